"""Where work runs, as plain data: the scoring executors and the audit's task map both take an
`ExecutorSpec`. Kept apart from `scoring.run` so that choosing an executor (the audit does)
never imports torch."""

from __future__ import annotations

from dataclasses import dataclass

from clipguard.errors import ClipguardError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSpec:
    """Where shards are scored. ``workers`` is the number of Ray actors; the local executor's
    decode workers are `ScoreConfig.workers`."""

    kind: str = "local"
    address: str | None = None  # a Ray cluster ("auto", "ray://host:10001"); None starts a local one
    workers: int = 2
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ClipguardError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise ClipguardError("the executor needs at least one worker")
