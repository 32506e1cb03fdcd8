"""Patch signatures: what a stamped trigger leaves in an image's pixels.

A backdoor stamps one small patch (BadNets' checkerboard, Carlini & Terzis') on every image it
poisons. A reference CLIP need not place the stamped copies together (the bundled one does not:
most copies land beside their own originals, not beside each other), but the pixels of the patch
are the same on every copy. So each image keeps the signatures of a few of its tiles, and the
audit groups images by signature (`clipguard.audit.detect`: stamped_images): a tile that recurs at
the same place in many otherwise different images, all captioned with one label, is a trigger.

A signature is computed at score time with ``--save-embeddings`` (the image is decoded there
anyway) and travels in the embeddings' metadata (``image_patches``), the audit's input. The
image is turned grey and box-resized to ``SIDE`` x ``SIDE`` (so the grid is relative to the
image, like a trigger sized as a fraction of its side); tiles of ``TILE`` px are taken every
``STRIDE`` px; a tile's signature is which of its 64 pixels are brighter than the tile's mean
(robust to JPEG re-encoding and to brightness and contrast changes), mixed with its position.
The ``KEEP`` tiles of highest contrast are kept: a trigger meant to be learnt stands out (the
checkerboard's black and white is the highest contrast a tile can have), and flat tiles (plain
background, everywhere) are never kept.

What it cannot see: a patch not aligned to the grid within ``STRIDE`` / 2 px at the 64 px scale, a
blended or invisible trigger (no fixed pixels), a flat one (a white square).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

SIDE = 64
TILE = 8  # 8 x 8 = 64 pixels: one uint64 of "brighter than the mean" bits
STRIDE = 4
KEEP = 8
MIN_CONTRAST = 20.0  # standard deviation of a tile's grey values (0-255) below which it is flat
# Mixes a tile's position into its bits (Fibonacci hashing), so one signature is one place.
_POSITION_MIX = np.uint64(0x9E3779B97F4A7C15)


def patch_signature(image: Image.Image) -> np.ndarray:
    """Up to ``KEEP`` uint64 signatures of the image's highest-contrast tiles, highest first."""
    # Grey before resizing: one channel to resample (a 640 x 480 photo: about 0.5 ms in all).
    grey = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.BOX), dtype=np.float32)
    tiles = sliding_window_view(grey, (TILE, TILE))[::STRIDE, ::STRIDE].reshape(-1, TILE * TILE)
    contrast = tiles.std(axis=1)
    bits = np.packbits(tiles > tiles.mean(axis=1, keepdims=True), axis=1).view(">u8").ravel().astype(np.uint64)
    with np.errstate(over="ignore"):  # the mix wraps around 2**64 by design
        signatures = bits ^ (np.arange(len(bits), dtype=np.uint64) * _POSITION_MIX)
    order = np.argsort(-contrast, kind="stable")[:KEEP]
    return signatures[order[contrast[order] >= MIN_CONTRAST]]
