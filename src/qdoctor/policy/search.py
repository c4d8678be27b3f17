"""Automatic plan search: the cheapest plan that meets a perplexity budget.

Cost order (what a plan "spends"): smoothing is free at inference (folded into weights and
norms); a per-group layer costs a finer-grained GEMM; a layer kept in FP8/BF16 leaves the
INT8 path. The search therefore tries, on top of the best plan so far:

1. naive: the target scheme everywhere;
1b. rotation — only with ``"rotation"`` in ``FixConfig.methods``: Hadamard R1+R2 (offline) and
   R1+R2+R4 (an online Hadamard before down_proj); every later step builds on the better basis;
2. weights — only if some layers show the weight-outlier signature (per-channel INT8 output
   error > ``weight_error_threshold``): mixed granularity (per-group on those layers, each with
   the coarsest g in 128/64/32/16 whose output error meets the threshold) vs
   bi-smoothing of their producer pairs; keep the better;
3. activations — SmoothQuant on every pair for each α in ``alphas`` ("auto": α searched per
   pair on calibration output error, pairs with a kept consumer left alone); keep if better;
3b. scale search — with ``"mse"``: the mse observer on static activations, then the weight clip
   search, each kept if better; tried also when the budget is already met (``FixConfig.polish``,
   default on: the step costs nothing at inference, and a budget met by a thin margin on held-out
   text can be missed on the test split);
4. spike-aware precision — keep the spikiest layers (by spike ratio) in ``keep`` precision,
   one at a time, while the budget is missed and fewer than ``max_layer_fraction`` of the
   layers are out of the default. Stage 2's per-group/FP8 layers count against that budget too, so
   when stage 2 won, the same keep step also runs from the plan without stage 2's layers, and the
   better result goes on (a per-group plan that spends the whole budget for a small gain would
   otherwise leave no room for the spikes);
4b. weight rounding — with ``FixConfig.gptq`` or ``"gptq"``: GPTQ on the best plan so far (free at
   inference: the weights stay on the same grid); with ``"smoothquant-gptq"`` also llm-compressor's
   standard recipe (SmoothQuant 0.8 + GPTQ) as a plan of its own; each kept if better; GPTQ on the
   best plan is tried also when the budget is met (``polish``, as 3b);
5. prune — drop kept layers (least spiky first) that the budget does not need.

Serving (``FixConfig.serve``, default ``vllm``; ``serve.profiles``): a candidate the runtime
profile cannot run is never tried (it is listed in ``FixResult.skipped`` with its violations);
where the runtime fuses layers (vLLM's q/k/v → qkv_proj, gate/up → gate_up_proj) a fused group
moves together — an override of one shard is given to its siblings, and every layer counts against
``max_layer_fraction``. Where per-group weights do not run (vLLM without the optional Humming
kernel, or with static activations), stage 2 tries FP8 for the outlier layers instead (W8A8-FP8,
on a GPU that runs it; BF16 where it does not) besides bi-smoothing.

Every plan is scored by the search metric (``FixConfig.metric``, ``policy/metric.py``):

- ``ppl`` (default): perplexity on held-out text, the last ``holdout_fraction`` of the
  calibration source (WikiText-2 valid), disjoint from both the calibration windows and the
  test split; the budget is the allowed perplexity increase in percent;
- ``tasks:T1,T2,…``: mean zero-shot accuracy (``acc``) over a fixed seeded subsample of
  ``metric_items`` items per task, tokenized once; the budget is the allowed accuracy drop in
  percentage points.

"Better" and "meets the budget" always come from the metric. The result says whether the
budget was met; it never hides a miss.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from qdoctor.calib.collect import CalibrationConfig, calibration_token_ids
from qdoctor.calib.windows import consecutive_windows, window_body
from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity
from qdoctor.models.registry import arch_for, block_linear_names, bos_token_id
from qdoctor.models.streaming import require_resident
from qdoctor.policy.evidence import cap, evidence_from_scan, rank_spikes, rank_weight_outliers
from qdoctor.policy.metric import Metric, MetricSpec, PerplexityMetric, TaskAccuracyMetric, parse_metric
from qdoctor.policy.recipe import Recipe
from qdoctor.quant.gptq import GPTQConfig
from qdoctor.quant.granularity import PerChannel, PerGroup
from qdoctor.quant.spec import LayerScheme, QuantSpec, Scheme, get_scheme
from qdoctor.scan.config import FIX_SPIKE_MIN_RATIO, ScanConfig, Thresholds
from qdoctor.scan.run import scan_with_stats
from qdoctor.transforms.rotation import RotationStep
from qdoctor.serve.cost import GemmTable, PlanCost, plan_cost
from qdoctor.serve.profiles import ServeProfile, check_plan, layer_servable, model_fused_groups, refuse, rules_for
from qdoctor.transforms.smoothing import SmoothingStep

TARGET_ALIASES = {"w8a8-tensor-static": "w8a8-tensor-tensor-static", "w8a8-channel-static": "w8a8-channel-tensor-static",
                  "w8a8-token": "w8a8-channel-token"}


def resolve_target(name: str) -> Scheme:
    return get_scheme(TARGET_ALIASES.get(name, name))


@dataclass(frozen=True)
class FixConfig:
    target: str = "w8a8-tensor-tensor-static"
    budget_pct: float = 1.0  # metric "ppl": allowed PPL increase over FP in percent; "tasks:…": accuracy points
    max_layer_fraction: float = 0.03  # at most this fraction of linear layers kept / per-group
    weight_error_threshold: float = Thresholds.weight_error  # Qin's 1% per-layer output error (scan.config)
    spike_min_ratio: float = FIX_SPIKE_MIN_RATIO  # layers below this spike ratio are never kept
    group_size: int = 128
    keep: str = "bf16"  # bf16 | fp16 | fp8
    alphas: tuple = ("auto", 0.5, 0.8)
    eval_windows: int = 4
    eval_seqlen: int = 2048
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(sample_rows=512,
                                                                                     holdout_fraction=0.2))
    metric: str = "ppl"  # "ppl" or "tasks:piqa,arc_easy" (policy/metric.py)
    metric_items: int = 200  # task metric: items drawn per task
    metric_seed: int = 1234  # task metric: seed of the draw
    task_data: str | None = None  # task metric: folder with <task>.jsonl[.gz] instead of the shipped data
    metric_batch_size: int = 16  # task metric: requests per forward
    gptq: GPTQConfig | None = None  # a GPTQ candidate step (3b) with this config; None: not tried
    methods: tuple[str, ...] = ()  # further candidate steps (METHODS): rotation, mse, gptq, smoothquant-gptq
    polish: bool = True  # the free steps asked for (mse, gptq) are tried on the best plan even once it meets the budget
    serve: str = "vllm"  # runtime profile the plan must run on (serve.profiles): vllm | transformers | any
    gpu: str = "hopper"  # vllm: ampere | ada | hopper (FP8 W8A8 needs ada/hopper)
    tp: int = 1  # vllm: tensor parallelism (online Hadamard needs tp 1)
    allow_optional_kernels: bool = False  # vllm: the optional Humming kernel (per-group INT8 W8A8)
    cost_m: int = 2048  # tokens per forward at which plan costs are estimated (serve.cost)
    gemm_table: str | None = None  # bench/gemm.py JSON; None: the one shipped with qdoctor, if any

    def __post_init__(self):
        self.profile  # unknown runtime / GPU / bad tp → QDoctorError
        unknown = [x for x in self.methods if x not in METHODS]
        if unknown:
            raise QDoctorError(f"unknown search method(s) {', '.join(unknown)}: use {', '.join(METHODS)}")
        spec = self.metric_spec  # bad syntax / unknown task → QDoctorError
        if self.budget_pct < 0:
            raise QDoctorError("the budget must be ≥ 0%" if spec.name == "ppl" else "the budget must be ≥ 0 points")
        if not isinstance(self.metric_items, int) or isinstance(self.metric_items, bool) or self.metric_items < 1:
            raise QDoctorError(f"--metric-items must be a positive integer, got {self.metric_items!r}")
        if not isinstance(self.metric_batch_size, int) or self.metric_batch_size < 1:
            raise QDoctorError(f"the metric batch size must be a positive integer, got {self.metric_batch_size!r}")
        if not 0 <= self.max_layer_fraction <= 1:
            raise QDoctorError("max_layer_fraction must be in [0, 1]")
        if self.keep not in ("bf16", "fp16", "fp8"):
            raise QDoctorError(f"--keep must be bf16, fp16 or fp8, got {self.keep!r}")
        if not isinstance(self.cost_m, int) or isinstance(self.cost_m, bool) or self.cost_m < 1:
            raise QDoctorError(f"--cost-m must be a positive integer, got {self.cost_m!r}")
        if self.calibration.holdout_fraction <= 0:
            raise QDoctorError("the search needs held-out text: calibration.holdout_fraction > 0")

    def scan_config(self, progress: bool = True) -> ScanConfig:
        """The scan the search's evidence comes from: this calibration, the search's weight-error
        threshold (so every layer above it gets its per-group errors) and group size; weight-side
        errors only (the search reads no activation error). A full scan serves as well."""
        return ScanConfig(calibration=self.calibration, thresholds=Thresholds(weight_error=self.weight_error_threshold),
                          group_size=self.group_size, activation_errors=False, progress=progress)

    @property
    def profile(self) -> ServeProfile:
        return ServeProfile(self.serve, self.gpu, self.tp, self.allow_optional_kernels)

    @property
    def metric_spec(self) -> MetricSpec:
        """``metric`` parsed (raises ``QDoctorError`` on bad syntax or an unknown task)."""
        return parse_metric(self.metric)

    @property
    def budget_unit(self) -> str:
        return "%" if self.metric_spec.name == "ppl" else "points"


@dataclass
class Plan:
    smoothing: list[SmoothingStep] = field(default_factory=list)
    overrides: dict[str, LayerScheme] = field(default_factory=dict)
    label: str = "naive"
    rotation: RotationStep | None = None  # Hadamard rotations (statistics recalibrated in their basis)
    gptq: GPTQConfig | None = None
    observers: tuple[tuple[str, str], ...] = ()  # (role, observer): scale search on every quantized layer

    def kept(self) -> list[str]:
        return [n for n, ls in self.overrides.items() if ls.keep or (ls.weights and ls.weights.dtype == "fp8")]

    def per_group(self) -> list[str]:
        return [n for n, ls in self.overrides.items()
                if ls.weights is not None and isinstance(ls.weights.granularity, PerGroup)]

    def extend(self, label: str, smoothing=(), overrides=None, gptq: GPTQConfig | None = None) -> "Plan":
        o = dict(self.overrides)
        o.update(overrides or {})
        return Plan(self.smoothing + list(smoothing), o, label, self.rotation, gptq or self.gptq, self.observers)

    def but(self, label: str, **changes) -> "Plan":
        """This plan with ``changes`` to its fields (rotation, gptq, observers) under ``label``."""
        fields = {"overrides": dict(self.overrides), "smoothing": list(self.smoothing), **changes}
        return replace(self, label=label, **fields)


# Candidate steps beyond smoothing, granularity and precision (``FixConfig.methods``), each free at
# inference except R4's online Hadamard before down_proj (``serve.profiles`` checks the runtime):
#   rotation          Hadamard R1+R2 offline (and R1+R2+R4 where the runtime runs online transforms)
#   mse               scale search: the mse observer on static activations, the weight clip search
#   gptq              GPTQ weight rounding on the best plan so far (``FixConfig.gptq`` or defaults)
#   smoothquant-gptq  llm-compressor's standard recipe as a candidate (SmoothQuant 0.8 + GPTQ)
METHODS = ("rotation", "mse", "gptq", "smoothquant-gptq")


def with_observers(ls: LayerScheme, observers: tuple[tuple[str, str], ...]) -> LayerScheme:
    """``ls`` with the observers of ``observers`` on its weights / static activations (kept layers
    and dynamic activations as they are)."""
    if not ls.is_quantized:
        return ls
    o = dict(observers)
    w = replace(ls.weights, observer=o["weights"]) if "weights" in o else ls.weights
    a = ls.activations
    if a is not None and not a.dynamic and "activations" in o:
        a = replace(a, observer=o["activations"])
    return LayerScheme(w, a)


@dataclass
class Trial:
    """One scored plan. ``value``/``delta`` are in the search metric's terms: for ``ppl`` they
    default to ``ppl``/``delta_pct`` (so ``Trial(label, ppl, delta_pct, kept, per_group,
    seconds, plan)`` is a complete perplexity trial); for ``tasks`` ``value`` is the mean
    accuracy (fraction), ``delta`` the change vs FP in points, ``details`` the per-task
    accuracies, and ``ppl``/``delta_pct`` are None (not measured)."""

    label: str
    ppl: float | None
    delta_pct: float | None
    kept: int
    per_group: int
    seconds: float
    plan: Plan = field(repr=False, default=None)
    metric: str = "ppl"
    value: float | None = None
    delta: float | None = None
    details: dict = field(default_factory=dict)
    cost: float | None = None  # estimated GEMM time relative to BF16 at FixConfig.cost_m (serve.cost)

    def __post_init__(self):
        if self.metric == "ppl":
            if self.value is None:
                self.value = self.ppl
            if self.delta is None:
                self.delta = self.delta_pct

    def to_dict(self) -> dict:
        d = {"label": self.label, "ppl": self.ppl, "delta_pct": self.delta_pct, "kept": self.kept,
             "per_group": self.per_group, "seconds": round(self.seconds, 1), "metric": self.metric,
             "value": self.value, "delta": self.delta, "cost": self.cost}
        if self.details:
            d["details"] = dict(self.details)
        return d


# the keys of ``FixResult.to_dict`` (a recipe's ``metrics`` hold them less "trials" and "seconds"); the
# model card draws them as one table (``export.card.search_lines``)
RESULT_KEYS = ("target", "budget_pct", "met", "fp_ppl", "naive_ppl", "planned_ppl", "planned_delta_pct",
               "naive_delta_pct", "fp_heldout_ppl", "metric", "budget", "budget_unit", "fp_value", "naive_value",
               "planned_value", "naive_delta", "planned_delta", "task_values", "layers_total", "layers_kept",
               "layers_per_group", "plan", "trials", "serve", "skipped", "cost", "heldout", "seconds")


@dataclass
class FixResult:
    config: FixConfig
    fp_ppl: float
    naive: Trial
    best: Trial
    met: bool
    trials: list[Trial]
    recipe: Recipe
    evidence: dict
    total_layers: int
    seconds: float
    metric: dict = field(default_factory=lambda: {"name": "ppl"})  # Metric.describe() of the search metric
    fp_value: float | None = None  # the metric at full precision (default: fp_ppl for "ppl")
    fp_details: dict = field(default_factory=dict)  # task metric: per-task FP accuracy
    skipped: list = field(default_factory=list)  # candidate plans not tried: {"label", "violations"}
    cost: dict = field(default_factory=dict)  # PlanCost.to_dict() of the best plan

    def __post_init__(self):
        if self.fp_value is None and self.metric_name == "ppl":
            self.fp_value = self.fp_ppl

    @property
    def metric_name(self) -> str:
        return self.metric.get("name", "ppl")

    def to_dict(self) -> dict:
        ppl = self.metric_name == "ppl"
        d = {"target": self.config.target}
        if ppl:  # the keys of reports from before the metric option, unchanged
            d.update({"budget_pct": self.config.budget_pct, "met": self.met, "fp_ppl": self.fp_ppl,
                      "naive_ppl": self.naive.ppl, "planned_ppl": self.best.ppl,
                      "planned_delta_pct": self.best.delta_pct, "naive_delta_pct": self.naive.delta_pct})
        else:
            d.update({"met": self.met, "fp_heldout_ppl": self.fp_ppl})
        d.update({
            "metric": dict(self.metric), "budget": self.config.budget_pct, "budget_unit": "%" if ppl else "points",
            "fp_value": self.fp_value, "naive_value": self.naive.value, "planned_value": self.best.value,
            "naive_delta": self.naive.delta, "planned_delta": self.best.delta,
        })
        if not ppl:
            d["task_values"] = {"fp": dict(self.fp_details), "naive": dict(self.naive.details),
                                "planned": dict(self.best.details)}
        d.update({
            "layers_total": self.total_layers, "layers_kept": self.best.kept, "layers_per_group": self.best.per_group,
            "plan": self.best.label, "trials": [t.to_dict() for t in self.trials],
            "serve": self.config.profile.to_dict(), "skipped": list(self.skipped), "cost": dict(self.cost),
        })
        if ppl:
            d["heldout"] = {"windows": self.config.eval_windows, "seqlen": self.config.eval_seqlen,
                            "source": f"last {self.config.calibration.holdout_fraction:.0%} of "
                                      f"{self.config.calibration.source}"}
        d["seconds"] = round(self.seconds, 1)
        return d


def keep_scheme(target: Scheme, keep: str) -> LayerScheme:
    """The layer scheme of a layer kept out of INT8: bf16/fp16, or FP8 with the target's
    activation granularity (per-channel FP8 weights)."""
    if keep in ("bf16", "fp16"):
        return LayerScheme(keep=keep)
    a = target.default.activations
    return LayerScheme(QuantSpec("fp8", PerChannel()),
                       QuantSpec("fp8", a.granularity, a.dynamic) if a is not None else None)


def group_scheme(target: Scheme, group_size: int) -> LayerScheme:
    return LayerScheme(QuantSpec("int8", PerGroup(group_size)), target.default.activations)


def heldout_windows(tokenizer, config: FixConfig, bos_id: int | None) -> torch.Tensor:
    """The windows plans are scored on: ``eval_windows`` × ``eval_seqlen`` tokens from the last
    ``holdout_fraction`` of the calibration source (``calib.windows``)."""
    held = calibration_token_ids(tokenizer, config.calibration, heldout=True)
    if held.numel() < window_body(config.eval_seqlen, bos_id):
        raise QDoctorError("held-out text is shorter than one evaluation window; lower --eval-seqlen")
    return consecutive_windows(held, config.eval_seqlen, bos_id, max_windows=config.eval_windows)


def check_scan_matches(scan, config: FixConfig):
    """(report, stats) of ``scan`` when it can stand for this search's own: the same calibration
    (windows, sampled rows, held-out part) and a weight-error threshold no higher than the
    search's (else the per-group errors of some layers were not measured); a ``QDoctorError``
    naming every difference otherwise."""
    report, stats = scan
    want = config.scan_config(progress=False)
    got = ScanConfig.from_dict(report.config)  # ScanReport.config is ScanConfig.to_dict()
    diffs = [f"{k} {getattr(got.calibration, k)!r} (fix: {getattr(want.calibration, k)!r})"
             for k in ("n_samples", "seqlen", "source", "seed", "sample_rows", "holdout_fraction")
             if getattr(got.calibration, k) != getattr(want.calibration, k)]
    if got.thresholds.weight_error > want.thresholds.weight_error:
        diffs.append(f"weight-error threshold {got.thresholds.weight_error} (fix: {want.thresholds.weight_error})")
    for key in ("group_size", "error_tokens", "max_spike_rows", "spike_factor"):
        if getattr(got, key) != getattr(want, key):
            diffs.append(f"{key} {getattr(got, key)!r} (fix: {getattr(want, key)!r})")
    if diffs:
        raise QDoctorError("the scan was made with other settings than this fix: " + "; ".join(diffs) +
                           " — re-run the scan with the fix's (`qdoctor scan --for-fix`) or give the fix the scan's")
    return report, stats


class Searcher:
    """Holds the model (in memory or block-streamed: the pipeline decides), its calibration,
    evidence, held-out windows and the search metric (``self.metric``, built once by
    ``build_metric``: for a task metric the items are drawn and tokenized here).

    Everything that needs weights is a walk over the blocks (``models.streaming``):

    - calibration statistics and evidence (spike ratio, weight output errors, the per-group
      errors of each weight-outlier layer): one weights-only scan (``scan_with_stats`` with
      ``FixConfig.scan_config``), or a saved scan passed as ``scan=(report, stats)``;
    - a candidate plan: one pass of the held-out windows in which block i is smoothed and
      quantized as it is opened and put back when closed (``Recipe.perplexity``).

    So a plan costs one forward of the held-out windows (and, block-streamed, one read of every
    block). The zero-shot task metric scores the whole treated model and so needs it in memory.
    Subclasses may override ``evaluate(plan, windows=None) -> Trial``; with a non-perplexity
    metric the returned Trial must carry ``value`` (``make_trial`` builds it)."""

    def __init__(self, model, tokenizer, config: FixConfig, progress: bool = True, scan=None,
                 start: Recipe | None = None):
        self.model, self.tok, self.config, self.progress = model, tokenizer, config, progress
        # start: a recipe to search from (``qdoctor fix --start-from``): its plan is the naive one
        self.start = start
        self.target = start.scheme if start is not None else resolve_target(config.target)
        self.metric_spec = config.metric_spec
        if self.metric_spec.name != "ppl":
            require_resident(model, f"--metric {self.metric_spec}",
                             "; --stream searches with the perplexity metric only (--metric ppl)")
        self.arch = arch_for(model)
        self.names = block_linear_names(model, self.arch)
        self.profile = config.profile
        # fused shards move together where the runtime fuses them (vLLM's qkv_proj / gate_up_proj)
        fuses = any(r.name == "fused-shards" for r in rules_for(self.profile))
        self.fused = model_fused_groups(model) if fuses else []
        self._group_of = {n: g for g in self.fused for n in g}
        self.shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in self.names}  # (N, K), meta or not
        self.gemm = GemmTable.load(config.gemm_table) if config.gemm_table else GemmTable.shipped()
        refuse(self.violations(Plan()), self.profile, f"the target {config.target}")  # before any work
        keep_ls = keep_scheme(self.target, config.keep)
        if not layer_servable(keep_ls, self.profile):
            raise QDoctorError(f"--keep {config.keep} ({keep_ls.describe()}) does not run on {self.profile.describe()}; "
                               "use --keep bf16")
        if scan is None:
            scan = scan_with_stats(model, tokenizer, config.scan_config(progress))
        self.scan, self.stats = check_scan_matches(scan, config)
        self.stats_by_basis: dict = {}  # rotation basis → statistics calibrated in it (``stats_for``)
        self.windows = heldout_windows(tokenizer, config, bos_token_id(model, tokenizer))
        self.fp_ppl = perplexity(model, tokenizer, windows=self.windows, progress=progress, desc="fp held-out").ppl
        self._fp_cache: dict = {}
        self.evidence = evidence_from_scan(self.scan)
        missing = sorted(set(self.names) - set(self.evidence))
        if missing:
            raise QDoctorError(f"the scan has no finding for {missing[0]} (+{len(missing) - 1} more): it is of "
                               "another model")
        self.metric: Metric = self.build_metric()

    def build_metric(self) -> Metric:
        """The search metric, measured on the (still full-precision) model for ``fp_value``."""
        c = self.config
        if self.metric_spec.name == "ppl":
            return PerplexityMetric(self.tok, self.windows, fp_value=self.fp_ppl,
                                    source=f"last {c.calibration.holdout_fraction:.0%} of {c.calibration.source}")
        return TaskAccuracyMetric(self.model, self.tok, self.metric_spec.tasks, items=c.metric_items,
                                  seed=c.metric_seed, data_dir=c.task_data, batch_size=c.metric_batch_size)

    def group_size(self, name: str) -> int:
        """The coarsest group size that brings ``name``'s weight output error under the threshold
        (from the scan's ``group_errors``)."""
        g = self.evidence[name].needed_group_size(self.config.weight_error_threshold)
        if g is None:
            raise QDoctorError(f"{name}: no group size was chosen (its per-channel weight error is within "
                               "the threshold)")
        return g

    def fp_ppl_of(self, windows: torch.Tensor) -> float:
        key = (windows.data_ptr(), tuple(windows.shape))
        if key not in self._fp_cache:
            self._fp_cache[key] = perplexity(self.model, self.tok, windows=windows, progress=False).ppl
        return self._fp_cache[key]

    def violations(self, plan: Plan) -> list:
        """How ``plan`` breaks the serving profile (``serve.profiles.check_plan``; empty: it serves)."""
        return check_plan(self.recipe(plan), self.names, self.profile, fused=self.fused)

    def cost_of(self, plan: Plan) -> PlanCost:
        """The plan's estimated GEMM cost vs BF16 at ``cost_m`` tokens (``serve.cost``)."""
        scheme = self.recipe(plan).scheme
        return plan_cost({n: scheme.resolve(n) for n in self.names}, self.shapes, self.gemm, self.config.cost_m)

    def siblings(self, name: str) -> tuple[str, ...]:
        """``name`` and the shards the runtime fuses it with (just ``name`` where nothing is fused)."""
        return self._group_of.get(name, (name,))

    def whole_groups(self, names: list[str], max_layers: int) -> list[str]:
        """``names`` with their fused siblings, in rank order, as many whole groups as fit ``max_layers``."""
        out: list[str] = []
        for n in names:
            group = [m for m in self.siblings(n) if m not in out]
            if group and len(out) + len(group) <= max_layers:
                out += group
        return out

    def group_overrides(self, names: list[str]) -> dict[str, LayerScheme]:
        """Per-group weights for ``names``: each fused group takes the finest group size any of its
        members needs (one scheme per fused GEMM); members below the threshold follow their group."""
        sizes = {n: self.evidence[n].needed_group_size(self.config.weight_error_threshold) for n in names}
        out = {}
        for n in names:
            need = [sizes[m] for m in self.siblings(n) if sizes.get(m) is not None]
            out[n] = group_scheme(self.target, min(need) if need else self.group_size(n))
        return out

    def recipe(self, plan: Plan) -> Recipe:
        scheme = self.target.with_overrides(plan.overrides, name=f"{self.target.name}+{plan.label}")
        if plan.observers:
            scheme = Scheme(scheme.name, with_observers(scheme.default, plan.observers),
                            {k: with_observers(v, plan.observers) for k, v in scheme.overrides.items()},
                            scheme.ignore, scheme.description)
        model = getattr(self.model, "qdoctor_source", "")
        if self.start is not None:  # the start recipe's steps first, then the plan's; its other keys kept
            return replace(self.start, scheme=scheme, smoothing=list(self.start.smoothing) + list(plan.smoothing),
                           calibration=self.config.calibration, model=model, evidence={}, metrics={},
                           rotation=plan.rotation or self.start.rotation, gptq=plan.gptq or self.start.gptq)
        return Recipe(scheme=scheme, smoothing=list(plan.smoothing), calibration=self.config.calibration, model=model,
                      rotation=plan.rotation, gptq=plan.gptq)

    def make_trial(self, plan: Plan, value: float, seconds: float, details: dict | None = None) -> Trial:
        """A Trial of ``plan`` scored ``value`` by the search metric."""
        m = self.metric
        delta = m.delta(value)
        if m.name == "ppl":
            return Trial(plan.label, value, delta, len(plan.kept()), len(plan.per_group()), seconds, plan)
        return Trial(plan.label, None, None, len(plan.kept()), len(plan.per_group()), seconds, plan,
                     metric=m.name, value=value, delta=delta, details=dict(details or {}))

    def evaluate(self, plan: Plan, windows: torch.Tensor | None = None) -> Trial:
        """Score ``plan`` by the search metric, or — when ``windows`` is given — by perplexity on
        those windows (a perplexity Trial, any metric). The model is unchanged afterwards."""
        t0 = time.perf_counter()
        recipe = self.recipe(plan)
        stats = self.stats_for(recipe)
        if windows is not None and (windows is not self.windows or self.metric.name != "ppl"):
            ppl = recipe.perplexity(self.model, self.tok, windows, stats, desc=f"plan {plan.label}")[0].ppl
            ref = self.fp_ppl if windows is self.windows else self.fp_ppl_of(windows)
            return Trial(plan.label, ppl, 100.0 * (ppl / ref - 1.0), len(plan.kept()), len(plan.per_group()),
                         time.perf_counter() - t0, plan)
        value, details = self.metric.measure_plan(self.model, recipe, stats)
        return self.make_trial(plan, value, time.perf_counter() - t0, details)

    def stats_for(self, recipe: Recipe):
        """The scan's statistics, or — for a plan in another basis (a rotation) — that basis's,
        calibrated once by the recipe and kept for the next plan in it."""
        if self.stats is None or recipe.basis == self.stats.basis:
            return self.stats
        if recipe.basis not in self.stats_by_basis:
            self.stats_by_basis[recipe.basis] = recipe.statistics(self.model, self.tok, self.stats)
        return self.stats_by_basis[recipe.basis]


def search(model, tokenizer, config: FixConfig | None = None, progress: bool = True,
           searcher: Searcher | None = None) -> FixResult:
    """Run the staged search (module docstring) and return the best plan found."""
    config = searcher.config if searcher is not None else (config or FixConfig())
    t_start = time.perf_counter()
    s = searcher or Searcher(model, tokenizer, config, progress)
    m = getattr(s, "metric", None)
    if m is None:  # a Searcher subclass that does not build one: held-out perplexity, as before metrics existed
        m = s.metric = PerplexityMetric(s.tok, s.windows, fp_value=s.fp_ppl)
    fp_value, budget = m.fp_value, config.budget_pct
    limit = m.limit(fp_value, budget)
    max_layers = int(math.floor(config.max_layer_fraction * len(s.names)))
    trials: list[Trial] = []
    unit = "%" if m.name == "ppl" else " pts"
    bar = tqdm(desc=f"fix ({config.target}, {m.name}, budget {budget}{unit})", unit="plan", disable=not progress,
               leave=False)

    def value(t: Trial) -> float:
        if t.value is None or t.metric != m.name:
            raise TypeError(f"evaluate() returned a {t.metric!r} Trial without a value for the {m.name!r} search "
                            f"metric (build it with Searcher.make_trial)")
        return t.value

    def better(a: Trial, b: Trial) -> bool:
        """Better on the metric; on a tie, cheaper (estimated GEMM cost) when both costs are known."""
        va, vb = value(a), value(b)
        if va == vb and a.cost is not None and b.cost is not None:
            return a.cost < b.cost
        return m.better(va, vb)

    skipped: list[dict] = []

    def run(plan: Plan) -> Trial | None:
        """Score ``plan``; None (and a note in ``skipped``) when the serving profile cannot run it."""
        bad = s.violations(plan)
        if bad:
            skipped.append({"label": plan.label, "violations": [v.line() for v in bad]})
            return None
        t = s.evaluate(plan)
        value(t)
        t.cost = s.cost_of(plan).relative
        trials.append(t)
        bar.update(1)
        top = trials[0]
        for x in trials[1:]:
            top = x if better(x, top) else top
        bar.set_postfix(best=m.format_value(top.value), limit=m.format_value(limit))
        return t

    def meets(t: Trial) -> bool:
        return m.within_budget(value(t), fp_value, budget)

    siblings = s.siblings
    naive = best = run(Plan())
    methods = set(config.methods)
    gptq_cfg = config.gptq or (GPTQConfig() if methods & {"gptq", "smoothquant-gptq"} else None)
    # 1b. rotation: every later step builds on the better basis
    if "rotation" in methods and not meets(best):
        for step in rotation_candidates(s.arch):
            t = run(best.plan.but(f"rotation-{step.basis.split(':')[1]}", rotation=step))
            if t is not None and better(t, best):
                best = t
    # 2. weight outliers: per-group, or — where the runtime has no per-group kernel — FP8 (BF16 where
    # FP8 does not run) for those layers; bi-smoothing either way. Fused siblings move together.
    outliers = cap(rank_weight_outliers(s.evidence, config.weight_error_threshold), len(s.names),
                   config.max_layer_fraction)
    grouped = s.whole_groups(outliers, max_layers)
    if outliers and not meets(best):
        pre = "" if best.plan.label == "naive" else f"{best.plan.label}+"  # e.g. after a rotation
        g = s.group_overrides(grouped)
        cands = [run(best.plan.extend(f"{pre}mixed-granularity", overrides=g))]
        if cands[0] is None and grouped:
            fp8 = keep_scheme(s.target, "fp8")
            keep = "fp8" if layer_servable(fp8, config.profile) else "bf16"
            ls = fp8 if keep == "fp8" else LayerScheme(keep="bf16")
            cands.append(run(best.plan.extend(f"{pre}outliers-{keep}", overrides=dict.fromkeys(grouped, ls))))
        cands.append(run(best.plan.extend(f"{pre}bi-smoothing",
                                          smoothing=[SmoothingStep("bismooth-max", 0.5, tuple(outliers))])))
        for t in cands:  # the first of equals wins, as min()
            if t is not None and better(t, best):
                best = t
    # 3. SmoothQuant for the activations
    if not meets(best):
        base = best
        for alpha in config.alphas:
            t = run(base.plan.extend(f"{base.plan.label}+smoothquant-{alpha}",
                                     smoothing=[SmoothingStep("smoothquant", alpha)]))
            if t is not None and better(t, best):
                best = t
    # 3b. scale search: the mse observer on static activations, then the weight clip search
    polish = config.polish  # free at inference: worth trying past the budget (module docstring, 3b/4b)
    if "mse" in methods and (polish or not meets(best)):
        static = s.target.default.activations is not None and not s.target.default.activations.dynamic
        for obs in ((("activations", "mse"),) if static else ()) + (("weights", "mse"),):
            t = run(best.plan.but(f"{best.plan.label}+mse-{obs[0]}", observers=best.plan.observers + (obs,)))
            if t is not None and better(t, best):
                best = t
    # 4. keep the spikiest layers (with their fused siblings), while whole groups fit the layer budget
    keep_ls = keep_scheme(s.target, config.keep)

    def keep_spikes(best: Trial) -> Trial:
        budget_left = max_layers - len(best.plan.per_group())
        spikes = [n for n in rank_spikes(s.evidence, config.spike_min_ratio) if n not in best.plan.overrides]
        for name in spikes:
            if meets(best):
                break
            group = [n for n in siblings(name) if not (n in best.plan.overrides and best.plan.overrides[n] == keep_ls)]
            if not group or name in best.plan.kept():
                continue
            if len(best.plan.kept()) + len(group) > budget_left:
                continue
            label = f"{_base_label(best.plan.label)}+keep{len(best.plan.kept()) + len(group)}-{config.keep}"
            t = run(best.plan.extend(label, overrides=dict.fromkeys(group, keep_ls)))
            if t is not None and better(t, best):
                best = t
        return best

    # stage 2's layers compete with kept layers for one layer budget (per-group on 6 layers can spend all
    # of it for a tiny gain): the plan without them keeps spikes too, and the better of the two goes on
    stage2 = set(best.plan.overrides) & set(grouped)
    without = None
    if stage2 and not meets(best) and rank_spikes(s.evidence, config.spike_min_ratio):
        without = run(best.plan.but(_drop_steps(best.plan.label, STAGE2_STEPS),
                                    overrides={k: v for k, v in best.plan.overrides.items() if k not in stage2}))
    best = keep_spikes(best)
    if without is not None:
        alt = keep_spikes(without)
        if better(alt, best):
            best = alt
    # 4b. GPTQ weight rounding on the best plan so far (after the keep step: a GPTQ plan costs a calibration
    # pass, and which layers are kept does not change how the others round), and llm-compressor's standard recipe
    if gptq_cfg is not None and (config.gptq is not None or "gptq" in methods) and (polish or not meets(best)):
        t = run(best.plan.extend(f"{best.plan.label}+gptq", gptq=gptq_cfg))
        if t is not None and better(t, best):
            best = t
    if "smoothquant-gptq" in methods and not meets(best):
        t = run(Plan([SmoothingStep("smoothquant", 0.8)], {}, "smoothquant-0.8+gptq", gptq=gptq_cfg))
        if t is not None and better(t, best):
            best = t
    # 5. prune kept layers the budget does not need (least spiky group first), a fused group at once
    if meets(best) and best.plan.kept():
        groups = list(dict.fromkeys(tuple(siblings(n)) for n in best.plan.kept()))
        for group in sorted(groups, key=lambda g: max(s.evidence[n].spike_ratio for n in g)):
            if not all(n in best.plan.kept() for n in group if n in best.plan.overrides):
                continue
            o = {k: v for k, v in best.plan.overrides.items() if k not in group}
            t = run(best.plan.but(f"{_base_label(best.plan.label)}+keep{len(o)}-{config.keep}", overrides=o))
            if t is not None and meets(t):
                best = t
    bar.close()
    recipe = s.recipe(best.plan)
    recipe.evidence = {n: _why(s.evidence[n]) for n in best.plan.overrides}
    result = FixResult(config=config, fp_ppl=s.fp_ppl, naive=naive, best=best, met=meets(best), trials=trials,
                       recipe=recipe, evidence={n: e.to_dict() for n, e in s.evidence.items()},
                       total_layers=len(s.names), seconds=time.perf_counter() - t_start, metric=m.describe(),
                       fp_value=fp_value, fp_details=dict(getattr(m, "fp_details", {}) or {}), skipped=skipped,
                       cost=s.cost_of(best.plan).to_dict())
    # what the search measured, without its wall time: the same search writes the same recipe
    recipe.metrics = {k: v for k, v in result.to_dict().items() if k not in ("trials", "seconds")}
    return result


def rotation_candidates(arch) -> list[RotationStep]:
    """The rotations the search tries for this family: R1+R2 (offline, free) and R1+R2+R4 (an
    online Hadamard before down_proj); none the family refuses (``RotationStep.check``)."""
    out = []
    for step in (RotationStep(True, True, False), RotationStep(True, True, True)):
        try:
            step.check(arch)
        except QDoctorError:
            continue
        out.append(step)  # one the runtime cannot run (R4 under vLLM tp > 1) is skipped by the profile
    return out


def _base_label(label: str) -> str:
    """``label`` without its "+keepN-precision" step (later steps, such as "+gptq", stay)."""
    return re.sub(r"\+keep\d+-[a-z0-9]+", "", label)


STAGE2_STEPS = ("mixed-granularity", "outliers-fp8", "outliers-bf16")  # the labels of stage 2's overrides


def _drop_steps(label: str, steps: tuple[str, ...]) -> str:
    """``label`` without the given '+'-separated steps ("naive" when nothing is left)."""
    kept = [p for p in label.split("+") if p not in steps]
    return "+".join(kept) or "naive"


def _why(e) -> str:
    return (f"spike ratio {e.spike_ratio:.0f}, input absmax {e.act_absmax:.1f}, "
            f"per-channel INT8 weight output error {100 * e.out_w_channel:.2f}%")
