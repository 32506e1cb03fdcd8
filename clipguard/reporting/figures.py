"""The report's two figures as PNG bytes: the distance density with gamma, and flagged rate by shard.

The density is that of every scored pair (no labels needed), drawn with the same weighted kernel
estimate as the calibration's Figure 6 (clipguard/calibration/plots.py), so the two figures can be
read side by side. Figures are bare Agg Figures: no pyplot, no global backend state.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clipguard.calibration.plots import CLEAN_COLOUR, POISON_COLOUR, weighted_bandwidth, weighted_density

# A kernel estimate costs grid x pairs; beyond this many pairs a seeded subsample shows the same shape.
MAX_DENSITY_PAIRS = 20_000
MAX_SHARD_BARS = 80
DPI = 100


@dataclass(frozen=True)
class Interval:
    """An estimate at gamma, as the calibration states it."""

    name: str
    point: float | None
    lower: float
    upper: float


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def density_png(distances: np.ndarray, gamma: float | None, intervals: list[Interval], seed: int = 0) -> bytes:
    """Density of all scored distances; the flagged side of gamma shaded, its estimates written."""
    values = np.asarray(distances, dtype=float)
    values = values[np.isfinite(values)]
    if values.size > MAX_DENSITY_PAIRS:
        values = np.random.default_rng(seed).choice(values, MAX_DENSITY_PAIRS, replace=False)
    fig = Figure(figsize=(7.5, 3.6), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if values.size == 0:
        ax.text(0.5, 0.5, "no pair could be scored", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _png(fig)
    weights = np.ones(values.size)
    bandwidth = weighted_bandwidth(values, weights) or 0.01
    shown = np.concatenate([values, [gamma]]) if gamma is not None else values
    pad = max(3 * bandwidth, 0.02)
    grid = np.linspace(shown.min() - pad, shown.max() + pad, 512)
    density = weighted_density(values, weights, grid, bandwidth)
    ax.plot(grid, density, color=CLEAN_COLOUR, label=f"all scored pairs (n={distances.size:,})")
    ax.fill_between(grid, density, color=CLEAN_COLOUR, alpha=0.15)
    ax.plot(values, np.zeros_like(values), "|", color=CLEAN_COLOUR, markersize=8, alpha=0.3)
    if gamma is not None:
        flagged = grid >= gamma
        ax.fill_between(grid[flagged], density[flagged], color=POISON_COLOUR, alpha=0.35, label="flagged (d ≥ γ)")
        ax.axvline(gamma, color="black", linestyle=":", linewidth=1.5)
        ax.annotate(f"γ = {gamma:.4f}", xy=(gamma, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -14), textcoords="offset points",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    if intervals:
        # Above the axes, where neither the curve, the gamma label nor the legend can cover it.
        ax.set_title("at γ: " + " · ".join(_interval_text(i) for i in intervals), fontsize=8)
    ax.set_xlabel("cosine distance (1 − cosine similarity)")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _interval_text(interval: Interval) -> str:
    point = "undefined" if interval.point is None else f"{interval.point:.3f}"
    return f"{interval.name} {point} [{interval.lower:.3f}, {interval.upper:.3f}]"


def shard_rate_png(names: list[str], rates: list[float], overall: float) -> bytes:
    """One bar per shard (the highest rates when there are many), the overall rate as a line."""
    order = list(range(len(names)))
    title = "flagged rate by shard"
    if len(names) > MAX_SHARD_BARS:
        order = sorted(order, key=lambda i: -rates[i])[:MAX_SHARD_BARS]
        title += f" (the {MAX_SHARD_BARS} highest of {len(names):,} shards)"
    fig = Figure(figsize=(7.5, 2.8), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(range(len(order)), [rates[i] for i in order], color=POISON_COLOUR, alpha=0.7)
    ax.axhline(overall, color="black", linestyle=":", linewidth=1.2, label=f"all shards {overall:.2%}")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([names[i] for i in order], rotation=90 if len(order) > 8 else 0, fontsize=7)
    ax.set_ylabel("flagged / scored")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0, top=max(max(rates, default=0), overall, 1e-3) * 1.15)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)
