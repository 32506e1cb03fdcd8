"""What a fine-tune run is asked to do, what it reports while running, and what it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clipguard.errors import ClipguardError

PRECISIONS = ("fp32", "bf16", "fp16")
# "auto": the plain matmul-softmax attention kernel under bf16/fp16 autocast on CPU, where it is
# faster on CLIP's short sequences (see _Trainer); "default": whatever PyTorch picks.
ATTENTION_KERNELS = ("auto", "default")


class FinetuneError(ClipguardError):
    """A fine-tune that cannot run as asked: bad settings, no usable data, a resume that does not fit."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of a contrastive fine-tune. Defaults are the victim's training in
    Yang et al. 2023, §4.1: AdamW (decoupled weight decay 0.2), lr 1e-5 cosine-decayed to 1e-6,
    batch 128, 10 epochs. Betas and eps are OpenAI CLIP's (and open_clip_train's for ViTs).

    ``max_steps`` stops earlier than ``epochs`` and, when set, is also the length of the cosine
    schedule (so no counting pass over the data is needed). ``workers`` changes which samples meet
    in a batch, so a run is reproducible for a given seed *and* worker count.
    """

    lr: float = 1e-5
    weight_decay: float = 0.2
    min_lr: float = 1e-6
    batch_size: int = 128
    epochs: int = 10
    max_steps: int | None = None
    warmup_steps: int = 10
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip_norm: float | None = None
    freeze_image: bool = False
    freeze_text: bool = False
    seed: int = 0
    shuffle_buffer: int = 1000
    workers: int = 0
    precision: str = "fp32"
    attention: str = "auto"
    # Write a resumable checkpoint every this many steps (0: only when the run ends or stops).
    save_every: int = 0

    def validate(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append("lr must be positive")
        if not 0 <= self.min_lr <= self.lr:
            problems.append("min_lr must be in [0, lr]")
        if self.weight_decay < 0:
            problems.append("weight_decay must be non-negative")
        if self.batch_size < 2:
            problems.append("batch_size must be at least 2 (a contrastive batch needs negatives)")
        if self.epochs < 1:
            problems.append("epochs must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be at least 1")
        if self.warmup_steps < 0:
            problems.append("warmup_steps must be non-negative")
        if self.shuffle_buffer < 0 or self.workers < 0 or self.save_every < 0:
            problems.append("shuffle_buffer, workers and save_every must be non-negative")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.attention not in ATTENTION_KERNELS:
            problems.append(f"attention must be one of {', '.join(ATTENTION_KERNELS)}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            problems.append("grad_clip_norm must be positive")
        if self.freeze_image and self.freeze_text:
            problems.append(
                "freezing both towers leaves only the temperature to train (the paper's M^0 is "
                "simply the starting model); freeze at most one"
            )
        if problems:
            raise FinetuneError("invalid fine-tune settings: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Settings that may differ between a run and its resumption without changing the result.
RESUMABLE_DIFFERENCES = frozenset({"save_every"})


@dataclass(frozen=True)
class TrainProgress:
    """Sent to the progress callback after every optimizer step."""

    step: int  # steps completed, resumed ones included
    total_steps: int  # length of the learning-rate schedule
    epoch: int  # 0-based epoch of this step
    loss: float
    lr: float
    samples_seen: int
    samples_per_second: float  # over the steps run in this call


@dataclass
class BadSampleTally:
    """Samples that could not be trained on, counted once each: during the first pass only
    (later passes meet the same samples again)."""

    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    shard_problems: list[dict[str, str]] = field(default_factory=list)
    partial_batch_dropped: int = 0  # good samples left over after the last full batch of a pass

    MAX_EXAMPLES = 20

    def add(self, shard: str, key: str, error: str) -> None:
        reason = error.split(":", 1)[0]
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append({"shard": shard, "key": key, "error": error})

    def add_shard_problem(self, shard: str, error: str) -> None:
        self.shard_problems.append({"shard": shard, "error": error})

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_reason": dict(sorted(self.by_reason.items())),
            "examples": self.examples,
            "shard_problems": self.shard_problems,
            "partial_batch_dropped": self.partial_batch_dropped,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BadSampleTally:
        return cls(
            by_reason=dict(values.get("by_reason", {})),
            examples=list(values.get("examples", [])),
            shard_problems=list(values.get("shard_problems", [])),
            partial_batch_dropped=int(values.get("partial_batch_dropped", 0)),
        )


@dataclass
class FinetuneResult:
    checkpoint: Path
    resume_state: Path | None  # kept only while the run is incomplete
    complete: bool  # False when stopped (should_stop) before epochs / max_steps were reached
    steps: int
    total_steps: int
    epochs_completed: int
    samples_seen: int
    bad_samples: dict[str, int]
    bad_examples: list[dict[str, str]]
    shard_problems: list[dict[str, str]]
    final_loss: float | None
    losses: list[float]  # one per step, resumed steps included
    wall_seconds: float  # this call only
    samples_per_second: float  # this call only

    @property
    def bad_sample_total(self) -> int:
        return sum(self.bad_samples.values())
