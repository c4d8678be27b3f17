"""Options a sub-command would accept and ignore are refused with one line (exit 2) before any
model is loaded; ``--limit`` with ``--tasks`` is items per task, as lm-eval's ``--limit``."""

import json

import pytest

from qdoctor.cli import build_parser, main

NO_MODEL = "/nonexistent/never-loaded"  # every refusal below comes before the model is loaded


def refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("qdoctor: error")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "no such file" not in err  # refused before the model path was even looked at
    return lines[0]


# (argv after the sub-command, the options named in the refusal, a word of the reason)
CASES = [
    # eval, perplexity mode: the task options
    (["eval", "--task-limit", "5"], ["--task-limit"], "--tasks"),
    (["eval", "--subsample", "5"], ["--subsample"], "--tasks"),
    (["eval", "--task-seed", "7"], ["--task-seed"], "--tasks"),
    (["eval", "--task-data", "/tmp"], ["--task-data"], "--tasks"),
    # eval, task mode: the perplexity options
    (["eval", "--tasks", "piqa", "--seqlen", "512"], ["--seqlen"], "perplexity"),
    (["eval", "--tasks", "piqa", "--text", "wikitext2:test"], ["--text"], "perplexity"),
    (["eval", "--tasks", "piqa", "--stream"], ["--stream"], "in memory"),
    (["eval", "--tasks", "piqa", "--task-seed", "3"], ["--task-seed"], "--subsample"),
    (["eval", "--tasks", "piqa", "--limit", "5", "--task-limit", "6"], ["--limit", "--task-limit"], "disagree"),
    (["eval", "--tasks", "piqa", "--limit", "5", "--subsample", "6"], ["--limit", "--subsample"], "not both"),
    # eval: calibration options no plan uses (a dynamic scheme; a recipe's own calibration)
    (["eval", "--scheme", "w8a8-channel-token", "--calib-samples", "8"], ["--calib-samples"], "no scheme"),
    (["eval", "--tasks", "piqa", "--seed", "3"], ["--seed"], "no scheme"),
    # scan
    (["scan", "--sensitivity-windows", "3"], ["--sensitivity-windows"], "--sensitivity"),
    (["scan", "--sensitivity-scheme", "w8a8-channel-token"], ["--sensitivity-scheme"], "--sensitivity"),
    (["scan", "--sensitivity-seqlen", "256"], ["--sensitivity-seqlen"], "--sensitivity"),
    (["scan", "--sample-rows", "64"], ["--sample-rows"], "--for-fix"),
    # export
    (["export", "--scheme", "w8a8-channel-token", "--calib-seqlen", "64"], ["--calib-seqlen"], "no calibration"),
    (["export", "--scheme", "w8a8-channel-tensor-static", "--ppl-seqlen", "512"], ["--ppl-seqlen"],
     "--ppl-windows"),
    # plant
    (["plant", "--dims", "5,77", "--seed", "3"], ["--seed"], "count"),
    # fix (the task-metric options, refused before this issue; kept here with the others)
    (["fix", "--metric-items", "50"], ["--metric-items"], "task metric"),
    (["fix", "--no-polish"], ["--no-polish"], "free steps"),
    (["fix", "--no-polish", "--methods", "rotation"], ["--no-polish"], "free steps"),
]


@pytest.mark.parametrize("argv,options,why", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_ignored_option_is_refused(capsys, tmp_path, argv, options, why):
    extra = ["--out", str(tmp_path / "out")] if argv[0] in ("export", "plant") else []
    line = refused(capsys, [*argv, "--model", NO_MODEL, *extra])
    for opt in options:
        assert opt in line
    assert why in line


def test_default_value_written_out_still_counts_as_given(capsys):
    """``--seqlen 2048`` is the default value, yet the user wrote it: still refused with --tasks."""
    line = refused(capsys, ["eval", "--tasks", "piqa", "--seqlen", "2048", "--model", NO_MODEL])
    assert "--seqlen" in line


def test_export_recipe_refuses_calibration_options(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("qdoctor_recipe: 1\nscheme: {name: s, default: {weights: {dtype: int8, granularity: channel},"
                      " activations: {dtype: int8, granularity: tensor}}}\n")
    line = refused(capsys, ["export", "--recipe", str(recipe), "--calib-samples", "8", "--model", NO_MODEL,
                            "--out", str(tmp_path / "out")])
    assert "--calib-samples" in line and "recipe" in line


def test_flags_used_by_the_mode_are_accepted():
    """The audit's other side: the same options parse where the mode reads them (no refusal logic runs
    at parse time, so a refusal above is the check, not argparse)."""
    p = build_parser()
    assert p.parse_args(["eval", "--tasks", "piqa", "--limit", "50"]).limit == 50
    assert p.parse_args(["eval", "--tasks", "piqa", "--task-limit", "50"]).task_limit == 50
    assert p.parse_args(["scan", "--sensitivity", "layer", "--sensitivity-windows", "3"]).sensitivity_windows == 3


def test_limit_with_tasks_is_items_per_task(tiny_llama_dir, tmp_path):
    """lm-eval's convention: ``--tasks piqa,arc_easy --limit 2`` scores the first 2 items of each task."""
    out = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_llama_dir), "--tasks", "piqa,arc_easy", "--limit", "2",
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["task"] for r in rows} == {"piqa", "arc_easy"}
    assert {r["plan"] for r in rows} == {"full-precision", "w8a8-channel-token"}
    assert all(r["items"] == 2 for r in rows) and report["limit"] == 2


@pytest.mark.parametrize("flag", ["--limit", "--task-limit"])
def test_task_limit_is_an_alias(tiny_llama_dir, monkeypatch, flag):
    """Both spellings reach the scorer as the same per-task limit (the scorer itself is stubbed: the
    test above scores real items)."""
    import qdoctor.eval.zeroshot as zeroshot

    seen = []

    def fake_evaluate(model, tok, tasks, limit, subsample, seed, data_dir):
        seen.append((tuple(tasks), limit, subsample))
        return {}

    monkeypatch.setattr(zeroshot, "evaluate", fake_evaluate)
    assert main(["eval", "--model", str(tiny_llama_dir), "--tasks", "piqa", flag, "7"]) == 0
    assert seen and all(s == (("piqa",), 7, None) for s in seen)
