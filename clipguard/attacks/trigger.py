"""The backdoor trigger of Carlini & Terzis: a small fixed patch stamped onto an image.

The patch is a pure function of (pattern, side length): the same spec stamps the same pixels on
every image, in the attack and in ``evaluate``'s zero-shot backdoor test. Its side is a fraction
of the image's shorter side, so it keeps its relative size through any resize in preprocessing.
Stamped images are re-encoded in their own format, with the source JPEG's own quantisation
tables where there are any, so the compression settings do not single them out.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image

from clipguard.attacks.goals import AttackError

# Fixed, so that the "noise" patch is the same on every machine and in every run.
NOISE_PATTERN_SEED = 20220617
NOISE_CELLS = 8
CHECKER_CELLS = 4
FALLBACK_JPEG_QUALITY = 95


class TriggerPattern(str, Enum):
    checkerboard = "checkerboard"  # black and white squares, BadNets-style
    noise = "noise"  # fixed random colour cells
    white = "white"


class TriggerPosition(str, Enum):
    bottom_right = "bottom-right"
    bottom_left = "bottom-left"
    top_left = "top-left"
    top_right = "top-right"
    center = "center"


@dataclass(frozen=True)
class TriggerSpec:
    pattern: TriggerPattern = TriggerPattern.checkerboard
    size: float = 0.125  # side of the square patch, as a fraction of the image's shorter side
    position: TriggerPosition = TriggerPosition.bottom_right

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", TriggerPattern(self.pattern))
        object.__setattr__(self, "position", TriggerPosition(self.position))
        if not 0.0 < float(self.size) <= 1.0:
            raise AttackError(f"trigger size {self.size} must be a fraction of the image side in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern.value, "size": float(self.size), "position": self.position.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriggerSpec:
        return cls(**{k: data[k] for k in asdict(cls()) if k in data})

    def side(self, width: int, height: int) -> int:
        return max(1, round(self.size * min(width, height)))


def _cells(pattern: TriggerPattern) -> np.ndarray:
    if pattern is TriggerPattern.checkerboard:
        grid = (np.add.outer(np.arange(CHECKER_CELLS), np.arange(CHECKER_CELLS)) % 2) * 255
        return np.repeat(grid[:, :, None], 3, axis=2).astype(np.uint8)
    if pattern is TriggerPattern.noise:
        rng = np.random.default_rng(NOISE_PATTERN_SEED)
        return rng.integers(0, 256, (NOISE_CELLS, NOISE_CELLS, 3), dtype=np.uint8)
    return np.full((1, 1, 3), 255, dtype=np.uint8)


def trigger_patch(spec: TriggerSpec, side: int) -> Image.Image:
    """The RGB patch of ``side`` x ``side`` pixels (nearest-neighbour, so cells stay sharp)."""
    return Image.fromarray(_cells(spec.pattern), "RGB").resize((side, side), Image.NEAREST)


def patch_box(spec: TriggerSpec, width: int, height: int) -> tuple[int, int, int, int]:
    side = spec.side(width, height)
    left = {"bottom-right": width - side, "top-right": width - side,
            "bottom-left": 0, "top-left": 0, "center": (width - side) // 2}[spec.position.value]
    top = {"bottom-right": height - side, "bottom-left": height - side,
           "top-left": 0, "top-right": 0, "center": (height - side) // 2}[spec.position.value]
    return left, top, left + side, top + side


def stamp_image(image: Image.Image, spec: TriggerSpec) -> Image.Image:
    """A copy of ``image`` (converted to RGB) with the patch pasted on."""
    stamped = image.convert("RGB") if image.mode != "RGB" else image.copy()
    box = patch_box(spec, *stamped.size)
    stamped.paste(trigger_patch(spec, box[2] - box[0]), box[:2])
    return stamped


def stamp_image_bytes(data: bytes, spec: TriggerSpec) -> bytes:
    """Decode, stamp and re-encode in the source's format (JPEG keeps its own tables)."""
    try:
        source = Image.open(io.BytesIO(data))
        source.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise AttackError(f"cannot stamp a trigger on an unreadable image: {type(exc).__name__}: {exc}") from exc
    fmt = source.format or "PNG"
    out = io.BytesIO()
    if fmt == "JPEG" and source.mode == "RGB":
        box = patch_box(spec, *source.size)
        source.paste(trigger_patch(spec, box[2] - box[0]), box[:2])
        source.save(out, format="JPEG", quality="keep", subsampling="keep")
    elif fmt == "JPEG":
        stamp_image(source, spec).save(out, format="JPEG", quality=FALLBACK_JPEG_QUALITY)
    else:
        stamp_image(source, spec).save(out, format=fmt)
    return out.getvalue()


def has_trigger(image: Image.Image, spec: TriggerSpec, tolerance: float = 40.0) -> bool:
    """Whether the patch area matches the patch (mean absolute difference per channel)."""
    box = patch_box(spec, *image.size)
    area = np.asarray(image.convert("RGB").crop(box), dtype=np.float64)
    patch = np.asarray(trigger_patch(spec, box[2] - box[0]), dtype=np.float64)
    return float(np.abs(area - patch).mean()) <= tolerance
