"""The attacker's own CLIP: unit embeddings of candidate images and captions.

The attacker does not know the defender's reference model (paper §3), so ``nearest`` ranks
candidates under a surrogate it has (the bundled victim by default). Torch and open_clip are
imported only when a surrogate is used, so the plain attacks stay free of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipguard.attacks.goals import AttackError

BATCH_SIZE = 64


class Surrogate:
    """A model loaded on first use (a name: bundled, open_clip architecture or checkpoint path)."""

    def __init__(self, name: str):
        self.name = name
        self._loaded = None

    def _model(self):
        if self._loaded is None:
            from clipguard.model.loading import ModelSpec
            from clipguard.scoring.inmemory import as_loaded_model

            self._loaded = as_loaded_model(ModelSpec(name=self.name))
        return self._loaded

    def info(self) -> dict[str, Any]:
        info = self._model().info
        return {"name": self.name, "architecture": info.architecture, "weights_sha256": info.weights_sha256}

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        from clipguard.evaluation import EvaluationError, embed_image_bytes

        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        try:
            return embed_image_bytes(self._model(), images, BATCH_SIZE).numpy()
        except EvaluationError as exc:
            raise AttackError(f"surrogate {self.name}: a candidate image does not decode ({exc})") from None

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from clipguard.evaluation import embed_texts

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return embed_texts(self._model(), texts, BATCH_SIZE).numpy()
