"""`clipguard attack`: flags -> AttackConfig -> run_attack, then a summary of what was injected."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from clipguard.cli.choices import (
    DEFAULT_SURROGATE,
    AttackKind,
    CaptionSource,
    EvadeVariant,
    KeyPolicy,
    TriggerPattern,
    TriggerPosition,
    core_enum,
)
from clipguard.cli.common import console, err_console, progress_reporter, user_errors
from clipguard.labels import LabelSource

if TYPE_CHECKING:
    from clipguard.attacks import AttackProgress, AttackResult
    from clipguard.cli.progress import ProgressTask


def attack(
    kind: Annotated[AttackKind, typer.Argument(help="single-image (Attack I), single-label (II), multi-label (III), targeted or backdoor (Carlini & Terzis).")],
    clean: Annotated[list[str], typer.Argument(help="Clean shards: folders, globs, brace patterns or URLs.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the poisoned shards and poison_manifest.json.")],
    goal: Annotated[list[str], typer.Option("--goal", help="A:B. Yang et al.: texts of class A should retrieve images of B. Carlini: images of A ('*' = any) should read as label B. Repeat for multi-label.")],
    rate: Annotated[Optional[float], typer.Option(help="Poisoning rate φ = |Dp| / |D| in pairs, |D| = clean + poisons; |Dp| = round(φ·|D|).")] = None,
    count: Annotated[Optional[int], typer.Option(help="Number of poison pairs instead of --rate.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice (sources, positions).")] = 0,
    keywords: Annotated[Optional[Path], typer.Option(help="JSON {class: list of keywords} for labelling captions (whole word, case-insensitive) and for template captions.")] = None,
    label_source: Annotated[LabelSource, typer.Option(help="auto: json 'class' where present, else keywords.")] = LabelSource.auto,
    target_image: Annotated[Optional[str], typer.Option(help="Clean key of the target image (single-image: class B; targeted: class A). Default: a seeded random one.")] = None,
    caption_source: Annotated[CaptionSource, typer.Option(help="targeted/backdoor captions: from the data, or 'a photo of a {label}' templates.")] = CaptionSource.data,
    trigger_pattern: Annotated[TriggerPattern, typer.Option(help="Backdoor patch pattern.")] = TriggerPattern.checkerboard,
    trigger_size: Annotated[float, typer.Option(help="Backdoor patch side as a fraction of the image's shorter side.")] = 0.125,
    trigger_position: Annotated[TriggerPosition, typer.Option(help="Where the backdoor patch goes.")] = TriggerPosition.bottom_right,
    keys: Annotated[KeyPolicy, typer.Option(help="renumber: number each output shard afresh in the input's key style (poisons undetectable by key); keep: clean keys untouched, poisons take the next free keys.")] = KeyPolicy.renumber,
    evade: Annotated[Optional[EvadeVariant], typer.Option(help="A variant built to pass a pair filter: blend (caption names the poison class but describes the image; any attack), nearest (class-B images nearest to class-A captions under --surrogate; single-image, single-label, multi-label), clean-label (trigger on images whose captions are the target label; backdoor), many-captions (data and template captions, all distinct; targeted).")] = None,
    surrogate: Annotated[str, typer.Option(help="The attacker's model that --evade nearest ranks images with (bundled name, open_clip architecture or checkpoint); not the defender's reference.")] = DEFAULT_SURROGATE,
    overwrite: Annotated[bool, typer.Option(help="Replace shards and manifest already in --out.")] = False,
) -> None:
    """Mix poisons into clean shards; write poisoned shards and the ground-truth manifest.

    \b
    Example:
      clipguard attack single-label world/train --goal sheep:aeroplane \\
        --rate 0.005 --out poisoned/
      clipguard attack single-label world/train --goal sheep:aeroplane \\
        --rate 0.005 --evade nearest --out poisoned-nearest/
    """
    from clipguard import attacks

    with user_errors():
        trigger = attacks.TriggerSpec(pattern=core_enum(attacks.TriggerPattern, trigger_pattern), size=trigger_size,
                                      position=core_enum(attacks.TriggerPosition, trigger_position))
        config = attacks.AttackConfig(
            kind=core_enum(attacks.AttackKind, kind), goals=tuple(attacks.parse_goal(g) for g in goal), rate=rate,
            count=count, seed=seed, label_source=label_source, keywords=keywords, target_image=target_image,
            trigger=trigger, caption_source=core_enum(attacks.CaptionSource, caption_source),
            key_policy=core_enum(attacks.KeyPolicy, keys), overwrite=overwrite,
            evade=core_enum(attacks.EvadeVariant, evade) if evade is not None else None, surrogate=surrogate,
        )
        with progress_reporter() as progress:
            tasks: dict[str, ProgressTask] = {}

            def on_progress(event: AttackProgress) -> None:
                if event.stage not in tasks:
                    tasks[event.stage] = progress.task(event.stage, total=event.shards_total, steps="shards")
                tasks[event.stage].update(completed=event.shards_done)

            result = attacks.run_attack(clean, out, config, progress=on_progress)
            for task in tasks.values():
                task.finish()
        print_summary(result)


def print_summary(result: AttackResult) -> None:
    manifest = result.manifest
    table = Table(title=f"clipguard attack {manifest.kind} -> {result.out_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("goals", ", ".join(f"{g['source']}:{g['target']} ({g['count']} poisons)" for g in manifest.goals))
    requested = manifest.requested
    asked = f"requested φ = {requested['rate']}" if "rate" in requested else f"requested {requested['count']} poisons"
    table.add_row("poisoning rate", f"φ = {manifest.count} / {manifest.total_pairs:,} = {manifest.rate:.5f} ({asked})")
    spread = sum(1 for s in manifest.output_shards if s["poisons"])
    table.add_row("shards", f"{len(manifest.output_shards)} written, poisons in {spread}")
    if manifest.target_image:
        table.add_row("target image", f"{manifest.target_image['source_key']} (class {manifest.target_image['class']})")
    if manifest.evade:
        table.add_row("evade", ", ".join(f"{k} {v}" for k, v in manifest.evade.items()))
    if manifest.trigger:
        table.add_row("trigger", ", ".join(f"{k} {v}" for k, v in manifest.trigger.items()))
    counts = manifest.labels["counts"]
    unlabelled = ", ".join(f"{k}: {v}" for k, v in counts["unlabelled"].items()) or "none"
    table.add_row("labels", f"{counts['labelled']:,} of {counts['total']:,} pairs labelled; unlabelled: {unlabelled}")
    table.add_row("keys", manifest.key_policy)
    table.add_row("manifest", str(result.manifest_path))
    console.print(table)
    err_console.print("[dim]the manifest lists every poison key: use it as ground-truth labels for calibrate[/]")
