"""Zero-shot scoring speed: qdoctor vs lm-eval's HFLM, same machine, model, items, batch size.

    python bench/zeroshot_speed.py                               # SmolLM2-135M, 8 tasks x 48 items
    python bench/zeroshot_speed.py --tasks arc_easy,hellaswag --items 100 --rounds 3 --threads 1

Both sides score the same (context, continuation) requests of the same items (a seeded
subsample of each task) with the same model object: qdoctor through
``qdoctor.eval.zeroshot.score_items`` (tokenization included), lm-eval through
``HFLM.loglikelihood`` (its tokenization included). Rounds alternate which side runs first, so
load from other processes falls on both; each side's time is its median over rounds. Reported:
items/second of each and their ratio per task, and the ratio over all tasks (total lm-eval time
/ total qdoctor time, i.e. equal item counts per task). Wall time is what a user waits; process
CPU time is printed too because it is less disturbed by other processes on a shared machine.
Predictions are compared as a sanity check. Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="anything qdoctor.load accepts")
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,openbookqa,lambada_openai")
    ap.add_argument("--items", type=int, default=48, help="items per task (seeded subsample)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward, both sides (as lm-eval counts them)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import qdoctor
    from qdoctor.eval.zeroshot import PairEncoder, LoglikelihoodScorer, choose_indices, get_task, load_items, score_items
    from qdoctor.eval.zeroshot.agreement import lm_eval_score, make_hflm
    from qdoctor.eval.zeroshot.encoding import resolve_max_length

    model, tok = qdoctor.load(args.model, dtype=args.dtype)
    device = next(model.parameters()).device
    print(f"model {args.model} ({args.dtype}) on {device}, torch threads {torch.get_num_threads()}, "
          f"batch size {args.batch_size}, {args.items} items/task, {args.rounds} rounds", flush=True)
    encoder = PairEncoder(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    scorer = LoglikelihoodScorer(model, batch_size=args.batch_size, max_length=resolve_max_length(model, tok),
                                 pad_id=pad_id, progress=False)
    hflm = make_hflm(model, tok, batch_size=args.batch_size)

    rows, total = [], {"ours_wall": 0.0, "lm_wall": 0.0, "ours_cpu": 0.0, "lm_cpu": 0.0, "items": 0}
    for name in args.tasks.split(","):
        spec = get_task(name)
        _, items = load_items(spec)
        items = [items[i] for i in choose_indices(len(items), subsample=args.items, seed=args.seed)]
        score_items(spec, items[:2], encoder, scorer)  # warm-up (allocator, kernels)
        times = {"ours_wall": [], "lm_wall": [], "ours_cpu": [], "lm_cpu": []}
        for r in range(args.rounds):
            order = ("ours", "lm") if r % 2 == 0 else ("lm", "ours")
            for side in order:
                if side == "ours":
                    ours, wall, cpu = _timed(lambda: score_items(spec, items, encoder, scorer))
                else:
                    ref, wall, cpu = _timed(lambda: lm_eval_score(hflm, spec, items))
                times[f"{side}_wall"].append(wall)
                times[f"{side}_cpu"].append(cpu)
        med = {k: statistics.median(v) for k, v in times.items()}
        agree = sum((a.pred == b.pred) if a.label is not None else (a.is_greedy == b.is_greedy)
                    for a, b in zip(ours, ref)) / len(items)
        for k in med:
            total[k] += med[k]
        total["items"] += len(items)
        rows.append((name, len(items), len(items) / med["ours_wall"], len(items) / med["lm_wall"],
                     med["lm_wall"] / med["ours_wall"], med["lm_cpu"] / med["ours_cpu"], agree))
        print(f"  {name}: ours {med['ours_wall']:.1f}s, lm-eval {med['lm_wall']:.1f}s", flush=True)

    print("\n| task | items | qdoctor items/s | lm-eval items/s | ratio (wall) | ratio (CPU time) | same predictions |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, ours_ips, lm_ips, ratio, cpu_ratio, agree in rows:
        print(f"| {name} | {n} | {ours_ips:.2f} | {lm_ips:.2f} | {ratio:.2f}x | {cpu_ratio:.2f}x | {agree:.0%} |")
    print(f"| **all** | {total['items']} | {total['items'] / total['ours_wall']:.2f} | "
          f"{total['items'] / total['lm_wall']:.2f} | **{total['lm_wall'] / total['ours_wall']:.2f}x** | "
          f"{total['lm_cpu'] / total['ours_cpu']:.2f}x | |")
    print(f"\nspeed ratio qdoctor / lm-eval HFLM (wall, all tasks): {total['lm_wall'] / total['ours_wall']:.2f}x")


if __name__ == "__main__":
    main()
