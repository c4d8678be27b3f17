"""Build the shipped task files (src/qdoctor/data/tasks/) from the upstream files.

    python -m qdoctor.eval.zeroshot.convert /work/shared/data src/qdoctor/data/tasks

Input layout and provenance: shared/data/SOURCES.md; per-file notes: data/tasks/LICENSES.md.
Output: one JSONL record per item in the task schema (``tasks.py``), in upstream order;
files are gzip'd (level 9, zeroed timestamp), so rebuilding gives identical bytes.

HellaSwag: the only copy available is llama.cpp's text format (klosax/hellaswag_text_data),
whose context is ``activity_label + ": " + ctx`` with ``ctx = ctx_a + " " + ctx_b`` — lm-eval
instead capitalizes ``ctx_b``. ``ctx_b`` is the unfinished noun phrase after the last full
sentence (ActivityNet items), so a trailing fragment that starts lower-case and has no
sentence-final punctuation is capitalized (``str.capitalize``, as lm-eval). Then lm-eval's
``preprocess`` runs on the query and the endings.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import re
from pathlib import Path

from qdoctor.eval.zeroshot.tasks import hellaswag_preprocess

GZIP_ABOVE = 0  # bytes: every shipped file is gzip'd (6.5 MB → 4.8 MB)

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_FINAL_PUNCT = re.compile(r"[.!?][\"')\]]*$")


def restore_ctx_b_capital(query: str) -> tuple[str, bool]:
    """Capitalize the trailing ctx_b fragment of a klosax HellaSwag context line."""
    label, sep, ctx = query.partition(": ")
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    fragment = ctx[start:]
    if fragment[:1].islower() and not _FINAL_PUNCT.search(fragment):
        return label + sep + ctx[:start] + fragment.capitalize(), True
    return query, False


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(path) if line.strip()]


def _ai2(record: dict) -> dict:
    """AI2 jsonl (question.stem, question.choices) → Hugging Face layout."""
    choices = record["question"]["choices"]
    return {"id": record["id"], "question": record["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": record["answerKey"]}


def build_piqa(src: Path) -> list[dict]:
    labels = _lines(src / "piqa" / "valid-labels.lst")
    rows = _jsonl(src / "piqa" / "valid.jsonl")
    assert len(labels) == len(rows)
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels)]


def build_arc(src: Path, which: str) -> list[dict]:
    return [_ai2(r) for r in _jsonl(src / "arc" / f"ARC-{which}-Test.jsonl")]


def build_hellaswag(src: Path) -> tuple[list[dict], int]:
    lines = _lines(src / "hellaswag" / "hellaswag_val_full.txt")
    assert len(lines) % 6 == 0
    out, restored = [], 0
    for i in range(0, len(lines), 6):
        query, fixed = restore_ctx_b_capital(lines[i])
        restored += fixed
        out.append({"query": hellaswag_preprocess(query),
                    "choices": [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]],
                    "label": int(lines[i + 1])})
    return out, restored


def build_winogrande(src: Path) -> list[dict]:
    rows = _jsonl(src / "winogrande" / "winogrande_dev_mosaic.jsonl")
    labels = _lines(src / "winogrande" / "dev-labels.lst")
    assert len(rows) == len(labels) and all(r["gold"] + 1 == int(y) for r, y in zip(rows, labels))
    return [{"contexts": r["context_options"], "continuation": r["continuation"], "label": r["gold"]} for r in rows]


def build_boolq(src: Path) -> list[dict]:
    out = []
    for r in _jsonl(src / "boolq" / "val.jsonl"):
        label = r["label"]
        label = label if isinstance(label, bool) else {"true": True, "false": False}[str(label).lower()]
        out.append({"idx": r["idx"], "question": r["question"], "passage": r["passage"], "label": int(label)})
    return out


def build_openbookqa(src: Path) -> list[dict]:
    rows = [_ai2(r) for r in _jsonl(src / "openbookqa" / "test.jsonl")]
    for r in rows:
        r["question_stem"] = r.pop("question")
    # Cross-check against the official TSV (same 500 items, same gold letters).
    with open(src / "openbookqa" / "test.tsv", encoding="utf-8", newline="") as fh:
        tsv = list(csv.reader(fh, delimiter="\t"))[1:]
    assert [(t[0], t[-1]) for t in tsv] == [(r["id"], r["answerKey"]) for r in rows]
    return [{"id": r["id"], "question_stem": r["question_stem"], "choices": r["choices"], "answerKey": r["answerKey"]}
            for r in rows]


def build_lambada(src: Path) -> list[dict]:
    return [{"text": r["text"]} for r in _jsonl(src / "lambada_openai" / "lambada_test.jsonl")]


def write_task(records: list[dict], out_dir: Path, task: str) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    for stale in (out_dir / f"{task}.jsonl", out_dir / f"{task}.jsonl.gz"):
        stale.unlink(missing_ok=True)
    if len(data) > GZIP_ABOVE:
        path = out_dir / f"{task}.jsonl.gz"
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
            gz.write(data)
        path.write_bytes(buf.getvalue())
    else:
        path = out_dir / f"{task}.jsonl"
        path.write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="folder laid out as shared/data (SOURCES.md)")
    ap.add_argument("out", type=Path, help="output folder, e.g. src/qdoctor/data/tasks")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hellaswag, restored = build_hellaswag(args.src)
    builds = {
        "piqa": build_piqa(args.src), "arc_easy": build_arc(args.src, "Easy"),
        "arc_challenge": build_arc(args.src, "Challenge"), "hellaswag": hellaswag,
        "winogrande": build_winogrande(args.src), "boolq": build_boolq(args.src),
        "openbookqa": build_openbookqa(args.src), "lambada_openai": build_lambada(args.src),
    }
    for task, records in builds.items():
        path = write_task(records, args.out, task)
        print(f"{task:15s} {len(records):6d} records  {path.stat().st_size:9d} bytes  {path.name}")
    print(f"hellaswag: ctx_b capitalized in {restored} of {len(hellaswag)} contexts")


if __name__ == "__main__":
    main()
