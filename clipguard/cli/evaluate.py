"""`clipguard evaluate`: flags -> evaluate(...) -> tables (and JSON with --json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from clipguard.cli.choices import DEFAULT_PRETRAINED, TriggerPattern, TriggerPosition, core_enum
from clipguard.cli.common import compact_table, console, err_console, user_errors
from clipguard.datasets import resolve_dataset
from clipguard.errors import ClipguardError
from clipguard.labels import LabelSource, load_keywords, make_labeler

if TYPE_CHECKING:
    from clipguard.evaluation import EvaluationReport


def evaluate(
    model: Annotated[str, typer.Argument(help="Checkpoint (.safetensors with sidecar), bundled model name, or open_clip architecture.")],
    test: Annotated[list[str], typer.Option("--test", help="Labelled test shards, or a dataset name from ~/.config/clipguard/datasets.toml, e.g. coco (repeat for several).")],
    goal: Annotated[Optional[list[str]], typer.Option("--goal", help="A:B: class-A test texts query all test images; class-B images (or the target image) are the targets. Repeatable.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="poison_manifest.json of the attack: supplies goals, the target image and the trigger.")] = None,
    target_image: Annotated[Optional[str], typer.Option(help="Attack I: key of the target image x* in --target-shards.")] = None,
    target_shards: Annotated[Optional[list[str]], typer.Option("--target-shards", help="Shards that hold --target-image (the poisoned training shards).")] = None,
    target_label: Annotated[Optional[str], typer.Option(help="Targeted poisoning: the label the target image should read as (zero-shot).")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Clean model to compare with (goal metrics, utility, encoder drift).")] = None,
    trigger_target: Annotated[Optional[str], typer.Option(help="Backdoor: the label the trigger should force; enables the zero-shot backdoor test.")] = None,
    trigger_pattern: Annotated[TriggerPattern, typer.Option(help="Backdoor patch pattern (as in the attack).")] = TriggerPattern.checkerboard,
    trigger_size: Annotated[float, typer.Option(help="Backdoor patch side, fraction of the shorter image side.")] = 0.125,
    trigger_position: Annotated[TriggerPosition, typer.Option(help="Backdoor patch position.")] = TriggerPosition.bottom_right,
    keywords: Annotated[Optional[Path], typer.Option(help="JSON {class: list of keywords}: labels for captions without json class, and zero-shot prompts.")] = None,
    label_source: Annotated[LabelSource, typer.Option(help="auto: json 'class' where present, else keywords.")] = LabelSource.auto,
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag or weights file when MODEL/--baseline is an architecture name.")] = DEFAULT_PRETRAINED,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Inference batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the random-text baseline.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON here.")] = None,
    datasets_config: Annotated[Optional[Path], typer.Option(help="TOML file mapping dataset names to shard specs.")] = None,
) -> None:
    """Hit@K / MinRank for poisoning goals, utility, backdoor success and encoder drift.

    \b
    Example:
      clipguard evaluate poisoned.safetensors --test world/test \\
        --goal sheep:aeroplane --baseline clean.safetensors
    """
    from clipguard import attacks
    from clipguard.evaluation import BackdoorTrigger, evaluate as evaluate_model, load_test_set, read_target_image, targets_from_manifest
    from clipguard.model.loading import ModelSpec, load_model

    with user_errors():
        keyword_table = load_keywords(keywords) if keywords is not None else None
        goals = [attacks.parse_goal(g) for g in goal or []]
        target, trigger, label = None, None, target_label
        if manifest is not None:
            found = targets_from_manifest(manifest)
            goals = goals or found.goals
            target, trigger, label = found.target_image, found.trigger, label or found.target_label
        if target_image is not None:
            if not target_shards:
                raise ClipguardError("--target-image needs --target-shards (the shards that hold it)")
            target = read_target_image(target_image, target_shards)
        if trigger_target is not None:
            spec = attacks.TriggerSpec(pattern=core_enum(attacks.TriggerPattern, trigger_pattern), size=trigger_size,
                                       position=core_enum(attacks.TriggerPosition, trigger_position))
            trigger = BackdoorTrigger(target=trigger_target, spec=spec)
        if not goals and trigger is None and label is None:
            err_console.print("[yellow]no --goal, --manifest or --trigger-target: reporting utility only[/]")
        test_set = load_test_set(resolve_dataset(test, datasets_config), make_labeler(label_source, keyword_table))
        loaded = load_model(ModelSpec(name=model, pretrained=pretrained, device=device))
        reference = load_model(ModelSpec(name=baseline, pretrained=pretrained, device=device)) if baseline else None
        report = evaluate_model(loaded, test_set, goals, target_image=target, baseline=reference, trigger=trigger,
                                target_label=label, keywords=keyword_table, seed=seed, batch_size=batch_size)
        print_report(report)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            err_console.print(f"report written to {json_out}")


def _goal_row(table: Table, name: str, numbers) -> None:
    from clipguard.metrics import GOAL_HIT_KS

    table.add_row(name, *(f"{numbers.hits[k]:.3f}" for k in GOAL_HIT_KS), f"{numbers.min_rank:.2f}")


def print_report(report: EvaluationReport) -> None:
    from clipguard.metrics import GOAL_HIT_KS, UTILITY_HIT_KS

    test = report.test
    console.print(f"[bold]test set[/]: {test['pairs']:,} pairs, {test['images']:,} images"
                  + (f", skipped {test['skipped']}" if test["skipped"] else ""))
    for goal in report.goals:
        what = f"target image {goal.target_image}" if goal.target_kind == "image" else "target class images"
        table = compact_table(f"goal {goal.goal} ({goal.model.n_queries} queries, {goal.model.gallery_size} gallery images, {what})",
                              [f"Hit@{k}" for k in GOAL_HIT_KS] + ["MinRank"])
        _goal_row(table, "model", goal.model)
        if goal.baseline is not None:
            _goal_row(table, "baseline model", goal.baseline)
        _goal_row(table, "random texts", goal.random_text)
        console.print(table)
    table = compact_table("utility: retrieval over the test pairs (TR: image -> text, IR: text -> image)",
                          [f"TR@{k}" for k in UTILITY_HIT_KS] + [f"IR@{k}" for k in UTILITY_HIT_KS])
    rows = [("model", report.utility)] + ([("baseline model", report.baseline_utility)] if report.baseline_utility else [])
    for name, utility in rows:
        table.add_row(name, *(f"{utility.text_retrieval[k]:.3f}" for k in UTILITY_HIT_KS),
                      *(f"{utility.image_retrieval[k]:.3f}" for k in UTILITY_HIT_KS))
    console.print(table)
    if report.backdoor is not None:
        b = report.backdoor
        line = (f"[bold]backdoor[/] -> {b.target}: success {b.success_rate:.3f} over {b.n_evaluated} triggered images "
                f"(zero-shot accuracy without trigger {b.clean_accuracy:.3f})")
        if b.baseline_success_rate is not None:
            line += f"; baseline model success {b.baseline_success_rate:.3f}"
        console.print(line)
    if report.targeted is not None:
        t = report.targeted
        console.print(f"[bold]targeted[/] image {t.target_image} -> {t.label}: read as {t.predicted} "
                      f"(label rank {t.label_rank}, {'success' if t.success else 'no success'})")
    if report.drift is not None:
        console.print(f"[bold]encoder drift[/] vs baseline (mean cosine distance): text {report.drift.text:.4f}, "
                      f"image {report.drift.image:.4f}")
