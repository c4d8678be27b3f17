"""``qdoctor doctor``: the whole job on one calibration pass — diagnose, treat, verify, export.

1. **scan** — one full scan (``scan.run.scan_with_stats``) with the plan search's calibration
   (``FixConfig.scan_config`` plus the activation-side errors the report shows);
2. **fix** — the plan search (``policy.search``) starts from that scan's findings and
   statistics (``Searcher(scan=(report, stats))``): no second calibration pass;
3. **verify** — FP / naive / plan perplexity on WikiText-2 *test* windows
   (``policy.verify``) and zero-shot accuracy of FP vs the plan on a seeded item subsample,
   with standard errors (``eval.zeroshot``);
4. **export** — the plan as a compressed-tensors checkpoint (``export.export_checkpoint``),
   then which runtimes serve it: vLLM by its kernel rules (``export.ctconfig``), transformers
   by loading the written checkpoint and generating a few greedy tokens.

Everything lands in a work folder ``.<DIR>.tmp-<pid>-XXXX`` beside ``DIR``, renamed to ``DIR``
only once complete (``export.staging.staged_dir``): a failure or a Ctrl-C removes it, a
``kill -9`` leaves it for the next run to remove. The result is one ``DoctorResult``; the HTML
report and the terminal summary render it (``report.doctor_html``, ``cli.doctor_cmd``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qdoctor.errors import QDoctorError
from qdoctor.eval.zeroshot import evaluate
from qdoctor.eval.zeroshot.metrics import mean, mean_stderr
from qdoctor.export.checkpoint import ExportReport, export_checkpoint
from qdoctor.export.staging import check_out_dir, staged_dir
from qdoctor.io import atomic_write_json, atomic_write_text, peak_rss_mb
from qdoctor.policy.recipe import Recipe, save_recipe
from qdoctor.models.streaming import require_resident
from qdoctor.policy.search import FixConfig, FixResult, Searcher, search
from qdoctor.policy.verify import verify_perplexities
from qdoctor.report.doctor_html import render_doctor_html
from qdoctor.report.html import write_html
from qdoctor.report.json import write_json
from qdoctor.scan.config import ScanConfig
from qdoctor.scan.findings import ScanReport
from qdoctor.scan.run import scan_with_stats

MARKER = "doctor.json"  # the file that makes an existing DIR a doctor output (replaceable with --overwrite)
FILES = {"report": "report.html", "result": MARKER, "scan_json": "scan.json", "scan_html": "scan.html",
         "recipe": "recipe.yaml", "checkpoint": "checkpoint"}


@dataclass(frozen=True)
class DoctorConfig:
    """What the doctor runs: the plan search (its calibration is the scan's) and the verification.

    test_windows × test_seqlen: WikiText-2 test windows of the before/after perplexity table.
    tasks / task_items / task_seed: zero-shot tasks, items drawn per task with the seed (all
        items when a task has fewer); empty ``tasks``: no zero-shot check.
    The runtime the checkpoint is for is the search's profile (``fix.serve``/``gpu``/``tp``:
    ``serve.profiles``): plans it cannot run are never tried, and the export checks it again.
    load_check: load the written checkpoint with transformers and generate ``load_check_tokens``
        greedy tokens from ``load_check_prompt``."""

    fix: FixConfig = field(default_factory=FixConfig)
    test_windows: int = 2
    test_seqlen: int = 2048
    tasks: tuple[str, ...] = ("piqa", "arc_easy")
    task_items: int = 100
    task_seed: int = 1234
    save_dtype: str | None = None
    load_check: bool = True
    load_check_prompt: str = "The capital of France is"
    load_check_tokens: int = 12
    progress: bool = True

    def __post_init__(self):
        if self.fix.metric_spec.name != "ppl":
            raise QDoctorError("the doctor searches with the perplexity metric (zero-shot tasks verify the plan)")
        for name in ("test_windows", "test_seqlen", "task_items", "load_check_tokens"):
            if getattr(self, name) < 1:
                raise QDoctorError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    def scan_config(self) -> ScanConfig:
        """The search's own scan (its calibration, threshold, group size) with the activation-side
        errors too: the report shows them, and a full scan serves the search as well."""
        return replace(self.fix.scan_config(self.progress), activation_errors=True)

    def export_options(self) -> dict:
        """Keyword arguments of ``export_checkpoint`` that depend on the serve profile: the
        search's own (``FixConfig.profile``), so the export refuses what the search would not try."""
        return {"serve": self.fix.profile}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fix"] = {k: v for k, v in asdict(self.fix).items()}
        return d


@dataclass
class TaskComparison:
    """Zero-shot accuracy of one task, full precision vs the plan, on the same items.

    ``delta_stderr`` is the paired standard error of the mean per-item difference
    d_i = correct_plan,i − correct_fp,i: √(Σ(d_i − d̄)² / (n − 1)) / √n."""

    task: str
    items: int
    of: int
    fp_acc: float
    fp_stderr: float
    plan_acc: float
    plan_stderr: float
    delta: float
    delta_stderr: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_task(task: str, fp, planned) -> TaskComparison:
    """``TaskComparison`` of two ``TaskResult``s of ``task`` scored on the same items."""
    if [it.index for it in fp.items] != [it.index for it in planned.items]:
        raise ValueError(f"{task}: the two runs scored different items")
    diffs = [float(q.correct) - float(f.correct) for f, q in zip(fp.items, planned.items)]
    return TaskComparison(task=task, items=fp.n_items, of=fp.n_total, fp_acc=fp.metrics["acc"],
                          fp_stderr=fp.metrics["acc_stderr"], plan_acc=planned.metrics["acc"],
                          plan_stderr=planned.metrics["acc_stderr"], delta=mean(diffs), delta_stderr=mean_stderr(diffs))


@dataclass
class RuntimeCheck:
    """Whether one runtime serves the checkpoint, and how that was established."""

    runtime: str
    serves: bool | None  # None: not checked
    how: str  # "loaded and generated" | "kernel rules (not run here)" | …
    detail: str = ""
    sample: str = ""  # transformers: the generated text

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DoctorResult:
    """Everything the doctor found, decided and measured; rendered by ``report.doctor_html`` and
    ``cli.doctor_cmd`` (nothing here renders)."""

    model: str
    config: DoctorConfig
    scan: ScanReport
    fix: FixResult
    verification: dict  # policy.verify.verify_perplexities
    tasks: list[TaskComparison]
    export: ExportReport
    runtimes: list[RuntimeCheck]
    out_dir: str
    steps: list[PlanStep] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=lambda: dict(FILES))
    phases: dict[str, float] = field(default_factory=dict)  # phase → wall seconds
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # phase → process CPU seconds (all threads)
    peak_rss_mb: float = 0.0

    @property
    def recipe(self) -> Recipe:
        return self.fix.recipe

    @property
    def recovered(self) -> bool:
        """The plan meets the budget on held-out text (the search's criterion)."""
        return self.fix.met

    def to_dict(self) -> dict:
        return {"schema": "qdoctor.doctor/1", "model": self.model, "config": self.config.to_dict(),
                "diagnosis": {"summary": self.scan.summary.to_dict(),
                              "flagged": [f.name for f in self.scan.flagged()]},
                "fix": self.fix.to_dict(), "plan": [s.to_dict() for s in self.steps],
                "recipe": self.recipe.to_dict(), "verification": dict(self.verification),
                "tasks": [t.to_dict() for t in self.tasks], "export": self.export.to_dict(),
                "runtimes": [r.to_dict() for r in self.runtimes], "files": dict(self.files),
                "phases": {k: round(v, 1) for k, v in self.phases.items()},
                "cpu_seconds": {k: round(v, 1) for k, v in self.cpu_seconds.items()}, "peak_rss_mb": round(self.peak_rss_mb, 1)}


@dataclass
class PlanStep:
    """One step of the plan as a person reads it: what it does, on which layers, why, and what it
    costs at inference."""

    what: str
    layers: list[str]
    why: str
    cost: str

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_list(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else ", ".join(names[:4]) + f" (+{len(names) - 4} more)"


def _smoothing_step(step, scan: ScanReport) -> PlanStep:
    layers = list(step.layers)
    if step.method == "smoothquant":
        spikes = [f.name for f in scan.flagged() if f.activation_spike]
        why = (f"activation outliers make per-tensor INT8 activations coarse (spike layers: {_layer_list(spikes)})"
               if spikes else "it lowered the held-out perplexity of the activation-quantized model")
        what = f"SmoothQuant, α {step.alpha}" + (" (searched per norm → linear pair)" if step.alpha == "auto" else "")
        what += ": divides activation channel j by s_j = max|X_j|^α / max|W_j|^(1−α) and multiplies W's column j"
    else:
        weights = [f.name for f in scan.flagged() if f.weight_outlier]
        why = (f"weight outliers in {_layer_list(weights)}" if weights else
               "it lowered the held-out perplexity")
        what = f"bi-smoothing ({step.method.split('-', 1)[1]}), α {step.alpha}: balances the weight and activation "                "ranges of each input channel of the producer pairs"
    return PlanStep(what, ["*"] if layers == ["*"] else layers, why,
                    "free: the factors are folded into the preceding norm and the weights")


def _optional_steps(recipe: Recipe) -> list[PlanStep]:
    """The plan's rotation and GPTQ steps (``Recipe.rotation``, ``Recipe.gptq``), when present."""
    out = []
    rotation = recipe.rotation
    if rotation is not None:
        d = rotation.to_dict()
        offline = [k.upper() for k in ("r1", "r2") if d.get(k)]
        if offline:
            out.append(PlanStep(f"Hadamard rotation {'/'.join(offline)}", ["*"], "spreads outlier channels over all "
                                "channels before quantization", "free: folded into the weights"))
        if d.get("r4"):
            out.append(PlanStep("online Hadamard R4 before down_proj", ["*.down_proj"], "spreads the down_proj input "
                                "outliers", "an online Hadamard transform per token before each down_proj"))
    gptq = recipe.gptq
    if gptq is not None:
        out.append(PlanStep("GPTQ weight rounding", ["*"], "rounds each weight column to compensate the error of "
                            "the ones before it (second-order)", "free: calibration time only"))
    return out


def plan_steps(fix: FixResult, scan: ScanReport) -> list[PlanStep]:
    """The searched plan, step by step (the recipe's order: treatments, then per-layer precision)."""
    recipe, plan = fix.recipe, fix.best.plan
    steps = [PlanStep(f"{fix.config.target} on every linear layer ({recipe.scheme.default.describe()})", ["*"],
                      "the target scheme", "the INT8 path: an INT8 GEMM per linear layer")]
    steps += _optional_steps(recipe)
    steps += [_smoothing_step(s, scan) for s in plan.smoothing]
    for name in plan.per_group():
        g = plan.overrides[name].weights.granularity
        steps.append(PlanStep(f"per-group INT8 weights (g = {g.group_size})", [name],
                              recipe.evidence.get(name, "weight outlier"),
                              "a finer-grained GEMM (one scale per group of input channels); vLLM has no INT8 "
                              "W8A8 kernel for per-group weights"))
    for name in plan.kept():
        ls = plan.overrides[name]
        how = ls.keep or "fp8"
        steps.append(PlanStep(f"kept in {how}", [name], recipe.evidence.get(name, "activation spike"),
                              "leaves the INT8 path: a " + ("bf16/fp16 GEMM with 2× the weight bytes of INT8"
                                                            if ls.keep else "FP8 GEMM")))
    return steps


class Phases:
    """Wall time and process CPU time per phase (CPU time tells a loaded machine's wall time from
    the work), each phase announced on stderr as ``[i/n] name …`` (``say``)."""

    def __init__(self, names: list[str], say=None):
        self.names, self.say, self.seconds, self.cpu_seconds = list(names), say, {}, {}

    def run(self, name: str, fn, *args, **kwargs):
        if self.say is not None:
            self.say(f"[{self.names.index(name) + 1}/{len(self.names)}] {name} …")
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - t0
        self.cpu_seconds[name] = time.process_time() - c0
        return out


PHASES = ["scan", "fix", "verify: perplexity", "verify: zero-shot", "export", "serve check", "report"]


def compare_tasks(model, tokenizer, recipe: Recipe, stats, config: DoctorConfig) -> list[TaskComparison]:
    """Zero-shot accuracy of full precision and of the plan (applied in place, then undone) on
    the same seeded items."""
    if not config.tasks:
        return []
    kw = dict(tasks=list(config.tasks), subsample=config.task_items, seed=config.task_seed, progress=config.progress)
    fp = evaluate(model, tokenizer, **kw)
    with recipe.applied(model, tokenizer, stats):
        planned = evaluate(model, tokenizer, **kw)
    return [compare_task(t, fp[t], planned[t]) for t in config.tasks]


def vllm_check(report: ExportReport) -> RuntimeCheck:
    """vLLM by its compressed-tensors kernel rules (``export.ctconfig.vllm_issue``; not run here)."""
    if report.vllm_issues:
        return RuntimeCheck("vLLM", False, "kernel rules (not run here)", "; ".join(report.vllm_issues))
    return RuntimeCheck("vLLM", True, "kernel rules (not run here)",
                        "every config group has a vLLM kernel: vllm serve <checkpoint>")


def transformers_check(path: Path, config: DoctorConfig) -> RuntimeCheck:
    """Load the written checkpoint with ``AutoModelForCausalLM.from_pretrained`` (compressed-tensors
    decompresses it) and generate ``load_check_tokens`` greedy tokens."""
    if not config.load_check:
        return RuntimeCheck("transformers", None, "not checked (--no-load-check)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        ids = tok(config.load_check_prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=config.load_check_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    except Exception as e:  # the check's finding, not the doctor's failure
        return RuntimeCheck("transformers", False, "AutoModelForCausalLM.from_pretrained",
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return RuntimeCheck("transformers", True, "loaded and generated", "AutoModelForCausalLM.from_pretrained "
                        f"(compressed-tensors); {config.load_check_tokens} greedy tokens",
                        sample=config.load_check_prompt + text)


def model_card(fix: FixResult, verification: dict, stats_note: str) -> dict:
    """The checkpoint's model card: the search's evidence and measurements, as measured."""
    recipe = fix.recipe
    return {"evidence": dict(recipe.evidence), "metrics": {**recipe.metrics, "calibration": stats_note},
            "ppl": {"full_precision": verification["fp_ppl"], recipe.name: verification["planned_ppl"],
                    "windows": verification["windows"], "seqlen": verification["seqlen"],
                    "text": verification["split"]}}


def diagnose_and_treat(model, tokenizer, config: DoctorConfig, work: Path, phases: Phases, source: str,
                       render, t_start: float | None = None) -> DoctorResult:
    """Every phase, writing into the (empty) work folder ``work``; ``render(result) -> str`` is the
    HTML report (called last)."""
    cal = config.fix.calibration
    report, stats = phases.run("scan", scan_with_stats, model, tokenizer, config.scan_config())
    report.statistics = None
    write_json(report, str(work / FILES["scan_json"]))

    def fix():
        searcher = Searcher(model, tokenizer, config.fix, progress=config.progress, scan=(report, stats))
        return searcher, search(model, tokenizer, config.fix, progress=config.progress, searcher=searcher)

    searcher, result = phases.run("fix", fix)
    result.recipe.model = result.recipe.model or source
    save_recipe(result.recipe, str(work / FILES["recipe"]))
    verification = phases.run("verify: perplexity", verify_perplexities, searcher, result.best.plan,
                              config.test_seqlen, config.test_windows)
    tasks = phases.run("verify: zero-shot", compare_tasks, model, tokenizer, result.recipe, searcher.stats, config)
    note = f"{cal.n_samples} × {cal.seqlen} tokens of {cal.source} (seed {cal.seed})"
    ckpt = work / FILES["checkpoint"]
    exported = phases.run("export", export_checkpoint, model, tokenizer, ckpt, recipe=result.recipe,
                          stats=searcher.stats, card=model_card(result, verification, note), dtype=config.save_dtype,
                          progress=config.progress, **config.export_options())
    exported.out_dir = FILES["checkpoint"]  # relative: the work folder is renamed
    runtimes = [vllm_check(exported)]
    runtimes.append(phases.run("serve check", transformers_check, ckpt, config))
    doctor = DoctorResult(model=source, config=config, scan=report, fix=result, verification=verification,
                          tasks=tasks, export=exported, runtimes=runtimes, out_dir=str(work),
                          steps=plan_steps(result, report), phases=phases.seconds, cpu_seconds=phases.cpu_seconds,
                          peak_rss_mb=peak_rss_mb())

    def write_reports():
        write_html(report, str(work / FILES["scan_html"]))
        atomic_write_text(str(work / FILES["report"]), render(doctor))

    phases.run("report", write_reports)  # the page shows the phases before this one
    if t_start is not None:  # wall time since the model load began
        doctor.phases["total"] = time.perf_counter() - t_start
        doctor.cpu_seconds["total"] = time.process_time()  # the whole process, model load included
    doctor.peak_rss_mb = peak_rss_mb()
    atomic_write_json(str(work / MARKER), doctor.to_dict())  # last: its presence marks a complete output
    return doctor


def run_doctor(model, tokenizer, config: DoctorConfig, out_dir, *, source: str = "", overwrite: bool = False,
               render=None, say=None, load_seconds: float | None = None) -> DoctorResult:
    """Run the doctor on a loaded model and publish ``out_dir`` atomically (module docstring).

    render: ``DoctorResult → HTML`` (default ``report.doctor_html.render_doctor_html``).
    say: a ``str → None`` for the phase lines (None: quiet)."""
    require_resident(model, "qdoctor doctor (the zero-shot check scores the whole treated model)")
    check_out_dir(out_dir, overwrite, MARKER)
    phases = Phases(PHASES, say)
    if load_seconds is not None:
        phases.seconds["load"] = load_seconds
    t_start = time.perf_counter() - (load_seconds or 0.0)
    with staged_dir(out_dir, overwrite, MARKER) as work:
        result = diagnose_and_treat(model, tokenizer, config, Path(work), phases, source,
                                    render or render_doctor_html, t_start)
    result.out_dir = str(Path(out_dir).expanduser())
    return result
