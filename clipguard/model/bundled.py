"""Tiny CLIP models that ship inside the package, addressable by a short name without a path.

They are trained on the synthetic world's `reference` split (see `clipguard.synth`), so the whole
attack -> train -> filter -> repair loop runs offline in minutes. `victim` plays the pretrained
starting point of the model under attack; `reference` plays the defender's independent scorer
(the paper scores with ViT-B/16 while the victim is ViT-B/32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipguard.errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "synth" / "weights"


@dataclass(frozen=True)
class BundledModel:
    name: str
    architecture: str
    weights: Path
    role: str


_BUNDLED = {
    "clipguard-victim": BundledModel(
        "clipguard-victim", "clipguard-tiny-victim", WEIGHTS_DIR / "clipguard-victim.safetensors",
        "starting point of the model under attack",
    ),
    "clipguard-reference": BundledModel(
        "clipguard-reference", "clipguard-tiny-reference", WEIGHTS_DIR / "clipguard-reference.safetensors",
        "the defender's reference scorer",
    ),
}


def names() -> list[str]:
    return list(_BUNDLED)


def is_bundled(name: str) -> bool:
    return name in _BUNDLED


def resolve(name: str) -> BundledModel:
    bundle = _BUNDLED[name]
    if not bundle.weights.is_file():
        raise ModelLoadError(
            f"bundled model '{name}' has no weights at {bundle.weights}; rebuild them with "
            "`python -m clipguard.synth.train_bundled` (see README)"
        )
    return bundle
