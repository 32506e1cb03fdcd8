"""`clipguard synth`: write the built-in labelled world (train / test / reference / validation shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from clipguard.cli.choices import WORLD_DEFAULTS as _WORLD
from clipguard.cli.common import console, err_console, user_errors


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
    overwrite: Annotated[bool, typer.Option(help="Replace a world already in --out.")] = False,
) -> None:
    """Generate the synthetic world: 20 PASCAL classes with synonyms, attributes, disjoint splits.

    \b
    Example:
      clipguard synth --out world/ --train 500 --reference 500
    """
    from clipguard.synth import SPLITS, WorldSpec, generate_world

    with user_errors():
        spec = WorldSpec(
            seed=seed, image_size=image_size, train_images=train, reference_images=reference,
            test_images_per_class=test, validation_images_per_class=validation, captions_per_image=captions_per_image, shard_size=shard_size,
        )
        err_console.print(f"generating the synthetic world (seed {seed}) into {out}")
        info = generate_world(out, spec, overwrite=overwrite)
    table = Table(title=f"synthetic world -> {out}")
    for column in ("split", "pairs", "shards"):
        table.add_column(column)
    for split in SPLITS:
        table.add_row(split, f"{spec.pairs_in(split):,}", str(info.shards(split)))
    console.print(table)
    console.print(f"class keywords: {Path(out) / 'keywords.json'}")
