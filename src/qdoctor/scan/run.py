"""``scan(model, tokenizer, config) -> ScanReport``: find each linear layer's W8A8 weak spots.

One streamed pass over the calibration windows (``models.streaming.stream_blocks``): for block
i, a pre-hook on each of its linears records the input statistics and a stratified error
subsample (``scan.collect``); after the block's forward every layer gets its
``LayerFinding`` — weight statistics, activation statistics, quantization errors, verdict —
and the recorded activations are freed. Memory: one block, the block inputs of the
calibration set, and one block's error subsamples.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qdoctor.calib.collect import CalibrationStats, calibration_windows
from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, bos_token_id, get_blocks
from qdoctor.models.streaming import stream_blocks
from qdoctor.quant.fake import fake_quantize, row_slices
from qdoctor.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qdoctor.quant.scales import scale_from_absmax
from qdoctor.quant.spec import QuantSpec
from qdoctor.scan.collect import InputRecorder, SharedInputCheck, uniform_token_mask
from qdoctor.quant.scales import group_size_for
from qdoctor.scan.config import GROUP_CANDIDATES
from qdoctor.scan.config import ScanConfig, Thresholds
from qdoctor.scan.sensitivity import measure_sensitivity
from qdoctor.scan.findings import (
    ACT_DTYPES,
    ACT_MODES,
    ACTIVATION_SPIKE,
    BOTH,
    ERROR_KEYS,
    OK,
    WEIGHT_OUTLIER,
    ActivationStats,
    LayerFinding,
    ScanReport,
    ScanSummary,
    WeightStats,
)
from qdoctor.stats.quant_error import (
    gram_sq_norm,
    row_sq_norms,
    rows_quadratic_form,
    weighted_gram,
    weighted_norm_ratio,
)
from qdoctor.stats.spikes import (
    median_token_absmax,
    spike_channels,
    spike_mask,
    spike_positions,
    spike_ratio,
    spike_token_ids,
    token_absmax_by_position,
)
from qdoctor.text import index_ranges
from qdoctor.stats.weights import input_dim_absmax, top_outlier_dims

def scan(model, tokenizer, config: ScanConfig | None = None, input_ids: torch.Tensor | None = None) -> ScanReport:
    """Scan every quantizable linear layer of ``model`` (see the module docstring).

    ``input_ids`` (N, L): calibration windows to use instead of ``config.calibration``'s (e.g. your
    own text, already tokenized; include <bos> yourself for models that need it)."""
    return scan_with_stats(model, tokenizer, config, input_ids)[0]


@torch.no_grad()
def scan_with_stats(model, tokenizer, config: ScanConfig | None = None,
                    input_ids: torch.Tensor | None = None) -> tuple[ScanReport, CalibrationStats]:
    """``scan``, plus the calibration statistics it gathered on the way (channel and token
    absmax of every linear input), reusable as ``qdoctor.quantize(..., calibration=stats)``."""
    from qdoctor import __version__
    from qdoctor.io import peak_rss_mb

    config = config or ScanConfig()
    t0 = time.perf_counter()
    arch = arch_for(model)
    blocks = get_blocks(model, arch)
    bos = bos_token_id(model, tokenizer)
    cal = config.calibration
    config_dict = config.to_dict()
    if input_ids is None:
        input_ids = calibration_windows(tokenizer, cal, bos_id=bos)
    elif input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise QDoctorError("input_ids must be (N, L) token windows with L ≥ 2")
    else:
        config_dict["calibration"].update(n_samples=int(input_ids.shape[0]), seqlen=int(input_ids.shape[1]),
                                          source="input_ids (given)")
    umask = uniform_token_mask(input_ids.shape[0], input_ids.shape[1], config.error_tokens, cal.seed)
    findings: list[LayerFinding] = []
    layer_stats = {}
    token_text = _TokenText(tokenizer)

    groups = arch.input_groups(model.config)
    clock = {"forward": 0.0, "findings": 0.0}  # block forwards (with recording hooks) vs statistics/errors

    def _block_findings(i, block, groups, recorders, block_findings):
        for group in groups:
            rec = recorders[group[0]]
            rec.last_input = None
            sub = ErrorSample.from_recorder(rec, device=block.get_submodule(group[0]).weight.device,
                                            activation_errors=config.activation_errors)
            for rel in group:
                name = f"{arch.blocks}.{i}.{rel}"
                block_findings[rel] = layer_finding(name, i, rel, block.get_submodule(rel).weight, rec, input_ids,
                                                    config, token_text, sub)
            shared = rec.to_linear_input_stats()  # one object for the consumers of one input, as calibrate()
            layer_stats.update({f"{arch.blocks}.{i}.{rel}": shared for rel in group})

    def on_block(i, block, inputs):
        recorders: dict[str, InputRecorder] = {}
        handles = []
        for group in groups:
            owner = block.get_submodule(group[0])
            rec = InputRecorder(owner.in_features, umask, config.spike_factor, config.max_spike_rows,
                                seed=cal.seed + i, sample_rows=cal.sample_rows, rows_seed=cal.seed,
                                name=f"{arch.blocks}.{i}.{group[0]}")
            handles.append(owner.register_forward_pre_hook(rec))
            for rel in group:
                recorders[rel] = rec
                if rel != group[0]:
                    check = SharedInputCheck(rec, f"{arch.blocks}.{i}.{rel}")
                    handles.append(block.get_submodule(rel).register_forward_pre_hook(check))
        t_fwd = time.perf_counter()
        try:
            outs = inputs.forward(block)
        finally:
            for h in handles:
                h.remove()
        t_stats = time.perf_counter()
        clock["forward"] += t_stats - t_fwd
        block_findings = {}
        with _num_threads(config.stats_threads):
            _block_findings(i, block, groups, recorders, block_findings)
        findings.extend(block_findings[rel] for rel in arch.linears)
        clock["findings"] += time.perf_counter() - t_stats
        return outs

    stream_blocks(model, input_ids, on_block, batch_size=cal.batch_size, progress=config.progress, desc="scan")
    stats = CalibrationStats(layers=layer_stats, input_ids=input_ids, config=cal)
    sensitivity = None
    if config.sensitivity:
        sensitivity = measure_sensitivity(model, tokenizer, findings, stats, config)
    report = ScanReport(
        model=model_info(model, arch, len(blocks)),
        config=config_dict,
        layers=findings,
        summary=summarize(findings, config.thresholds),
        sensitivity=sensitivity,
        timing={"scan_seconds": round(time.perf_counter() - t0, 2), "block_forward_seconds": round(clock["forward"], 2),
                "findings_seconds": round(clock["findings"], 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                "calibration_tokens": int(input_ids.numel())},
        qdoctor_version=__version__,
    )
    return report, stats


@contextmanager
def _num_threads(n: int):
    """Run the statistics with ``n`` torch threads (0: leave the setting alone), then restore it."""
    before = torch.get_num_threads()
    if n > 0 and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def model_info(model, arch, n_blocks: int) -> dict:
    cfg = model.config
    return {
        "source": getattr(model, "qdoctor_source", None),
        "class": type(model).__name__,
        "family": arch.family,
        "model_type": getattr(cfg, "model_type", None),
        "blocks": n_blocks,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "linear_layers": n_blocks * len(arch.linears),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


class _TokenText:
    """Decoded text of token ids (cached), for the spike-token tables."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        if tid not in self.cache:
            try:
                self.cache[tid] = self.tokenizer.decode([tid])
            except Exception:  # noqa: BLE001 — a tokenizer that cannot decode one id is not fatal
                self.cache[tid] = f"<{tid}>"
        return self.cache[tid]


def _r(v: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (keeps the JSON small and readable)."""
    v = float(v)
    return float(f"{v:.{digits}g}") if v == v and abs(v) != float("inf") else v


class ErrorSample:
    """The error subsample of one input, shared by every consumer, on the device of the weights.

    Activation scales (s = a / qmax): per-tensor static a = max |x| over *all* calibration
    tokens; per-tensor dynamic a = max |x| over the row's own sequence (batch-1 inference);
    per-token dynamic a = the row's own max. ``delta(key) = Q(X) − X`` is recomputed on each call
    (one T × K tensor at a time: an elementwise pass, cheap next to the error GEMMs, and it keeps
    six variants of a 28672-wide input from sitting in memory together)."""

    def __init__(self, rows: torch.Tensor, samples: torch.Tensor, row_weights: torch.Tensor, is_spike: torch.Tensor,
                 tensor_absmax: float, sequence_absmax: torch.Tensor, device=None, activation_errors: bool = True):
        device = torch.device(device) if device is not None else rows.device
        self.x = rows.to(device).float()
        self.row_weights = row_weights.to(device)
        self.is_spike = is_spike.to(device)
        self._gram: torch.Tensor | None = None
        # the activation variants measured (none when only weight errors are asked for)
        self.keys = [f"{mode}_{dtype}" for dtype in ACT_DTYPES for mode in ACT_MODES] if activation_errors else []
        self._quant: dict[str, tuple[QuantSpec, torch.Tensor | None]] = {}
        seq = sequence_absmax[samples].view(-1, 1).float().to(device)
        for dtype in ACT_DTYPES:
            qmax = QuantSpec(dtype, PerTensor()).qmax
            self._quant[f"tensor_static_{dtype}"] = (
                QuantSpec(dtype, PerTensor(), dynamic=False),
                scale_from_absmax(torch.tensor(float(tensor_absmax), device=device), qmax))
            self._quant[f"tensor_dynamic_{dtype}"] = (QuantSpec(dtype, PerTensor(), dynamic=True),
                                                      scale_from_absmax(seq, qmax))
            self._quant[f"token_dynamic_{dtype}"] = (QuantSpec(dtype, PerToken(), dynamic=True), None)
        x_sq = row_sq_norms(self.x)
        self.act_errors = {f"a_{key}": weighted_norm_ratio(row_sq_norms(self.delta(key)), x_sq, self.row_weights)
                           for key in self.keys}

    def delta(self, key: str) -> torch.Tensor:
        """Q(X) − X (T, K) in fp32 for the activation variant ``key`` (e.g. ``tensor_static_int8``)."""
        spec, scale = self._quant[key]
        return fake_quantize(self.x, spec, scale).sub_(self.x)

    def to(self, device) -> "ErrorSample":
        """The sample on ``device`` (where the weights are: the error GEMMs run there)."""
        device = torch.device(device)
        if self.x.device == device:
            return self
        self.x, self.row_weights, self.is_spike = self.x.to(device), self.row_weights.to(device), self.is_spike.to(device)
        self._quant = {k: (spec, None if s is None else s.to(device)) for k, (spec, s) in self._quant.items()}
        if self._gram is not None:
            self._gram = self._gram.to(device)
        return self

    @property
    def tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_gram(self) -> bool:
        return self._gram is not None

    def gram(self) -> torch.Tensor:
        """G = Xᵀ diag(w) X, computed once for every consumer of this input."""
        if self._gram is None:
            self._gram = weighted_gram(self.x, self.row_weights)
        return self._gram

    @classmethod
    def from_recorder(cls, rec: InputRecorder, device=None, activation_errors: bool = True) -> "ErrorSample":
        """The recorder's subsample, built on ``device`` (default: where the rows are)."""
        rows, samples, weights, is_spike = rec.error_rows()
        return cls(rows, samples, weights, is_spike, float(rec.channel_absmax.max()), rec.token_absmax.amax(dim=1),
                   device=device, activation_errors=activation_errors)


def layer_errors(w: torch.Tensor, sample: ErrorSample, group_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """(``LayerFinding.errors``, typical-token errors) for weight W (N × K) on the error subsample.

    The output errors are ‖X (Q(W) − W)ᵀ‖ and ‖(Q(X) − X) Wᵀ‖ over ‖X Wᵀ‖ with row weights — the
    same numbers as ``stats.quant_error.output_rel_error`` — each computed the cheaper of two
    equivalent ways (``stats.quant_error`` Gram forms): per row through X Wᵀ (T·K·N), or through
    H = WᵀW (N·K² once, then T·K² per variant: cheaper when N > K) for the activation side, and
    through the input's G = Xᵀ diag(w) X (shared by q/k/v, by gate/up; N·K² per variant) for the
    weight side. The typical-token error of an activation mode is the median over the non-spike
    sampled tokens of ‖e_t‖ / ‖y_t‖: what a normal token loses, which the Frobenius error hides
    when a few spike tokens dominate ‖XWᵀ‖."""
    w = w.detach()
    n_out, k = w.shape
    x, rw, t = sample.x, sample.row_weights, sample.tokens
    keys = sample.keys
    out: dict[str, float] = {}
    # W is visited in blocks of output rows (every quantity below is a sum over rows n), so the
    # fp32 working copies are bounded by ROW_BLOCK_ELEMS whatever the layer size; the per-tensor
    # scale is taken over the whole W first. A W of one block is converted once and reused.
    blocks = row_slices(n_out, k)
    whole = [w.float()] if len(blocks) == 1 else None

    def row_blocks():
        yield from whole if whole is not None else (w[r].float() for r in blocks)

    # Activation side, per row: reference ‖y_t‖² and every variant's ‖e_t‖².
    # One variant's Q(X) − X at a time (``ErrorSample.delta``), so at most one T × K delta is alive.
    # the way is chosen for the full set of variants, so a weights-only scan gets the same numbers
    variants = len(ACT_DTYPES) * len(ACT_MODES) + 1
    if n_out * k * k + variants * t * k * k < variants * t * k * n_out:
        h = sum(wc.T @ wc for wc in row_blocks())
        y_sq = rows_quadratic_form(x, h)
        e_sq = [rows_quadratic_form(sample.delta(key), h) for key in keys]
        del h
    else:
        def sq_norms(inp: torch.Tensor) -> torch.Tensor:
            return sum(row_sq_norms(F.linear(inp, wc)) for wc in row_blocks())

        y_sq = sq_norms(x)
        e_sq = [sq_norms(sample.delta(key)) for key in keys]
    y_total = float((y_sq * rw).sum())
    # Weight side: only weighted totals are needed.
    use_gram = (0 if sample.has_gram else t * k * k) + 3 * n_out * k * k < 3 * t * k * n_out
    specs = {"tensor": QuantSpec("int8", PerTensor()), "channel": QuantSpec("int8", PerChannel()),
             "group": QuantSpec("int8", PerGroup(group_size))}
    tensor_scale = scale_from_absmax(w.abs().amax().float(), specs["tensor"].qmax)
    num = dict.fromkeys(specs, 0.0)
    dw_sq = dict.fromkeys(specs, 0.0)
    w_sq = 0.0
    for wc in row_blocks():
        w_sq += float(wc.square().sum())
        for gname, spec in specs.items():
            dw = fake_quantize(wc, spec, tensor_scale if gname == "tensor" else None).sub_(wc)
            num[gname] += (gram_sq_norm(dw, sample.gram()) if use_gram
                           else float((row_sq_norms(F.linear(x, dw)) * rw).sum()))
            dw_sq[gname] += float(dw.square().sum())
            del dw
    w_norm = w_sq ** 0.5
    for gname in specs:
        out[f"out_w_{gname}"] = (max(num[gname], 0.0) / y_total) ** 0.5 if y_total > 0 else 0.0
        out[f"w_{gname}"] = dw_sq[gname] ** 0.5 / w_norm if w_norm > 0 else 0.0  # = weight_rel_error(w, spec)
    typical = {}
    normal = ~sample.is_spike
    for j, key in enumerate(keys):
        out[f"out_a_{key}"] = weighted_norm_ratio(e_sq[j].clamp_min(0), y_sq, rw)
        if bool(normal.any()):
            per_token = (e_sq[j][normal].clamp_min(0) / y_sq[normal].clamp_min(1e-30)).sqrt()
            typical[key] = float(per_token.median())
    out.update(sample.act_errors)
    # activation keys are NaN when the sample measured no activation variants (weights-only scan)
    return {key: out.get(key, float("nan")) for key in ERROR_KEYS}, typical



def layer_finding(name: str, block: int, rel: str, weight: torch.Tensor, rec: InputRecorder,
                  input_ids: torch.Tensor, config: ScanConfig, token_text=None,
                  sample: ErrorSample | None = None) -> LayerFinding:
    """Statistics, errors and verdict of one layer from its weight and its input recorder
    (``sample``: the recorder's error subsample, when already built for another consumer)."""
    w = weight.detach()  # fp32 copies are made in row blocks by layer_errors
    n_out, k = w.shape
    g = group_size_for(k, config.group_size)
    prof = input_dim_absmax(w)
    med = float(prof.median())
    wstats = WeightStats(
        max_abs=_r(prof.max()), median_dim_absmax=_r(med),
        max_median_ratio=_r(float(prof.max()) / med if med > 0 else float("inf")),
        top_dims=[[j, _r(v)] for j, v in top_outlier_dims(w, config.top_dims)],
        group_size=g, dim_absmax=[_r(v) for v in prof.tolist()])
    ta = rec.token_absmax
    factor = config.spike_factor
    mask = spike_mask(ta, factor)
    ids = input_ids[:, : ta.shape[1]]
    tids = spike_token_ids(ta, ids, factor)
    by_max, by_med = token_absmax_by_position(ta)
    ch_vals, ch_idx = rec.channel_absmax.topk(min(config.top_dims, k))
    sample = (sample or ErrorSample.from_recorder(rec, device=w.device,
                                                  activation_errors=config.activation_errors)).to(w.device)
    errors, typical = layer_errors(w, sample, g)
    ratio = spike_ratio(ta)
    astats = ActivationStats(
        absmax=_r(rec.channel_absmax.max()), median_token_max=_r(median_token_absmax(ta)),
        max_token_max=_r(ta.max()), spike_ratio=_r(ratio), spike_factor=factor,
        spike_tokens=int(mask.sum()), spike_samples=int(mask.any(dim=1).sum()), samples=int(ta.shape[0]),
        spike_positions={str(p): c for p, c in sorted(spike_positions(ta, factor).items(),
                                                      key=lambda kv: -kv[1])[:20]},
        spike_token_ids={str(t): c for t, c in list(tids.items())[:20]},
        spike_token_text={str(t): token_text(t) for t in list(tids)[:20]} if token_text else {},
        spike_channels=[[c, _r(v)] for c, v in spike_channels(rec.spike_rows(), config.top_dims)],
        top_channels=[[int(c), _r(v)] for c, v in zip(ch_idx.tolist(), ch_vals.tolist())],
        error_tokens=int(sample.x.shape[0]),
        typical_token_errors={key: _r(v) for key, v in typical.items()},
        channel_absmax=[_r(v) for v in rec.channel_absmax.tolist()],
        token_max_by_position=[_r(v) for v in by_max.tolist()],
        token_median_by_position=[_r(v) for v in by_med.tolist()],
    )
    finding = LayerFinding(name=name, block=block, projection=rel.rsplit(".", 1)[-1], in_features=k,
                           out_features=n_out, weight=wstats, activation=astats,
                           errors={key: _r(v) for key, v in errors.items()}, spike_ratio=_r(ratio))
    if errors["out_w_channel"] > config.thresholds.weight_error:  # what per-group weights would need
        finding.group_errors = {str(gs): _r(e) for gs, e in group_errors(w, sample, GROUP_CANDIDATES).items()}
    finding.verdict, finding.reasons = classify(finding, config.thresholds)
    return finding


def group_errors(w: torch.Tensor, sample: ErrorSample, candidates: tuple[int, ...]) -> dict[int, float]:
    """{g: INT8 per-group(g) weight output error} for the group sizes among ``candidates`` that
    divide K (the largest divisor below the smallest candidate when none does), on the error
    subsample: ‖X (Q_g(W) − W)ᵀ‖ / ‖X Wᵀ‖ with row weights, through the input's Gram matrix
    G = Xᵀ diag(w) X (``gram_sq_norm``), W in row blocks."""
    k = w.shape[1]
    sizes = sorted({g for g in candidates if k % g == 0} or {group_size_for(k, min(candidates))}, reverse=True)
    gram = sample.gram()
    num = dict.fromkeys(sizes, 0.0)
    ref = 0.0
    for r in row_slices(*w.shape):
        wc = w[r].float()
        ref += gram_sq_norm(wc, gram)
        for g in sizes:
            num[g] += gram_sq_norm(fake_quantize(wc, QuantSpec("int8", PerGroup(g))).sub_(wc), gram)
    return {g: (max(num[g], 0.0) / ref) ** 0.5 if ref > 0 else 0.0 for g in sizes}


def classify(f: LayerFinding, t: Thresholds) -> tuple[str, list[str]]:
    """(verdict, reasons): the evidence numbers behind every flag (thresholds: ``scan.config``).

    weight-outlier needs both the cause (one input dimension far above the typical one) and the
    symptom (per-channel INT8 weight-only output error above 1%); activation-spike needs the
    spike ratio above its bound."""
    reasons = []
    w, e = f.weight, f.errors
    ratio = w.max_median_ratio if w.max_median_ratio is not None else float("inf")
    weight = ratio > t.weight_dim_ratio and e["out_w_channel"] > t.weight_error
    if weight:
        top = w.top_dims[0] if w.top_dims else [None, w.max_abs]
        reasons.append(f"max|W| {w.max_abs:.3g} on input dim {int(top[0])} = {ratio:.3g}× the median input dim "
                       f"(> {t.weight_dim_ratio:g}×) and per-channel INT8 weight-only output error "
                       f"{100 * e['out_w_channel']:.2f}% (> {100 * t.weight_error:g}%; per-group({w.group_size}) "
                       f"{100 * e['out_w_group']:.2f}%)")
    spike = f.spike_ratio > t.spike_ratio
    if spike:
        a = f.activation
        typ = a.typical_token_errors.get("tensor_static_int8")
        typ_text = f", typical token {100 * typ:.0f}%" if typ is not None else ""
        reasons.append(f"spike ratio {f.spike_ratio:.3g} > {t.spike_ratio:g} (input max {a.max_token_max:.4g} vs "
                       f"median token {a.median_token_max:.3g}); per-tensor static INT8 output error "
                       f"{100 * e['out_a_tensor_static_int8']:.1f}%{typ_text}")
    verdict = BOTH if weight and spike else WEIGHT_OUTLIER if weight else ACTIVATION_SPIKE if spike else OK
    return verdict, reasons


def _layer_list(findings: list[LayerFinding]) -> str:
    """"layers 11, 28, 29 down_proj; layers 0–2 q_proj/k_proj": projections sharing the same
    blocks are merged; groups in order of first block."""
    by_proj: dict[str, list[int]] = {}
    for f in findings:
        by_proj.setdefault(f.projection, []).append(f.block)
    by_blocks: dict[tuple[int, ...], list[str]] = {}
    for proj, blocks in by_proj.items():
        by_blocks.setdefault(tuple(sorted(blocks)), []).append(proj)
    parts = []
    for blocks, projs in sorted(by_blocks.items(), key=lambda kv: kv[0]):
        word = "layer" if len(blocks) == 1 else "layers"
        parts.append(f"{word} {index_ranges(blocks, sep=', ', dash='–', min_run=3)} {'/'.join(projs)}")
    return "; ".join(parts)


def summarize(findings: list[LayerFinding], t: Thresholds) -> ScanSummary:
    """The model-level view: verdict counts and one line per finding."""
    n = len(findings)
    counts = {v: 0 for v in (OK, WEIGHT_OUTLIER, ACTIVATION_SPIKE, BOTH)}
    for f in findings:
        counts[f.verdict] += 1
    spikes = [f for f in findings if f.activation_spike]
    weights = [f for f in findings if f.weight_outlier]
    lines = []
    if spikes:
        lines.append(f"{len(spikes)} of {n} linear layers concentrate activation spikes: {_layer_list(spikes)}")
    elif findings:
        top = max(findings, key=lambda f: f.spike_ratio)
        lines.append(f"0 of {n} linear layers concentrate activation spikes (largest spike ratio "
                     f"{top.spike_ratio:.3g} ≤ {t.spike_ratio:g}, {top.name})")
    if weights:
        lines.append(f"{len(weights)} of {n} linear layers hold weight outliers: {_layer_list(weights)}")
    elif findings:
        top = max(findings, key=lambda f: f.weight.max_median_ratio or 0)
        ratio = top.weight.max_median_ratio or 0
        if ratio > t.weight_dim_ratio:  # the cause without the symptom
            why = (f"largest input-dim max/median {ratio:.3g} > {t.weight_dim_ratio:g} in {top.name}, but its "
                   f"per-channel INT8 weight-only output error is {100 * top.errors['out_w_channel']:.2f}% "
                   f"≤ {100 * t.weight_error:g}%")
        else:
            why = f"largest input-dim max/median {ratio:.3g} ≤ {t.weight_dim_ratio:g}, {top.name}"
        lines.append(f"0 of {n} linear layers hold weight outliers (max|W| ≤ "
                     f"{max(f.weight.max_abs for f in findings):.3g} everywhere; {why})")
    worst_spike = max(spikes, key=lambda f: f.spike_ratio, default=None)
    if worst_spike:
        a, e = worst_spike.activation, worst_spike.errors
        line = (f"worst spike: {worst_spike.name}, input max {a.max_token_max:.4g} vs median token "
                f"{a.median_token_max:.3g} (spike ratio {worst_spike.spike_ratio:.3g}); output error per-tensor static "
                f"INT8 {100 * e['out_a_tensor_static_int8']:.1f}% vs per-token dynamic "
                f"{100 * e['out_a_token_dynamic_int8']:.2f}%")
        typ = a.typical_token_errors.get("tensor_static_int8")
        if typ is not None:
            line += f"; a typical token loses {100 * typ:.0f}% of its output under per-tensor static INT8"
        lines.append(line)
    worst_weight = max(weights, key=lambda f: f.errors["out_w_channel"], default=None)
    if worst_weight:
        lines.append(f"worst weights: {worst_weight.name}, max|W| {worst_weight.weight.max_abs:.3g} "
                     f"({worst_weight.weight.max_median_ratio:.3g}× the median input dim); INT8 weight-only output "
                     f"error per-channel {100 * worst_weight.errors['out_w_channel']:.2f}% vs per-group"
                     f"({worst_weight.weight.group_size}) {100 * worst_weight.errors['out_w_group']:.2f}%")
    diffuse = [f for f in findings if not f.weight_outlier and f.errors["out_w_channel"] > t.weight_error]
    if diffuse:
        worst = max(diffuse, key=lambda f: f.errors["out_w_channel"])
        lines.append(f"note: {len(diffuse)} of {n} layers exceed {100 * t.weight_error:g}% per-channel INT8 weight-only "
                     f"output error without an outlier input dimension (diffuse, not the weight-outlier signature): "
                     f"{_layer_list(diffuse)}; worst {worst.name} {100 * worst.errors['out_w_channel']:.2f}% "
                     f"(per-group {100 * worst.errors['out_w_group']:.2f}%)")
    return ScanSummary(layers=n, counts=counts, weight_outlier_layers=[f.name for f in weights],
                       activation_spike_layers=[f.name for f in spikes], lines=lines,
                       worst_spike=worst_spike.name if worst_spike else None,
                       worst_weight=worst_weight.name if worst_weight else None)
