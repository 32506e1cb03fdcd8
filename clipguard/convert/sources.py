"""What every dataset reader yields, and the errors a conversion raises.

A reader only parses annotations: it yields one ``SourcePair`` per pair it will write, naming the
image file and the caption. Reading, checking and writing the image is the writer's job, so every
dataset gets the same validation and the same manifest rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError


class ConvertError(ClipguardError):
    """An annotation file or image folder that is missing or not in the dataset's official format."""


class CaptionChoice(str, Enum):
    """COCO and Flickr30k have five captions an image: write the first, or one pair per caption."""

    first = "first"
    all = "all"


@dataclass(frozen=True)
class SourcePair:
    """One pair to convert. ``problem`` is a reason known from the annotations alone (no caption);
    such a pair is recorded as a failure without its image being read."""

    key: str
    image_path: Path | None
    caption: str | None
    source: dict[str, Any] = field(default_factory=dict)  # the dataset's own ids, kept in .json
    problem: str | None = None


@dataclass
class ReaderCounts:
    """Annotations a reader passed over on purpose (an image outside the requested split): counted,
    not listed, since they are the user's selection rather than a fault."""

    outside_split: int = 0


def require_file(path: Path, what: str, hint: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConvertError(f"{what} not found: expected {path} ({hint})")
    return path


def require_folder(path: Path, what: str, hint: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConvertError(f"{what} not found: expected a folder at {path} ({hint})")
    return path


def safe_key(text: str) -> str:
    """A WebDataset key: readers split a member name at the first dot of its basename, so dots
    (and whitespace, which some tools mishandle) become underscores."""
    return "".join("_" if ch == "." or ch.isspace() else ch for ch in text)
