"""`clipguard gate`: flags -> threshold, model, policy -> gate_shards; the report to stdout.

Exit codes are the contract with CI: 0 the dataset is within policy, 1 it is not, 2 the gate
could not decide (bad path, calibration file or model, unreadable shard, or a crash). A crash must
not read as 1, so unexpected exceptions also exit 2, with their traceback on stderr.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from clipguard.cli.common import ERROR_EXIT, err_console, score_progress, user_errors
from clipguard.errors import ClipguardError
from clipguard.cli.filter import (
    AllowPipeOpt,
    BatchSizeOpt,
    DeviceOpt,
    GammaOpt,
    JpegDraftOpt,
    MaxCaptionBytesOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    ScoringOptions,
    ShardsArg,
    WorkersOpt,
    load_scoring,
)
from clipguard.cli.choices import DEFAULT_EXAMPLES, DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_ERROR_RATE, DEFAULT_MAX_PIXELS
from clipguard.cli.choices import ExecutorKind
from clipguard.cli.score import ExecutorOpt, GpusPerWorkerOpt, RayAddressOpt

if TYPE_CHECKING:
    from clipguard.filtering.gate import GateReport

FAIL_EXIT = 1
# Checked by the gate itself, not by the option parser: a missing file must still give the JSON
# error object with --format json (the parser's usage error would leave stdout empty).
GateCalibrationOpt = Annotated[
    Optional[Path],
    typer.Option(dir_okay=False, help="calibration.json from `clipguard calibrate` (its gamma, checked against --model)."),
]
GateScoresOpt = Annotated[
    Optional[Path],
    typer.Option(file_okay=False, help="A `clipguard score` folder to reuse (read only); it must come from the same model. Shards it lacks are scored now."),
]


class ReportFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


def _render(report_format: ReportFormat, report: GateReport) -> str:
    from clipguard.filtering.gate_report import render_json, render_markdown, render_text

    renderers = {ReportFormat.text: render_text, ReportFormat.json: render_json, ReportFormat.markdown: render_markdown}
    return renderers[report_format](report)


def gate(
    shards: ShardsArg,
    max_flagged_rate: Annotated[float, typer.Option(help="Fail when more than this fraction of scored pairs is flagged (0.001 = 0.1%).")],
    gamma: GammaOpt = None,
    calibration: GateCalibrationOpt = None,
    max_error_rate: Annotated[
        float,
        typer.Option(help="Fail when more than this fraction of all pairs could not be scored (corrupt image, missing caption, unsafe member); such pairs are never counted as flagged."),
    ] = DEFAULT_MAX_ERROR_RATE,
    allow_truncated: Annotated[bool, typer.Option(help="Gate a truncated shard on the pairs before the cut instead of failing it (pairs after the cut were never vetted).")] = False,
    scores: GateScoresOpt = None,
    save_scores: Annotated[Optional[Path], typer.Option(file_okay=False, help="Keep the scores computed here in this folder (default: a temporary folder).")] = None,
    report_format: Annotated[ReportFormat, typer.Option("--format", help="text for a CI log, json for machines (stdout only), markdown for a PR comment or $GITHUB_STEP_SUMMARY.")] = ReportFormat.text,
    examples: Annotated[int, typer.Option(min=0, help="Show this many flagged pairs with the highest distance.")] = DEFAULT_EXAMPLES,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    batch_size: BatchSizeOpt = 64,
    precision: PrecisionOpt = None,
    workers: WorkersOpt = 1,
    device: DeviceOpt = "cpu",
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    max_caption_bytes: MaxCaptionBytesOpt = DEFAULT_MAX_CAPTION_BYTES,
    jpeg_draft: JpegDraftOpt = True,
    executor: ExecutorOpt = ExecutorKind.local,
    ray_address: RayAddressOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = 0.0,
    allow_pipe: AllowPipeOpt = False,
    audit: Annotated[Optional[Path], typer.Option("--audit", file_okay=False, help="An audit folder (clipguard audit): its findings' pairs count as flagged, and findings are gated by --max-findings.")] = None,
    signal_threshold: Annotated[Optional[list[str]], typer.Option("--signal-threshold", help="With --audit: pairs whose cross-pair signal is above VALUE count as flagged, as NAME=VALUE; repeat for several.")] = None,
    max_findings: Annotated[Optional[int], typer.Option(min=0, help="With --audit: fail when the audit holds more findings in these shards (default 0: any finding fails), counting the kinds without a --max-findings-of of their own.")] = None,
    max_findings_of: Annotated[Optional[list[str]], typer.Option("--max-findings-of", help="With --audit: a limit for one kind of finding, as KIND=COUNT (KIND: class_pair, relabelled_images, image_fan_in, image_cluster, caption_fan_out, stamped_images); repeat for several.")] = None,
    max_rate_by: Annotated[Optional[list[str]], typer.Option("--max-rate-by", help="With --audit: fail when one rule alone flags more of the scored pairs, as RULE=RATE (RULE: distance, finding or a cross-pair signal name); repeat for several.")] = None,
) -> None:
    """CI gate: exit 0 when the flagged rate (cosine distance >= gamma, among scored pairs) and the
    error rate are within policy, 1 when not, 2 when the gate could not decide.

    \b
    Example:
      clipguard gate shards/ --max-flagged-rate 0.001 \\
        --calibration calibration/calibration.json --format markdown
    """
    report = _run_gate(
        shards, (max_flagged_rate, max_error_rate, allow_truncated, _max_findings(audit, max_findings), max_rate_by, max_findings_of), gamma, calibration,
        scores, save_scores, examples,
        ScoringOptions(
            model, pretrained, model_config, batch_size, precision, workers, device, max_pixels, max_caption_bytes,
            jpeg_draft, executor, ray_address, gpus_per_worker,
        ),
        allow_pipe, report_format, (audit, signal_threshold),
    )
    # Plain echo, not rich: the report holds attacker-written captions, which must not be read
    # as console markup, and JSON on stdout must stay exactly JSON.
    typer.echo(_render(report_format, report), nl=False)
    if not report.passed:
        raise typer.Exit(code=FAIL_EXIT)


def _max_findings(audit: Path | None, max_findings: int | None) -> int | None:
    return max_findings if max_findings is not None or audit is None else 0


def _run_gate(
    shards: list[str],
    policy_request: tuple[float, float, bool, int | None, list[str] | None, list[str] | None],
    gamma: float | None,
    calibration: Path | None,
    scores: Path | None,
    save_scores: Path | None,
    examples: int,
    options: ScoringOptions,
    allow_pipe: bool,
    report_format: ReportFormat = ReportFormat.text,
    audit_request: tuple[Path | None, list[str] | None] = (None, None),
) -> GateReport:
    try:
        with user_errors(), _json_errors(report_format):
            # Inside the try: an import that fails is a crash (exit 2), never a verdict (exit 1).
            from clipguard.data.shardspec import resolve_shards
            from clipguard.filtering.auditflags import audit_flags_from_options
            from clipguard.filtering.gate import GateConfig, GatePolicy, gate_shards, parse_findings_of, parse_rate_by
            from clipguard.filtering.threshold import resolve_threshold

            if scores is not None and not scores.is_dir():
                raise ClipguardError(f"--scores {scores} is not a folder; give a `clipguard score` folder")
            threshold = resolve_threshold(gamma, calibration)
            *limits, rate_by, findings_of = policy_request
            policy = GatePolicy(*limits, max_rate_by=parse_rate_by(rate_by), max_findings_of=parse_findings_of(findings_of))
            shard_list = resolve_shards(shards, allow_pipe=allow_pipe)
            loaded, score_config = load_scoring(options, scores, calibration)
            if policy.max_findings is not None and audit_request[0] is None:
                raise ClipguardError("--max-findings needs --audit AUDIT (the folder `clipguard audit` wrote)")
            if policy.max_findings_of and audit_request[0] is None:
                raise ClipguardError("--max-findings-of needs --audit AUDIT (the folder `clipguard audit` wrote)")
            if policy.max_rate_by and audit_request[0] is None:
                raise ClipguardError("--max-rate-by needs --audit AUDIT: its rules are the audit's findings and signals")
            config = GateConfig(policy=policy, reuse_scores=scores, save_scores=save_scores, examples=examples, score=score_config,
                                audit=audit_flags_from_options(*audit_request))
            err_console.print(
                f"gating {len(shard_list)} shard(s) at gamma {threshold.gamma:.4f} ({threshold.source}) "
                f"with {loaded.info.architecture}",
                markup=False,
            )
            with score_progress(len(shard_list)) as on_progress:
                report = gate_shards(shard_list, loaded, threshold, config, progress=on_progress)
            return report
    except typer.Exit:
        raise
    except Exception as exc:
        err_console.print("[bold red]error:[/] the gate crashed; this is a bug in clipguard, not a verdict")
        err_console.print_exception()
        if report_format is ReportFormat.json:
            _echo_json_error(f"the gate crashed ({type(exc).__name__}: {exc}); this is a bug in clipguard, not a verdict")
        raise typer.Exit(code=ERROR_EXIT) from None


@contextlib.contextmanager
def _json_errors(report_format: ReportFormat) -> Iterator[None]:
    """With --format json, a run that cannot decide still prints JSON on stdout, so that a CI step
    that posts or parses stdout gets the reason and the exit code instead of nothing."""
    try:
        yield
    except ClipguardError as exc:
        if report_format is ReportFormat.json:
            _echo_json_error(str(exc))
        raise


def _echo_json_error(message: str) -> None:
    typer.echo(json.dumps({"error": message, "exit_code": ERROR_EXIT}, indent=2))
