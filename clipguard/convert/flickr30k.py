"""Flickr30k: the official ``results_20130124.token`` caption file, or Karpathy's
``dataset_flickr30k.json`` (which adds the train/val/test split used for retrieval), and the
``flickr30k-images/`` folder.

Token lines are ``1000092795.jpg#0<TAB>caption``; the number after ``#`` orders an image's five
captions, so "first" is caption #0.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipguard.convert.sources import (
    CaptionChoice,
    ConvertError,
    ReaderCounts,
    SourcePair,
    require_folder,
    safe_key,
)

CAPTION_FILES = ("results_20130124.token", "results.token", "dataset_flickr30k.json")
KARPATHY_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FlickrInputs:
    captions_file: Path
    images: Path

    @classmethod
    def under(cls, root: Path, captions_file: Path | None = None, images: Path | None = None) -> "FlickrInputs":
        root = Path(root)
        if captions_file is None:
            found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
            if not found:
                raise ConvertError(f"Flickr30k caption file not found: expected one of "
                                   f"{', '.join(str(root / n) for n in CAPTION_FILES)}; pass --captions-file to name another")
            captions_file = found[0]
        elif not Path(captions_file).is_file():
            raise ConvertError(f"Flickr30k caption file not found: expected {captions_file} "
                               "(results_20130124.token or dataset_flickr30k.json)")
        images = require_folder(images or root / "flickr30k-images", "Flickr30k image folder",
                                "flickr30k-images/ with the .jpg files; pass --images to name another")
        return cls(Path(captions_file), images)


def read_flickr30k(inputs: FlickrInputs, captions: CaptionChoice = CaptionChoice.first,
                   split: str | None = None, counts: ReaderCounts | None = None) -> Iterator[SourcePair]:
    counts = counts if counts is not None else ReaderCounts()
    if inputs.captions_file.suffix == ".json":
        entries = _karpathy_entries(inputs.captions_file, split, counts)
    else:
        if split is not None:
            raise ConvertError(f"{inputs.captions_file.name} has no splits; a split (train/val/test) needs "
                               "Karpathy's dataset_flickr30k.json as --captions-file")
        entries = _token_entries(inputs.captions_file)
    for file_name, texts, extra in entries:
        key = safe_key(Path(file_name).stem)
        path = inputs.images / Path(file_name).name
        source = {"dataset": "flickr30k", "file_name": file_name, **extra}
        texts = [(n, t.strip()) for n, t in texts if t and t.strip()]
        if not texts:
            yield SourcePair(key, path, None, source, problem="missing_caption: no caption in the caption file")
        elif captions is CaptionChoice.first:
            yield SourcePair(key, path, texts[0][1], {**source, "caption_index": texts[0][0],
                                                      "captions": [t for _, t in texts]})
        else:
            for index, text in texts:
                yield SourcePair(f"{key}_{index}", path, text, {**source, "caption_index": index})


def _token_entries(path: Path) -> Iterator[tuple[str, list[tuple[int, str]], dict]]:
    grouped: dict[str, list[tuple[int, str]]] = defaultdict(list)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read Flickr30k caption file {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, tab, text = line.partition("\t")
        file_name, hash_, index = name.partition("#")
        if not tab or not hash_ or not index.strip().isdigit():
            raise ConvertError(f"{path}:{number} is not a Flickr30k token line "
                               f"'<image>.jpg#<n><TAB><caption>': {line[:80]!r}")
        grouped[file_name.strip()].append((int(index), text))
    for file_name in sorted(grouped):
        yield file_name, sorted(grouped[file_name]), {}


def _karpathy_entries(path: Path, split: str | None, counts: ReaderCounts) -> Iterator[tuple[str, list, dict]]:
    if split is not None and split not in KARPATHY_SPLITS:
        raise ConvertError(f"unknown Flickr30k split {split!r}; Karpathy's splits are {', '.join(KARPATHY_SPLITS)}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"Flickr30k caption file {path} is not readable JSON: {exc}") from exc
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list):
        raise ConvertError(f"{path} is not Karpathy's dataset_flickr30k.json: expected an object with a list "
                           "'images' [{filename, split, sentences: [{raw}]}]")
    for image in images:
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise ConvertError(f"{path}: an image entry without filename: {str(image)[:80]}")
        if split is not None and image.get("split") != split:
            counts.outside_split += 1
            continue
        sentences = image.get("sentences") or []
        texts = [(n, s.get("raw")) for n, s in enumerate(sentences) if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        yield image["filename"], texts, {"imgid": image.get("imgid"), "split": image.get("split")}
