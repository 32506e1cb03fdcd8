"""A folder of images with same-stem ``.txt`` captions (``a/cat.jpg`` + ``a/cat.txt``), searched
recursively. The key is the path below the folder without its extension, so nested folders keep
apart (``a/cat`` and ``b/cat``). An image without a caption, or a caption without an image, is a
recorded failure: both mean the folder is not what the user thinks it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipguard.convert.sources import SourcePair, require_folder, safe_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_CAPTION_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class FolderInputs:
    root: Path

    @classmethod
    def under(cls, root: Path) -> "FolderInputs":
        return cls(require_folder(root, "image folder", "images with same-stem .txt captions"))


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    size = path.stat().st_size
    if size > MAX_CAPTION_FILE_BYTES:
        return None, f"caption_too_large: {path.name} has {size} bytes"
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
    text = text.strip()
    return (text, None) if text else (None, "missing_caption: empty .txt")


def read_folder(inputs: FolderInputs) -> Iterator[SourcePair]:
    root = inputs.root
    # Sorted relative paths: the same folder gives the same shards, whatever the file system order.
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    images: dict[Path, Path] = {}
    captions: dict[Path, Path] = {}
    for relative in files:
        stem = relative.with_suffix("")
        if relative.suffix.lower() in IMAGE_SUFFIXES:
            if stem in images:  # cat.jpg and cat.png: which caption belongs to which is unknowable
                yield SourcePair(safe_key(stem.as_posix()), root / relative, None,
                                 {"dataset": "folder", "file_name": relative.as_posix()},
                                 problem=f"duplicate_key: {images[stem].name} and {relative.name} share a caption stem")
                continue
            images[stem] = relative
        elif relative.suffix.lower() == ".txt":
            captions[stem] = relative
    for stem in sorted(set(images) | set(captions)):
        key = safe_key(stem.as_posix())
        image = images.get(stem)
        caption_file = captions.get(stem)
        source = {"dataset": "folder", "file_name": image.as_posix() if image else None,
                  "caption_file": caption_file.as_posix() if caption_file else None}
        if image is None:
            yield SourcePair(key, None, None, source, problem=f"missing_image: no image beside {caption_file.as_posix()}")
            continue
        if caption_file is None:
            yield SourcePair(key, root / image, None, source, problem=f"missing_caption: no {stem.name}.txt beside the image")
            continue
        text, problem = _read_caption(root / caption_file)
        yield SourcePair(key, root / image, text, source, problem=problem)
