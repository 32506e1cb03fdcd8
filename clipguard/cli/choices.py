"""The choices and defaults that command signatures show in `--help`, spelled out here.

Typer reads a command's signature when the app is built, so whatever a signature names is
imported by `clipguard --help`. The core modules that own these values import torch, open_clip,
webdataset or scipy at the top (about 8 s on 2 busy cores), so the CLI keeps its own copy of the
few enums and numbers it shows, and commands turn them into the core's types inside their body
(`core_enum(AttackKind, kind)`). tests/test_cli_startup.py pins every value here to the core's,
so a change there fails a test instead of drifting.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

# clipguard.model.loading
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
# clipguard.data.pairs
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_CAPTION_BYTES = 16_384
# clipguard.filtering.run, clipguard.filtering.gate
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_ERROR_RATE = 0.01
DEFAULT_EXAMPLES = 5



@dataclass(frozen=True)
class FinetuneDefaults:
    """clipguard.training.FinetuneConfig() defaults that `clipguard finetune` shows."""

    epochs: int = 10
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 10
    batch_size: int = 128
    weight_decay: float = 0.2
    seed: int = 0
    shuffle_buffer: int = 1000
    workers: int = 0


@dataclass(frozen=True)
class WorldDefaults:
    """clipguard.synth.WorldSpec() defaults that `clipguard synth` shows."""

    train_images: int = 2000
    test_images_per_class: int = 25
    validation_images_per_class: int = 50
    reference_images: int = 4000
    captions_per_image: int = 2
    image_size: int = 64
    shard_size: int = 1000


@dataclass(frozen=True)
class WebNoiseDefaults:
    """clipguard.synth.WebNoiseConfig() defaults that `clipguard synth --noise web` shows."""

    partial_rate: float = 0.2
    wrong_attribute_rate: float = 0.35
    boilerplate_rate: float = 0.15
    label_noise_rate: float = 0.06
    stock_page_rate: float = 0.05
    stock_max_pages: int = 5


class NoiseKind(str, Enum):  # clipguard.synth.noise.NOISE_KINDS
    none = "none"
    web = "web"


@dataclass(frozen=True)
class AuditDefaults:
    """clipguard.audit.AuditConfig() defaults that `clipguard audit` shows."""

    alpha: float = 1e-6
    k: int = 10
    image_duplicate: float = 0.95
    text_duplicate: float = 0.95
    exact_limit: int = 50_000
    index_codes: str = "sq8"
    partition_rows: int = 1 << 22


FINETUNE_DEFAULTS = FinetuneDefaults()
AUDIT_DEFAULTS = AuditDefaults()
WORLD_DEFAULTS = WorldDefaults()
WEB_NOISE_DEFAULTS = WebNoiseDefaults()


class AttackKind(str, Enum):  # clipguard.attacks.AttackKind
    single_image = "single-image"
    single_label = "single-label"
    multi_label = "multi-label"
    targeted = "targeted"
    backdoor = "backdoor"


class CaptionSource(str, Enum):  # clipguard.attacks.CaptionSource
    data = "data"
    templates = "templates"


class KeyPolicy(str, Enum):  # clipguard.attacks.KeyPolicy
    renumber = "renumber"
    keep = "keep"


class TriggerPattern(str, Enum):  # clipguard.attacks.TriggerPattern
    checkerboard = "checkerboard"
    noise = "noise"
    white = "white"


class TriggerPosition(str, Enum):  # clipguard.attacks.TriggerPosition
    bottom_right = "bottom-right"
    bottom_left = "bottom-left"
    top_left = "top-left"
    top_right = "top-right"
    center = "center"


class EvadeVariant(str, Enum):  # clipguard.attacks.EvadeVariant
    blend = "blend"
    nearest = "nearest"
    clean_label = "clean-label"
    many_captions = "many-captions"


DEFAULT_SURROGATE = "clipguard-victim"  # clipguard.attacks.DEFAULT_SURROGATE


class IndexCodes(str, Enum):  # clipguard.audit.neighbours.CODES
    sq8 = "sq8"
    pq = "pq"
    flat = "flat"


class ExecutorKind(str, Enum):  # clipguard.executors.spec.EXECUTORS
    local = "local"
    ray = "ray"


class EmbeddingLayout(str, Enum):  # clipguard.scoring.from_embeddings.LAYOUTS
    clip_retrieval = "clip-retrieval"
    datacomp = "datacomp"


class DatasetKind(str, Enum):  # clipguard.convert.DatasetKind
    coco = "coco"
    flickr30k = "flickr30k"
    vg = "vg"
    folder = "folder"


class CaptionChoice(str, Enum):  # clipguard.convert.CaptionChoice
    first = "first"
    all = "all"


DEFAULT_WORST = 12  # clipguard.reporting.contents.DEFAULT_WORST
DEFAULT_CONVERT_SHARD_SIZE = 5000  # clipguard.convert.pipeline.DEFAULT_SHARD_SIZE

E = TypeVar("E", bound=Enum)


def core_enum(core_type: type[E], choice: Enum) -> E:
    """The core's member with the value of a CLI choice (the core compares members by identity)."""
    return core_type(choice.value)
