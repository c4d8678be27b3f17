import json

from qdoctor.cli import main

SMALL = ["--eval-windows", "1", "--eval-seqlen", "64", "--limit", "1", "--seqlen", "64", "--calib-samples", "4",
         "--calib-seqlen", "64", "--sample-rows", "32"]


def test_fix_writes_recipe_and_quantize_reapplies_it(tiny_llama_dir, tmp_path, capsys):
    plan, js = tmp_path / "plan.yaml", tmp_path / "fix.json"
    code = main(["fix", "--model", str(tiny_llama_dir), "--target", "w8a8-channel-static", "--budget", "50%",
                 *SMALL, "--recipe-out", str(plan), "--json", str(js)])
    assert code == 0
    report = json.loads(js.read_text())
    assert report["met"] is True and report["planned_ppl"] <= report["fp_ppl"] * 1.5
    v = report["verification"]
    assert v["split"] == "wikitext2:test" and v["windows"] == 1
    assert {"fp_ppl", "naive_ppl", "planned_ppl"} <= set(v)
    out = capsys.readouterr()
    assert "plans tried on held-out text" in out.out
    q = tmp_path / "q.json"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--recipe", str(plan), "--seqlen", "64", "--limit", "1",
                 "--json", str(q)]) == 0
    assert json.loads(q.read_text())["quantized_layers"] == 14


def test_fix_missed_budget_says_so_and_exits_3(tiny_llama_dir, tmp_path, capsys):
    js = tmp_path / "fix.json"
    code = main(["fix", "--model", str(tiny_llama_dir), "--target", "w8a8-tensor-static", "--budget", "0",
                 "--max-layers", "0%", *SMALL, "--json", str(js)])
    report = json.loads(js.read_text())
    if report["planned_ppl"] > report["fp_ppl"]:
        assert code == 3 and report["met"] is False
        assert "budget NOT met" in capsys.readouterr().err
    else:  # quantization happened to cost nothing on this tiny model
        assert code == 0


def test_fix_bad_arguments(tiny_llama_dir, capsys):
    assert main(["fix", "--model", str(tiny_llama_dir), "--budget", "lots"]) == 2
    assert "bad budget" in capsys.readouterr().err
    assert main(["fix", "--model", str(tiny_llama_dir), "--target", "w3a3"]) == 2


def test_fix_task_metric_cli(tiny_llama_dir, tmp_path, capsys):
    from .test_fix_metric import write_tasks

    data = tmp_path / "tasks"
    data.mkdir()
    write_tasks(data)
    plan, js = tmp_path / "plan.yaml", tmp_path / "fix.json"
    code = main(["fix", "--model", str(tiny_llama_dir), "--target", "w8a8-channel-static", "--metric",
                 "tasks:piqa,arc_easy", "--metric-items", "10", "--metric-seed", "3", "--task-data", str(data),
                 "--budget", "100", *SMALL, "--recipe-out", str(plan), "--json", str(js)])
    assert code == 0  # a drop of at most 100 points always meets the budget
    report = json.loads(js.read_text())
    m = report["metric"]
    assert m["name"] == "tasks" and m["score"] == "acc" and m["seed"] == 3 and m["items_per_task"] == 10
    assert set(m["tasks"]) == {"piqa", "arc_easy"} and report["budget"] == 100 and report["budget_unit"] == "points"
    assert report["met"] is True and report["plan"] == "naive" and "planned_ppl" not in report
    tv = report["task_values"]
    assert report["fp_value"] == (tv["fp"]["piqa"] + tv["fp"]["arc_easy"]) / 2
    assert report["planned_delta"] == 100 * (report["planned_value"] - report["fp_value"])
    assert report["trials"][0]["metric"] == "tasks" and report["trials"][0]["ppl"] is None
    assert {"fp_ppl", "naive_ppl", "planned_ppl"} <= set(report["verification"])  # WikiText-2 test, as before
    out = capsys.readouterr()
    assert "mean acc" in out.out and "plan-selection items" in out.out and "Δ vs FP" in out.out
    assert "another seed" in out.err
    from qdoctor.policy.recipe import load_recipe

    assert load_recipe(str(plan)).metrics["metric"]["name"] == "tasks"


def test_fix_metric_bad_arguments_fail_before_loading(tmp_path, capsys):
    base = ["fix", "--model", str(tmp_path / "no-such-model")]  # never loaded: each error comes first
    cases = [
        (["--metric", "accuracy"], "bad metric 'accuracy'"),
        (["--metric", "tasks:piqa,nope"], "unknown task 'nope'"),
        (["--metric", "tasks:"], "empty task name"),
        (["--metric", "tasks:piqa", "--metric-items", "0"], "--metric-items must be a positive integer"),
        (["--metric", "tasks:piqa", "--budget", "1%"], "accuracy points"),
        (["--metric", "tasks:piqa", "--budget=-1"], "≥ 0 points"),
        (["--metric", "tasks:piqa", "--budget", "lots"], "bad budget"),
        (["--metric-items", "50"], "only apply to a task metric"),
        (["--task-data", str(tmp_path)], "only apply to a task metric"),
        (["--metric", "tasks:piqa", "--task-data", str(tmp_path)], "no data file for task 'piqa'"),
    ]
    for extra, why in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("qdoctor: error: ") and "\n" not in err and why in err, (extra, err)
