"""Error policies for the reading stages (webdataset's ``handler=``, open_clip's ``log_and_continue``).

A stage that cannot read a shard in full first records what happened in the shard's
`ShardReport` (that record is never optional), then asks its handler what the pipeline does next:
the handler returns True to go on with the next shard, False to stop, or raises. The default,
`reraise`, makes a failure end the run; a caller that reports failures per shard (scoring,
training, filter) chooses `record_and_continue` or `CountFailures` explicitly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.data.tarstream import ShardReport


class ShardReadError(ClipguardError):
    """A shard could not be read in full; ``report`` says how far it got and why."""

    def __init__(self, report: ShardReport):
        super().__init__(f"{report.url}: {report.read_error}")
        self.report = report


Handler = Callable[[ShardReadError], bool]


def reraise(error: ShardReadError) -> bool:
    raise error


def record_and_continue(error: ShardReadError) -> bool:
    """Go on: the shard's report already holds the failure for whoever reads it."""
    return True


@dataclass
class CountFailures:
    """Go on, counting failures by reason (``shard_error: <why>``) into ``counts``."""

    counts: Counter = field(default_factory=Counter)

    def __call__(self, error: ShardReadError) -> bool:
        self.counts[f"shard_error: {error.report.read_error}"] += 1
        return True
