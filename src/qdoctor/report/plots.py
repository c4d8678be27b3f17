"""Scan plots (matplotlib, Agg backend) returned as PNG bytes, for the HTML report.

- ``heatmap``: block × projection grid of one per-layer number (max|W|, spike ratio), log colour
  scale, the flagged cells outlined;
- ``error_strip``: one point per layer, in model order, of chosen error keys (log scale) with
  the decision threshold;
- ``error_bars``: grouped bars of every scheme's error for a few layers;
- ``token_profile``: per-position max / median token absmax of the spikiest layers;
- ``dim_profile``: per-input-dimension weight absmax of the worst weight layers;
- ``value_bars`` / ``grouped_errorbars``: bars of a few measured values (perplexities, accuracies)
  with error bars and a reference line, for the doctor report.
"""

from __future__ import annotations

import io
import math

from qdoctor.scan.findings import LayerFinding

_FLAG = {"weight-outlier": "#d62728", "activation-spike": "#ff7f0e", "both": "#9467bd", "ok": "#7f7f7f"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _grid(findings: list[LayerFinding]):
    blocks = sorted({f.block for f in findings})
    projs: list[str] = []
    for f in findings:
        if f.projection not in projs:
            projs.append(f.projection)
    return blocks, projs


def compact(v: float) -> str:
    """A cell label of at most 4 characters: 3198, 640, 12, 9.2, 0.74, 2e+04."""
    if v >= 9999.5:
        return f"{v:.0e}".replace("e+0", "e")
    if v >= 99.5:
        return f"{v:.0f}"
    if v >= 9.95:
        return f"{v:.0f}"
    if v >= 0.995:
        return f"{v:.1f}"
    return f"{v:.2f}".lstrip("0")


def heatmap(findings: list[LayerFinding], value, title: str, flagged=None, cbar_label: str = "") -> bytes:
    """Block (columns) × projection (rows) grid of ``value(finding)``; ``flagged(finding)`` cells
    are outlined in black."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _plt()
    blocks, projs = _grid(findings)
    grid = np.full((len(projs), len(blocks)), np.nan)
    cells = {}
    for f in findings:
        r, c = projs.index(f.projection), blocks.index(f.block)
        grid[r, c] = max(float(value(f)), 1e-6)
        cells[(r, c)] = f
    width = max(6.0, 0.42 * len(blocks) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(projs) + 1.6))
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (1e-3, 1.0)
    if vmax <= vmin:
        vmax = vmin * 10
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax))
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=8)
    ax.set_yticks(range(len(projs)), projs, fontsize=9)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=11, loc="left")
    log_mid = math.sqrt(vmin * vmax)
    for (r, c), f in cells.items():
        v = grid[r, c]
        ax.text(c, r, compact(v), ha="center", va="center", fontsize=6.5,
                color="black" if v > log_mid else "white")
        if flagged is not None and flagged(f):
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2))
    cb = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.set_label(cbar_label, fontsize=8)
    return _png(fig)


def error_strip(findings: list[LayerFinding], keys: list[tuple[str, str]], threshold: float | None, title: str,
                ylabel: str = "relative output error") -> bytes:
    """Each layer (x, model order) and each (key, label): errors[key] on a log axis; flagged layers
    get a coloured background tick."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 3.4))
    xs = list(range(len(findings)))
    markers = ["o", "s", "^", "v", "D", "x"]
    for (key, label), m in zip(keys, markers):
        ys = [max(f.errors.get(key, float("nan")), 1e-6) for f in findings]
        ax.plot(xs, ys, marker=m, markersize=3.5, linestyle="none", alpha=0.85, label=label)
    for x, f in zip(xs, findings):
        if f.verdict != "ok":
            ax.axvspan(x - 0.5, x + 0.5, color=_FLAG[f.verdict], alpha=0.3, linewidth=0)
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"{100 * threshold:g}%")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    # One tick per block, at the middle of its layers; thin lines separate the blocks.
    spans: dict[int, list[int]] = {}
    for x, f in zip(xs, findings):
        spans.setdefault(f.block, []).append(x)
    for b, members in spans.items():
        if members[0] > 0:
            ax.axvline(members[0] - 0.5, color="#cccccc", linewidth=0.5, zorder=0)
    centers = [(members[0] + members[-1]) / 2 for members in spans.values()]
    step = max(1, len(centers) // 30)
    ax.set_xticks(centers[::step], [str(b) for b in spans][::step], fontsize=8)
    ax.tick_params(axis="x", length=0)
    ax.set_xlabel("block (layers in block order: " + ", ".join(dict.fromkeys(f.projection for f in findings)) + ")")
    ax.set_xlim(-0.5, len(findings) - 0.5)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(fontsize=8, ncol=len(keys) + 1, loc="upper right")
    return _png(fig)


def error_bars(findings: list[LayerFinding], keys: list[tuple[str, str]], title: str) -> bytes:
    """Grouped bars: for each layer in ``findings``, one bar per (key, label), log scale."""
    import numpy as np

    plt = _plt()
    n = len(findings)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * n + 3), 3.8))
    width = 0.8 / max(1, len(keys))
    x = np.arange(n)
    for i, (key, label) in enumerate(keys):
        ys = [max(f.errors.get(key, float("nan")), 1e-6) for f in findings]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, ys, width, label=label)
    ax.axhline(0.01, color="red", linestyle="--", linewidth=1, label="1%")
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{f.block}.{f.projection}" for f in findings], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative output error")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(fontsize=7, ncol=min(len(keys) + 1, 5), loc="upper left", bbox_to_anchor=(0, -0.28))
    return _png(fig)


def token_profile(findings: list[LayerFinding], title: str) -> bytes:
    """Per-position token absmax (max over samples, solid; median over samples, dotted), log-log
    (position + 1 on x) so that the first positions — where spikes usually sit — stay visible."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 3.8))
    for f in findings:
        a = f.activation
        xs = range(1, len(a.token_max_by_position) + 1)
        line, = ax.plot(xs, a.token_max_by_position, linewidth=1,
                        label=f"{f.block}.{f.projection} (ratio {f.spike_ratio:.3g})")
        ax.plot(xs, a.token_median_by_position, linewidth=0.9, linestyle=":", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token position in the calibration window + 1 (log scale)")
    ax.set_ylabel("max |x| over channels")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def dim_profile(findings: list[LayerFinding], title: str, attr: str = "weight") -> bytes:
    """Per-input-dimension absmax of W (``attr='weight'``) or of X (``'activation'``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 3.2))
    for f in findings:
        prof = f.weight.dim_absmax if attr == "weight" else f.activation.channel_absmax
        ax.plot(range(len(prof)), prof, linewidth=0.8, label=f"{f.block}.{f.projection}")
    ax.set_yscale("log")
    ax.set_xlabel("input dimension j")
    ax.set_ylabel("max_n |W[n, j]|" if attr == "weight" else "max_t |X[t, j]|")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    return _png(fig)


def value_bars(labels: list[str], values: list[float], title: str, ylabel: str, errors: list[float] | None = None,
               reference: tuple[float, str] | None = None, colors: list[str] | None = None) -> bytes:
    """One bar per label (``errors``: ± error bars, e.g. a standard error), each labelled with its
    value; ``reference`` = (y, label): a dashed horizontal line (a budget limit)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.25 * len(labels) + 2), 3.2))
    x = list(range(len(labels)))
    ax.bar(x, values, 0.6, yerr=errors, capsize=5 if errors else 0, color=colors, edgecolor="#333", linewidth=0.5)
    for xi, v in zip(x, values):
        ax.annotate(f"{v:.3g}", (xi, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    if reference is not None:
        ax.axhline(reference[0], color="red", linestyle="--", linewidth=1, label=reference[1])
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(x, labels, rotation=15 if max(len(s) for s in labels) > 14 else 0, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11, loc="left")
    return _png(fig)


def grouped_errorbars(groups: list[str], series: list[tuple[str, list[float], list[float]]], title: str,
                      ylabel: str) -> bytes:
    """For each group (a task), one bar per series (label, values, ± errors)."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2.5), 3.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, values, errors) in enumerate(series):
        xs = x + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, values, width, yerr=errors, capsize=4, label=label, edgecolor="#333", linewidth=0.5)
        for xi, v in zip(xs, values):
            ax.annotate(f"{v:.3g}", (xi, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(x, groups, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11, loc="left")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)
