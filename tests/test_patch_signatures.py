"""Patch signatures (clipguard.signals.patches): a stamped trigger gives every stamped image one
signature in common, through JPEG re-encoding; unrelated images share none of their highest-
contrast tiles; a flat image has none."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipguard.attacks.trigger import TriggerSpec, stamp_image, stamp_image_bytes
from clipguard.signals.patches import KEEP, patch_signature
from clipguard.synth.render import render_image
from clipguard.synth.vocabulary import CLASSES, sample_attributes


def _images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [render_image(CLASSES[i % len(CLASSES)], sample_attributes(rng), rng, size) for i in range(n)]


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_a_stamped_trigger_is_one_signature_on_every_stamped_image():
    spec = TriggerSpec()  # BadNets' checkerboard, an eighth of the side, bottom right
    stamped = [Image.open(io.BytesIO(stamp_image_bytes(_jpeg(image), spec))) for image in _images(12)]
    common = set.intersection(*(set(patch_signature(image).tolist()) for image in stamped))
    assert len(common) == 1
    # The same trigger on a larger image (the signature grid is relative to the image's side).
    large = stamp_image(_images(1, seed=5, size=192)[0], spec)
    assert common <= set(patch_signature(large).tolist())


def test_unrelated_images_share_no_signature_and_a_flat_image_has_none():
    signatures = [set(patch_signature(image).tolist()) for image in _images(40, seed=1)]
    assert all(0 < len(s) <= KEEP for s in signatures)
    shared = [len(a & b) for i, a in enumerate(signatures) for b in signatures[i + 1:]]
    assert np.mean(shared) < 0.05  # an icon's outline may recur at one place now and then, no more
    assert patch_signature(Image.new("RGB", (64, 64), (200, 200, 200))).size == 0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_any_image_mode_gives_signatures(mode):
    image = stamp_image(_images(1, seed=2)[0], TriggerSpec()).convert(mode)
    assert patch_signature(image).dtype == np.uint64 and patch_signature(image).size > 0
