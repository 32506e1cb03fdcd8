"""Calibrating the flagging threshold gamma from a labelled sample, with error bars.

sampling   which pairs to label (uniform or distance-stratified) and their inclusion probabilities
estimates  poisons, precision, recall, FPR at a gamma for the full data, with intervals; canary recall
threshold  choose gamma for a target FPR, a target recall or max F1; labels needed for a target width
plots      weighted clean / poison distance densities with gamma marked (the paper's Figure 6)

Pure numpy/scipy/matplotlib: no shards, no models.
"""

from clipguard.calibration.estimates import (
    CurveMetric,
    Estimate,
    EstimateCurve,
    Population,
    ThresholdEstimates,
    canary_recall,
    canary_recall_curve,
    clopper_pearson,
    estimate_at,
    estimate_curve,
    weighted_roc_auc,
)
from clipguard.calibration.plots import DensityPlot, plot_distance_densities
from clipguard.calibration.sampling import (
    LabelledSample,
    SampleDesign,
    Stratum,
    draw_sample,
    label_sample,
)
from clipguard.calibration.threshold import Calibration, LabelPlan, choose_threshold, labels_needed

__all__ = [
    "Calibration",
    "CurveMetric",
    "DensityPlot",
    "Estimate",
    "EstimateCurve",
    "LabelPlan",
    "LabelledSample",
    "Population",
    "SampleDesign",
    "Stratum",
    "ThresholdEstimates",
    "canary_recall",
    "canary_recall_curve",
    "choose_threshold",
    "clopper_pearson",
    "draw_sample",
    "estimate_at",
    "estimate_curve",
    "label_sample",
    "labels_needed",
    "plot_distance_densities",
    "weighted_roc_auc",
]
