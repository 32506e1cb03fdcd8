"""Score image-caption pairs held in memory: for pipelines that already have the data (a Ray
Data ``map_batches``, a notebook, a crawler) and should not write shards to get a distance.

The same decoding limits and the same encoders as shard scoring, so a pair scores the same in
memory as in a shard. A pair that cannot be scored (an image that does not decode, too many
pixels, an empty caption) gets NaN and its reason in ``errors``; it never fails the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from clipguard.data.pairs import DecodeLimits, crop_to_aspect, open_image
from clipguard.errors import ClipguardError
from clipguard.model.encoding import encode_images, encode_texts, tokenize
from clipguard.model.loading import LoadedModel, ModelSpec

ImageInput = Union[Image.Image, bytes, bytearray, memoryview]
ModelInput = Union[str, ModelSpec, LoadedModel]
DEFAULT_BATCH_SIZE = 64


@dataclass
class PairScores:
    """One entry per input pair, in input order."""

    similarity: np.ndarray  # float32 cosine similarity, NaN where the pair could not be scored
    distance: np.ndarray  # float32 1 - similarity (the score files' cosine_distance), NaN likewise
    errors: list[str | None]  # None where scored, else the reason (the score files' reasons)
    model: dict[str, Any]  # ModelInfo.to_dict() of the model that scored

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    def __len__(self) -> int:
        return len(self.errors)


def as_loaded_model(model: ModelInput) -> LoadedModel:
    """A loaded model from a name (bundled, open_clip architecture, checkpoint path), a spec, or
    a loaded model; loaded once per process, so per-batch calls do not reload it."""
    if isinstance(model, LoadedModel):
        return model
    from clipguard.scoring.run import cached_model

    return cached_model(model if isinstance(model, ModelSpec) else ModelSpec(name=str(model)))


def score_pairs(
    images: Sequence[ImageInput],
    captions: Sequence[str | None],
    model: ModelInput = "ViT-B-32",
    batch_size: int = DEFAULT_BATCH_SIZE,
    limits: DecodeLimits | None = None,
) -> PairScores:
    """Cosine similarity and distance of each (image, caption) under a reference CLIP."""
    images, captions = list(images), list(captions)
    if len(images) != len(captions):
        raise ClipguardError(f"score_pairs got {len(images)} images but {len(captions)} captions; give one caption per image")
    if batch_size < 1:
        raise ClipguardError("batch_size must be at least 1")
    loaded = as_loaded_model(model)
    limits = limits or DecodeLimits()
    similarity = np.full(len(images), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(images)
    ready: list[tuple[int, torch.Tensor, str]] = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        pixels, text, error = _prepare(image, caption, loaded, limits)
        if error is not None:
            errors[index] = error
        else:
            ready.append((index, pixels, text))
    for start in range(0, len(ready), batch_size):
        batch = ready[start:start + batch_size]
        image_features = encode_images(loaded, torch.stack([pixels for _, pixels, _ in batch]))
        text_features = encode_texts(loaded, tokenize(loaded.tokenizer, [text for _, _, text in batch]).tokens)
        similarity[[index for index, _, _ in batch]] = (image_features * text_features).sum(dim=-1).numpy()
    return PairScores(similarity=similarity, distance=(1.0 - similarity).astype(np.float32), errors=errors,
                      model=loaded.info.to_dict())


def _prepare(image: Any, caption: Any, loaded: LoadedModel, limits: DecodeLimits) -> tuple[torch.Tensor | None, str | None, str | None]:
    text, error = _caption(caption, limits)
    if error is not None:
        return None, None, error
    decoded, error = _image(image, limits)
    if error is not None:
        return None, None, error
    try:
        return loaded.preprocess(decoded), text, None
    except Exception as exc:  # a transform that fails on one image must not fail the batch
        return None, None, f"preprocess_failed: {type(exc).__name__}: {str(exc)[:120]}"


def _caption(caption: Any, limits: DecodeLimits) -> tuple[str | None, str | None]:
    if caption is None:
        return None, "missing_caption"
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    if not isinstance(caption, str):
        return None, f"unsupported_caption: {type(caption).__name__} (give str)"
    raw = caption.encode("utf-8")[: limits.max_caption_bytes]
    text = raw.decode("utf-8", errors="ignore").strip()
    return (text, None) if text else (None, "empty_caption")


def _image(image: Any, limits: DecodeLimits) -> tuple[Image.Image | None, str | None]:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return open_image(bytes(image), limits)
    if isinstance(image, Image.Image):
        # Already decoded by the caller, so only the checks that bound the resize remain.
        width, height = image.size
        if width * height > limits.max_pixels:
            return None, f"image_too_large: {width}x{height} exceeds {limits.max_pixels} pixels"
        return crop_to_aspect(image, limits.max_aspect_ratio).convert("RGB"), None
    if image is None:
        return None, "missing_image"
    return None, f"unsupported_image: {type(image).__name__} (give a PIL image or encoded bytes)"
