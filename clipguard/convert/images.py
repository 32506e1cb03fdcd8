"""Read one image file for a shard: bounded, validated with the scorer's own decoder, and kept
byte-for-byte when it already is a format readers accept."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipguard.data.pairs import WEB_IMAGE_FORMATS, DecodeLimits, open_image

DEFAULT_MAX_IMAGE_BYTES = 64 << 20
# PIL format -> the shard field clipguard's reader (clipguard.data.pairs.IMAGE_FIELDS) accepts.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageFile:
    """``field`` and ``data`` when the image can be written; else ``error`` says why not."""

    field: str | None = None
    data: bytes | None = None
    reencoded: bool = False
    error: str | None = None


# A dataset on the user's own disk is not a hostile shard: its few older raster formats are
# decoded (and re-encoded to PNG); EPS and the like still never are.
LOCAL_IMAGE_FORMATS = (*WEB_IMAGE_FORMATS, "BMP", "GIF", "TIFF")


def local_image_limits() -> DecodeLimits:
    return DecodeLimits(formats=LOCAL_IMAGE_FORMATS)


def read_image_file(path: Path | None, limits: DecodeLimits, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageFile:
    if path is None:
        return ImageFile(error="missing_image: the annotations name no image file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return ImageFile(error=f"image_too_large: {path.name} has {size} bytes (limit {max_bytes})")
        data = path.read_bytes()
    except FileNotFoundError:
        return ImageFile(error=f"missing_image: {path} not found")
    except OSError as exc:
        return ImageFile(error=f"unreadable_image: {type(exc).__name__}: {exc}"[:160])
    # The full decode (pixel limit checked from the header first) is what catches a truncated or
    # corrupt file; the decoded pixels are dropped at once, only the file's bytes are kept.
    image, error = open_image(data, limits)
    if error is not None:
        return ImageFile(error=error)
    field = KEPT_FORMATS.get(_format_of(data))
    if field is not None:
        return ImageFile(field=field, data=data)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: what the scorer decodes is what was on disk
    return ImageFile(field="png", data=buffer.getvalue(), reencoded=True)


def _format_of(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data), formats=LOCAL_IMAGE_FORMATS) as image:
            return image.format
    except Exception:  # noqa: BLE001 - open_image already accepted it; any failure means "not kept as is"
        return None
