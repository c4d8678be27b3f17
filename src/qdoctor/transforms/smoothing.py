"""Smoothing: per-input-channel scales S folded through producer → consumer pairs.

    Y = (X diag(S)⁻¹)(W diag(S))ᵀ      (see ``fold.py``; the FP model is unchanged)

Two ways to choose S_j from an activation range r_X(j) and a weight range r_W(j) — the
latter over every row of every consumer of the producer:

- SmoothQuant (Xiao et al. 2023):   S_j = r_X(j)^α / r_W(j)^(1−α),  r = max|·|.
  α → 1 migrates activation difficulty into the weights (α = 0.5 … 0.8 typical).
- Bi-smoothing (Qin 2024, our definition in SCIENCE.md):  S_j = (r_X(j) / r_W(j))^α,
  r = max or median of |·|, α = 0.5 "balanced". Aimed at weight outliers: a column with
  r_W ≫ r_X gets S_j ≪ 1, shrinking the outlier weights (with α = 0.5 and r = max both
  ranges become √(r_X r_W)).

S is clamped to [1e-5, 1e5]; channels with r_X = 0 or r_W = 0 get S_j = 1.

``alpha: auto`` (SmoothQuant only) searches α per pair over ``AUTO_ALPHAS`` (and "no
smoothing") for the smallest calibration output error of the pair's consumers under the
scheme they will be quantized with:

    α* = argmin_α Σ_consumers ‖X Wᵀ − Q_x(X/S_α) Q_w(W·S_α)ᵀ‖_F / ‖X Wᵀ‖_F

on the sampled calibration rows X, a static activation scale being max_j(absmax_j / S_j)/qmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qdoctor.errors import QDoctorError
from qdoctor.models.registry import arch_for, get_blocks
from qdoctor.quant.fake import fake_quantize
from qdoctor.transforms.fold import fold_scales

METHODS = ("smoothquant", "bismooth-max", "bismooth-median")
S_MIN, S_MAX = 1e-5, 1e5
AUTO_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothquant_scales(act_range: torch.Tensor, weight_range: torch.Tensor, alpha: float) -> torch.Tensor:
    """S_j = r_X^α / r_W^(1−α)."""
    a, w = act_range.double(), weight_range.double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return _sanitize(s, a, w)


def bismooth_scales(act_range: torch.Tensor, weight_range: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """S_j = (r_X / r_W)^α."""
    a, w = act_range.double(), weight_range.double()
    return _sanitize((a / w).pow(alpha), a, w)


def _sanitize(s: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    bad = (a <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(bad, torch.ones_like(s), s).clamp(S_MIN, S_MAX)


@dataclass(frozen=True)
class SmoothingStep:
    """One smoothing pass, as data (a recipe entry).

    method: smoothquant | bismooth-max | bismooth-median; alpha: migration strength;
    layers: consumer-layer globs selecting the pairs to smooth (a pair is smoothed when any
    of its consumers matches); default all pairs."""

    method: str = "smoothquant"
    alpha: "float | str" = 0.5  # or "auto" (smoothquant: searched per pair)
    layers: tuple[str, ...] = ("*",)

    def __post_init__(self):
        if self.method not in METHODS:
            raise QDoctorError(f"unknown smoothing method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.alpha == "auto":
            if self.method != "smoothquant":
                raise QDoctorError("alpha: auto is available for smoothquant only")
        elif not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise QDoctorError(f"smoothing alpha must be in [0, 1] or 'auto', got {self.alpha!r}")

    def to_dict(self) -> dict:
        return {"method": self.method, "alpha": self.alpha, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "SmoothingStep":
        unknown = set(d) - {"method", "alpha", "layers"}
        if unknown:
            raise QDoctorError(f"unknown key(s) in smoothing step: {', '.join(sorted(unknown))}")
        alpha = d.get("alpha", 0.5)
        try:
            alpha = alpha if alpha == "auto" else float(alpha)
        except (TypeError, ValueError):
            raise QDoctorError(f"smoothing alpha must be a number or 'auto', got {alpha!r}") from None
        return cls(method=str(d.get("method", "smoothquant")), alpha=alpha, layers=tuple(d.get("layers", ("*",))))


@dataclass
class SmoothingReport:
    pairs: int = 0
    weight_absmax_before: dict[str, float] = field(default_factory=dict)  # consumer → max|W|
    weight_absmax_after: dict[str, float] = field(default_factory=dict)
    alphas: dict[str, "float | None"] = field(default_factory=dict)  # producer → chosen α (None: not smoothed)


def _pair_error(stats_list, weights, specs, s: torch.Tensor) -> float:
    """Σ over consumers of the output error after smoothing by S (see module docstring)."""
    total = 0.0
    for st, w, ls in zip(stats_list, weights, specs):
        dev = w.device
        sf = s.float().to(dev)
        x = st.rows.to(dev).float()
        xs = x / sf
        ws = w.detach().float() * sf
        a = ls.activations
        scale = None
        if a is not None and not a.dynamic:
            amax = float((st.channel_absmax / s.float().cpu()).max())
            scale = torch.tensor(max(amax, 1e-12) / a.qmax, device=dev)
        ref = x @ w.detach().float().T

        xq = xs if a is None else fake_quantize(xs, a, scale)
        wq = fake_quantize(ws, ls.weights)
        total += float((xq @ wq.T - ref).norm() / ref.norm().clamp_min(1e-12))
    return total


def search_alpha(stats_list, weights, specs, act_r, w_r) -> "tuple[float | None, torch.Tensor]":
    """(α*, S) minimising the pair's output error; (None, ones) when no smoothing is best."""
    best_alpha, best_s = None, torch.ones_like(act_r, dtype=torch.float64)
    best_err = _pair_error(stats_list, weights, specs, best_s)
    for alpha in AUTO_ALPHAS:
        s = smoothquant_scales(act_r, w_r, alpha)
        err = _pair_error(stats_list, weights, specs, s)
        if err < best_err:
            best_alpha, best_s, best_err = alpha, s, err
    return best_alpha, best_s


@torch.no_grad()
def apply_smoothing(model, stats, step: SmoothingStep, scheme=None) -> SmoothingReport:
    """Smooth ``model`` in place from calibration ``stats`` (``CalibrationStats``), and update
    those stats to describe the smoothed activations (channel absmax and sampled rows ÷ S).

    ``scheme`` (the ``Scheme`` the model will be quantized with) is needed for ``alpha: auto``."""
    arch = arch_for(model)
    report = SmoothingReport()
    for b, block in enumerate(get_blocks(model, arch)):
        smooth_block(model.config, arch, b, block, stats, step, scheme, report)
    return report


def smooth_block(config, arch, b: int, block, stats, step: SmoothingStep, scheme=None,
                 report: SmoothingReport | None = None) -> SmoothingReport:
    """``apply_smoothing`` for decoder block ``b`` alone (the block-streamed search smooths each
    block as it is read); ``stats`` needs the block's layers, by full name."""
    import fnmatch

    report = report if report is not None else SmoothingReport()
    prefix = f"{arch.blocks}.{b}."
    for pair in arch.pairs_for(config):
        names = [prefix + c for c in pair.consumers]
        if not any(fnmatch.fnmatchcase(n, g) for n in names for g in step.layers):
            continue
        first = stats[names[0]]
        weights = [block.get_submodule(c).weight for c in pair.consumers]
        if step.method == "bismooth-median":
            act_r = first.channel_median()
            w_r = torch.cat([w.detach().abs().float() for w in weights]).median(dim=0).values.cpu()
        else:
            act_r = first.channel_absmax
            w_r = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0).cpu()
        if step.method == "smoothquant" and step.alpha == "auto":
            specs = [scheme.resolve(n) if scheme is not None else None for n in names]
            if any(ls is None or not ls.is_quantized for ls in specs) or first.rows is None:
                if scheme is None or first.rows is None:
                    raise QDoctorError("alpha: auto needs the target scheme and sampled calibration rows")
                report.alphas[prefix + pair.producer] = None
                continue  # a consumer stays in high precision: leave the pair alone
            alpha, s = search_alpha([stats[n] for n in names], weights, specs, act_r, w_r)
            report.alphas[prefix + pair.producer] = alpha
            if alpha is None:
                continue
        elif step.method == "smoothquant":
            s = smoothquant_scales(act_r, w_r, step.alpha)
        else:
            s = bismooth_scales(act_r, w_r, step.alpha)
        for n, w in zip(names, weights):
            report.weight_absmax_before[n] = float(w.detach().abs().max())
        fold_scales(block, arch, pair, s)
        for n, w in zip(names, weights):
            report.weight_absmax_after[n] = float(w.detach().abs().max())
        for st in {id(stats[n]): stats[n] for n in names}.values():  # consumers may share one object
            st.rescale_channels(1.0 / s.cpu())
        report.pairs += 1
    return report
