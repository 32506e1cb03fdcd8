"""`clipguard sterilize`: repair a poisoned model by fine-tuning it on clean data (paper §5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from clipguard.cli.common import TrainPrecision, console, err_console, progress_reporter, user_errors
from clipguard.errors import ClipguardError
from clipguard.labels import load_keywords, make_labeler

if TYPE_CHECKING:
    from clipguard.sterilize import SterilizeResult, Watch

REFUSED_EXIT = 1


def sterilize(
    model: Annotated[str, typer.Argument(help="The (possibly poisoned) model: checkpoint, bundled name or architecture.")],
    clean: Annotated[list[str], typer.Option("--clean", help="Clean shards, or a dataset name from ~/.config/clipguard/datasets.toml (e.g. vg).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the repaired checkpoint (.safetensors + .json).")],
    lr: Annotated[float, typer.Option(help="Learning rate (Table 8: 1e-4 works best).")] = 1e-4,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the clean data.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option(min=2, help="Contrastive batch size.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for data order.")] = 0,
    goal: Annotated[Optional[list[str]], typer.Option("--goal", help="A:B goal to watch (repeatable); needs --test.")] = None,
    test: Annotated[Optional[list[str]], typer.Option("--test", help="Labelled shards for the watch; the early stop is chosen on them, so report final figures on other shards (the synthetic world's validation split, not its test split).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="poison_manifest.json: supplies goals and Attack I's target image.")] = None,
    target_image: Annotated[Optional[str], typer.Option(help="Attack I: key of the target image in --target-shards.")] = None,
    target_shards: Annotated[Optional[list[str]], typer.Option("--target-shards", help="Shards that hold --target-image.")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Clean model whose goal Hit@10 is the level to reach (default: random-text baseline).")] = None,
    keywords: Annotated[Optional[Path], typer.Option(help="JSON {class: keywords} to label test captions without json class.")] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="Evaluate the goals every N steps (the Figure 9 curve).")] = 10,
    max_utility_drop: Annotated[Optional[float], typer.Option(help="Refuse to save if utility (mean TR/IR Hit@10) drops more than this; an early stop also waits for utility within it.")] = None,
    no_early_stop: Annotated[bool, typer.Option("--no-early-stop", help="Train the full schedule even once the goals are at baseline.")] = False,
    precision: Annotated[TrainPrecision, typer.Option(help="Autocast precision of the forward pass; weights stay fp32 (bf16: 1.4x faster a step on an AVX512-BF16 EPYC, 1.7x on a CPU with AMX).")] = TrainPrecision.fp32,
    datasets_config: Annotated[Optional[Path], typer.Option(help="TOML file mapping dataset names to shard specs.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of the sterilization curve (default: next to --out).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the result (curve, before/after) as JSON.")] = None,
) -> None:
    """Fine-tune a poisoned model on clean data until the poison is gone, keeping utility.

    \b
    Example:
      clipguard sterilize poisoned.safetensors --clean world/reference \\
        --out sterilized.safetensors --goal sheep:aeroplane \\
        --test world/validation
    """
    from clipguard.datasets import resolve_dataset
    from clipguard.model.loading import ModelSpec, load_model
    from clipguard.sterilize import SterilizeConfig, plot_curve, sterilize as run_sterilize

    with user_errors():
        clean_specs = resolve_dataset(clean, datasets_config)
        watch = _watch(goal, test, manifest, target_image, target_shards, baseline, keywords)
        loaded = load_model(ModelSpec(name=model, pretrained=None))
        config = SterilizeConfig(
            lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, seed=seed, eval_every=eval_every,
            stop_at_baseline=not no_early_stop, max_utility_drop=max_utility_drop, precision=precision.value,
        )
        with progress_reporter() as progress:
            task = progress.task("sterilize", steps="steps", unit="samples")

            def on_step(event, point) -> None:
                task.update(completed=event.step, total=event.total_steps, done=event.samples_seen,
                            rate=event.samples_per_second, note=f"loss {event.loss:.3f}")
                if point is not None:
                    hits = ", ".join(f"{g} Hit@10 {v:.3f}" for g, v in point.hits_at_10.items())
                    progress.log(f"step {point.step}: {hits}; utility {point.utility:.3f}")

            result = run_sterilize(loaded, clean_specs, out, config, watch, progress=on_step)
        print_result(result)
        if result.curve:
            figure = plot_curve(result, plot or Path(out).with_suffix(".curve.png"))
            err_console.print(f"curve written to {figure}")
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    if not result.saved:
        err_console.print(f"[bold red]refused:[/] {result.refused_reason}")
        raise typer.Exit(code=REFUSED_EXIT)


def _watch(goal, test, manifest, target_image, target_shards, baseline, keywords) -> Watch | None:
    from clipguard.attacks import parse_goal
    from clipguard.evaluation import load_test_set, read_target_image, targets_from_manifest
    from clipguard.model.loading import ModelSpec, load_model
    from clipguard.sterilize import Watch

    goals = [parse_goal(g) for g in goal or []]
    target = None
    if manifest is not None:
        found = targets_from_manifest(manifest)
        goals = goals or list(found.goals)
        target = found.target_image
    if target_image is not None:
        if not target_shards:
            raise ClipguardError("--target-image needs --target-shards (the shards that hold it)")
        target = read_target_image(target_image, target_shards)
    if not goals:
        if test:
            raise ClipguardError("--test without --goal or --manifest: nothing to watch")
        return None
    if not test:
        raise ClipguardError("watching a goal needs --test SHARDS (labelled test pairs)")
    keyword_table = load_keywords(keywords) if keywords is not None else None
    test_set = load_test_set(test, make_labeler(keywords=keyword_table))
    reference = load_model(ModelSpec(name=baseline, pretrained=None)) if baseline else None
    return Watch(goals=goals, test=test_set, target_image=target, baseline=reference)


def print_result(result: SterilizeResult) -> None:
    if result.curve:
        table = Table(title="sterilization curve")
        table.add_column("step", justify="right")
        goals = list(result.curve[0].hits_at_10)
        for g in goals:
            table.add_column(f"{g} Hit@10", justify="right")
            table.add_column(f"{g} MinRank", justify="right")
        table.add_column("utility", justify="right")
        for p in result.curve:
            table.add_row(str(p.step), *[x for g in goals for x in (f"{p.hits_at_10[g]:.3f}", f"{p.min_rank[g]:.2f}")],
                          f"{p.utility:.3f}")
        console.print(table)
    status = "stopped early: goals at baseline" if result.stopped_early else "full schedule"
    console.print(f"{result.steps} steps, {result.samples_seen:,} samples, {result.wall_seconds:.1f} s ({status})")
    if result.utility_drop is not None:
        console.print(f"utility change: {-result.utility_drop:+.3f}")
    if result.saved:
        console.print(f"[green]saved[/] {result.checkpoint}")

