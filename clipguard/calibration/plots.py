"""The paper's Figure 6 for the user's data: densities of clean and poisoned distances, gamma marked.

Each labelled pair counts 1 / pi times, so a stratified sample that over-samples the tail still
shows the population's shapes. Densities come from a weighted Gaussian kernel estimate whose
bandwidth follows Silverman's rule on the effective sample size (sum w)^2 / sum w^2; a group with
one pair, or with identical distances, borrows the bandwidth of all labelled pairs, so a tiny
poison group still shows as a bump (each pair is also drawn as a rug tick).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clipguard.errors import CalibrationError

CLEAN_COLOUR = "#1f77b4"
POISON_COLOUR = "#d62728"
CANARY_COLOUR = "#7f7f7f"
MIN_BANDWIDTH = 1e-3


@dataclass(frozen=True)
class DensityPlot:
    """Where the figure went and what it shows."""

    path: Path
    n_clean: int
    n_poison: int
    n_canaries: int


def weighted_bandwidth(values: np.ndarray, weights: np.ndarray) -> float | None:
    """Silverman's rule with weighted spread and effective n; None when it cannot be computed."""
    if values.size < 2:
        return None
    mean = np.average(values, weights=weights)
    spread = np.sqrt(np.average((values - mean) ** 2, weights=weights))
    if spread <= 0:
        return None
    effective_n = weights.sum() ** 2 / np.sum(weights**2)
    return float(max(1.06 * spread * effective_n ** (-0.2), MIN_BANDWIDTH))


def weighted_density(values: np.ndarray, weights: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Weighted Gaussian kernel density on `grid`, integrating to 1."""
    z = (grid[:, None] - values[None, :]) / bandwidth
    kernel = np.exp(-0.5 * z**2) / (bandwidth * np.sqrt(2 * np.pi))
    return kernel @ (weights / weights.sum())


def plot_distance_densities(
    distances: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    gamma: float,
    path: str | Path,
    canary_distances: np.ndarray | None = None,
    title: str = "Cosine distance of labelled pairs under the reference model",
) -> DensityPlot:
    """Write a PNG of the weighted clean and poison densities with gamma marked."""
    distances = np.asarray(distances, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    weights = np.asarray(weights, dtype=float)
    if distances.size == 0:
        raise CalibrationError("nothing to plot: no labelled pairs")
    if not (distances.shape == labels.shape == weights.shape):
        raise CalibrationError("distances, labels and weights must have the same length")
    canaries = None if canary_distances is None else np.asarray(canary_distances, dtype=float)
    fallback = weighted_bandwidth(distances, weights) or 0.01
    shown = [distances, [gamma]] + ([canaries] if canaries is not None and canaries.size else [])
    low, high = float(np.min(np.concatenate(shown))), float(np.max(np.concatenate(shown)))
    pad = max(3 * fallback, 0.02)
    grid = np.linspace(low - pad, high + pad, 512)

    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure state is touched.
    fig = Figure(figsize=(7, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    groups = [
        ("clean", distances[~labels], weights[~labels], CLEAN_COLOUR),
        ("poison", distances[labels], weights[labels], POISON_COLOUR),
    ]
    if canaries is not None and canaries.size:
        groups.append(("canary", canaries, np.ones(canaries.size), CANARY_COLOUR))
    for name, values, group_weights, colour in groups:
        if values.size == 0:
            continue
        bandwidth = weighted_bandwidth(values, group_weights) or fallback
        density = weighted_density(values, group_weights, grid, bandwidth)
        style = "--" if name == "canary" else "-"
        ax.plot(grid, density, style, color=colour, label=f"{name} (n={values.size})")
        if name != "canary":
            ax.fill_between(grid, density, color=colour, alpha=0.2)
        ax.plot(values, np.zeros_like(values), "|", color=colour, markersize=10, alpha=0.6)
    ax.axvline(gamma, color="black", linestyle=":", linewidth=1.5)
    ax.annotate(f"γ = {gamma:.3f}", xy=(gamma, 1), xycoords=("data", "axes fraction"),
                xytext=(4, -14), textcoords="offset points",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_xlabel("cosine distance (1 − cosine similarity)")
    ax.set_ylabel("density (weighted by 1/inclusion probability)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return DensityPlot(path, int((~labels).sum()), int(labels.sum()),
                       0 if canaries is None else int(canaries.size))
