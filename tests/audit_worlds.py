"""Tiny hand-made score folders with synthetic vectors, for the audit tests: clean pairs with
natural noise (stock images reused with 2-5 captions, boilerplate captions on many images,
a few percent of captions naming a wrong class, captions naming no class), and plantable
attacks whose answer is known."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipguard.scoring.scorefiles import embedding_paths, score_path, write_embeddings, write_parquet, write_score_table

CLASSES = ["sheep", "aeroplane", "dog", "cat", "banana", "car", "boat", "horse"]
KEYWORDS = {name: [name] for name in CLASSES}
DIM = 32
WORDS = ["small", "big", "old", "new", "red", "blue", "green", "happy", "lonely", "bright", "dark", "wet"]


@dataclass
class Pair:
    caption: str
    image: np.ndarray
    text: np.ndarray
    sha: str
    tag: str = "clean"
    patches: tuple[int, ...] = ()


@dataclass
class World:
    """Builds pairs; `write` lays them out as `clipguard score --save-embeddings` would."""

    seed: int = 0
    pairs: list[Pair] = field(default_factory=list)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.image_centres = self._unit(self.rng.normal(size=(len(CLASSES), DIM)))
        # A class's captions sit near its images, as in a CLIP space (a pair's own distance is what
        # tells an image's added captions from its original ones), yet text space is its own.
        self.text_centres = self._unit(self.image_centres + self._unit(self.rng.normal(size=(len(CLASSES), DIM))))
        self.counter = 0
        # Patch signatures draw from their own generator, so that worlds built without them stay as they were.
        self.patch_rng = np.random.default_rng(self.seed + 10_000)

    def _unit(self, v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def _id(self) -> str:
        self.counter += 1
        return f"{self.counter:06d}"

    def image(self, cls: int, spread: float = 0.25) -> tuple[np.ndarray, str]:
        vector = self._unit(self.image_centres[cls] + spread * self.rng.normal(size=DIM))
        return vector, hashlib.sha256(self._id().encode()).hexdigest()

    def text(self, cls: int | None) -> np.ndarray:
        centre = self.text_centres[cls] if cls is not None else self._unit(self.rng.normal(size=DIM))
        return self._unit(centre + 0.35 * self.rng.normal(size=DIM))

    def caption(self, cls: int | None) -> str:
        words = " ".join(self.rng.choice(WORDS, size=2))
        noun = CLASSES[cls] if cls is not None else "thing"
        return f"a {words} {noun} photo {self._id()}"

    def add(self, caption: str, image: tuple[np.ndarray, str], text: np.ndarray, tag: str = "clean") -> None:
        self.pairs.append(Pair(caption, image[0], text, image[1], tag))

    def clean(self, n: int = 640, mislabel: float = 0.03, stock: int = 12, boilerplate: int = 25, unlabelled: float = 0.1):
        """n pairs of one image each, then the natural noise on top."""
        for i in range(n):
            cls = i % len(CLASSES)
            named = cls
            if self.rng.random() < mislabel:  # a wrong class, spread over the other classes
                named = int(self.rng.choice([c for c in range(len(CLASSES)) if c != cls]))
            if self.rng.random() < unlabelled:
                named = None
            self.add(self.caption(named), self.image(cls), self.text(named))
        for s in range(stock):  # stock images reused with 2-5 captions of their own class, as noisy
            cls = s % len(CLASSES)
            image = self.image(cls)
            for _ in range(int(self.rng.integers(2, 6))):
                named = cls
                if self.rng.random() < mislabel:
                    named = int(self.rng.choice([c for c in range(len(CLASSES)) if c != cls]))
                self.add(self.caption(named), image, self.text(named))
        text = self.text(None)
        for b in range(boilerplate):  # one alt-text behind many images, naming no class
            self.add("Click here to enlarge the image", self.image(b % len(CLASSES)), text, "boilerplate")
        return self

    def _signatures(self, n: int) -> list[int]:
        return [int(v) for v in self.patch_rng.integers(1, 2**63, size=n)]

    def with_patches(self, texture: int = 15, watermark: int = 30):
        """Patch signatures on every image so far (three tiles of its own each), and the natural
        background of shared tiles: one class's texture on ``texture`` of its images, captioned as
        its images are, and a watermark on ``watermark`` images of every class."""
        own: dict[str, tuple[int, ...]] = {}
        for p in self.pairs:
            own.setdefault(p.sha, tuple(self._signatures(3)))
        texture_sig, watermark_sig = self._signatures(2)
        car = sorted({p.sha for p in self.pairs if p.tag == "clean" and p.caption.split()[3] == "car"})[:texture]
        marked = sorted(own)[:: max(1, len(own) // watermark)][:watermark]
        for p in self.pairs:
            p.patches = own[p.sha] + ((texture_sig,) if p.sha in car else ()) + ((watermark_sig,) if p.sha in marked else ())
        return self

    def stamp(self, label: str, images: int = 9, echo: int = 0):
        """A backdoor: copies of images of the other classes, each with one shared trigger tile
        (beside tiles of its own) and one caption of ``label``; the first ``echo`` of them share a
        second signature too (a tile half over the patch, where their corners agree)."""
        c = CLASSES.index(label)
        trigger, second = self._signatures(2)
        for i in range(images):
            b = [x for x in range(len(CLASSES)) if x != c][i % (len(CLASSES) - 1)]
            image = self.image(b)
            self.pairs.append(Pair(self.caption(c), image[0], self.text(c), image[1], "stamped",
                                   (trigger, *((second,) if i < echo else ()), *self._signatures(3))))
        return self

    def fan_in(self, caption_class: str, image_class: str, captions: int = 7):
        image = self.image(CLASSES.index(image_class))
        for _ in range(captions):
            c = CLASSES.index(caption_class)
            self.add(self.caption(c), image, self.text(c), "fan_in")
        return self

    def fan_out(self, caption_class: str, image_class: str, images: int = 15):
        c, b = CLASSES.index(caption_class), CLASSES.index(image_class)
        text = self.text(c)
        for _ in range(images):
            self.add(f"a photo of a {caption_class}", self.image(b), text, "fan_out")
        return self

    def cell(self, caption_class: str, image_class: str, pairs: int = 20):
        """Attack II: captions of A on images of B that the data already holds (as Yang et al.)."""
        c, b = CLASSES.index(caption_class), CLASSES.index(image_class)
        images = [p for p in self.pairs if p.tag == "clean" and p.caption.split()[3] == image_class]
        for i in self.rng.choice(len(images), size=pairs, replace=False):
            self.add(self.caption(c), (images[i].image, images[i].sha), self.text(c), "cell")
        return self

    def relabel(self, caption_class: str, image_class: str | None, images: int = 12, undecided: int = 0):
        """Copies of images that carry two captions of their class, captioned `caption_class`: Attack
        II on images of one class, or (image_class None) a backdoor's stamped copies of any class.
        ``undecided`` more images of `image_class` carry one caption of their class and one of a
        third class beside the planted one (a stock photo's pages disagree: no majority)."""
        c = CLASSES.index(caption_class)
        for i in range(images):
            b = CLASSES.index(image_class) if image_class else [x for x in range(len(CLASSES)) if x != c][i % (len(CLASSES) - 1)]
            image = self.image(b)
            for _ in range(2):
                self.add(self.caption(b), image, self.text(b))
            self.add(self.caption(c), image, self.text(c), "relabel")
        for i in range(undecided):
            b = CLASSES.index(image_class)
            third = [x for x in range(len(CLASSES)) if x not in (b, c)][i % (len(CLASSES) - 2)]
            image = self.image(b)
            self.add(self.caption(b), image, self.text(b))
            self.add(self.caption(third), image, self.text(third))
            self.add(self.caption(c), image, self.text(c), "relabel_undecided")
        return self

    def cluster(self, label: str, images: int = 30):
        """Near-identical distinct images (one trigger-like point, tiny jitter), all captioned with `label`."""
        c = CLASSES.index(label)
        point = self._unit(self.rng.normal(size=DIM))
        for _ in range(images):
            vector = self._unit(point + 0.02 * self.rng.normal(size=DIM))
            self.add(self.caption(c), (vector, hashlib.sha256(self._id().encode()).hexdigest()), self.text(c), "cluster")
        return self

    def write(self, folder: Path, shards: int = 2, embeddings: bool = True) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        order = self.rng.permutation(len(self.pairs))
        for s, rows in enumerate(np.array_split(order, shards)):
            name = f"{s:05d}"
            keys = [f"{name}{i:06d}" for i in range(len(rows))]
            picked = [self.pairs[i] for i in rows]
            sims = [float(p.image @ p.text) for p in picked]
            write_score_table(score_path(folder, name), {
                "key": keys, "shard": [name] * len(rows), "cosine_similarity": sims,
                "cosine_distance": [1 - v for v in sims], "status": ["ok"] * len(rows), "error": [None] * len(rows),
                "image_sha256": [p.sha for p in picked],
            }, {})
            if embeddings:
                image_path, text_path, meta_path = embedding_paths(folder, name)
                write_embeddings(image_path, np.stack([p.image for p in picked]))
                write_embeddings(text_path, np.stack([p.text for p in picked]))
                write_parquet(meta_path, pa.table({
                    "key": keys, "shard": [name] * len(rows), "caption": [p.caption for p in picked],
                    "image_sha256": [p.sha for p in picked],
                    "image_patches": pa.array([list(p.patches) for p in picked], pa.list_(pa.uint64()))}))
        return folder

    def tags_by_key(self, folder: Path) -> dict[tuple[str, str], str]:
        """(shard, key) -> tag, rebuilt from the written metadata by caption and sha."""
        import pyarrow.parquet as pq

        tag = {(p.caption, p.sha): p.tag for p in self.pairs}
        out = {}
        for path in sorted((Path(folder) / "metadata").glob("*.parquet")):
            t = pq.read_table(path).to_pydict()
            for s, k, c, h in zip(t["shard"], t["key"], t["caption"], t["image_sha256"]):
                out[(s, k)] = tag[(c, h)]
        return out
