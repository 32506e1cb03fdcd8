"""Independent tasks through an executor: `Tasks(spec)` runs ``fn(*shared, *a)`` for each ``a``,
here (local) or as Ray tasks, and ``map_tasks(fn, args, spec)`` is one such map.

For passes that need no model, such as the audit's per-part pass and its neighbour search:
scoring has its own executors (`clipguard.scoring.run._executor`), which keep a model per
worker. Local runs the tasks in this process, one after another (a process pool is not built
yet). On Ray each task gets one CPU (or the map's ``cpus``, within `Tasks.node_cpus`) and is retried on another worker up to
`executors.ray.TASK_ATTEMPTS` times if its worker dies; a task that raises a clipguard error
(bad input) fails the map with that error at once, since it would fail again anywhere. One
`Tasks` opened as a context holds one Ray session for all its maps (starting Ray takes seconds),
and ``shared`` arguments (a search index) go to Ray's object store once, not once per task.
``fn`` must be importable by name (a module-level function), and its arguments picklable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.executors.spec import ExecutorSpec

TASK_CPUS = 1  # what Ray reserves for each task: a task with threads of its own should use this many


class Tasks:
    """Where a run's independent tasks go. Use as a context manager around all of a run's maps: a
    Ray session started by the first of them lasts until the context ends."""

    def __init__(self, spec: "ExecutorSpec | None" = None):
        self.spec = spec
        self._stack = contextlib.ExitStack()
        self._ray = None

    @property
    def distributed(self) -> bool:
        """True when tasks leave this process (then shipping a task's inputs is worth planning for)."""
        return self.spec is not None and self.spec.kind == "ray"

    def __enter__(self) -> "Tasks":
        return self

    def __exit__(self, *exc) -> None:
        self._ray = None
        self._stack.close()

    def _session(self):
        """Ray, started or joined at the first map that needs it (not before: bad input found
        first is reported without waiting seconds for Ray) and kept until the context ends."""
        if self._ray is None:
            from clipguard.executors.ray import ray_session

            self._ray = self._stack.enter_context(ray_session(self.spec))
        return self._ray

    def slots(self) -> int:
        """How many tasks run at once: 1 here; on Ray, the CPUs of the cluster joined or started
        (this starts the session) over each task's."""
        if not self.distributed:
            return 1
        return max(1, int(self._session().cluster_resources().get("CPU", 1)) // TASK_CPUS)

    @property
    def task_threads(self) -> int | None:
        """The threads a task of one CPU should run its library on: ``TASK_CPUS`` on Ray (a
        worker inherits OMP_NUM_THREADS from where it started), None here (the library's own
        choice, every core, since the tasks run one after another)."""
        return TASK_CPUS if self.distributed else None

    def node_cpus(self, wanted: int) -> int:
        """CPUs a task may ask for and still be placed: ``wanted``, or the most any live node of
        the cluster has where that is fewer (this starts the session); 1 here."""
        if not self.distributed:
            return 1
        largest = max((node["Resources"].get("CPU", 0) for node in self._session().nodes() if node.get("Alive")), default=1)
        return max(1, min(int(wanted), int(largest)))

    def map(self, fn: Callable, args: Sequence[tuple], shared: tuple = (),
            on_done: Callable[[int, int], None] | None = None, cpus: int = TASK_CPUS) -> list[Any]:
        """``[fn(*shared, *a) for a in args]``; ``on_done(finished, total)`` after each task."""
        results: list[Any] = [None] * len(args)
        for i, result in self.imap(fn, args, shared, on_done, cpus):
            results[i] = result
        return results

    def imap(self, fn: Callable, args: Sequence[tuple], shared: tuple = (),
             on_done: Callable[[int, int], None] | None = None, cpus: int = TASK_CPUS) -> Iterator[tuple[int, Any]]:
        """(position in ``args``, result) as each task finishes, so a caller can put each result
        where it belongs without holding them all. On Ray each task reserves ``cpus`` (see
        `node_cpus`); a task that runs threads of its own should run that many."""
        done = on_done or (lambda finished, total: None)
        if not self.distributed:
            for i, a in enumerate(args):
                result = fn(*shared, *a)
                done(i + 1, len(args))
                yield i, result
            return
        yield from _ray_imap(self._session(), fn, args, shared, done, cpus)


def in_order(finished: Iterator[tuple[int, Any]]) -> Iterator[Any]:
    """`Tasks.imap`'s results in the order of their arguments: each as soon as those before it
    are out (on Ray tasks finish in any order; the ones ahead wait here)."""
    waiting: dict[int, Any] = {}
    upcoming = 0
    for i, result in finished:
        waiting[i] = result
        while upcoming in waiting:
            yield waiting.pop(upcoming)
            upcoming += 1


def map_tasks(fn: Callable, args: Sequence[tuple], spec: "ExecutorSpec | None" = None,
              on_done: Callable[[int, int], None] | None = None) -> list[Any]:
    """``[fn(*a) for a in args]``, run where ``spec`` says; ``on_done(finished, total)`` after each task."""
    with Tasks(spec) as tasks:
        return tasks.map(fn, args, on_done=on_done)


def _ray_imap(ray, fn: Callable, args: Sequence[tuple], shared: tuple,
              done: Callable[[int, int], None], cpus: int = TASK_CPUS) -> Iterator[tuple[int, Any]]:
    from clipguard.executors.ray import TASK_ATTEMPTS

    # max_retries covers a worker that dies; retry_exceptions stays off, so an error raised by
    # the task (a bad part) comes back once instead of three times.
    remote = ray.remote(num_cpus=cpus, max_retries=TASK_ATTEMPTS)(fn)
    refs = [ray.put(s) for s in shared]  # top-level ObjectRef arguments reach the task as values
    pending = {remote.remote(*refs, *a): i for i, a in enumerate(args)}
    try:
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready)
            try:
                result = ray.get(ready)
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ClipguardError):
                    raise cause from None
                raise ClipguardError(f"task {i} of {len(args)} ({getattr(fn, '__name__', fn)}) failed on Ray: {exc}") from None
            done(len(args) - len(pending), len(args))
            yield i, result
    finally:
        for ref in pending:  # a failed map leaves nothing running behind it
            ray.cancel(ref)
