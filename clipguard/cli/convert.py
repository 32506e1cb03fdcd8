"""`clipguard convert`: a dataset in its official on-disk format -> shards + a registered name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from clipguard.cli.choices import DEFAULT_CONVERT_SHARD_SIZE, CaptionChoice, DatasetKind, core_enum
from clipguard.cli.common import console, err_console, progress_reporter, user_errors

if TYPE_CHECKING:
    from clipguard.convert import ConvertResult


def convert(
    kind: Annotated[DatasetKind, typer.Argument(help="coco, flickr30k, vg (Visual Genome) or folder (image + same-stem .txt).")],
    root: Annotated[Path, typer.Argument(help="The dataset's folder as downloaded (annotations and images below it).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the shards and convert_manifest.json.")],
    name: Annotated[Optional[str], typer.Option(help="Name to register (and shard prefix); default: the kind, e.g. vg.")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Pairs per shard.")] = DEFAULT_CONVERT_SHARD_SIZE,
    captions_file: Annotated[Optional[Path], typer.Option(help="COCO captions_*.json, Flickr30k results_20130124.token or dataset_flickr30k.json, VG region_descriptions.json (default: found under ROOT).")] = None,
    images: Annotated[Optional[Path], typer.Option(help="Image folder (default: ROOT/train2017, ROOT/flickr30k-images, ROOT for VG_100K*).")] = None,
    image_data: Annotated[Optional[Path], typer.Option(help="VG image_data.json (default: ROOT/image_data.json when present).")] = None,
    split: Annotated[Optional[str], typer.Option(help="COCO: train2017, val2017, ...; Flickr30k with Karpathy's JSON: train, val or test.")] = None,
    captions: Annotated[CaptionChoice, typer.Option(help="COCO/Flickr30k: the first caption of each image, or one pair per caption.")] = CaptionChoice.first,
    keywords: Annotated[Optional[Path], typer.Option(help="JSON {class: keywords} for the class labels (default: the paper's 20 PASCAL classes).")] = None,
    registry: Annotated[Optional[Path], typer.Option(help="Dataset registry TOML to write the name into (default: $CLIPGUARD_DATASETS or ~/.config/clipguard/datasets.toml).")] = None,
    no_register: Annotated[bool, typer.Option("--no-register", help="Write the shards only.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace shards an earlier conversion left in --out.")] = False,
) -> None:
    """Convert COCO, Flickr30k, Visual Genome or a folder into shards that `sterilize --clean NAME` finds.

    \b
    Example:
      clipguard convert vg ~/data/visual-genome --out shards/vg
    """
    # Imported here so that `--help` does not wait for torch.
    from clipguard import convert as core
    from clipguard.labels import load_keywords

    with user_errors():
        config = core.ConvertConfig(
            kind=core_enum(core.DatasetKind, kind), root=root, out=out, name=name, shard_size=shard_size,
            captions_file=captions_file, images=images, image_data_file=image_data, split=split,
            captions=core_enum(core.CaptionChoice, captions),
            keywords=load_keywords(keywords) if keywords is not None else None,
            register=not no_register, registry=registry, overwrite=overwrite,
        )
        with progress_reporter() as progress:
            task = progress.task(f"convert {kind.value}", total=None, steps="pairs read", unit="pairs written")

            def on_progress(read: int, written: int) -> None:
                task.update(completed=read, done=written)

            result = core.convert_dataset(config, progress=on_progress)
            task.finish()
        print_result(result)


def print_result(result: "ConvertResult") -> None:
    console.print(f"{result.written:,} of {result.read:,} pairs written to {len(result.shards)} shard(s) in "
                  f"{result.out} ({result.wall_seconds:.1f} s)")
    if result.outside_split:
        console.print(f"{result.outside_split:,} images outside the split left out")
    if result.failures:
        reasons = ", ".join(f"{code} {count:,}" for code, count in result.by_reason.most_common())
        err_console.print(f"[yellow]{len(result.failures):,} failed[/]: {reasons} (listed in {result.manifest_path})")
    labels = result.labels
    top = ", ".join(f"{name} {count:,}" for name, count in labels.per_class.most_common(5))
    console.print(f"class labels: {labels.labelled:,} labelled ({top or 'none'})")
    if result.registration is not None:
        console.print(f"[green]registered[/] {result.registration.name} in {result.registration.registry}: "
                      f"use --clean {result.registration.name} / --test {result.registration.name}")
