"""The synthetic world's splits, written as WebDataset shards with a world.json manifest.

Splits play the paper's roles on Flickr-PASCAL: `train` is the victim's training data, `test`
the balanced labelled half of PASCAL (the same number of images per class), and `reference`
an independent clean set (Visual Genome's role: sterilizing fine-tunes, reference models).
`validation` is drawn like `test` but held apart from it: whatever is chosen by watching a
metric (when sterilizing stops) is chosen there, so the figures reported on `test` are not the
ones the choice was made on.

Every image has its own random stream, derived from (seed, split, image index): an image does
not change when another split's size or the number of captions per image changes. Shards are
byte-identical for the same spec: fixed JPEG settings, fixed tar member mtime, owner and mode.

`WorldSpec(noise="web")` makes the train split look like a web scrape (`noise.py`): the same
pictures and ordinary captions, then per-pair caption noise drawn from each image's own noise
stream and stock pictures shown on several image slots. `noise="none"` draws nothing from those
streams and writes exactly the world it always wrote.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds

from clipguard.errors import ClipguardError
from clipguard.synth.noise import (
    CAPTION_KINDS,
    NOISE_KINDS,
    NOISY_SPLITS,
    NoisyCaption,
    WebNoiseConfig,
    caption_kind,
    noisy_caption,
    stock_sources,
)
from clipguard.synth.render import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, render_image
from clipguard.synth.vocabulary import (
    CAPTION_TEMPLATES,
    CLASS_KEYWORDS,
    CLASSES,
    Attributes,
    Caption,
    keyword_table,
    make_caption,
    make_short_caption,
    sample_attributes,
)

FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "test", "reference", "validation")
_SPLIT_STREAMS = {"train": 1, "test": 2, "reference": 3, "validation": 4}
# Splits drawn like `test`: balanced per class, fully detailed captions.
_TEST_LIKE = ("test", "validation")
# Independent random streams per image: attributes, caption wording, drawing jitter.
_ATTRIBUTE_STREAM, _CAPTION_STREAM, _DRAWING_STREAM, _NOISE_STREAM = 0, 1, 2, 3
# The split's stock plan has a stream of its own: an "image index" no image has, and a non-zero
# last entry (numpy's SeedSequence reads [a, b, c] and [a, b, c, 0] as the same seed).
_PLAN_INDEX, _STOCK_STREAM = 2**31, 4
# img2dataset keys: 5 digits of shard index then 4 digits of index in the shard.
MAX_SHARD_SIZE = 10_000
# Fixed tar member metadata so that bytes do not depend on the clock or the user.
TAR_MTIME = 0
TAR_OWNER = "clipguard"
_SHARD_NAME = re.compile(r"^\d{6}\.tar$")


class WorldSpecError(ClipguardError):
    """A synthetic-world spec or output folder that cannot be used."""


@dataclass(frozen=True)
class WorldSpec:
    """What to generate. Defaults: 4,000 train pairs, 500 test pairs, 8,000 reference pairs and
    1,000 validation pairs (twice the test split, so that a stop chosen on it rests on 50 queries
    of a class rather than 25)."""

    seed: int = 0
    image_size: int = 64
    train_images: int = 2000
    reference_images: int = 4000
    test_images_per_class: int = 25
    validation_images_per_class: int = 50
    captions_per_image: int = 2  # train and reference
    test_captions_per_image: int = 1
    # Share of train/reference captions in the short web style ("a photo of a lamb", each
    # attribute named with attribute_mention_rate). Most web captions name the object first and
    # few details; that is what makes the class, not the colour, the main thing a model learns,
    # as in the paper's data. Test captions are short-style too but name every attribute, so
    # retrieving the exact image needs them.
    short_caption_rate: float = 0.6
    attribute_mention_rate: float = 0.3
    # Zipf exponent of the train split's class frequencies (0 = balanced); see WEB_FREQUENCY_ORDER.
    train_class_skew: float = 1.0
    shard_size: int = 1000
    jpeg_quality: int = 90
    # "web": the train split's clean data looks like a web scrape (see noise.py and web_noise).
    noise: str = "none"
    web_noise: WebNoiseConfig = WebNoiseConfig()

    def validate(self) -> None:
        problems = []
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            problems.append(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
        for name in ("train_images", "reference_images", "test_images_per_class", "validation_images_per_class"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("captions_per_image", "test_captions_per_image"):
            if not 1 <= getattr(self, name) <= len(CAPTION_TEMPLATES):
                problems.append(f"{name} must be in [1, {len(CAPTION_TEMPLATES)}]")
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            problems.append(f"shard_size must be in [1, {MAX_SHARD_SIZE}] (9-digit keys)")
        if not 1 <= self.jpeg_quality <= 95:
            problems.append("jpeg_quality must be in [1, 95]")
        if not 0.0 <= self.short_caption_rate <= 1.0:
            problems.append("short_caption_rate must be in [0, 1]")
        if self.train_class_skew < 0:
            problems.append("train_class_skew must be non-negative")
        if not 0.0 <= self.attribute_mention_rate <= 1.0:
            problems.append("attribute_mention_rate must be in [0, 1]")
        if self.seed < 0:
            problems.append("seed must be non-negative")
        if self.noise not in NOISE_KINDS:
            problems.append(f"noise must be one of {', '.join(NOISE_KINDS)}, not {self.noise!r}")
        if not isinstance(self.web_noise, WebNoiseConfig):
            problems.append("web_noise must be a WebNoiseConfig")
        else:
            problems.extend(self.web_noise.problems())
        if problems:
            raise WorldSpecError("invalid world spec: " + "; ".join(problems))

    def images_in(self, split: str) -> int:
        return {
            "train": self.train_images,
            "test": self.test_images_per_class * len(CLASSES),
            "reference": self.reference_images,
            "validation": self.validation_images_per_class * len(CLASSES),
        }[_known(split)]

    def captions_in(self, split: str) -> int:
        return self.test_captions_per_image if split in _TEST_LIKE else self.captions_per_image

    def short_caption_rate_in(self, split: str) -> float:
        return 1.0 if split in _TEST_LIKE else self.short_caption_rate

    def mention_rate_in(self, split: str) -> float:
        return 1.0 if split in _TEST_LIKE else self.attribute_mention_rate

    def pairs_in(self, split: str) -> int:
        return self.images_in(split) * self.captions_in(split)

    def is_noisy(self, split: str) -> bool:
        return self.noise == "web" and split in NOISY_SPLITS


def _known(split: str) -> str:
    if split not in SPLITS:
        raise WorldSpecError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return split


@dataclass(frozen=True)
class PairNoise:
    """What web noise did to one pair of a noisy split: clean data, never poison."""

    kind: str  # noise.CAPTION_KINDS: "none", "partial", "wrong_attribute", "boilerplate", "label_noise"
    caption_class: str | None  # the class the caption names; None for boilerplate
    wrong_attributes: tuple[str, ...]  # attributes the caption names wrongly (wrong_attribute)
    page_id: str  # the image slot; image_id is the picture's, shared by a stock picture's slots
    stock_pages: int  # slots showing this picture (1: not a stock picture)

    def to_dict(self) -> dict:
        return {
            "noise": self.kind,
            "caption_class": self.caption_class,
            "wrong_attributes": list(self.wrong_attributes),
            "page_id": self.page_id,
            "stock_pages": self.stock_pages,
        }


@dataclass(frozen=True)
class SynthSample:
    """One image-caption pair, ready to be written as a WebDataset sample."""

    key: str
    image_id: str
    split: str
    class_name: str
    attributes: Attributes
    caption: Caption
    jpeg: bytes
    noise: PairNoise | None = None  # None in a clean split: its json is what it always was

    def metadata(self) -> dict:
        extra = {} if self.noise is None else self.noise.to_dict()
        return {
            **extra,
            "key": self.key,
            "caption": self.caption.text,
            "class": self.class_name,
            "keyword": self.caption.keyword,
            "caption_style": self.caption.style,
            "mentions": list(self.caption.mentions),
            "image_id": self.image_id,
            "split": self.split,
            "attributes": self.attributes.to_dict(),
        }

    def to_wds(self) -> dict[str, str | bytes]:
        return {
            "__key__": self.key,
            "jpg": self.jpeg,
            "txt": self.caption.text.encode("utf-8"),
            "json": json.dumps(self.metadata(), sort_keys=True).encode("utf-8"),
        }


@dataclass(frozen=True)
class SplitInfo:
    name: str
    pattern: str  # brace pattern relative to the world folder, e.g. "train/{000000..000003}.tar"
    shard_count: int
    pair_count: int
    image_count: int  # distinct pictures (fewer than image slots where stock pictures repeat)
    captions_per_image: int
    pairs_per_class: dict[str, int]
    noise_counts: dict[str, int] | None = None  # pairs per noise kind (+ "stock_pairs"); noisy splits only


@dataclass(frozen=True)
class WorldInfo:
    root: Path
    spec: WorldSpec
    splits: dict[str, SplitInfo]
    keywords: dict[str, list[str]] = field(default_factory=keyword_table)

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    @property
    def keywords_json(self) -> Path:
        return self.root / "keywords.json"

    def shards(self, split: str) -> str:
        """The split's shards as one brace pattern with the world folder in front."""
        return str(self.root / self.splits[_known(split)].pattern)


def image_key(index: int, shard_size: int) -> str:
    shard, position = divmod(index, shard_size)
    return f"{shard * MAX_SHARD_SIZE + position:09d}"


def _split_rng(spec: WorldSpec, split: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_STREAMS[split]])


def _image_rng(spec: WorldSpec, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_STREAMS[split], index, stream])


# How common each class is in scraped data, most common first. Only `train` follows it (with
# WorldSpec.train_class_skew); `test` and `reference` stay balanced. Web data is long-tailed, and
# the paper's attacks hit classes that are rare in the training set (sheep in Flickr30k +
# PASCAL): a rare class is what a handful of poisons can take over.
WEB_FREQUENCY_ORDER: tuple[str, ...] = (
    "person", "car", "dog", "cat", "chair", "bird", "bottle", "bus", "boat", "horse", "bicycle",
    "train", "sofa", "tvmonitor", "diningtable", "pottedplant", "motorbike", "aeroplane", "cow", "sheep",
)


def class_counts(total: int, skew: float) -> dict[str, int]:
    """Images per class: Zipf(skew) over WEB_FREQUENCY_ORDER (skew 0 = balanced), largest
    remainder rounding, every class at least once when total allows."""
    weights = np.array([1.0 / (rank + 1) ** skew for rank in range(len(WEB_FREQUENCY_ORDER))])
    shares = weights / weights.sum() * total
    counts = np.floor(shares).astype(int)
    if total >= len(counts):
        counts = np.maximum(counts, 1)
    for index in np.argsort(-(shares - np.floor(shares)), kind="stable"):
        if counts.sum() >= total:
            break
        counts[index] += 1
    while counts.sum() > total:
        counts[int(np.argmax(counts))] -= 1
    return dict(zip(WEB_FREQUENCY_ORDER, counts.tolist()))


def split_classes(spec: WorldSpec, split: str) -> list[str]:
    """Class of each image: long-tailed for `train` (train_class_skew), as balanced as the size
    allows for `reference`, exactly balanced for `test` and `validation`."""
    count = spec.images_in(_known(split))
    if split == "train" and spec.train_class_skew > 0:
        counts = class_counts(count, spec.train_class_skew)
        ordered = [name for name in CLASSES for _ in range(counts[name])]
    else:
        ordered = [CLASSES[i % len(CLASSES)] for i in range(count)]
    order = _split_rng(spec, split).permutation(count)
    return [ordered[i] for i in order]


def _encode_jpeg(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 keeps the named colour of a 13 px icon from bleeding into the background.
    image.save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class _PlannedImage:
    class_name: str
    attributes: Attributes
    captions: tuple[Caption, ...]
    picture: int  # the slot whose picture this slot shows (itself unless a stock copy)
    noise: tuple[NoisyCaption, ...] | None = None  # one per caption, noisy splits only


def _plan_image(spec: WorldSpec, split: str, index: int, class_name: str, picture: int | None = None) -> _PlannedImage:
    """Slot ``index``'s captions; a stock copy (``picture`` another slot, whose class is
    ``class_name``) describes that slot's picture, with its own caption and noise streams."""
    picture = index if picture is None else picture
    attributes = sample_attributes(_image_rng(spec, split, picture, _ATTRIBUTE_STREAM))
    caption_rng = _image_rng(spec, split, index, _CAPTION_STREAM)
    count, short_rate = spec.captions_in(split), spec.short_caption_rate_in(split)
    mention_rate = spec.mention_rate_in(split)
    captions = _distinct_captions(class_name, attributes, caption_rng, count, short_rate, mention_rate)
    if not spec.is_noisy(split):
        return _PlannedImage(class_name, attributes, captions, picture)
    noise_rng = _image_rng(spec, split, index, _NOISE_STREAM)
    noisy: list[NoisyCaption] = []
    for ordinary in captions:
        kind = caption_kind(spec.web_noise, noise_rng)
        chosen = noisy_caption(kind, ordinary, class_name, attributes, noise_rng, spec.web_noise, short_rate, mention_rate)
        # Two identical pairs are one pair twice, not two captions: keep the ordinary one.
        if chosen.caption.text in {c.caption.text for c in noisy} | {o.text for o in captions if o is not ordinary}:
            chosen = NoisyCaption(ordinary, "none", class_name)
        noisy.append(chosen)
    return _PlannedImage(class_name, attributes, tuple(c.caption for c in noisy), picture, tuple(noisy))


def _distinct_captions(
    class_name: str, attributes: Attributes, rng: np.random.Generator, count: int, short_rate: float,
    mention_rate: float,
) -> tuple[Caption, ...]:
    """Captions of one image, all different texts (full ones each use their own template)."""
    unused_templates = [int(t) for t in rng.permutation(len(CAPTION_TEMPLATES))]
    captions: list[Caption] = []
    short_tries = 0
    while len(captions) < count:
        if short_tries < 20 and rng.random() < short_rate:
            short_tries += 1
            caption = make_short_caption(class_name, attributes, rng, mention_rate)
            if caption.text in {c.text for c in captions}:
                continue
        else:
            caption = make_caption(class_name, attributes, rng, unused_templates.pop())
        captions.append(caption)
    return tuple(captions)


def _render_jpeg(spec: WorldSpec, split: str, index: int, plan: _PlannedImage) -> bytes:
    rng = _image_rng(spec, split, index, _DRAWING_STREAM)
    image = render_image(plan.class_name, plan.attributes, rng, spec.image_size)
    return _encode_jpeg(image, spec.jpeg_quality)


def _stock_sources(spec: WorldSpec, split: str) -> dict[int, int]:
    if not spec.is_noisy(split):
        return {}
    rng = np.random.default_rng([spec.seed, _SPLIT_STREAMS[split], _PLAN_INDEX, _STOCK_STREAM])
    return stock_sources(spec.images_in(split), spec.web_noise, rng)


def _plan_split(spec: WorldSpec, split: str) -> list[_PlannedImage]:
    classes = split_classes(spec, split)
    sources = _stock_sources(spec, split)
    return [
        _plan_image(spec, split, i, classes[sources.get(i, i)], sources.get(i))
        for i in range(len(classes))
    ]


def _pair_noise(spec: WorldSpec, split: str, image_index: int, plan: _PlannedImage, caption_index: int,
                pages: Counter) -> PairNoise | None:
    if plan.noise is None:
        return None
    noisy = plan.noise[caption_index]
    return PairNoise(noisy.kind, noisy.caption_class, noisy.wrong_attributes, f"{split}-{image_index:06d}",
                     pages[plan.picture])


def iter_split_samples(spec: WorldSpec, split: str) -> Iterator[SynthSample]:
    """The split's pairs in their shard order; captions of one image are spread apart."""
    spec.validate()
    _known(split)
    plans = _plan_split(spec, split)
    pages = Counter(plan.picture for plan in plans)
    pairs = [(i, j) for i in range(len(plans)) for j in range(spec.captions_in(split))]
    order = _split_rng(spec, split).permutation(len(pairs))
    pending = Counter(plans[i].picture for i, _ in pairs)
    jpegs: dict[int, bytes] = {}
    for position, pair_index in enumerate(order):
        image_index, caption_index = pairs[pair_index]
        plan = plans[image_index]
        picture = plan.picture
        if picture not in jpegs:
            jpegs[picture] = _render_jpeg(spec, split, picture, plans[picture])
        jpeg = jpegs[picture]
        pending[picture] -= 1
        if pending[picture] == 0:
            del jpegs[picture]  # keeps memory to the images still waiting for a caption
        yield SynthSample(
            key=image_key(position, spec.shard_size),
            image_id=f"{split}-{picture:06d}",
            split=split,
            class_name=plan.class_name,
            attributes=plan.attributes,
            caption=plan.captions[caption_index],
            jpeg=jpeg,
            noise=_pair_noise(spec, split, image_index, plan, caption_index, pages),
        )


def shard_pattern(split: str, shard_count: int) -> str:
    if shard_count == 1:
        return f"{split}/000000.tar"
    return f"{split}/{{000000..{shard_count - 1:06d}}}.tar"


def write_split(out_dir: Path, spec: WorldSpec, split: str) -> SplitInfo:
    """Writes OUT/<split>/000000.tar, ... (each through a temporary name, then renamed)."""
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    per_class: Counter[str] = Counter()
    noise_counts: Counter[str] = Counter()
    pictures: set[str] = set()
    samples = iter_split_samples(spec, split)
    shard_count = 0
    while shard := list(islice(samples, spec.shard_size)):
        _write_shard(split_dir / f"{shard_count:06d}.tar", shard)
        per_class.update(sample.class_name for sample in shard)
        pictures.update(sample.image_id for sample in shard)
        for sample in shard:
            if sample.noise is not None:
                noise_counts[sample.noise.kind] += 1
                noise_counts["stock_pairs"] += sample.noise.stock_pages > 1
        shard_count += 1
    return SplitInfo(
        name=split,
        pattern=shard_pattern(split, shard_count),
        shard_count=shard_count,
        pair_count=spec.pairs_in(split),
        image_count=len(pictures),
        captions_per_image=spec.captions_in(split),
        pairs_per_class={name: per_class[name] for name in CLASSES},
        noise_counts=_noise_counts(noise_counts) if spec.is_noisy(split) else None,
    )


def _noise_counts(counts: Counter[str]) -> dict[str, int]:
    return {kind: counts[kind] for kind in (*CAPTION_KINDS, "stock_pairs")}


def _write_shard(path: Path, samples: list[SynthSample]) -> None:
    tmp_path = path.with_name(path.name + ".tmp")
    with open(tmp_path, "wb") as stream:
        writer = wds.TarWriter(
            stream, user=TAR_OWNER, group=TAR_OWNER, mode=0o444, encoder=False, mtime=TAR_MTIME
        )
        for sample in samples:
            writer.write(sample.to_wds())
        writer.close()
    os.replace(tmp_path, path)


def _clear_previous_output(out_dir: Path, overwrite: bool) -> None:
    """Stale shards from a larger earlier world would be picked up by a glob: remove or refuse."""
    ours = [out_dir / "world.json", out_dir / "keywords.json"]
    for split in SPLITS:
        if (out_dir / split).is_dir():
            ours += [p for p in (out_dir / split).iterdir() if _SHARD_NAME.match(p.name)]
            ours += list((out_dir / split).glob("*.tar.tmp"))
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise WorldSpecError(
            f"{out_dir} already holds a synthetic world ({existing[0].name} and others); "
            "pass overwrite=True to replace it"
        )
    for path in existing:
        path.unlink()


def generate_world(out_dir: str | Path, spec: WorldSpec | None = None, overwrite: bool = False):
    """Writes the four splits, world.json and keywords.json under out_dir; returns WorldInfo."""
    spec = spec or WorldSpec()
    spec.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WorldSpecError(f"{out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out_dir, overwrite)
    splits = {split: write_split(out_dir, spec, split) for split in SPLITS}
    info = WorldInfo(root=out_dir, spec=spec, splits=splits)
    _write_json(info.keywords_json, info.keywords)
    _write_json(info.world_json, world_manifest(info))
    return info


def world_manifest(info: WorldInfo) -> dict:
    spec = asdict(info.spec)
    splits = {name: asdict(split) for name, split in info.splits.items()}
    if info.spec.noise == "none":
        # A clean world's manifest stays what it always was, byte for byte.
        del spec["noise"], spec["web_noise"]
        for split in splits.values():
            del split["noise_counts"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "spec": spec,
        "classes": {name: list(CLASS_KEYWORDS[name]) for name in CLASSES},
        "keywords_file": info.keywords_json.name,
        "splits": splits,
    }
    if info.spec.noise != "none":
        manifest["noisy_splits"] = list(NOISY_SPLITS)
    return manifest


def _spec_from_manifest(content: dict) -> WorldSpec:
    known = {f.name for f in fields(WorldSpec)}
    values = {k: v for k, v in content.items() if k in known}
    if isinstance(values.get("web_noise"), dict):
        noise_fields = {f.name for f in fields(WebNoiseConfig)}
        values["web_noise"] = WebNoiseConfig(**{k: v for k, v in values["web_noise"].items() if k in noise_fields})
    return WorldSpec(**values)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_world_info(out_dir: str | Path) -> WorldInfo:
    """Loads a world written by generate_world (its world.json and keywords.json)."""
    root = Path(out_dir)
    try:
        manifest = json.loads((root / "world.json").read_text(encoding="utf-8"))
        keywords = json.loads((root / manifest["keywords_file"]).read_text(encoding="utf-8"))
        if manifest["format_version"] != FORMAT_VERSION:
            raise WorldSpecError(
                f"{root / 'world.json'} has format_version {manifest['format_version']}, "
                f"this clipguard reads {FORMAT_VERSION}; regenerate the world"
            )
        spec = _spec_from_manifest(manifest["spec"])
        splits = {name: SplitInfo(**value) for name, value in manifest["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WorldSpecError(f"{root} does not hold a readable synthetic world: {error}") from error
    return WorldInfo(root=root, spec=spec, splits=splits, keywords=keywords)
