"""The whole story on the built-in synthetic world: the attack works, the filter stops it, the
sterilizing fine-tune repairs it (Yang et al. 2023, Tables 3, 16 and 8).

world (the noisy web world by default: clean pairs that overlap the poisons in distance) ->
Attack II on train -> score the poisoned data with the reference model, keeping embeddings ->
audit them (cross-pair signals and findings) -> label a sample (by distance strata on the clean
world, uniform on the web one; labels read from the poison manifest, as a person would give them) -> calibrate gamma twice, for pair distance alone
and for the combination (distance or an audit finding), under the same false-positive target ->
filter with the combination -> fine-tune the victim on clean, poisoned and kept data, and sterilize
the poisoned victim on the reference split, watching the validation split to decide when to stop
(two jobs at a time) -> evaluate every model on the test split, which no choice was made on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipguard.attacks import AttackConfig, AttackKind, parse_goal, run_attack
from clipguard.audit import AuditConfig, run_audit
from clipguard.calibration.run import CalibrateRequest, calibrate_scores, poison_flags
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.errors import CalibrationError, ClipguardError
from clipguard.evaluation import EvaluationReport, evaluate, load_test_set
from clipguard.filtering.auditflags import AuditFlags
from clipguard.filtering.run import FilterConfig, filter_shards
from clipguard.filtering.threshold import load_calibration
from clipguard.labels import LabelSource, make_labeler
from clipguard.metrics import roc_auc
from clipguard.model.loading import ModelSpec, load_model
from clipguard.reporting import ReportRequest, write_report
from clipguard.scoring.run import ScoreConfig, score_shards
from clipguard.sterilize import SterilizeConfig, SterilizeJob, SterilizeResult, plot_curve, run_sterilize_job
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import FinetuneConfig, FinetuneJob, FinetuneResult, run_finetune_job, side_by_side_pool

VICTIM = "clipguard-victim"
REFERENCE = "clipguard-reference"
# Sterilizing stops by watching this split; the table is read off `test`. Stopping on the split
# one reports would report the first time a noisy metric touched the target, not the model.
WATCH_SPLIT = "validation"


class DemoError(ClipguardError):
    """A demo stage that produced nothing the next one can use."""


# Two epochs on noisy captions need more poisons than four: at 5% the quick poisoned Hit@10 was
# 0.44, at 10% 0.72 (docs/results.md).
WEB_RATE_QUICK = 0.10


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and training settings.

    The victim's fine-tune is the paper's recipe (AdamW, weight decay 0.2, cosine decay to a
    tenth) at a 100x higher learning rate (1e-3 instead of 1e-5), batch 32 instead of 128 and 8
    epochs instead of 10: the paper's lr is for a pretrained ViT-B/32 over ~12k steps; this tiny
    model gets 1,000, and at lr 1e-4 or batch 64 the 20 poisons did not move it (measured,
    docs/results.md). Sterilizing fine-tunes on a clean set (the reference split) at the victim's
    lr, 1e-3, for up to two epochs, not the paper's one epoch at 1e-4, and stops once the goal's
    Hit@10 on the validation split is at the clean model's there: on an earlier poisoned victim
    (Hit@10 0.60, clean 0.04) two epochs at 3e-4 left 0.28 and one at 1e-3 left 0.20; at 1e-3 the
    curve reaches the clean level near step 250 and wanders from 0.00 to 0.20 after it, so
    stopping there is what keeps the repair (measured, docs/results.md). The stop reads
    validation, never test, so the table's sterilized row is not the one point that happened to
    touch the target. It also waits for utility within 0.01 of the poisoned model's: without
    that, a run stopped at step 250 with validation utility 0.024 below its start, mid-dip, and
    the repaired model kept the loss (test TR Hit@10 0.052 below the clean model's).

    ``quick`` (about 2.5 minutes on 2 cores) shows the same story on a budget: two epochs of the
    train split per fine-tune instead of eight, so it poisons 5% of the pairs (211) instead of
    0.5% (20), fine-tunes at lr 5e-4 (1e-3 for two epochs cost the clean model 0.05 of utility and
    lifted its Hit@10 to 0.20) and sterilizes for 150 steps at 3e-4 with the schedule ending
    there. Measured with the demo's seeds 0 and 1: poisoned Hit@10 0.68 and 0.88 against 0.04
    clean; 2% (82 poisons) at lr 1e-3 reached only 0.44, as did 5% at lr 3e-4
    (docs/results.md). It trains the 150 steps out rather than stopping: early on, utility is
    still well below the clean model's (validation: 0.78 at step 50, 0.87 at step 150).
    """

    goal: str = "sheep:aeroplane"
    rate: float = 0.005
    seed: int = 0
    # The fields' defaults are the clean-caption world's recipe (`demo --noise none`, the paper's
    # table); `web` is the demo's default world and recipe (`for_world`).
    world: WorldSpec = field(default_factory=WorldSpec)
    victim_lr: float = 1e-3
    victim_min_lr: float = 1e-4
    victim_epochs: int = 8
    batch_size: int = 32
    labels: int = 500  # pairs a person labels
    # Drawn stratified by distance where the poisons are the far tail (the clean world), else
    # uniformly (`web`).
    stratify_labels: bool = True
    # The attacker finds "texts of sheep" and "images of aeroplane" by keyword (`web`), else by the
    # images' class, which on the clean world picks the same texts.
    attacker_by_keyword: bool = False
    target_fpr: float = 0.01
    sterilize_lr: float = 1e-3
    sterilize_epochs: int = 2
    sterilize_steps: int | None = None  # a cap on the steps of those epochs
    sterilize_eval_every: int = 50
    # Stop once the goal's Hit@10 is back at the clean model's (`clipguard sterilize`'s default)
    # and utility is within this of where sterilizing started, both on validation: the first
    # touch of the clean level can come while utility is dipping (see the class docstring).
    sterilize_early_stop: bool = True
    sterilize_max_utility_drop: float | None = 0.01
    precision: str = "bf16"
    # Processes for the fine-tunes and sterilizing (None: one per core, at most three; 1: all of
    # them in this process, one after the other).
    workers: int | None = None

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(rate=0.05, victim_lr=5e-4, victim_min_lr=5e-5, victim_epochs=2,
                   sterilize_lr=3e-4, sterilize_steps=150, sterilize_eval_every=50, sterilize_early_stop=False,
                   sterilize_max_utility_drop=None)

    @classmethod
    def web(cls, quick: bool = False) -> "DemoConfig":
        """The web-like world (`WorldSpec(noise="web")`), where pair distance alone misses the
        poisons and the audit finds them. Its recipe, measured (docs/results.md): the victim
        fine-tuned on noisy captions at the clean world's lr 1e-3 for 8 epochs falls to the
        random-text level (clean TR@10 0.54, the goal's Hit@10 0.32 against a random text's 0.36),
        so it trains at 5e-4 for 4 epochs (clean TR@10 0.72); there 20 poisons (0.5%) move the
        goal's MinRank from 75 to 44 but not its Hit@10 (0.04), while 5% (211 poisons) take it to
        0.92. ``quick`` trains 2 epochs at 10% and sterilizes as `quick` does.

        The attacker takes captions by keyword, as Yang et al. labelled Visual Genome: there a
        sheep photo's caption may be boilerplate or name another class, and one taken by the
        image's class does not say "sheep". The 500 labels are drawn uniformly: the far tail here
        is loose clean captions, and a stratified sample spent 82 of its labels on poisons, leaving
        ~420 clean ones whose FPR bound could not certify 1% (docs/results.md)."""
        base = cls.quick() if quick else cls(victim_lr=5e-4, victim_min_lr=5e-5, victim_epochs=4)
        return dataclasses.replace(base, rate=WEB_RATE_QUICK if quick else 0.05, world=WorldSpec(noise="web"),
                                   stratify_labels=False, attacker_by_keyword=True)

    @classmethod
    def for_world(cls, noise: str = "web", quick: bool = False) -> "DemoConfig":
        """`clipguard demo [--quick] [--noise web|none]`'s configuration."""
        if noise == "none":
            return cls.quick() if quick else cls()
        return cls.web(quick)

    def sterilize_config(self) -> SterilizeConfig:
        return SterilizeConfig(
            lr=self.sterilize_lr, epochs=self.sterilize_epochs, max_steps=self.sterilize_steps,
            batch_size=self.batch_size, eval_every=self.sterilize_eval_every,
            stop_at_baseline=self.sterilize_early_stop, max_utility_drop=self.sterilize_max_utility_drop,
            seed=self.seed, precision=self.precision,
        )

    def victim_config(self) -> FinetuneConfig:
        """The victim's fine-tune: the same for the clean, poisoned and filtered runs."""
        return FinetuneConfig(
            lr=self.victim_lr, min_lr=self.victim_min_lr, epochs=self.victim_epochs,
            batch_size=self.batch_size, seed=self.seed, precision=self.precision, warmup_steps=10,
        )


@dataclass
class ModelRow:
    name: str
    hits: dict[int, float]
    min_rank: float
    random_hits_10: float
    utility_tr_10: float
    utility_ir_10: float


@dataclass
class DemoResult:
    out_dir: Path
    rows: list[ModelRow]
    phi: float
    poisons: int
    gamma: float
    calibration: dict[str, Any]
    filter_counts: dict[str, int]
    poisons_quarantined: int
    stage_seconds: dict[str, float]
    report_path: Path
    figures: list[Path]
    html_report: Path | None = None  # the audit page of the poisoned data (`clipguard report`)
    # Pair distance alone against the combination, measured on every pair (the truth is known)
    detection: list[dict[str, Any]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # the audit's findings, most significant first

    def row(self, name: str) -> ModelRow:
        return next(r for r in self.rows if r.name == name)


StageCallback = Callable[[str], None]


@dataclass(frozen=True)
class StageProgress:
    """How far one job of a stage has got (the attack, scoring, a fine-tune, ...), in one shape
    whatever the job, for a caller to show; the jobs' own events stay inside the demo."""

    job: str  # "score", "filter", "fine-tune poisoned", "sterilize", ...
    completed: int
    total: int | None
    steps: str  # what completed counts: shards, steps
    done: int | None = None  # pairs (or samples) so far
    rate: float | None = None  # pairs per second, where the job measures it itself
    note: str = ""


ProgressCallback = Callable[[StageProgress], None]


def run_demo(
    out_dir: Path, config: DemoConfig = DemoConfig(), on_stage: StageCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> DemoResult:
    out_dir = Path(out_dir)
    report = on_progress or (lambda progress: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    goal = parse_goal(config.goal)

    def stage(name: str):
        if on_stage:
            on_stage(name)
        return _Timer(timings, name)

    with stage("synthesize the world"):
        world = generate_world(out_dir / "world", config.world, overwrite=True)
    with stage("Attack II: poison the train split"):
        attack = run_attack(
            world.shards("train"), out_dir / "poisoned",
            AttackConfig(kind=AttackKind.single_label, goals=(goal,), rate=config.rate, seed=config.seed, overwrite=True,
                         **({"label_source": LabelSource.keywords, "keywords": world.keywords_json}
                            if config.attacker_by_keyword else {})),
            progress=lambda e: report(StageProgress(f"attack: {e.stage}", e.shards_done, e.shards_total, "shards")),
        )
    reference = load_model(ModelSpec(REFERENCE))
    with stage("score the poisoned data with the reference model"):
        score_shards(resolve_shards(str(out_dir / "poisoned")), reference, out_dir / "scores",
                     ScoreConfig(batch_size=128, save_embeddings=True),
                     progress=lambda e: report(StageProgress("score", e.shards_done, e.shards_total, "shards", e.pairs_done)))
    with stage("audit the scored data: fan-in, fan-out, class cells, clusters, density"):
        audit = run_audit(AuditConfig(scores=out_dir / "scores", out=out_dir / "audit", keywords=world.keywords_json))
        flags = AuditFlags.load(out_dir / "audit")
    design = "stratified" if config.stratify_labels else "uniform"
    with stage(f"label a {design} sample and calibrate gamma (distance alone, and with the audit)"):
        def calibrate(folder: str, with_audit: AuditFlags | None):
            return calibrate_scores(out_dir / "scores", CalibrateRequest(
                labels=attack.manifest_path, out_dir=out_dir / folder, target_fpr=config.target_fpr,
                labels_sample=config.labels, stratify=config.stratify_labels, seed=config.seed, audit=with_audit,
            ))

        alone = calibrate("calibration-distance-alone", None)
        try:
            calibration = calibrate("calibration", flags)
        except CalibrationError as exc:
            # The findings alone flag more labelled clean pairs than the target allows: say so,
            # and filter by distance alone rather than over the budget.
            combination_refused = str(exc)
            calibration, flags = alone, None
        else:
            combination_refused = None
    with stage("filter the poisoned data"):  # by distance or an audit finding
        threshold = load_calibration(calibration.calibration_path)
        filtered = filter_shards(
            resolve_shards(str(out_dir / "poisoned")), reference, threshold,
            FilterConfig(clean_dir=out_dir / "filtered", quarantine_dir=out_dir / "quarantine", reuse_scores=out_dir / "scores",
                         audit=flags),
            progress=lambda e: report(StageProgress(e.phase, e.shards_done, e.shards_total, "shards", e.pairs_done)),
        )
    with stage("write the audit report of the poisoned data"):
        audit_page = write_report(ReportRequest(
            scores=out_dir / "scores", out=out_dir / "report.html", calibration=calibration.calibration_path,
            filter_dir=out_dir / "filtered", keywords=world.keywords_json,
            title=f"clipguard demo: audit of the train split after Attack II {config.goal}",
        )).path
    test = load_test_set(world.shards("test"), make_labeler())
    with stage("fine-tune the victim on clean, poisoned and filtered data; sterilize the poisoned one"):
        victims = _train_and_sterilize(config, world, out_dir, goal, on_progress)
    repaired = victims.sterilized
    if not repaired.saved:
        raise DemoError(f"sterilizing the poisoned victim saved nothing: {repaired.refused_reason}")
    with stage("evaluate every model on the test split"):
        reports = {
            "pretrained victim": evaluate(load_model(ModelSpec(VICTIM)), test, [goal]),
            "clean fine-tune": evaluate(load_model(ModelSpec(str(victims.clean.checkpoint))), test, [goal]),
            "poisoned": evaluate(load_model(ModelSpec(str(victims.poisoned.checkpoint))), test, [goal]),
            "filtered": evaluate(load_model(ModelSpec(str(victims.filtered.checkpoint))), test, [goal]),
            "sterilized": evaluate(load_model(ModelSpec(str(repaired.checkpoint))), test, [goal]),
        }
    poison_keys = {p.key for p in attack.manifest.poisons}
    quarantined = _quarantined_keys(out_dir / "quarantine")
    rows = [_row(name, report) for name, report in reports.items()]
    curve_title = f"Sterilization (Yang et al. Fig. 9) on the {WATCH_SPLIT} split"
    figures = [calibration.densities_path, plot_curve(repaired, out_dir / "sterilization_curve.png", curve_title)]
    result = DemoResult(
        out_dir=out_dir,
        rows=rows,
        phi=attack.manifest.rate,
        poisons=len(poison_keys),
        gamma=calibration.calibration.gamma,
        calibration=_calibration_summary(calibration),
        filter_counts={"read": filtered.read, "kept": filtered.kept, "flagged": filtered.flagged, "errored": filtered.errored},
        poisons_quarantined=len(poison_keys & quarantined),
        stage_seconds=timings,
        report_path=out_dir / "report.json",
        figures=figures,
        html_report=audit_page,
        detection=_detection(out_dir / "scores", attack, flags, alone, calibration, combination_refused),
        findings=[f.description for f in audit.findings],
    )
    result.report_path.write_text(json.dumps(_report(result, config, reports, repaired), indent=2, default=str) + "\n")
    return result


class _Timer:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.started, 1)


@dataclass
class _Victims:
    clean: FinetuneResult
    poisoned: FinetuneResult
    filtered: FinetuneResult
    sterilized: SterilizeResult


def _train_and_sterilize(config: DemoConfig, world, out_dir: Path, goal, on_progress: ProgressCallback | None) -> _Victims:
    """The three victim fine-tunes, and sterilizing the poisoned victim on the reference split
    (watching the validation split, aiming at the clean victim's level).

    Two at a time on 2 cores, one thread each: poisoned and clean first, then filtered beside
    sterilizing, which needs both of the first two. In the quick demo on a 2-core EPYC all four
    took 124 s this way, against 101 s + 41 s for the three fine-tunes as three processes and
    then sterilizing alone (benchmarks/README.md).
    """
    models = out_dir / "models"
    victim = config.victim_config()
    workers = config.workers or min(os.cpu_count() or 1, 3)  # three fine-tunes
    with _training_progress(on_progress, across_processes=workers > 1) as events:
        return _run_victims(config, world, out_dir, goal, models, victim, workers, events)


@contextlib.contextmanager
def _training_progress(on_progress: ProgressCallback | None, across_processes: bool):
    """A queue the fine-tune jobs put (name, TrainProgress) on, and a thread that hands each
    event to ``on_progress``; None when nobody listens. The pool's processes reach it through
    a manager process."""
    if on_progress is None:
        yield None
        return
    manager = multiprocessing.get_context("spawn").Manager() if across_processes else None
    events = manager.Queue() if manager is not None else queue.Queue()

    def forward() -> None:
        while (item := events.get()) is not None:
            name, event = item
            on_progress(StageProgress(name, event.step, event.total_steps, "steps", event.samples_seen,
                                      event.samples_per_second, f"loss {event.loss:.3f}"))

    thread = threading.Thread(target=forward, name="clipguard-demo-progress", daemon=True)
    thread.start()
    try:
        yield events
    finally:
        events.put(None)
        thread.join()
        if manager is not None:
            manager.shutdown()


def _run_victims(config: DemoConfig, world, out_dir: Path, goal, models: Path, victim: FinetuneConfig, workers: int,
                 progress) -> _Victims:
    finetunes = {
        name: FinetuneJob(ModelSpec(VICTIM), shards, victim, models / f"{name}.safetensors",
                          progress=progress, name=f"fine-tune {name}")
        for name, shards in (("poisoned", str(out_dir / "poisoned")), ("clean", world.shards("train")),
                             ("filtered", str(out_dir / "filtered")))
    }

    def sterilize_job(poisoned: FinetuneResult, clean: FinetuneResult) -> SterilizeJob:
        return SterilizeJob(
            model=ModelSpec(str(poisoned.checkpoint)), clean_shards=[world.shards("reference")],
            out_path=models / "sterilized.safetensors", config=config.sterilize_config(), goals=(goal,),
            watch_shards=[world.shards(WATCH_SPLIT)], baseline=ModelSpec(str(clean.checkpoint)),
            progress=progress, name="sterilize",
        )

    if workers <= 1:
        done = {name: run_finetune_job(job) for name, job in finetunes.items()}
        repaired = run_sterilize_job(sterilize_job(done["poisoned"], done["clean"]))
        return _Victims(**done, sterilized=repaired)
    with side_by_side_pool(workers) as pool:
        futures = {name: pool.submit(run_finetune_job, job) for name, job in finetunes.items()}
        poisoned, clean = futures["poisoned"].result(), futures["clean"].result()
        repaired = pool.submit(run_sterilize_job, sterilize_job(poisoned, clean)).result()
        return _Victims(clean=clean, poisoned=poisoned, filtered=futures["filtered"].result(), sterilized=repaired)


def _row(name: str, report: EvaluationReport) -> ModelRow:
    goal = report.goals[0]
    return ModelRow(
        name=name, hits={k: goal.model.hits[k] for k in (1, 5, 10)}, min_rank=goal.model.min_rank,
        random_hits_10=goal.random_text.hits[10],
        utility_tr_10=report.utility.text_retrieval[10], utility_ir_10=report.utility.image_retrieval[10],
    )


def _quarantined_keys(quarantine_dir: Path) -> set[str]:
    keys = set()
    for shard in resolve_shards(str(quarantine_dir)) if any(quarantine_dir.glob("*.tar")) else []:
        for sample in iter_samples(shard, ShardReport(shard=shard.name, url=shard.url)):
            keys.add(sample.key)
    return keys


def _detection(scores: Path, attack, flags: AuditFlags | None, alone, combined,
               refused: str | None) -> list[dict[str, Any]]:
    """Each rule's recall and false-positive rate over every scored pair (the manifest is the
    truth), beside the calibration's estimate from the labelled sample."""
    from clipguard.calibration.combined import finding_members
    from clipguard.calibration.scored import load_population

    population = load_population(scores)
    truth, _ = poison_flags(population, [(p.shard, p.key) for p in attack.manifest.poisons], attack.manifest_path)
    rows = []
    if refused is not None:
        rows.append({"rule": "distance + audit findings", "refused": refused})
    nothing = np.zeros(population.size, dtype=bool)
    members = nothing if flags is None else finding_members(population.shards, population.keys, flags.finding_of)
    rules = [("pair distance alone", alone, nothing)] + ([] if refused else [("distance + audit findings", combined, members)])
    for name, run, extra in rules:
        flagged = (population.distances >= run.calibration.gamma) | extra
        rows.append({
            "rule": name, "gamma": run.calibration.gamma,
            "recall": float(flagged[truth].mean()) if truth.any() else None,
            "false_positive_rate": float(flagged[~truth].mean()),
            "estimated_false_positive_rate": _calibration_summary(run)["false_positive_rate"],
            "roc_auc_of_distance": float(roc_auc(population.distances, truth)) if truth.any() and (~truth).any() else None,
        })
    return rows


def _calibration_summary(run) -> dict[str, Any]:
    estimates = run.calibration.estimates
    def interval(e):  # noqa: E306
        return {"point": e.point, "lower": e.lower, "upper": e.upper}
    return {
        "gamma": run.calibration.gamma,
        "labelled": run.source.n_labelled,
        "poison_labels": run.source.n_poison_labels,
        "recall": interval(estimates.recall),
        "false_positive_rate": interval(estimates.false_positive_rate),
        "precision": interval(estimates.precision),
        "flagged_fraction": estimates.flagged_fraction.point,
        "roc_auc": run.calibration.roc_auc,
    }


def _report(result: DemoResult, config: DemoConfig, reports: dict[str, EvaluationReport], repaired) -> dict[str, Any]:
    return {
        "config": {**asdict(config), "world": asdict(config.world)},
        "goal": config.goal,
        "phi": result.phi,
        "poisons": result.poisons,
        "gamma": result.gamma,
        "calibration": result.calibration,
        "filter": result.filter_counts,
        "poisons_quarantined": result.poisons_quarantined,
        "table": [asdict(r) for r in result.rows],
        "evaluations": {name: r.to_dict() for name, r in reports.items()},
        "sterilization": {**repaired.to_dict(), "watched_split": WATCH_SPLIT},
        "stage_seconds": result.stage_seconds,
        "figures": [str(p) for p in result.figures],
        "html_report": str(result.html_report),
        "detection": result.detection,
        "findings": result.findings,
    }
