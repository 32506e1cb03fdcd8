"""clipguard checkpoints: weights as safetensors plus a JSON sidecar that names the architecture.

``model.safetensors`` + ``model.json``. The sidecar lets every command take the checkpoint path
alone as its MODEL argument; it also records how the weights were made (data, hyperparameters,
seed, steps), which the caller passes in as ``provenance``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from clipguard.errors import ModelLoadError

SIDECAR_FORMAT = "clipguard-checkpoint/1"


def sidecar_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(model: torch.nn.Module, path: Path, architecture: str, provenance: dict[str, Any] | None = None) -> Path:
    """Write weights (contiguous, shared tensors de-duplicated) and the sidecar, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": SIDECAR_FORMAT, "architecture": architecture})
    sidecar = {
        "format": SIDECAR_FORMAT,
        "architecture": architecture,
        # Embedding the config keeps a checkpoint of a custom architecture usable on its own.
        "model_config": open_clip.get_model_config(architecture),
        "weights": path.name,
        **(provenance or {}),
    }
    side_tmp = sidecar_path(path).with_name(sidecar_path(path).name + ".tmp")
    side_tmp.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    for written in (tmp, side_tmp):
        written.chmod(0o644)  # safetensors writes 0600; checkpoints are meant to be shared
    tmp.replace(path)
    side_tmp.replace(sidecar_path(path))
    return path


def read_sidecar(weights: Path) -> dict[str, Any] | None:
    side = sidecar_path(weights)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"checkpoint sidecar {side} is not valid JSON: {exc}") from exc
    if data.get("format") != SIDECAR_FORMAT or "architecture" not in data:
        return None
    return data
