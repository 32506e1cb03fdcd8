"""Visual Genome: ``region_descriptions.json``, ``image_data.json`` and ``VG_100K/``, ``VG_100K_2/``.

One pair per image, its caption the region phrases joined: largest regions first (they describe
the scene rather than a shoelace), repeats dropped, cut at ``max_caption_chars`` (~300 characters
is about the 77 tokens a CLIP text tower reads). Why not one pair per region: VG has ~50 regions
an image, so a contrastive batch would hold the same image many times with different texts, each
the others' false negative, and crops of a few pixels would swamp the clean set. One image, one
caption is what the paper's sterilization fine-tune (and a user's "VG captions") means.

Both JSON files are streamed item by item (clipguard.convert.jsonstream): region_descriptions is
~700 MB. From image_data only a small per-image record (folder, size, COCO/Flickr ids) is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipguard.convert.jsonstream import iter_json_array
from clipguard.convert.sources import ConvertError, SourcePair, require_file, require_folder

IMAGE_FOLDERS = ("VG_100K", "VG_100K_2")
DEFAULT_MAX_CAPTION_CHARS = 300


@dataclass(frozen=True)
class VgInputs:
    regions_file: Path
    image_data_file: Path | None  # without it, each image is looked up in both image folders
    images: Path

    @classmethod
    def under(cls, root: Path, regions_file: Path | None = None, image_data_file: Path | None = None,
              images: Path | None = None) -> "VgInputs":
        root = Path(root)
        regions_file = require_file(regions_file or root / "region_descriptions.json",
                                    "Visual Genome region descriptions",
                                    "VG's region_descriptions.json; pass --captions-file to name another")
        if image_data_file is not None:
            image_data_file = require_file(image_data_file, "Visual Genome image data", "VG's image_data.json")
        elif (root / "image_data.json").is_file():
            image_data_file = root / "image_data.json"
        images = require_folder(images or root, "Visual Genome image root",
                                "the folder holding VG_100K/ and VG_100K_2/; pass --images to name another")
        if not any((images / name).is_dir() for name in IMAGE_FOLDERS):
            raise ConvertError(f"Visual Genome images not found: expected {images / 'VG_100K'} and/or "
                               f"{images / 'VG_100K_2'}; pass --images to name the folder that holds them")
        return cls(regions_file, image_data_file, images)


@dataclass(frozen=True)
class _ImageRecord:
    folder: str | None
    file_name: str | None
    extra: dict


def _image_records(path: Path) -> dict[int, _ImageRecord]:
    records: dict[int, _ImageRecord] = {}
    for item in iter_json_array(path, "images {image_id, url, width, height}"):
        image_id = item.get("image_id", item.get("id"))
        if image_id is None:
            raise ConvertError(f"{path} is not VG's image_data.json: an item without image_id: {str(item)[:80]}")
        parts = str(item.get("url") or "").rstrip("/").split("/")
        # Only a known folder name is trusted from the url: it must not lead out of the image root.
        folder = parts[-2] if len(parts) >= 2 and parts[-2] in IMAGE_FOLDERS else None
        extra = {k: item[k] for k in ("width", "height", "coco_id", "flickr_id") if item.get(k) is not None}
        records[image_id] = _ImageRecord(folder, Path(parts[-1]).name if folder else None, extra)
    return records


def _image_path(images: Path, image_id, record: _ImageRecord | None) -> Path:
    if record is not None and record.folder is not None:
        return images / record.folder / record.file_name
    for folder in IMAGE_FOLDERS:
        candidate = images / folder / f"{image_id}.jpg"
        if candidate.is_file():
            return candidate
    return images / IMAGE_FOLDERS[0] / f"{image_id}.jpg"  # missing: the writer records it


def region_caption(regions: list[dict], max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[str, list]:
    """The joined phrases and the region ids used, largest region first."""
    def area(region: dict) -> float:
        try:
            return float(region.get("width", 0)) * float(region.get("height", 0))
        except (TypeError, ValueError):
            return 0.0

    ordered = sorted((r for r in regions if isinstance(r, dict)), key=lambda r: (-area(r), str(r.get("region_id"))))
    phrases, used, seen, length = [], [], set(), 0
    for region in ordered:
        phrase = " ".join(str(region.get("phrase") or "").split()).strip(" .,")
        if not phrase or phrase.lower() in seen:
            continue
        extra = len(phrase) + (2 if phrases else 0)
        if phrases and length + extra > max_chars:
            break
        phrases.append(phrase[:max_chars])
        used.append(region.get("region_id"))
        seen.add(phrase.lower())
        length += extra
    return ", ".join(phrases), used


def read_vg(inputs: VgInputs, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> Iterator[SourcePair]:
    records = _image_records(inputs.image_data_file) if inputs.image_data_file is not None else {}
    for item in iter_json_array(inputs.regions_file, "images with regions {id, regions: [...]}"):
        regions = item.get("regions")
        if not isinstance(regions, list):
            raise ConvertError(f"{inputs.regions_file} is not VG's region_descriptions.json: an item without "
                               f"a 'regions' list: {str(item)[:80]}")
        image_id = item.get("id", item.get("image_id"))
        if image_id is None and regions and isinstance(regions[0], dict):
            image_id = regions[0].get("image_id")
        if image_id is None:
            raise ConvertError(f"{inputs.regions_file}: an item with neither id nor regions to name its image")
        record = records.get(image_id)
        path = _image_path(inputs.images, image_id, record)
        caption, used = region_caption(regions, max_caption_chars)
        source = {"dataset": "vg", "image_id": image_id, "file_name": str(path.relative_to(inputs.images)),
                  "region_ids": used, "regions": len(regions), **(record.extra if record else {})}
        problem = None if caption else "missing_caption: no region phrase"
        yield SourcePair(str(image_id), path, caption or None, source, problem=problem)
