"""`clipguard calibrate`: flags -> CalibrateRequest -> calibrate_scores; a table of estimates."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from clipguard.cli.common import console, err_console, user_errors
from clipguard.cli.filter import AllowPipeOpt, DeviceOpt

if TYPE_CHECKING:
    from clipguard.calibration.estimates import Estimate
    from clipguard.calibration.run import CalibrationRun

DEFAULT_TARGET_FPR = 0.01


class Criterion(str, Enum):
    bound = "bound"
    point = "point"


def calibrate(
    scores: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="The `clipguard score` folder the labels refer to.")],
    labels: Annotated[Path, typer.Option(exists=True, help="Filled-in sample.csv (or the page's labels.csv), or an attack's poison_manifest.json.")],
    target_fpr: Annotated[Optional[float], typer.Option(help=f"Lowest gamma whose false-positive rate stays <= F (default {DEFAULT_TARGET_FPR} when no target is given).")] = None,
    target_recall: Annotated[Optional[float], typer.Option(help="Highest gamma whose recall stays >= R (from canaries when given, else labels).")] = None,
    max_f1: Annotated[bool, typer.Option(help="Gamma with the largest estimated F1.")] = False,
    criterion: Annotated[Criterion, typer.Option(help="Meet the target with the confidence bound (defensible) or the point estimate.")] = Criterion.bound,
    canaries: Annotated[int, typer.Option(min=0, help="Build N mismatched pairs from your own shards (caption of one pair, image of another) as known positives.")] = 0,
    shards: Annotated[Optional[list[str]], typer.Option(help="Where the scored shards are now, for canaries (default: the URLs in the score manifest). Repeat for several.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for calibration.json, densities.png (and canaries.csv).")] = Path("."),
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Confidence level of every interval.")] = 0.95,
    width: Annotated[float, typer.Option(min=0.001, max=1.0, help="Target interval width for the 'more labels needed' estimate.")] = 0.1,
    design: Annotated[Optional[Path], typer.Option(help="sample_design.json of a label CSV (default: the one a page download carries, else the one next to the CSV).")] = None,
    labels_sample: Annotated[Optional[int], typer.Option(min=1, help="With a poison manifest: label only a sample of N pairs drawn from the scores (else every pair: a census).")] = None,
    stratify: Annotated[bool, typer.Option(help="With --labels-sample: draw it stratified by distance, like `sample --stratify`.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of --labels-sample, the canaries and the interval simulation.")] = 0,
    device: DeviceOpt = "cpu",
    allow_pipe: AllowPipeOpt = False,
    audit: Annotated[Optional[Path], typer.Option("--audit", file_okay=False, help="An audit folder (clipguard audit): its findings' pairs count as flagged, and gamma is chosen for 'distance >= gamma or in a finding' under the same target.")] = None,
    signal: Annotated[Optional[list[str]], typer.Option("--signal", help="With --audit: also give this cross-pair signal (e.g. image_lof) a threshold under the same FPR target; repeat for several.")] = None,
    signal_share: Annotated[float, typer.Option(help="With --signal: the share of the FPR target the signals split between them (gamma gets the rest).")] = 0.5,
) -> None:
    """Choose the threshold gamma from labelled pairs, with precision, recall and FPR for the full data, each with an interval.

    Writes calibration.json (read by `filter --calibration` and `gate --calibration`) and densities.png.

    \b
    Example:
      clipguard calibrate scores/ --labels labelling/sample.csv \\
        --target-fpr 0.01 --out calibration/
    """
    from clipguard.calibration.run import CalibrateRequest, calibrate_scores
    from clipguard.data.shardspec import resolve_shards
    from clipguard.filtering.auditflags import AuditFlags

    with user_errors():
        if target_fpr is None and target_recall is None and not max_f1:
            target_fpr = DEFAULT_TARGET_FPR
        shard_urls = None
        if shards:
            shard_urls = {s.name: s.url for s in resolve_shards(shards, allow_pipe=allow_pipe)}
        request = CalibrateRequest(
            labels=labels, out_dir=out, target_fpr=target_fpr, target_recall=target_recall, max_f1=max_f1,
            criterion=criterion.value, confidence=confidence, width=width, design=design,
            labels_sample=labels_sample, stratify=stratify, seed=seed, canaries=canaries,
            canary_shard_urls=shard_urls, device=device, allow_pipe=allow_pipe,
            audit=None if audit is None else AuditFlags.load(audit),
            signals=tuple(signal or ()), signal_share=signal_share,
        )
        if canaries:
            err_console.print(f"building and scoring {canaries} canaries with the score folder's model", markup=False)
        run = calibrate_scores(scores, request)
        print_report(run)


def _interval(estimate: Estimate | None, percent: bool = True) -> tuple[str, str]:
    if estimate is None:
        return "-", "-"
    fmt = (lambda v: f"{v:.2%}") if percent else (lambda v: f"{v:,.1f}")
    point = "undefined" if estimate.point is None else fmt(estimate.point)
    return point, f"[{fmt(estimate.lower)}, {fmt(estimate.upper)}]"


def _target_text(run: CalibrationRun) -> str:
    c = run.calibration
    if c.method == "target_fpr":
        return f"lowest gamma with FPR <= {c.targets['fpr']:g} ({c.criterion})"
    if c.method == "target_recall":
        return f"highest gamma with recall >= {c.targets['recall']:g} ({c.criterion}, recall from {c.recall_source})"
    return "largest estimated F1"


def print_report(run: CalibrationRun) -> None:
    from clipguard.calibration.run import RECALL_CANARIES, RECALL_LABELS

    c = run.calibration
    e = c.estimates
    level = f"{c.confidence:.0%}"
    table = Table(title=f"clipguard calibrate -> {escape(str(run.calibration_path))}")
    table.add_column("full data at gamma", style="bold")
    table.add_column("estimate", justify="right")
    table.add_column(f"{level} interval", justify="right")
    table.add_column("from")
    table.add_row("gamma", f"{c.gamma:.4f}", "", _target_text(run))
    if run.audit is not None:  # every estimate below is of the union rule
        table.add_row("rule", "d >= gamma or in a finding", "",
                      f"{run.audit['findings']} finding(s), {run.audit['finding_pairs_in_population']:,} pairs "
                      f"({run.audit['finding_pairs_labelled']} labelled, {run.audit['finding_pairs_labelled_clean']} of them clean)")
    for rule in run.signals:  # each measured on the whole population, outside the estimates below
        table.add_row(f"or {rule.signal} > {rule.threshold:.4g}", f"FPR <= {rule.fpr_upper:.3%}", "(population)",
                      f"flags {rule.flagged_pairs:,} pairs ({rule.labelled_clean_flagged} labelled clean, "
                      f"{rule.labelled_poisons_flagged} labelled poisons); poisoned share <= {rule.poisoned_share_upper:.2%}")
    table.add_row("flagged fraction", f"{c.flagged_fraction:.2%}", "(exact)", f"{run.population_size:,} scored pairs")
    table.add_row("poisons", *_interval(e.n_poisons, percent=False), "labels")
    table.add_row("precision", *_interval(e.precision), "labels")
    table.add_row(RECALL_LABELS, *_interval(e.recall), f"{c.n_positive_labels} labelled poison(s)")
    if c.canary_recall is not None:
        table.add_row(RECALL_CANARIES, *_interval(c.canary_recall), f"{c.n_canaries} canaries")
    table.add_row("false-positive rate", *_interval(e.false_positive_rate), "labels")
    table.add_row("F1", "-" if e.f1 is None else f"{e.f1:.3f}", "", "labels (point)")
    table.add_row("ROC AUC", "-" if c.roc_auc is None else f"{c.roc_auc:.3f}", "", "labels, weighted by 1/pi")
    if run.canaries is not None:
        table.add_row("ROC AUC (canaries)", "-" if run.canary_auc is None else f"{run.canary_auc:.3f}", "",
                      "canaries vs labelled clean pairs")
    console.print(table)

    source = run.source
    where = f"{source.kind} {escape(str(source.path))}"
    console.print(
        f"labels: {source.n_labelled:,} labelled pairs ({source.n_poison_labels} poison), {source.mode}, "
        f"{source.design} design, from {where}"
        + (f"; {source.n_unlabelled} sampled pair(s) left unlabelled" if source.n_unlabelled else "")
    )
    if source.mode == "census":
        console.print("every scored pair is labelled (census from the poison manifest): the values are exact.")
    if run.canaries is not None and run.canaries.failed:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(run.canaries.failures_by_reason().items()))
        console.print(f"canaries: {len(run.canaries.failed)} of {run.canaries.requested} not used ({reasons})", markup=False)
    plan = run.plan
    if plan.n_additional > 0:
        rough = "" if plan.reliable else " (rough: fewer than 5 labelled poisons, likely an undercount)"
        console.print(
            f"more labels: about {plan.n_additional:,} more (total {plan.n_total:,}) would narrow the widest "
            f"interval ({plan.metric.replace('_', ' ')}, now {plan.current_width:.3f} wide) to {plan.target_width:g}{rough}"
        )
    else:
        console.print(f"more labels: none needed, every interval is at most {plan.target_width:g} wide")
    for note in c.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"densities: {escape(str(run.densities_path))}")
