"""`clipguard demo`: the attack -> filter -> repair loop on the built-in world, one table out."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipguard.cli.choices import NoiseKind
from clipguard.cli.common import compact_table, console, progress_reporter, user_errors

if TYPE_CHECKING:
    from clipguard.cli.progress import ProgressTask
    from clipguard.demo import DemoConfig, DemoResult, StageProgress

# The paper's numbers for the same rows (Flickr-PASCAL, Attack II sheep2aeroplane, ViT-B/32):
# Table 3 (clean / poisoned), Table 16 (pre-training defence), Table 8 (post-training, lr 1e-4).
PAPER_HIT10 = {"clean fine-tune": 0.200, "poisoned": 0.936, "filtered": 0.016, "sterilized": 0.008}


def demo(
    out: Annotated[Path, typer.Option("--out", help="Report folder (world, shards, models, plots, report.json).")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="The story on a budget, under 3 minutes on 2 CPU cores (the full demo: about 5, 9 with --noise none): 2 epochs per fine-tune instead of 4 (8), so 10% of the pairs poisoned instead of 5% (5% instead of 0.5%).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the attack, sampling and training.")] = 0,
    noise: Annotated[NoiseKind, typer.Option(help="The world: web (captions as loose as a scrape's, where clean and poisoned distances overlap; the default) or none (clean captions: any threshold works).")] = NoiseKind.web,
) -> None:
    """Synthesize, poison, train, score, calibrate, filter, retrain, sterilize, evaluate.

    \b
    Example:
      clipguard demo --quick --out demo-out/
    """
    from clipguard.demo import DemoConfig, run_demo

    config = dataclasses.replace(DemoConfig.for_world(noise.value, quick), seed=seed)
    started = time.perf_counter()

    with user_errors(), progress_reporter() as progress:
        tasks: dict[str, ProgressTask] = {}  # the running stage, and its jobs by name

        def on_stage(name: str) -> None:
            for task in reversed(tasks.values()):  # the stage's jobs, then the stage
                task.finish()
            tasks.clear()
            progress.log(f"{time.perf_counter() - started:6.1f} s  {name} ...")
            tasks[""] = progress.task(name)

        def on_progress(event: StageProgress) -> None:
            if event.job not in tasks:
                tasks[event.job] = progress.task(event.job, total=event.total, steps=event.steps)
            tasks[event.job].update(completed=event.completed, total=event.total, done=event.done,
                                    rate=event.rate, note=event.note)

        result = run_demo(out, config, on_stage=on_stage, on_progress=on_progress)
        for task in reversed(tasks.values()):
            task.finish()
    print_table(result, config)
    console.print(f"total {time.perf_counter() - started:.0f} s; report: {result.report_path}; "
                  f"audit page: {result.html_report}; figures: {', '.join(str(p) for p in result.figures)}")


def print_table(result: DemoResult, config: DemoConfig) -> None:
    table = compact_table(
        f"Attack II {config.goal} at phi = {result.phi:.2%} ({result.poisons} poisoned pairs): test split",
        ("Hit@1", "Hit@5", "Hit@10", "MinRank", "random\nHit@10", "TR@10", "IR@10", "paper\nHit@10"),
    )
    for row in result.rows:
        paper = PAPER_HIT10.get(row.name)
        table.add_row(row.name, *(f"{row.hits[k]:.3f}" for k in (1, 5, 10)), f"{row.min_rank:.1f}",
                      f"{row.random_hits_10:.3f}", f"{row.utility_tr_10:.3f}", f"{row.utility_ir_10:.3f}",
                      f"{paper:.3f}" if paper is not None else "")
    console.print(table)
    c = result.calibration
    console.print(
        f"gamma {result.gamma:.4f} from {c['labelled']} labelled pairs ({c['poison_labels']} poisons): "
        f"recall {c['recall']['point']:.3f} [{c['recall']['lower']:.3f}, {c['recall']['upper']:.3f}], "
        f"FPR {c['false_positive_rate']['point']:.4f} [{c['false_positive_rate']['lower']:.4f}, "
        f"{c['false_positive_rate']['upper']:.4f}]"
    )
    detection = compact_table(
        f"Pair distance alone against the combination, each at a target FPR of {config.target_fpr:.0%} "
        f"from {c['labelled']} labelled pairs: measured on all pairs",
        ("gamma", "recall", "FPR", "estimated FPR"),
    )
    for row in result.detection:
        if "refused" in row:
            console.print(f"{row['rule']}: not used, {row['refused']}", markup=False)
            continue
        est = row["estimated_false_positive_rate"]
        detection.add_row(row["rule"], f"{row['gamma']:.4f}", f"{row['recall']:.3f}", f"{row['false_positive_rate']:.4f}",
                          f"{est['point']:.4f} [{est['lower']:.4f}, {est['upper']:.4f}]")
    console.print(detection)
    if result.findings:
        console.print(f"audit: {len(result.findings)} finding(s); first: {result.findings[0]}", markup=False)
    else:
        console.print("audit: no finding at the significance level")
    f = result.filter_counts
    console.print(f"filter: {f['read']:,} read, {f['kept']:,} kept, {f['flagged']:,} flagged, {f['errored']:,} errors; "
                  f"{result.poisons_quarantined}/{result.poisons} poisons quarantined")
