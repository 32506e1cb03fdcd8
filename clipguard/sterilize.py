"""The post-training defence (Yang et al. 2023, §5, Figure 9, Table 8): fine-tune an already
poisoned model on clean data until the poison is gone, without giving up utility.

It is the ordinary contrastive fine-tune (``clipguard.training``) with the paper's best setting
(lr 1e-4, one epoch), plus a watch: with goals and a test set it evaluates every ``eval_every``
steps, records the curve, stops once every goal's Hit@10 is down to its baseline (and utility is
within the budget, when one is set), and refuses to save a model whose utility dropped more than
the budget.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipguard.attacks.goals import Goal
from clipguard.evaluation import EvaluationReport, TargetImage, TestSet, evaluate, load_test_set
from clipguard.labels import make_labeler
from clipguard.model.checkpoint import save_checkpoint
from clipguard.model.loading import LoadedModel, ModelSpec, load_model
from clipguard.training import FinetuneConfig, FinetuneResult, TrainProgress, finetune


@dataclass(frozen=True)
class SterilizeConfig:
    """Defaults: Table 8's best learning rate (1e-4) for one epoch over the clean set."""

    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    min_lr: float = 1e-6
    weight_decay: float = 0.2
    warmup_steps: int = 10
    seed: int = 0
    eval_every: int = 10
    stop_at_baseline: bool = True
    max_utility_drop: float | None = None
    precision: str = "fp32"

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(
            lr=self.lr, epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
            min_lr=min(self.min_lr, self.lr), weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps, seed=self.seed, precision=self.precision,
        )


@dataclass(frozen=True)
class Watch:
    """What to measure while sterilizing. ``baseline`` is the clean model whose goal Hit@10 is
    the level to reach; without it, the random-text baseline of the model being repaired."""

    goals: Sequence[Goal]
    test: TestSet
    target_image: TargetImage | None = None
    baseline: LoadedModel | None = None


@dataclass
class CurvePoint:
    step: int
    samples_seen: int
    hits_at_10: dict[str, float]  # goal -> Hit@10
    min_rank: dict[str, float]
    baseline_hits_at_10: dict[str, float]
    utility_tr_10: float
    utility_ir_10: float

    @property
    def utility(self) -> float:
        return (self.utility_tr_10 + self.utility_ir_10) / 2


@dataclass
class SterilizeResult:
    saved: bool
    checkpoint: Path | None
    refused_reason: str | None
    stopped_early: bool
    steps: int
    samples_seen: int
    wall_seconds: float
    curve: list[CurvePoint] = field(default_factory=list)
    before: EvaluationReport | None = None
    after: EvaluationReport | None = None
    utility_drop: float | None = None
    bad_samples: dict[str, int] = field(default_factory=dict)

    @property
    def baseline_name(self) -> str:
        """What the curve's baseline level is: a clean model's Hit@10 when Watch had one."""
        if self.before and self.before.goals and self.before.goals[0].baseline is not None:
            return "clean model"
        return "random-text baseline"

    def to_dict(self) -> dict[str, Any]:
        return {
            "saved": self.saved,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "refused_reason": self.refused_reason,
            "stopped_early": self.stopped_early,
            "steps": self.steps,
            "samples_seen": self.samples_seen,
            "wall_seconds": self.wall_seconds,
            "utility_drop": self.utility_drop,
            "bad_samples": self.bad_samples,
            "curve": [{**asdict(p), "utility": p.utility} for p in self.curve],
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
        }


ProgressCallback = Callable[[TrainProgress, CurvePoint | None], None]


def sterilize(
    model: LoadedModel | ModelSpec | str,
    clean_shards: list[str],
    out_path: Path | str,
    config: SterilizeConfig = SterilizeConfig(),
    watch: Watch | None = None,
    progress: ProgressCallback | None = None,
) -> SterilizeResult:
    """Fine-tune ``model`` on ``clean_shards``; write ``out_path`` unless the utility budget is
    exceeded. A LoadedModel is repaired in place."""
    started = time.perf_counter()
    loaded = _as_loaded(model)
    start_sha = loaded.info.weights_sha256
    curve: list[CurvePoint] = []
    before = _evaluate(loaded, watch) if watch else None
    if before is not None:
        curve.append(_point(0, 0, before))
    target = _baseline_levels(before) if before is not None else {}
    stop = {"now": False}

    def on_step(event: TrainProgress) -> None:
        point = None
        if watch is not None and event.step % max(config.eval_every, 1) == 0:
            point = _point(event.step, event.samples_seen, _evaluate(loaded, watch))
            curve.append(point)
            # Stopping where the model would then be refused for its utility would end the repair
            # with nothing saved: train on until both hold.
            if config.stop_at_baseline and _at_baseline(point, target) and _within_budget(before, point, config):
                stop["now"] = True
        if progress:
            progress(event, point)

    scratch = Path(tempfile.mkdtemp(prefix="clipguard-sterilize-"))
    try:
        trained = finetune(
            loaded, clean_shards, config.finetune_config(), scratch / "model.safetensors",
            progress_callback=on_step, should_stop=lambda: stop["now"],
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    after = _evaluate(loaded, watch) if watch else None
    if after is not None and (not curve or curve[-1].step != trained.steps):
        curve.append(_point(trained.steps, trained.samples_seen, after))

    drop = _utility_drop(before, after)
    refused = None
    if config.max_utility_drop is not None and drop is not None and drop > config.max_utility_drop:
        refused = (
            f"utility (mean of TR/IR Hit@10) dropped by {drop:.3f}, more than the budget "
            f"{config.max_utility_drop:.3f}; the model was not saved. Try a lower --lr or fewer steps."
        )
    checkpoint = None
    if refused is None:
        checkpoint = save_checkpoint(
            loaded.model, Path(out_path), loaded.info.architecture,
            _provenance(config, clean_shards, trained, start_sha, loaded, curve, before, after),
        )
    return SterilizeResult(
        saved=refused is None,
        checkpoint=checkpoint,
        refused_reason=refused,
        stopped_early=not trained.complete,
        steps=trained.steps,
        samples_seen=trained.samples_seen,
        wall_seconds=time.perf_counter() - started,
        curve=curve,
        before=before,
        after=after,
        utility_drop=drop,
        bad_samples=trained.bad_samples,
    )


@dataclass(frozen=True)
class SterilizeJob:
    """A watched sterilize that another process can run (``side_by_side_pool``): specs and shard
    paths instead of loaded models and test sets, which the process loads itself."""

    model: ModelSpec
    clean_shards: list[str]
    out_path: Path
    config: SterilizeConfig
    goals: tuple[Goal, ...]
    watch_shards: list[str]
    baseline: ModelSpec | None = None
    progress: Any = None  # a queue for (name, TrainProgress) after every step, as FinetuneJob's
    name: str = "sterilize"


def run_sterilize_job(job: SterilizeJob) -> SterilizeResult:
    watch = Watch(
        goals=job.goals, test=load_test_set(job.watch_shards, make_labeler()),
        baseline=load_model(job.baseline) if job.baseline is not None else None,
    )
    send = None if job.progress is None else (lambda event, point: job.progress.put((job.name, event)))
    return sterilize(job.model, job.clean_shards, job.out_path, job.config, watch, progress=send)


def _as_loaded(model: LoadedModel | ModelSpec | str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model if isinstance(model, ModelSpec) else ModelSpec(name=model, pretrained=None))


def _evaluate(loaded: LoadedModel, watch: Watch) -> EvaluationReport:
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        return evaluate(loaded, watch.test, list(watch.goals), target_image=watch.target_image, baseline=watch.baseline)
    finally:
        loaded.model.train(was_training)


def _point(step: int, samples: int, report: EvaluationReport) -> CurvePoint:
    return CurvePoint(
        step=step,
        samples_seen=samples,
        hits_at_10={g.goal: g.model.hits[10] for g in report.goals},
        min_rank={g.goal: g.model.min_rank for g in report.goals},
        baseline_hits_at_10=_baseline_levels(report),
        utility_tr_10=report.utility.text_retrieval[10],
        utility_ir_10=report.utility.image_retrieval[10],
    )


def _baseline_levels(report: EvaluationReport) -> dict[str, float]:
    """The clean model's Hit@10 when a baseline model is given, else the random-text baseline."""
    return {g.goal: (g.baseline or g.random_text).hits[10] for g in report.goals}


def _at_baseline(point: CurvePoint, target: dict[str, float]) -> bool:
    return bool(target) and all(point.hits_at_10[g] <= target[g] + 1e-9 for g in target)


def _within_budget(before: EvaluationReport | None, point: CurvePoint, config: SterilizeConfig) -> bool:
    if config.max_utility_drop is None or before is None:
        return True
    start = (before.utility.text_retrieval[10] + before.utility.image_retrieval[10]) / 2
    return start - point.utility <= config.max_utility_drop


def _utility_drop(before: EvaluationReport | None, after: EvaluationReport | None) -> float | None:
    if before is None or after is None:
        return None
    mean = lambda r: (r.utility.text_retrieval[10] + r.utility.image_retrieval[10]) / 2  # noqa: E731
    return mean(before) - mean(after)


def _provenance(config, shards, trained: FinetuneResult, start_sha, loaded, curve, before, after) -> dict[str, Any]:
    return {
        "made_by": "clipguard sterilize",
        "start_model_sha256": start_sha,
        "clean_data": list(shards),
        "hyperparameters": asdict(config),
        "steps": trained.steps,
        "samples_seen": trained.samples_seen,
        "stopped_early": not trained.complete,
        "bad_samples": trained.bad_samples,
        "curve": [{**asdict(p), "utility": p.utility} for p in curve],
        "goal_hit10_before": {g.goal: g.model.hits[10] for g in before.goals} if before else None,
        "goal_hit10_after": {g.goal: g.model.hits[10] for g in after.goals} if after else None,
    }


def plot_curve(result: SterilizeResult, path: Path, title: str = "Sterilization (Yang et al. Fig. 9)") -> Path:
    """Goal Hit@10 and utility against fine-tuning steps, with the baseline level dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    steps = [p.step for p in result.curve]
    for goal in (result.curve[0].hits_at_10 if result.curve else {}):
        line = axes.plot(steps, [p.hits_at_10[goal] for p in result.curve], marker="o", label=f"{goal} Hit@10")[0]
        axes.plot(steps, [p.baseline_hits_at_10[goal] for p in result.curve], linestyle="--",
                  color=line.get_color(), alpha=0.6, label=f"{goal} Hit@10, {result.baseline_name}")
    axes.plot(steps, [p.utility for p in result.curve], marker="s", color="black", label="utility (TR/IR Hit@10)")
    axes.set_xlabel("fine-tuning steps on clean data")
    axes.set_ylabel("Hit@10")
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center right")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path

