"""Everything beyond the weights that a stopped run needs to continue exactly where it stopped.

``X.safetensors`` holds the weights (an ordinary clipguard checkpoint); ``X.resume.safetensors``
holds AdamW's moments per parameter name, the torch RNG state and the loss history as tensors,
and the run's position (epoch, batches done in it, step), tallies and identity as JSON metadata.
No pickle anywhere. The learning rate is a pure function of the step, so there is no scheduler
state to keep.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipguard.training.config import BadSampleTally, FinetuneError

RESUME_FORMAT = "clipguard-resume/1"
_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def resume_state_path(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".resume.safetensors")


@dataclass
class RunPosition:
    """Where a run is. ``batches_in_epoch`` counts the batches of ``epoch`` already trained on."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    total_steps: int = 0
    wall_seconds: float = 0.0  # summed over every session of the run
    losses: list[float] = field(default_factory=list)
    tally: BadSampleTally = field(default_factory=BadSampleTally)

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("losses")
        values["tally"] = self.tally.to_dict()
        return values


@dataclass
class ResumeState:
    position: RunPosition
    identity: dict[str, Any]  # config, data and starting model: what makes it the same run
    moments: dict[str, dict[str, torch.Tensor]]  # parameter name -> AdamW state
    rng_state: torch.Tensor | None


def save_resume_state(
    path: Path,
    position: RunPosition,
    identity: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    named_parameters: dict[str, torch.nn.Parameter],
) -> Path:
    tensors: dict[str, torch.Tensor] = {
        "rng/torch": torch.get_rng_state(),
        "losses": torch.tensor(position.losses, dtype=torch.float64),
    }
    for name, parameter in named_parameters.items():
        for key, value in optimizer.state.get(parameter, {}).items():
            if key in _MOMENTS and isinstance(value, torch.Tensor):
                tensors[f"{key}/{name}"] = value.detach().contiguous().cpu()
    metadata = {
        "format": RESUME_FORMAT,
        "position": json.dumps(position.to_json()),
        "identity": json.dumps(identity, default=str),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_resume_state(path: Path) -> ResumeState:
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(
            f"no resume state at {path}: a run leaves one only while it is incomplete (stopped, "
            "interrupted or saved with --save-every)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise FinetuneError(f"{path} is not a readable resume state: {exc}") from exc
    if metadata.get("format") != RESUME_FORMAT:
        raise FinetuneError(f"{path} is not a clipguard resume state (format {metadata.get('format')!r})")
    raw = json.loads(metadata["position"])
    tally = BadSampleTally.from_dict(raw.pop("tally", {}))
    losses = tensors.pop("losses", torch.zeros(0, dtype=torch.float64)).tolist()
    position = RunPosition(**raw, losses=losses, tally=tally)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind in _MOMENTS:
            moments.setdefault(name, {})[kind] = value
    return ResumeState(
        position=position,
        identity=json.loads(metadata["identity"]),
        moments=moments,
        rng_state=tensors.get("rng/torch"),
    )


def restore_optimizer(
    optimizer: torch.optim.Optimizer, named_parameters: dict[str, torch.nn.Parameter], moments: dict
) -> None:
    missing = sorted(set(moments) - set(named_parameters))
    if missing:
        raise FinetuneError(
            f"the resume state holds optimizer state for parameters this run does not train "
            f"({', '.join(missing[:3])}...); were the freeze flags different?"
        )
    for name, parameter in named_parameters.items():
        if name in moments:
            # A fused optimizer keeps its step count beside the parameter; the loop one on the CPU.
            fused = bool(optimizer.defaults.get("fused"))
            optimizer.state[parameter] = {
                k: v if k == "step" and not fused else v.to(parameter.device) for k, v in moments[name].items()
            }
