"""Decode a raw sample into an image–caption pair, or a named reason why it cannot be one.

Limits protect the scorer from hostile input: the pixel count is checked from the image header
before any pixel is decoded, captions are bounded in bytes, and only image and text fields are
ever parsed (``.pkl``/``.pth`` members stay opaque bytes).

Only the web's raster formats are decoded (`WEB_IMAGE_FORMATS`: JPEG, PNG, WebP), the one the
member's extension names tried first: PIL would otherwise open any format it knows from the
bytes alone, and an EPS file named ``.jpg`` would reach Ghostscript. A PNG saved as ``.jpg`` (common
in scrapes) still decodes.

A very long, thin image is centre-cropped to `DecodeLimits.max_aspect_ratio` before anything
resizes it: a 1 x 100,000 px PNG is 190 bytes and 0.2% of the pixel limit, but resizing its short
side to 224 px would make 22 million pixels. The model's own transform (resize the short side,
then centre-crop a square) only ever looks at the central square, which the crop keeps whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass, field

from PIL import Image

from clipguard.data.sourcemeta import SourceMeta, meta_from_json
from clipguard.data.tarstream import DEFAULT_MAX_MEMBER_BYTES, RawSample

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
WEB_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
_FORMAT_OF_FIELD = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_CAPTION_BYTES = 16_384
DEFAULT_MAX_ASPECT_RATIO = 4.0


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    # JPEG draft mode decodes at a reduced DCT scale (>= this size) instead of full resolution.
    draft_size: int | None = None
    # Longer side / shorter side beyond which the image is centre-cropped (see the module doc).
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    # Members larger than this are never held in memory (scoring records them as errors).
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    # The PIL formats ever decoded. Shards are hostile: the web's three. Only a reader of the
    # user's own files (convert) widens this.
    formats: tuple[str, ...] = WEB_IMAGE_FORMATS


@dataclass
class Pair:
    key: str
    image: Image.Image | None
    caption: str | None
    image_sha256: str | None
    caption_invalid_utf8: bool = False
    caption_clipped: bool = False
    error: str | None = None  # None means the pair is usable
    source: SourceMeta = field(default_factory=SourceMeta)  # uid / url / scraper's status, if recorded

    @property
    def ok(self) -> bool:
        return self.error is None


def image_field(sample: RawSample) -> str | None:
    return next((f for f in IMAGE_FIELDS if f in sample.fields), None)


def read_caption(sample: RawSample, limits: DecodeLimits) -> tuple[str | None, bool, bool]:
    """Caption from ``txt``, else ``json["caption"]``; returns (caption, invalid_utf8, clipped)."""
    raw = sample.fields.get("txt")
    if raw is None and "json" in sample.fields:
        try:
            meta = json.loads(sample.fields["json"].decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
            raw = meta["caption"].encode("utf-8", errors="replace")
    if raw is None:
        return None, False, False
    try:
        raw.decode("utf-8")
        invalid = False
    except UnicodeDecodeError:
        invalid = True
    clipped = len(raw) > limits.max_caption_bytes
    # "ignore" at the cut only drops a multi-byte character that the clip split in two.
    text = raw[: limits.max_caption_bytes].decode("utf-8", errors="replace" if invalid else "ignore")
    return text.strip(), invalid, clipped


def decode_pair(sample: RawSample, limits: DecodeLimits) -> Pair:
    field_name = image_field(sample)
    image_bytes = sample.fields.get(field_name) if field_name else None
    caption, invalid_utf8, clipped = read_caption(sample, limits)
    pair = Pair(
        key=sample.key,
        image=None,
        caption=caption,
        image_sha256=hashlib.sha256(image_bytes).hexdigest() if image_bytes is not None else None,
        caption_invalid_utf8=invalid_utf8,
        caption_clipped=clipped,
        source=meta_from_json(sample.fields.get("json")),
    )
    if sample.problems:
        pair.error = sample.problems[0]
    elif image_bytes is None:
        pair.error = "missing_image"
    elif caption is None:
        pair.error = "missing_caption"
    elif not caption:
        # An empty caption would be scored against the empty string: not evidence either way.
        pair.error = "empty_caption"
    else:
        pair.image, pair.error = open_image(image_bytes, limits, field_name)
    return pair


def decode_formats(field_name: str | None, allowed: tuple[str, ...] = WEB_IMAGE_FORMATS) -> tuple[str, ...]:
    """The allowed formats, the one the extension names first."""
    named = _FORMAT_OF_FIELD.get(field_name or "")
    return tuple(dict.fromkeys([named, *allowed] if named in allowed else allowed))


def open_image(
    data: bytes, limits: DecodeLimits, field_name: str | None = None
) -> tuple[Image.Image | None, str | None]:
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below, before decoding; PIL's would only warn.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=decode_formats(field_name, limits.formats))
            except Image.UnidentifiedImageError:
                return None, f"corrupt_image: not a {', '.join(limits.formats)} image (other formats are never decoded)"
            width, height = image.size
            if width * height > limits.max_pixels:
                return None, f"image_too_large: {width}x{height} exceeds {limits.max_pixels} pixels"
            if limits.draft_size and image.format == "JPEG":
                image.draft("RGB", (limits.draft_size, limits.draft_size))
            image = crop_to_aspect(image, limits.max_aspect_ratio)
            image = image.convert("RGB")
            image.load()
    except Image.DecompressionBombError as exc:
        return None, f"image_too_large: {exc}"
    except Exception as exc:  # PIL raises many types for corrupt data
        # PIL puts object addresses in some messages; strip them so reruns record identical reasons.
        message = re.sub(r" at 0x[0-9a-f]+", "", str(exc))[:120]
        return None, f"corrupt_image: {type(exc).__name__}: {message}"
    return image, None


def crop_to_aspect(image: Image.Image, max_ratio: float) -> Image.Image:
    """The central part of an image whose sides differ by more than ``max_ratio``, cut to that
    ratio. Decoding itself is already bounded by the pixel limit; the crop bounds what a resize
    of the short side can make of it."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == 0 or long <= short * max_ratio:
        return image
    keep = max(1, int(short * max_ratio))
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)
