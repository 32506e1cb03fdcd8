"""`clipguard synth`: write the built-in labelled world (train / test / reference / validation shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from clipguard.cli.choices import WEB_NOISE_DEFAULTS as _NOISE
from clipguard.cli.choices import WORLD_DEFAULTS as _WORLD
from clipguard.cli.choices import NoiseKind
from clipguard.cli.common import console, err_console, user_errors

_RATE = {"min": 0.0, "max": 1.0}


def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder for train/, test/, reference/, validation/, world.json, keywords.json.")],
    seed: Annotated[int, typer.Option(help="World seed; the same seed gives byte-identical shards.")] = 0,
    train: Annotated[int, typer.Option(min=1, help="Train images (each with --captions-per-image pairs).")] = _WORLD.train_images,
    test: Annotated[int, typer.Option(min=1, help="Test images per class (20 classes, one caption each).")] = _WORLD.test_images_per_class,
    validation: Annotated[int, typer.Option(min=1, help="Validation images per class (drawn like test, kept apart from it: for choices such as when sterilizing stops).")] = _WORLD.validation_images_per_class,
    reference: Annotated[int, typer.Option(min=1, help="Reference images (the clean, independent split).")] = _WORLD.reference_images,
    captions_per_image: Annotated[int, typer.Option(min=1, help="Captions per train/reference image.")] = _WORLD.captions_per_image,
    image_size: Annotated[int, typer.Option(min=32, max=256, help="Image side in pixels.")] = _WORLD.image_size,
    shard_size: Annotated[int, typer.Option(min=1, help="Pairs per shard.")] = _WORLD.shard_size,
    noise: Annotated[NoiseKind, typer.Option(help="web: the train split's clean data looks like a web scrape (loose, wrong, boilerplate and mislabelled captions, reused stock images); test, validation and reference stay clean.")] = NoiseKind.none,
    partial_rate: Annotated[float, typer.Option(**_RATE, help="--noise web: share of train pairs whose caption names the class in web wording and little else.")] = _NOISE.partial_rate,
    wrong_attribute_rate: Annotated[float, typer.Option(**_RATE, help="--noise web: share whose caption names attributes the image does not have.")] = _NOISE.wrong_attribute_rate,
    boilerplate_rate: Annotated[float, typer.Option(**_RATE, help="--noise web: share with alt-text unrelated to the image ('click to enlarge', IMG_2041.jpg).")] = _NOISE.boilerplate_rate,
    label_noise_rate: Annotated[float, typer.Option(**_RATE, help="--noise web: share whose caption names a wrong class (spread over all class pairs).")] = _NOISE.label_noise_rate,
    stock_page_rate: Annotated[float, typer.Option(**_RATE, help="--noise web: share of train image slots showing a stock image shared with other slots.")] = _NOISE.stock_page_rate,
    stock_max_pages: Annotated[int, typer.Option(min=2, help="--noise web: most slots one stock image appears on.")] = _NOISE.stock_max_pages,
    overwrite: Annotated[bool, typer.Option(help="Replace a world already in --out.")] = False,
) -> None:
    """Generate the synthetic world: 20 PASCAL classes with synonyms, attributes, disjoint splits.

    \b
    Example:
      clipguard synth --out world/ --train 500 --reference 500
      clipguard synth --out noisy/ --noise web
    """
    from clipguard.synth import SPLITS, WebNoiseConfig, WorldSpec, generate_world

    with user_errors():
        web_noise = WebNoiseConfig(
            partial_rate=partial_rate, wrong_attribute_rate=wrong_attribute_rate, boilerplate_rate=boilerplate_rate,
            label_noise_rate=label_noise_rate, stock_page_rate=stock_page_rate, stock_max_pages=stock_max_pages,
        )
        spec = WorldSpec(
            seed=seed, image_size=image_size, train_images=train, reference_images=reference,
            test_images_per_class=test, validation_images_per_class=validation, captions_per_image=captions_per_image, shard_size=shard_size,
            noise=noise.value, web_noise=web_noise,
        )
        err_console.print(f"generating the synthetic world (seed {seed}, noise {noise.value}) into {out}")
        info = generate_world(out, spec, overwrite=overwrite)
    table = Table(title=f"synthetic world -> {out}")
    for column in ("split", "pairs", "shards", "noise"):
        table.add_column(column)
    for split in SPLITS:
        counts = info.splits[split].noise_counts
        noise_cell = ", ".join(f"{kind} {n:,}" for kind, n in counts.items() if kind != "none") if counts else "clean"
        table.add_row(split, f"{spec.pairs_in(split):,}", str(info.shards(split)), noise_cell)
    console.print(table)
    console.print(f"class keywords: {Path(out) / 'keywords.json'}")
