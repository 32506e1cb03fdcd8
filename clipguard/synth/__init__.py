"""The built-in synthetic, labelled image-caption world (20 PASCAL VOC classes).

`generate_world(out_dir, WorldSpec())` writes train / test / reference WebDataset shards,
world.json and keywords.json; see `world.py` for the layout, `vocabulary.py` for the words and
`noise.py` for the web-like noise of `WorldSpec(noise="web")`.
"""

from clipguard.synth.noise import CAPTION_KINDS, NOISE_KINDS, WebNoiseConfig, WebNoiseError
from clipguard.synth.render import render_contact_sheet, render_image
from clipguard.synth.vocabulary import (
    ATTRIBUTE_NAMES,
    BACKGROUNDS,
    CLASS_KEYWORDS,
    CLASSES,
    COLOURS,
    COUNTS,
    POSITIONS,
    SIZES,
    Attributes,
    Caption,
    class_prompts,
    keyword_forms,
    keyword_table,
    make_caption,
    make_short_caption,
    sample_attributes,
)
from clipguard.synth.world import (
    SPLITS,
    SplitInfo,
    SynthSample,
    WorldInfo,
    WorldSpec,
    WorldSpecError,
    generate_world,
    iter_split_samples,
    read_world_info,
)

__all__ = [
    "BACKGROUNDS",
    "CAPTION_KINDS",
    "NOISE_KINDS",
    "CLASS_KEYWORDS",
    "CLASSES",
    "COLOURS",
    "COUNTS",
    "POSITIONS",
    "SIZES",
    "SPLITS",
    "ATTRIBUTE_NAMES",
    "Attributes",
    "Caption",
    "SplitInfo",
    "SynthSample",
    "WebNoiseConfig",
    "WebNoiseError",
    "WorldInfo",
    "WorldSpec",
    "WorldSpecError",
    "class_prompts",
    "generate_world",
    "iter_split_samples",
    "keyword_forms",
    "keyword_table",
    "make_caption",
    "make_short_caption",
    "read_world_info",
    "render_contact_sheet",
    "render_image",
    "sample_attributes",
]
