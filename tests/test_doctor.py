"""``qdoctor doctor``: one run on a tiny model with planted weight outliers (module fixture), checked
against second derivations; atomicity on failure and Ctrl-C; the report in a real headless
Chromium (Playwright driving Debian's chromium): every section laid out with a non-zero size,
every plot a decoded non-empty image, the screenshot not blank.

CI installs the browser when it is missing (.ci/run: Debian's chromium) and runs the browser test;
where no Chromium or Playwright can be had it is skipped, saying which is missing."""

from __future__ import annotations

import io
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from qdoctor.cli import main
from qdoctor.report.doctor_html import SECTIONS

# Small enough for seconds on 2 cores; windows fit the tiny model's 512-token context.
FAST = ["--calib-samples", "8", "--calib-seqlen", "128", "--eval-windows", "1", "--eval-seqlen", "256",
        "--test-windows", "1", "--seqlen", "256", "--tasks", "piqa", "--task-items", "12", "--quiet"]


def planted_tiny(path: Path) -> list[str]:
    """A tiny random Llama with weight outliers planted (function-preserving) in block 0, saved."""
    from helpers import tiny_model, tiny_tokenizer

    from qdoctor.testing import plant_weight_outliers, save_model

    model = tiny_model("llama")
    res = plant_weight_outliers(model, blocks=[0], dims=2, magnitude=300.0, seed=0)
    save_model(model, tiny_tokenizer(), str(path), metadata={"layers": res.layers})
    return res.layers


@pytest.fixture(scope="module")
def doctored(tmp_path_factory):
    """(model dir, planted layers, out dir, exit code, calls of the calibration functions)."""
    import qdoctor.calib.collect as collect
    import qdoctor.doctor as doctor
    import qdoctor.policy.recipe as recipe_mod
    import qdoctor.policy.search as search_mod

    root = tmp_path_factory.mktemp("doctor")
    planted = planted_tiny(root / "model")
    calls = {"scan": 0}
    real_scan = doctor.scan_with_stats

    def counted_scan(*a, **k):
        calls["scan"] += 1
        return real_scan(*a, **k)

    def no_second_pass(*a, **k):
        raise AssertionError("a second calibration pass")

    mp = pytest.MonkeyPatch()
    mp.setattr(doctor, "scan_with_stats", counted_scan)
    mp.setattr(search_mod, "scan_with_stats", no_second_pass)  # the Searcher must take the doctor's scan
    mp.setattr(recipe_mod, "calibrate", no_second_pass)  # every plan, the zero-shot and export use its stats
    mp.setattr(collect, "calibrate", no_second_pass)
    try:
        rc = main(["doctor", str(root / "model"), "--out", str(root / "out"), *FAST])
    finally:
        mp.undo()
    return root / "model", planted, root / "out", rc, calls


def test_doctor_writes_the_folder_on_one_calibration_pass(doctored):
    model_dir, planted, out, rc, calls = doctored
    assert rc in (0, 3)  # 3: budget missed (still written)
    assert calls["scan"] == 1
    for name in ("report.html", "doctor.json", "scan.json", "scan.html", "recipe.yaml", "checkpoint/config.json",
                 "checkpoint/model.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".out.")]
    assert leftovers == []
    result = json.loads((out / "doctor.json").read_text())
    assert result["schema"] == "qdoctor.doctor/1"
    assert (rc == 0) == result["fix"]["met"]
    # the diagnosis names the planted layers as weight outliers
    scan = json.loads((out / "scan.json").read_text())
    weight = set(scan["summary"]["weight_outlier_layers"])
    assert set(planted) <= weight
    assert set(planted) <= set(result["diagnosis"]["flagged"])
    html = (out / "report.html").read_text()
    for name in planted:
        assert name in html


def test_doctor_numbers_match_a_second_derivation(doctored):
    """The plan's test perplexity re-derived from the written recipe alone (fresh calibration from
    the recipe's own settings, a fresh model load) and the FP perplexity from qdoctor.perplexity."""
    import qdoctor
    from qdoctor.calib.text import text_source
    from qdoctor.eval.perplexity import token_windows
    from qdoctor.models.registry import bos_token_id
    from qdoctor.policy.recipe import load_recipe

    model_dir, _, out, _, _ = doctored
    v = json.loads((out / "doctor.json").read_text())["verification"]
    model, tok = qdoctor.load(str(model_dir), dtype="fp32", device="cpu")
    windows = token_windows(tok, text_source("wikitext2:test"), v["seqlen"], bos_token_id(model, tok))[: v["windows"]]
    fp = qdoctor.perplexity(model, tok, windows=windows).ppl
    assert fp == pytest.approx(v["fp_ppl"], rel=1e-5)
    planned = load_recipe(str(out / "recipe.yaml")).perplexity(model, tok, windows)[0].ppl
    assert planned == pytest.approx(v["planned_ppl"], rel=1e-4)
    assert v["planned_delta_pct"] == pytest.approx(100 * (planned / fp - 1), rel=1e-3, abs=1e-3)


def test_checkpoint_loads_in_transformers_and_matches_the_simulation(doctored):
    """The exported checkpoint, loaded by transformers, gives the logits of the plan applied by
    qdoctor up to the conventions tests/export/test_checkpoint.py pins down exactly."""
    from transformers import AutoModelForCausalLM

    import qdoctor
    from qdoctor.policy.recipe import load_recipe

    model_dir, _, out, _, _ = doctored
    result = json.loads((out / "doctor.json").read_text())
    tf = next(r for r in result["runtimes"] if r["runtime"] == "transformers")
    assert tf["serves"] is True and tf["sample"].startswith("The capital of France is")
    loaded = AutoModelForCausalLM.from_pretrained(str(out / "checkpoint")).eval()
    model, tok = qdoctor.load(str(model_dir), dtype="fp32", device="cpu")
    ids = torch.tensor([[0, 5, 17, 99, 200, 301, 42, 7]])
    recipe = load_recipe(str(out / "recipe.yaml"))
    with torch.no_grad(), recipe.applied(model, tok):
        ours = model(ids).logits
    with torch.no_grad():
        theirs = loaded(ids).logits
    assert (theirs - ours).abs().max().item() < 0.05 * theirs.abs().max().item()


def test_paired_task_stderr_second_derivation():
    """delta_stderr = stdev(d) / √n of the per-item differences (statistics module)."""
    from qdoctor.doctor import compare_task
    from qdoctor.eval.zeroshot.evaluate import ItemResult, TaskResult

    fp_ok = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    q_ok = [1, 1, 0, 1, 0, 0, 1, 0, 0, 1]

    def run(ok):
        items = [ItemResult(i, 0, [0.0, -1.0], [False, False], pred=0 if c else 1) for i, c in enumerate(ok)]
        acc = sum(ok) / len(ok)
        se = statistics.stdev(ok) / math.sqrt(len(ok))
        return TaskResult("piqa", {"acc": acc, "acc_stderr": se}, len(ok), 100, 2 * len(ok), 0.0, "x", items)

    c = compare_task("piqa", run(fp_ok), run(q_ok))
    d = [q - f for f, q in zip(fp_ok, q_ok)]
    assert c.delta == pytest.approx(statistics.mean(d))
    assert c.delta_stderr == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)))
    assert c.delta == pytest.approx(c.plan_acc - c.fp_acc)
    with pytest.raises(ValueError):
        compare_task("piqa", run(fp_ok), run(q_ok[:-1]))


def _no_work_folders(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("fault", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_or_ctrl_c_leaves_no_output(doctored, tmp_path, monkeypatch, fault):
    """A failure (or Ctrl-C) in the export — after the scan, recipe and report inputs were
    written into the work folder — leaves neither DIR nor the work folder."""
    import qdoctor.doctor as doctor

    model_dir = doctored[0]

    def broken(*a, **k):
        raise fault

    monkeypatch.setattr(doctor, "export_checkpoint", broken)
    out = tmp_path / "out"
    if isinstance(fault, KeyboardInterrupt):
        assert main(["doctor", str(model_dir), "--out", str(out), *FAST, "--tasks", "none"]) == 130
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):
            main(["doctor", str(model_dir), "--out", str(out), *FAST, "--tasks", "none"])
    assert not out.exists()
    assert _no_work_folders(tmp_path, "out") == []


def test_overwrite_rules(doctored, tmp_path, capsys):
    """An existing DIR is refused (before the model loads); --overwrite replaces a doctor output
    but never another folder."""
    model_dir, _, out, _, _ = doctored
    assert main(["doctor", str(model_dir), "--out", str(out), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["doctor", str(model_dir), "--out", str(other), "--overwrite", *FAST]) == 2
    assert "doctor.json" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_arguments_fail_before_loading(tmp_path, capsys):
    assert main(["doctor", "no-such-model-dir", "--out", str(tmp_path / "o"), "--tasks", "nosuchtask"]) == 2
    assert "nosuchtask" in capsys.readouterr().err
    assert main(["doctor", "x", "--out", str(tmp_path / "o"), "--target", "w9a9"]) == 2
    assert main(["doctor", "x", "--out", str(tmp_path / "missing" / "o")]) == 2


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        missing = "a chromium binary" if exe is None else "the playwright package (pip install -e '.[test]')"
        pytest.skip(f"no {missing}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def test_report_renders_with_every_section_and_plot(doctored, browser, tmp_path):
    from PIL import Image, ImageStat

    out = doctored[2]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    for sid in SECTIONS:
        box = page.locator(f"section#{sid}").bounding_box()
        assert box is not None and box["height"] > 20 and box["width"] > 300, sid
        assert page.locator(f"section#{sid} h2, section#{sid} .verdict").count() >= 1, sid
    plots = page.evaluate("""() => [...document.querySelectorAll('img[data-plot]')].map(i => ({
        name: i.dataset.plot, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
        shown: i.getBoundingClientRect().width}))""")
    names = {p["name"] for p in plots}
    assert {"heatmap-spike", "heatmap-weight", "ppl-bars", "task-bars"} <= names
    for p in plots:
        assert p["complete"] and p["w"] > 100 and p["h"] > 100 and p["shown"] > 100, p
    # the planted layers are in the worst-layers table, as weight outliers
    table = page.locator("section#diagnosis table").inner_text()
    for name in doctored[1]:
        assert name in table
    assert "weight-outlier" in table
    png = page.screenshot(full_page=True)
    (tmp_path / "report.png").write_bytes(png)
    img = Image.open(io.BytesIO(png)).convert("L")
    assert img.height > 2000  # a long page, not an error stub
    assert ImageStat.Stat(img).stddev[0] > 10  # not blank
    page.close()
