"""The model that scores and calibrations record, turned back into a `ModelSpec` to load.

A run that reads scores (filter, gate, sample resuming a folder) must score any missing shards
with the model that wrote them, and a gamma only means something for the model it was chosen
on. So the default model of such a run is the recorded one, not a hard-coded ViT-B-32 (which,
offline, cannot even be fetched): a score folder's summary and a calibration.json both record
`ModelInfo.to_dict()` (architecture, weights source and path, sha256, precision) and its
fingerprint. An explicit --model/--pretrained still wins, and the existing fingerprint checks
then refuse it when it is not the recorded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError, ModelLoadError
from clipguard.model.loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, ModelSpec


@dataclass(frozen=True)
class RecordedModel:
    """A model as a score folder or calibration file records it."""

    record: dict[str, Any]  # ModelInfo.to_dict()
    fingerprint: dict[str, Any] | None
    where: str  # "score folder X" or "calibration X", for messages

    @property
    def architecture(self) -> str:
        return str(self.record.get("architecture") or "?")


@dataclass(frozen=True)
class ModelRequest:
    """What the user typed; None where they typed nothing, so the recorded model can be used."""

    name: str | None = None
    pretrained: str | None = None
    model_config: Path | None = None
    device: str = "cpu"
    precision: str | None = None

    @property
    def names_a_model(self) -> bool:
        return self.name is not None or self.pretrained is not None or self.model_config is not None


def recorded_model(scores: Path | None = None, calibration: Path | None = None) -> RecordedModel | None:
    """The model of the score folder (first) or of the calibration file; None when neither
    records one (no folder yet, an old calibration without a model, --gamma)."""
    if scores is not None:
        found = _from_score_folder(Path(scores))
        if found is not None:
            return found
    if calibration is not None:
        return _from_calibration(Path(calibration))
    return None


def model_spec_for_run(request: ModelRequest, recorded: RecordedModel | None) -> ModelSpec:
    """The user's model when they named one, else the recorded model, else the default."""
    if request.names_a_model or recorded is None:
        return ModelSpec(
            name=request.name or DEFAULT_MODEL,
            pretrained=request.pretrained if request.pretrained is not None else DEFAULT_PRETRAINED,
            model_config=request.model_config,
            device=request.device,
            precision=request.precision or "fp32",
        )
    return spec_from_record(recorded, request.device, request.precision)


def spec_from_record(recorded: RecordedModel, device: str = "cpu", precision: str | None = None) -> ModelSpec:
    """The ModelSpec that loads the recorded model again: a hub tag by its tag (the tag carries
    open_clip's per-tag settings such as QuickGELU), a bundled model or weights file by its path."""
    record = recorded.record
    architecture = record.get("architecture")
    source = record.get("weights_source")
    precision = precision or record.get("precision") or "fp32"
    if not architecture:
        raise ModelLoadError(f"the {recorded.where} names no model; pass --model (and --pretrained)")
    if source == "random":
        raise ModelLoadError(
            f"the {recorded.where} was scored by {architecture} with random weights, which cannot be "
            "loaded again; pass --model/--pretrained, or rescore with a weights file"
        )
    if source == "hub":
        return ModelSpec(name=architecture, pretrained=record.get("pretrained"), device=device, precision=precision)
    if source == "bundled":
        bundle = _bundle_named_by(record)
        if bundle is not None:
            # By name, not by path: the package (and its weights) may live elsewhere on this machine.
            return ModelSpec(name=bundle, pretrained=None, device=device, precision=precision)
    weights = record.get("weights_path")
    if not weights or not Path(weights).is_file():
        raise ModelLoadError(
            f"the {recorded.where} was scored by {architecture} with weights {weights} "
            f"(sha256 {str(record.get('weights_sha256'))[:12]}), which is not on this machine; put the "
            "file back at that path, or pass --model/--pretrained for the same weights"
        )
    if _is_clipguard_checkpoint(Path(weights)):
        # Loading by path reads the checkpoint's sidecar, which names (and may define) the architecture.
        return ModelSpec(name=weights, pretrained=None, device=device, precision=precision)
    return ModelSpec(name=architecture, pretrained=weights, device=device, precision=precision)


def _bundle_named_by(record: dict[str, Any]) -> str | None:
    from clipguard.model import bundled

    stem = Path(str(record.get("weights_path") or "")).stem
    for name in bundled.names():
        if name == stem:
            return name
    return None


def _is_clipguard_checkpoint(path: Path) -> bool:
    from clipguard.model.checkpoint import read_sidecar

    try:
        return read_sidecar(path) is not None
    except ClipguardError:
        return False


def _from_score_folder(folder: Path) -> RecordedModel | None:
    from clipguard.scoring.stats import folder_entries

    if not folder.is_dir() or not folder_entries(folder):
        return None  # a folder this run will create or fill: nothing recorded yet
    from clipguard.scoring.run import load_manifest

    manifest = load_manifest(folder)  # raises when the folder mixes models
    model = manifest.get("model")
    if not isinstance(model, dict):
        return None
    return RecordedModel(record=model, fingerprint=manifest.get("fingerprint"), where=f"score folder {folder}")


def _from_calibration(path: Path) -> RecordedModel | None:
    try:
        payload = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None  # resolve_threshold reads it too and reports what is wrong with it
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, dict):
        return None
    return RecordedModel(record=model, fingerprint=payload.get("fingerprint"), where=f"calibration {path}")
