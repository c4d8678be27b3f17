"""Zero-shot evaluation: data, prompts (against lm-eval's own task configs), tokenization
(against HFLM), scoring (against a one-sequence-at-a-time loop and against HFLM), metrics."""

import gzip
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from qdoctor.errors import QDoctorError
from qdoctor.eval.zeroshot import (DEFAULT_TASKS, TASKS, LoglikelihoodScorer, PairEncoder, TaskDataError,
                                   choose_indices, evaluate, format_table, get_task, load_items,
                                   score_items)
from qdoctor.eval.zeroshot import metrics as M
from qdoctor.eval.zeroshot.data import SHIPPED_DIR


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama"), tiny_tokenizer()


# --- shipped data and prompts -------------------------------------------------------------

SHIPPED_COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
                  "boolq": 3270, "openbookqa": 500, "lambada_openai": 5153}


def test_shipped_files_load_with_upstream_counts_and_stay_small():
    assert set(DEFAULT_TASKS) == set(TASKS) == set(SHIPPED_COUNTS)
    total = 0
    for task, n in SHIPPED_COUNTS.items():
        path, items = load_items(task)
        assert len(items) == n and path.parent == SHIPPED_DIR
        total += path.stat().st_size
    assert total < 6_000_000
    assert (SHIPPED_DIR / "LICENSES.md").is_file()


def test_prompts_of_known_items():
    _, piqa = load_items("piqa")
    assert piqa[0].contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa[0].continuations[0].startswith(" Provide the guinea pig") and piqa[0].label == 0
    _, hs = load_items("hellaswag")  # ctx_b capitalized as lm-eval does
    assert hs[0].contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs[0].continuations[3] == " starts pulling up roofing on a roof." and hs[0].label == 3
    _, wg = load_items("winogrande")
    assert wg[0].contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria")
    assert wg[0].continuations == (" always got the easier cases.",) * 2 and wg[0].label == 1
    _, bq = load_items("boolq")
    assert bq[0].contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq[0].continuations == (" no", " yes")
    _, lb = load_items("lambada_openai")
    assert lb[0].continuations == (" signs",) and not lb[0].contexts[0].endswith(" ")


@pytest.mark.parametrize("task", list(SHIPPED_COUNTS))
def test_requests_equal_lm_eval_task_config(task, tmp_path):
    """Second derivation of every prompt: lm-eval's own ConfigurableTask, built from its installed
    YAML with only the data source pointed at our file, must produce the same (context,
    continuation) requests and the same gold index for every item."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")
    from qdoctor.eval.zeroshot.agreement import build_lm_eval_task

    spec = get_task(task)
    path, items = load_items(spec)
    lm_task = build_lm_eval_task(spec, path, cache_dir=str(tmp_path))
    docs = list(lm_task.eval_docs)
    assert len(docs) == len(items)
    for i, (doc, item) in enumerate(zip(docs, items)):
        requests = lm_task.construct_requests(doc=doc, ctx=lm_task.fewshot_context(doc, 0), metadata=(task, i, 1))
        requests = requests if isinstance(requests, list) else [requests]
        assert [r.arguments for r in requests] == list(zip(item.contexts, item.continuations)), i
        if spec.kind == "multiple_choice":
            gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
            assert gold == item.label, i


def test_raw_hugging_face_layouts_match_stored_forms(tmp_path):
    hs_raw = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
              "endings": ["is using wrap [title] to wrap.", "b", "c", "d"], "label": "3"}
    wg_raw = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
              "option1": "Sarah", "option2": "Maria", "answer": "2"}
    for task, rec in (("hellaswag", hs_raw), ("winogrande", wg_raw)):
        (tmp_path / f"{task}.jsonl").write_text(json.dumps(rec) + "\n")
    _, (hs,) = load_items("hellaswag", data_dir=tmp_path)
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.continuations[0] == " is using wrap. to wrap." and hs.label == 3
    _, (wg,) = load_items("winogrande", data_dir=tmp_path)
    _, stored = load_items("winogrande")
    assert (wg.contexts, wg.continuations, wg.label) == (stored[0].contexts, stored[0].continuations, 1)


def test_hellaswag_ctx_b_capital_is_restored_only_on_trailing_fragments():
    from qdoctor.eval.zeroshot.convert import restore_ctx_b_capital

    assert restore_ctx_b_capital("Roof shingle removal: A man is sitting on a roof. he") == (
        "Roof shingle removal: A man is sitting on a roof. He", True)
    assert restore_ctx_b_capital("Hand car wash: . a colorful intro") == ("Hand car wash: . A colorful intro", True)
    assert restore_ctx_b_capital("Family Life: How to do it. Ask first.") == ("Family Life: How to do it. Ask first.", False)
    assert restore_ctx_b_capital("Zumba: The team dances. They") == ("Zumba: The team dances. They", False)


SHARED_DATA = Path(os.environ.get("QDOCTOR_SHARED_DATA", "/work/shared/data"))


@pytest.mark.skipif(not (SHARED_DATA / "SOURCES.md").is_file(), reason="upstream data folder not present")
def test_shipped_files_rebuild_byte_identically_from_upstream(tmp_path):
    from qdoctor.eval.zeroshot.convert import main

    main([str(SHARED_DATA), str(tmp_path)])
    for shipped in SHIPPED_DIR.glob("*.jsonl.gz"):
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


# --- data errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2', "not valid JSON"),
    ('["goal"]', "expected a JSON object"),
    ('{"goal": "g", "sol1": "a", "label": 0}', "missing field 'sol2'"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "field 'label' must be an integer in 0..1"),
    ('{"goal": "g", "sol1": "", "sol2": "b", "label": 0}', "sol1/sol2[0] is empty"),
    ('{"goal": 3, "sol1": "a", "sol2": "b", "label": 0}', "field 'goal' must be a string"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    good = '{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}'
    path = tmp_path / "piqa.jsonl"
    path.write_text(good + "\n\n" + good + "\n" + line + "\n")
    with pytest.raises(TaskDataError) as err:
        load_items("piqa", data_dir=tmp_path)
    text = str(err.value)
    assert text.startswith(f"{path}:4: ") and message in text and "\n" not in text
    assert err.value.line == 4 and isinstance(err.value, QDoctorError)


def test_gzip_user_file_missing_file_and_bad_answer_key(tmp_path):
    rec = {"id": "x", "question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}
    with gzip.open(tmp_path / "arc_easy.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(rec) + "\n")
    with pytest.raises(TaskDataError, match=r"arc_easy\.jsonl\.gz:1: arc_easy: answerKey 'C' is not one of"):
        load_items("arc_easy", data_dir=tmp_path)
    with pytest.raises(TaskDataError, match="no data file for task 'boolq'"):
        load_items("boolq", data_dir=tmp_path)
    with pytest.raises(QDoctorError, match="unknown task 'mmlu'"):
        get_task("mmlu")


def test_choose_indices():
    assert choose_indices(10) == list(range(10))
    assert choose_indices(10, limit=3) == [0, 1, 2] and choose_indices(2, limit=5) == [0, 1]
    a = choose_indices(1000, subsample=50, seed=7)
    assert a == choose_indices(1000, subsample=50, seed=7) == sorted(set(a)) and len(a) == 50
    assert a != choose_indices(1000, subsample=50, seed=8)
    with pytest.raises(QDoctorError, match="not both"):
        choose_indices(10, limit=1, subsample=1)
    with pytest.raises(QDoctorError, match="positive integer"):
        choose_indices(10, limit=0)


# --- metrics --------------------------------------------------------------------------------

def test_stderr_is_sample_std_over_sqrt_n():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert M.mean_stderr(xs) == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)))
    assert math.isnan(M.mean_stderr([1.0]))


def test_acc_norm_divides_by_characters_and_acc_bytes_by_bytes():
    # Choice 1 has more characters, choice 0 more bytes ("é" is 2 bytes).
    lls, choices = [-10.0, -10.5], ["ééé", "abcd"]
    assert M.argmax(lls) == 0
    assert M.argmax(M.normalized(lls, [len(c) for c in choices])) == 1  # -3.33 vs -2.625
    assert M.argmax(M.normalized(lls, [len(c.encode()) for c in choices])) == 0  # -1.67 vs -2.625
    assert M.argmax([-1.0, -1.0, -2.0]) == 0  # ties: first, as numpy.argmax


# --- tokenization = HFLM --------------------------------------------------------------------

PAIRS = [("Question: why?\nAnswer:", " because"), ("trailing space ", "word"), ("two  ", " spaces"),
         ("", " empty context"), ("<bos>already has bos", " yes"), ("a", "b")]


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_encode_pair_equals_hflm(llama, add_bos_token):
    pytest.importorskip("lm_eval")
    from qdoctor.eval.zeroshot.agreement import make_hflm

    model, tok = llama
    hflm = make_hflm(model, tok, batch_size=1, add_bos_token=add_bos_token)
    enc = PairEncoder(tok, add_bos_token=add_bos_token)
    for ctx, cont in PAIRS:
        if ctx == "":
            cont_enc = hflm.tok_encode(cont, add_special_tokens=False)
            expected = ([hflm.prefix_token_id], cont_enc)  # TemplateLM.loglikelihood's empty-context rule
        else:
            expected = hflm._encode_pair(ctx, cont)
        assert enc.encode_pair(ctx, cont) == expected, (ctx, cont)


def test_force_bos_prepends_once(llama):
    _, tok = llama
    plain, forced = PairEncoder(tok), PairEncoder(tok, force_bos=True)
    ctx, cont = plain.encode_pair("Question: x", " y")
    assert forced.encode_pair("Question: x", " y") == ([tok.bos_token_id] + ctx, cont)
    assert forced.encode_pair("<bos>Question: x", " y")[0].count(tok.bos_token_id) == 1


# --- scoring --------------------------------------------------------------------------------

def _reference(model, pairs, max_length=512):
    """One unpadded sequence at a time (cut from the left to max_length + 1 tokens, as lm-eval),
    full logits, float64 log-softmax."""
    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            seq = torch.tensor([(ctx + cont)[-(max_length + 1):]])
            logp = torch.log_softmax(model(seq[:, :-1]).logits[0].double(), -1)
            rows = logp[seq.shape[1] - 1 - len(cont):]
            target = torch.tensor(cont)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


def _some_items(tok, tasks=("arc_easy", "hellaswag", "winogrande", "boolq", "lambada_openai"), n=3):
    enc, groups = PairEncoder(tok), []
    for task in tasks:
        _, items = load_items(task)
        for it in items[:n]:
            groups.append([enc.encode_pair(c, x) for c, x in zip(it.contexts, it.continuations)])
    return groups


_REFERENCE_CACHE = {}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gemma2"])  # gemma2: eager attention
@pytest.mark.parametrize("batch_size, share_prefix", [(1, True), (5, True), (64, True), (7, False)])
def test_scorer_equals_one_sequence_at_a_time(family, batch_size, share_prefix):
    model, tok = tiny_model(family), tiny_tokenizer()
    groups = _some_items(tok, n=2)
    scorer = LoglikelihoodScorer(model, batch_size=batch_size, max_length=512, share_prefix=share_prefix,
                                 progress=False)
    got = scorer.score(groups)
    if family not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[family] = [_reference(model, g) for g in groups]
    want = _REFERENCE_CACHE[family]
    for g_got, g_want in zip(got, want):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(g_got, g_want):
            assert ll == pytest.approx(ll_ref, abs=2e-4, rel=1e-5)
            assert greedy == greedy_ref


def test_item_is_one_tree_row_with_the_prefix_once(llama):
    model, tok = llama
    scorer = LoglikelihoodScorer(model, batch_size=16, max_length=512, progress=False)
    ctx = PairEncoder(tok).encode_pair("Question: which one?\nAnswer:", " a")[0]
    n = len(ctx)
    (row,) = scorer._trees(0, [(ctx, [5, 6]), (ctx, [7]), (ctx, [8, 9, 10])])
    # inputs: ctx+[5], ctx, ctx+[8, 9] → prefix = ctx, branches [5] and [8, 9] (the 2nd is empty)
    assert row.tokens == ctx + [5] + [8, 9]
    assert row.positions == list(range(n)) + [n] + [n, n + 1]
    assert row.branches == [-1] * n + [0] + [2, 2]
    assert row.scored == [[n - 1, n], [n - 1], [n - 1, n + 1, n + 2]]
    unshared = LoglikelihoodScorer(model, share_prefix=False, progress=False)._trees(0, [(ctx, [5, 6]), (ctx, [7])])
    assert [r.tokens for r in unshared] == [ctx + [5], ctx] and not unshared[0].packed


def _assert_equals_reference(model, groups, got):
    for g, res in zip(groups, got):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(res, _reference(model, g)):
            assert ll == pytest.approx(ll_ref, abs=2e-4) and greedy == greedy_ref


def test_flat_layout_is_one_unpadded_row_per_batch(llama):
    model, tok = llama
    scorer = LoglikelihoodScorer(model, batch_size=16, max_length=512, progress=False)
    assert scorer.flat  # sdpa llama: items concatenated, attention item by item
    groups = _some_items(tok, tasks=("arc_easy", "winogrande", "piqa", "boolq"), n=4)
    trees = [t for i, g in enumerate(groups) for t in scorer._trees(i, g)]
    batches = scorer._batches(trees)
    assert all(len(rows) == 1 for rows in batches)  # one row, no padding
    assert all(sum(t.sequences for t in rows[0]) <= 16 for rows in batches)
    # first-fit decreasing: as few forwards as lm-eval's full batches of 16 sequences allow
    assert len(batches) == -(-sum(t.sequences for t in trees) // 16)
    assert sorted(t.item for rows in batches for t in rows[0]) == list(range(len(groups)))
    kwargs, segments = scorer._inputs(batches[0])
    assert kwargs["input_ids"].shape == (1, sum(len(t.tokens) for t in batches[0][0]))
    assert "attention_mask" not in kwargs and segments.groups[0].start == 0
    _assert_equals_reference(model, groups, scorer.score(groups))
    assert model.config._attn_implementation == "sdpa"  # restored after every forward


@pytest.mark.parametrize("alone_from, budget", [(0, 1 << 22), (10_000, 1 << 22), (10_000, 1), (40, 5_000)])
def test_flat_attention_groups(llama, alone_from, budget):
    """Items attended alone (sliced, causal or tree mask) or several in one padded call: same scores."""
    model, tok = llama
    scorer = LoglikelihoodScorer(model, batch_size=64, max_length=512, progress=False)
    scorer.alone_from, scorer.attention_budget = alone_from, budget
    groups = _some_items(tok, tasks=("arc_easy", "hellaswag", "boolq", "lambada_openai"), n=3)
    trees = sorted((t for i, g in enumerate(groups) for t in scorer._trees(i, g)), key=lambda t: -len(t.tokens))
    runs = scorer._attention_groups(trees)
    assert [t for run in runs for t in run] == trees
    for run in runs:
        longest = max(len(t.tokens) for t in run)
        assert len(run) == 1 or (longest <= alone_from and len(run) * longest ** 2 <= budget)
    _assert_equals_reference(model, groups, scorer.score(groups))


def test_row_layout_packs_short_items_into_rows_of_the_longest(llama):
    """The layout of models without the flat one (eager attention, other model code)."""
    model, tok = llama
    scorer = LoglikelihoodScorer(model, batch_size=64, max_length=512, progress=False)
    scorer.flat = False
    groups = _some_items(tok, tasks=("arc_easy", "winogrande", "piqa"), n=4)
    trees = [t for i, g in enumerate(groups) for t in scorer._trees(i, g)]
    (rows,) = scorer._batches(trees)
    width = max(len(t.tokens) for t in trees)
    assert len(rows) < len(trees)  # several items share a row
    assert all(sum(len(t.tokens) for t in row) <= width for row in rows)
    assert sorted(t.item for row in rows for t in row) == list(range(len(groups)))
    _assert_equals_reference(model, groups, scorer.score(groups))  # packed rows: each request exact


def test_flat_layout_falls_back_to_rows_when_layers_bypass_it(llama):
    model, tok = llama
    scorer = LoglikelihoodScorer(model, batch_size=8, max_length=512, progress=False)
    scorer.n_layers += 1  # as if one layer had not run the segment attention
    groups = _some_items(tok, tasks=("arc_easy", "boolq"), n=2)
    with pytest.warns(UserWarning, match="flat layout unsupported"):
        got = scorer.score(groups)
    assert not scorer.flat and model.config._attn_implementation == "sdpa"
    _assert_equals_reference(model, groups, got)


def test_sliding_window_mixes_flat_items_and_unpacked_requests():
    """Requests longer than the window run as padded rows through the model's own masks; the
    others as flat trees. Both in one call, each request equal to its own sequence."""
    model, tok = tiny_model("mistral"), tiny_tokenizer()
    model.config.sliding_window = 70  # items of 40..84 tokens (and two BoolQ ones over 512)
    scorer = LoglikelihoodScorer(model, batch_size=6, max_length=512, progress=False)
    assert scorer.flat and scorer.window == 70
    groups = _some_items(tok, tasks=("arc_easy", "winogrande", "boolq", "hellaswag"), n=2)
    trees = [t for i, g in enumerate(groups) for t in scorer._trees(i, g)]
    assert any(t.packed for t in trees) and any(not t.packed for t in trees)
    batches = scorer._batches(trees)
    assert sorted(id(t) for rows in batches for row in rows for t in row) == sorted(id(t) for t in trees)
    assert all(len({t.packed for row in rows for t in row}) == 1 for rows in batches)
    _assert_equals_reference(model, groups, scorer.score(groups))


def test_batch_counts_distinct_sequences_as_lm_eval(llama):
    """HFLM runs requests with the same context + continuation[:-1] once and counts them once."""
    model, _ = llama
    scorer = LoglikelihoodScorer(model, batch_size=2, max_length=512, progress=False)
    boolq_like = [[([3, 4, 5, 6], [7]), ([3, 4, 5, 6], [8])] for _ in range(4)]
    trees = [t for i, g in enumerate(boolq_like) for t in scorer._trees(i, g)]
    assert [t.sequences for t in trees] == [1] * 4 and trees[0].tokens == [3, 4, 5, 6]
    assert [len(rows[0]) for rows in scorer._batches(trees)] == [2, 2]
    (multi,) = scorer._trees(0, [([3, 4], [5, 6]), ([3, 4], [5, 7]), ([3, 4], [9])])
    assert multi.sequences == 2  # inputs [3, 4, 5], [3, 4, 5], [3, 4]


def test_token_scores_equal_log_softmax_and_first_argmax():
    """Shared rows, targets tied at the maximum (argmax = first maximum), in-place logsumexp."""
    from qdoctor.eval.zeroshot.scorer import _token_scores

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        logits = (torch.randint(0, 4, (6, 10), generator=gen).float() if trial % 2
                  else torch.randn(6, 10, generator=gen))
        rows = torch.randint(0, 6, (15,), generator=gen)
        targets = torch.randint(0, 10, (15,), generator=gen)
        targets[::3] = logits[rows[::3]].argmax(-1)
        lp, greedy = _token_scores(logits.clone(), rows, targets)
        assert torch.equal(greedy, logits[rows].argmax(-1) == targets)
        want = torch.log_softmax(logits.double(), -1)[rows, targets]
        assert torch.allclose(lp, want, atol=1e-6)


def test_left_truncation_to_max_length(llama):
    model, _ = llama
    ctx, cont = list(range(3, 40)), [41, 42, 43]
    scorer = LoglikelihoodScorer(model, batch_size=4, max_length=16, progress=False)
    ((ll, _),) = scorer.score([[(ctx, cont)]])[0]
    ((ll_ref, _),) = _reference(model, [(ctx, cont)], max_length=16)
    assert ll == pytest.approx(ll_ref, abs=2e-4)
    with pytest.raises(QDoctorError, match="exceeds max_length"):
        LoglikelihoodScorer(model, max_length=2, progress=False).score([[(ctx, cont)]])


def test_scores_equal_hflm_loglikelihood(llama):
    """Second derivation: lm-eval's HFLM on the same strings (its tokenization and batching)."""
    pytest.importorskip("lm_eval")
    from qdoctor.eval.zeroshot.agreement import lm_eval_score, make_hflm

    model, tok = llama
    hflm = make_hflm(model, tok, batch_size=8)
    enc = PairEncoder(tok)
    scorer = LoglikelihoodScorer(model, batch_size=8, max_length=512, progress=False)
    for task in ("arc_challenge", "winogrande", "lambada_openai", "openbookqa"):
        spec = get_task(task)
        _, items = load_items(spec)
        ours, ref = score_items(spec, items[:6], enc, scorer), lm_eval_score(hflm, spec, items[:6])
        for a, b in zip(ours, ref):
            assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=2e-4)
            assert (a.pred, a.pred_norm, a.is_greedy) == (b.pred, b.pred_norm, b.is_greedy)


# --- evaluate ---------------------------------------------------------------------------------

def test_evaluate_results_and_item_predictions(llama):
    model, tok = llama
    model.train()
    res = evaluate(model, tok, tasks=["piqa", "winogrande", "lambada_openai"], limit={"piqa": 5, "winogrande": 4},
                   subsample={"lambada_openai": 3}, seed=3, batch_size=4, progress=False)
    assert model.training  # mode restored
    piqa, wino, lamb = res["piqa"], res["winogrande"], res["lambada_openai"]
    assert (piqa.n_items, piqa.n_total, piqa.n_requests) == (5, 1838, 10)
    assert [it.index for it in piqa.items] == [0, 1, 2, 3, 4]
    assert set(piqa.metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes", "acc_bytes_stderr"}
    assert piqa.acc == sum(it.pred == it.label for it in piqa.items) / 5
    assert piqa.metrics["acc_stderr"] == pytest.approx(M.mean_stderr([float(it.correct) for it in piqa.items]))
    assert set(wino.metrics) == {"acc", "acc_stderr"} and wino.n_items == 4
    assert [it.index for it in lamb.items] == choose_indices(5153, subsample=3, seed=3)
    lls = [it.loglikelihoods[0] for it in lamb.items]
    assert lamb.perplexity == pytest.approx(math.exp(-sum(lls) / 3))
    assert lamb.items[0].pred is None and lamb.items[0].label is None
    assert "| piqa | 5/1838 |" in format_table(res)
    d = piqa.to_dict()
    assert "items" not in d and piqa.to_dict(include_items=True)["items"][0]["index"] == 0
    json.dumps(piqa.to_dict(include_items=True))


def test_evaluate_with_user_data_dir(llama, tmp_path):
    model, tok = llama
    rows = [{"question": "is it?", "passage": "It is.", "label": 1}, {"question": "no?", "passage": "No.", "label": 0}]
    (tmp_path / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(model, tok, tasks="boolq", data_dir=tmp_path, progress=False)
    assert res["boolq"].n_total == 2 and res["boolq"].data_file.endswith("boolq.jsonl")
    with pytest.raises(QDoctorError, match="listed twice"):
        evaluate(model, tok, tasks=["boolq", "boolq"], data_dir=tmp_path, progress=False)
