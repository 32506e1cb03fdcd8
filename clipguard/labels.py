"""Class labels for image–caption pairs: from ``json`` metadata, or by keywords in the caption.

The paper labels Visual Genome, which has no classes, by searching captions for keywords
(sheep = {sheep, lamb, goat}). A keyword file maps each class to its keywords, as JSON
``{"sheep": ["sheep", "lamb", "goat"], ...}``. Matching is whole-word and case-insensitive. A
caption that names keywords of two classes, or of none, gets no label: guessing would put pairs
into the wrong class of an attack or of a metric. Such captions are counted, never dropped
silently.

Sources:
- ``json``: the sample's ``json`` field has a string ``"class"``;
- ``keywords``: keyword search in the caption;
- ``auto``: ``json`` where a sample has a class, keyword search otherwise (when a keyword file
  was given).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError

MAX_KEYWORD_FILE_BYTES = 4 << 20


class LabelError(ClipguardError):
    """A keyword file, label source or class name that cannot be used."""


class UnknownClassError(LabelError):
    """A class that the data (or the keyword file) does not know."""


class LabelSource(str, Enum):
    auto = "auto"
    json = "json"
    keywords = "keywords"


# Why a pair has no label; the values are stable strings that end up in reports.
NO_KEYWORD = "no_keyword"
SEVERAL_CLASSES = "several_classes"
NO_CLASS_METADATA = "no_class_metadata"
NO_CAPTION = "no_caption"


@dataclass(frozen=True)
class Label:
    """``name`` is the class, or None with ``reason`` saying why there is none."""

    name: str | None
    source: str | None = None  # "json" or "keywords" when labelled
    reason: str | None = None
    matched: tuple[str, ...] = ()  # classes whose keywords the caption contains


def load_keywords(path: str | Path) -> dict[str, list[str]]:
    """Read and check a keyword file: a JSON object of class -> non-empty list of keywords."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_KEYWORD_FILE_BYTES:
            raise LabelError(f"keyword file {path} is larger than {MAX_KEYWORD_FILE_BYTES} bytes")
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelError(f"keyword file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"keyword file {path} is not readable JSON: {exc}") from exc
    return check_keywords(content, str(path))


def check_keywords(content: Any, where: str = "keywords") -> dict[str, list[str]]:
    if not isinstance(content, dict) or not content:
        raise LabelError(f"{where} must be a JSON object mapping class -> [keywords], e.g. "
                         '{"sheep": ["sheep", "lamb", "goat"]}')
    table: dict[str, list[str]] = {}
    for name, words in content.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise LabelError(f"{where}: class {name!r} needs a non-empty list of non-empty keyword strings")
        table[str(name)] = list(dict.fromkeys(w.strip() for w in words))
    return table


def _keyword_pattern(keyword: str) -> str:
    # Whole word: no word character may touch either end. Spaces inside a keyword match any run
    # of whitespace, so "dining table" also finds "dining  table".
    body = r"\s+".join(re.escape(part) for part in keyword.split())
    return rf"(?<!\w){body}(?!\w)"


class KeywordLabeler:
    """Whole-word, case-insensitive keyword search; one compiled regex per class."""

    def __init__(self, keywords: dict[str, list[str]]):
        self.keywords = check_keywords(keywords)
        self._patterns = {
            name: re.compile("|".join(_keyword_pattern(w) for w in words), re.IGNORECASE)
            for name, words in self.keywords.items()
        }

    @property
    def classes(self) -> list[str]:
        return list(self.keywords)

    def matches(self, caption: str) -> tuple[str, ...]:
        return tuple(name for name, pattern in self._patterns.items() if pattern.search(caption))

    def label(self, caption: str | None) -> Label:
        if caption is None:
            return Label(None, reason=NO_CAPTION)
        matched = self.matches(caption)
        if len(matched) == 1:
            return Label(matched[0], source="keywords", matched=matched)
        return Label(None, reason=NO_KEYWORD if not matched else SEVERAL_CLASSES, matched=matched)


def json_class(fields: dict[str, bytes]) -> str | None:
    """The string ``"class"`` of a sample's json metadata, or None."""
    raw = fields.get("json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, ValueError):
        return None
    value = meta.get("class") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


@dataclass
class Labeler:
    """Labels samples from the chosen source. Build with ``make_labeler``."""

    source: LabelSource
    keywords: KeywordLabeler | None = None

    def label(self, fields: dict[str, bytes], caption: str | None) -> Label:
        if self.source in (LabelSource.json, LabelSource.auto):
            name = json_class(fields)
            if name is not None:
                return Label(name, source="json")
            if self.source is LabelSource.json or self.keywords is None:
                return Label(None, reason=NO_CLASS_METADATA)
        return self.keywords.label(caption)

    def known_classes(self) -> list[str] | None:
        """Classes a keyword file declares (None when labels come only from metadata)."""
        return self.keywords.classes if self.keywords is not None else None


def make_labeler(source: LabelSource | str = LabelSource.auto, keywords: str | Path | dict | None = None) -> Labeler:
    source = LabelSource(source)
    if isinstance(keywords, (str, Path)):
        keywords = load_keywords(keywords)
    if source is LabelSource.keywords and keywords is None:
        raise LabelError("labels from keywords need a keyword file (--keywords FILE)")
    return Labeler(source=source, keywords=KeywordLabeler(keywords) if keywords is not None else None)


@dataclass
class LabelCounts:
    """How many pairs got each class, and how many got none, by reason."""

    per_class: Counter = field(default_factory=Counter)
    unlabelled: Counter = field(default_factory=Counter)
    by_source: Counter = field(default_factory=Counter)

    def add(self, label: Label) -> None:
        if label.name is None:
            self.unlabelled[label.reason] += 1
        else:
            self.per_class[label.name] += 1
            self.by_source[label.source] += 1

    @property
    def labelled(self) -> int:
        return sum(self.per_class.values())

    @property
    def total(self) -> int:
        return self.labelled + sum(self.unlabelled.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "total": self.total,
            "per_class": dict(sorted(self.per_class.items())),
            "unlabelled": dict(sorted(self.unlabelled.items())),
            "by_source": dict(sorted(self.by_source.items())),
        }


def require_class(name: str, counts: LabelCounts, known: list[str] | None, role: str) -> None:
    """Raise UnknownClassError when no pair carries ``name`` (with the classes that exist)."""
    if counts.per_class.get(name, 0) > 0:
        return
    present = sorted(counts.per_class)
    if known is not None and name not in known:
        detail = f"the keyword file knows {', '.join(sorted(known))}"
    elif present:
        detail = f"classes present: {', '.join(present)}"
    else:
        detail = f"no pair has a label at all (unlabelled: {dict(counts.unlabelled) or 'none'})"
    raise UnknownClassError(f"{role} class {name!r} has no labelled pair in the data; {detail}")


# CLIP-style prompts (Radford et al.; Carlini & Terzis build poison captions the same way).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a picture of {}.",
    "an image of {}.",
    "a photo of the {}.",
    "a close-up photo of {}.",
    "a good photo of {}.",
)


def _is_regular_plural(word: str, others: set[str]) -> bool:
    lower = word.lower()
    return (
        (lower.endswith("s") and lower[:-1] in others)
        or (lower.endswith("es") and lower[:-2] in others)
        or (lower.endswith("ies") and lower[:-3] + "y" in others)
    )


def class_words(class_name: str, keywords: dict[str, list[str]] | None) -> list[str]:
    """Words that name a class in a prompt: its keywords without regular plurals of one another
    (keyword files list "lamb" and "lambs"), or the class name itself without a keyword file."""
    if keywords is None:
        return [class_name]
    if class_name not in keywords:
        raise UnknownClassError(f"class {class_name!r} is not in the keyword file (it has {', '.join(sorted(keywords))})")
    words = keywords[class_name]
    lowered = {w.lower() for w in words}
    return [w for w in words if not _is_regular_plural(w, lowered - {w.lower()})]


def _with_article(template: str, word: str) -> str:
    if "{}" in template and template.split("{}")[0].endswith(("of ", "showing ")) and "the {}" not in template:
        article = "an" if word[:1].lower() in "aeiou" else "a"
        return template.format(f"{article} {word}")
    return template.format(word)


def class_prompts(class_name: str, keywords: dict[str, list[str]] | None) -> list[str]:
    """Every template with every word of the class, e.g. "a photo of a lamb." (distinct)."""
    prompts = [_with_article(t, w) for w in class_words(class_name, keywords) for t in PROMPT_TEMPLATES]
    return list(dict.fromkeys(prompts))
