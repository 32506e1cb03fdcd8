"""MS-COCO captions: ``annotations/captions_<split>.json`` and the ``<split>/`` image folder.

The captions file is one JSON object, ``{"images": [{id, file_name, ...}], "annotations":
[{image_id, id, caption}]}``. Captions have to be grouped by image, so it is read whole (train2017
is ~90 MB, far below Visual Genome). Images are written in id order; an image's captions in
annotation-id order, so "first" is the same caption on every run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipguard.convert.sources import CaptionChoice, ConvertError, SourcePair, require_file, require_folder, safe_key

DEFAULT_SPLIT = "train2017"


@dataclass(frozen=True)
class CocoInputs:
    captions_file: Path
    images: Path

    @classmethod
    def under(cls, root: Path, split: str | None = None, captions_file: Path | None = None,
              images: Path | None = None) -> "CocoInputs":
        split = split or DEFAULT_SPLIT
        captions_file = require_file(
            captions_file or Path(root) / "annotations" / f"captions_{split}.json", "COCO captions file",
            f"COCO's annotations/captions_{split}.json; pass --captions-file to name another")
        images = require_folder(images or Path(root) / split, "COCO image folder",
                                f"COCO's {split}/ with the .jpg files; pass --images to name another")
        return cls(captions_file, images)


def _load(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"COCO captions file {path} is not readable JSON: {exc}") from exc
    if not isinstance(content, dict) or not isinstance(content.get("images"), list) \
            or not isinstance(content.get("annotations"), list):
        raise ConvertError(f"{path} is not a COCO captions file: expected a JSON object with lists "
                           "'images' [{id, file_name}] and 'annotations' [{image_id, id, caption}]")
    return content


def read_coco(inputs: CocoInputs, captions: CaptionChoice = CaptionChoice.first) -> Iterator[SourcePair]:
    content = _load(inputs.captions_file)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for annotation in content["annotations"]:
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            raise ConvertError(f"{inputs.captions_file}: an annotation without image_id: {str(annotation)[:80]}")
        by_image[annotation["image_id"]].append(annotation)
    images = content["images"]
    for image in images:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise ConvertError(f"{inputs.captions_file}: an image entry without id and file_name: {str(image)[:80]}")
    del content  # the grouped annotations and the image list are all that is needed from here
    for image in sorted(images, key=lambda i: i["id"]):
        yield from _pairs_of(image, sorted(by_image.pop(image["id"], []), key=lambda a: a.get("id", 0)),
                             inputs.images, captions)


def _pairs_of(image: dict, annotations: list[dict], folder: Path, captions: CaptionChoice) -> Iterator[SourcePair]:
    image_id = image["id"]
    key = f"{image_id:012d}" if isinstance(image_id, int) else safe_key(str(image_id))
    path = folder / Path(image["file_name"]).name  # never follow a path out of the image folder
    source = {"dataset": "coco", "image_id": image_id, "file_name": image["file_name"]}
    texts = [(a.get("id"), a.get("caption")) for a in annotations
             if isinstance(a.get("caption"), str) and a["caption"].strip()]
    if not texts:
        yield SourcePair(key, path, None, source, problem="missing_caption: no caption in the annotations")
        return
    if captions is CaptionChoice.first:
        annotation_id, text = texts[0]
        yield SourcePair(key, path, text.strip(), {**source, "annotation_id": annotation_id,
                                                   "captions": [t.strip() for _, t in texts]})
        return
    for index, (annotation_id, text) in enumerate(texts):
        yield SourcePair(f"{key}_{index}", path, text.strip(), {**source, "annotation_id": annotation_id})
