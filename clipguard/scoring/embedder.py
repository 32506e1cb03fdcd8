"""Main-process stage: chunks -> embeddings, embedding each distinct image and caption once.

Attack I pairs one image with hundreds of captions, and scrapes repeat images and boilerplate
captions; a content-hash cache skips the model for repeats. The cache lives for one shard so
that a shard's scores are the same whether or not earlier shards were scored in this run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clipguard.model.encoding import encode_images, encode_texts
from clipguard.model.loading import LoadedModel
from clipguard.scoring.chunks import Chunk


@dataclass
class ChunkEmbeddings:
    image: torch.Tensor  # [n_ok, dim] float32, unit norm, in chunk.ok_index order
    text: torch.Tensor
    images_embedded: int  # how many the model actually ran on (cache misses)
    texts_embedded: int


@dataclass
class EmbeddingCache:
    """Embeddings already computed for one shard, by image sha256 and by caption text."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: dict[str, torch.Tensor] = field(default_factory=dict)


class ShardEmbedder:
    def __init__(self, loaded: LoadedModel, batch_size: int, trim_text: bool = True):
        self.loaded = loaded
        self.batch_size = batch_size
        self.trim_text = trim_text

    def embed(self, chunk: Chunk, cache: EmbeddingCache) -> ChunkEmbeddings | None:
        if not chunk.ok_index:
            return None
        ok_rows = [chunk.rows[i] for i in chunk.ok_index]
        image_keys = [row.image_sha256 for row in ok_rows]
        text_keys = [row.caption for row in ok_rows]
        images_run = self._fill(cache.images, image_keys, chunk.pixels, self._encode_images)
        texts_run = self._fill(cache.texts, text_keys, chunk.tokens, self._encode_texts)
        return ChunkEmbeddings(
            image=torch.stack([cache.images[k] for k in image_keys]),
            text=torch.stack([cache.texts[k] for k in text_keys]),
            images_embedded=images_run,
            texts_embedded=texts_run,
        )

    def _fill(self, cache: dict, keys: list[str], inputs: torch.Tensor, encode) -> int:
        first_seen: dict[str, int] = {}
        for position, key in enumerate(keys):
            if key not in cache and key not in first_seen:
                first_seen[key] = position
        if not first_seen:
            return 0
        positions = torch.tensor(list(first_seen.values()))
        todo = inputs[positions]
        outputs = torch.cat([encode(todo[i : i + self.batch_size]) for i in range(0, len(todo), self.batch_size)])
        for key, embedding in zip(first_seen, outputs):
            cache[key] = embedding
        return len(first_seen)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(self.loaded, pixels)

    def _encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        return encode_texts(self.loaded, tokens, trim=self.trim_text)
