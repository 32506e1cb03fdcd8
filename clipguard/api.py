"""clipguard's public Python API over shards: score, sample, calibrate, filter.

Thin, typed wrappers over the functions the commands call, with the commands' defaults, so a
script gets the same files and the same checks as ``clipguard score|calibrate|filter``. Shard
arguments take what the command line takes (folders, globs, brace patterns, URLs). A model is a
name (``"clipguard-reference"``, ``"ViT-B-32"``, a checkpoint path), a `ModelSpec` or a
`LoadedModel`. The audit is its own package: ``clipguard.audit.run_audit(AuditConfig(...))``, and
``clipguard.read_signal`` reads any signal's column back for a set of pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from clipguard.model.loading import LoadedModel, ModelSpec

if TYPE_CHECKING:
    from clipguard.calibration.labelsample import SampleOutput
    from clipguard.calibration.run import CalibrationRun
    from clipguard.filtering.run import FilterSummary
    from clipguard.scoring.run import ScoreSummary

ShardsInput = Union[str, Path, Sequence[Union[str, Path]]]
ModelInput = Union[str, ModelSpec, LoadedModel]
DEFAULT_TARGET_FPR = 0.01


def score(
    shards: ShardsInput,
    out: str | Path,
    model: ModelInput = "ViT-B-32",
    batch_size: int = 64,
    workers: int = 0,
    save_embeddings: bool = False,
    allow_pipe: bool = False,
) -> ScoreSummary:
    """Score every pair of the shards into ``out`` (one Parquet and stats file per shard); a
    rerun skips finished shards, as `clipguard score` does."""
    from clipguard.scoring.run import ScoreConfig, score_shards

    config = ScoreConfig(batch_size=batch_size, workers=workers, save_embeddings=save_embeddings)
    return score_shards(_shards(shards, allow_pipe), _loaded(model), out, config)


def sample(scores: str | Path, out: str | Path, n: int, seed: int = 0, stratify: bool = False) -> SampleOutput:
    """Draw ``n`` scored pairs for a person to label, as `clipguard sample SCORES` does:
    sample.csv (fill its label column), sample_design.json and a self-contained index.html."""
    from clipguard.calibration.labelsample import SampleRequest, sample_for_labelling

    return sample_for_labelling(Path(scores), Path(out), SampleRequest(n=n, seed=seed, stratify=stratify))


def calibrate(
    scores: str | Path,
    labels: str | Path,
    out: str | Path = ".",
    target_fpr: float | None = None,
    target_recall: float | None = None,
    max_f1: bool = False,
    criterion: str = "bound",
    confidence: float = 0.95,
    seed: int = 0,
) -> CalibrationRun:
    """Choose gamma from labelled pairs of a score folder (a filled sample.csv, a page's
    labels.csv or an attack's poison_manifest.json); writes calibration.json and densities.png.
    With no target, the lowest gamma whose false-positive rate stays <= 1%."""
    from clipguard.calibration.run import CalibrateRequest, calibrate_scores

    if target_fpr is None and target_recall is None and not max_f1:
        target_fpr = DEFAULT_TARGET_FPR
    request = CalibrateRequest(
        labels=Path(labels), out_dir=Path(out), target_fpr=target_fpr, target_recall=target_recall,
        max_f1=max_f1, criterion=criterion, confidence=confidence, seed=seed,
    )
    return calibrate_scores(Path(scores), request)


def filter(  # noqa: A001 - clipguard.filter mirrors `clipguard filter`
    shards: ShardsInput,
    out: str | Path,
    quarantine: str | Path,
    gamma: float | None = None,
    calibration: str | Path | None = None,
    scores: str | Path | None = None,
    model: ModelInput | None = None,
    shard_size: int | None = None,
    batch_size: int = 64,
    allow_pipe: bool = False,
) -> FilterSummary:
    """Copy clean pairs to ``out`` and flagged or unscorable pairs to ``quarantine``; give
    exactly one of ``gamma`` and ``calibration``. Without ``model``, the model the ``scores``
    folder or the calibration records scores any shard not yet scored (and any other is refused)."""
    from clipguard.filtering.run import DEFAULT_SHARD_SIZE, FilterConfig, check_output_folders, filter_shards
    from clipguard.filtering.threshold import resolve_threshold
    from clipguard.scoring.recorded import ModelRequest, model_spec_for_run, recorded_model
    from clipguard.scoring.run import ScoreConfig

    threshold = resolve_threshold(gamma, Path(calibration) if calibration is not None else None)
    shard_list = _shards(shards, allow_pipe)
    config = FilterConfig(
        clean_dir=out, quarantine_dir=quarantine, shard_size=shard_size or DEFAULT_SHARD_SIZE,
        reuse_scores=Path(scores) if scores is not None else None, score=ScoreConfig(batch_size=batch_size),
    )
    check_output_folders(shard_list, config)
    if model is None:
        recorded = recorded_model(config.reuse_scores, Path(calibration) if calibration is not None else None)
        model = model_spec_for_run(ModelRequest(), recorded)
    return filter_shards(shard_list, _loaded(model), threshold, config)


def _shards(shards: ShardsInput, allow_pipe: bool):
    from clipguard.data.shardspec import resolve_shards

    specs = [shards] if isinstance(shards, (str, Path)) else list(shards)
    return resolve_shards([str(s) for s in specs], allow_pipe=allow_pipe)


def _loaded(model: ModelInput) -> LoadedModel:
    from clipguard.scoring.inmemory import as_loaded_model

    return as_loaded_model(model)
