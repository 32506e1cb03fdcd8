"""Independent tasks through an executor: ``map_tasks(fn, args, spec)`` runs ``fn(*a)`` for each
``a`` and returns the results in input order, here (local) or as Ray tasks.

For passes that need no model, such as the audit's per-part pass: scoring has its own executors
(`clipguard.scoring.run._executor`), which keep a model per worker. Local runs the tasks in
this process, one after another (a process pool is not built yet). On Ray each task gets one
CPU and is retried on another worker up to `executors.ray.TASK_ATTEMPTS` times if its worker
dies; a task that raises a clipguard error (bad input) fails the map with that error at once,
since it would fail again anywhere.
``fn`` must be importable by name (a module-level function), and its arguments picklable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.executors.spec import ExecutorSpec


def map_tasks(fn: Callable, args: Sequence[tuple], spec: "ExecutorSpec | None" = None,
              on_done: Callable[[int, int], None] | None = None) -> list[Any]:
    """``[fn(*a) for a in args]``, run where ``spec`` says; ``on_done(finished, total)`` after each task."""
    done = on_done or (lambda finished, total: None)
    if spec is not None and spec.kind == "ray":
        return _ray_map(fn, args, spec, done)
    results = []
    for a in args:
        results.append(fn(*a))
        done(len(results), len(args))
    return results


def _ray_map(fn: Callable, args: Sequence[tuple], spec: "ExecutorSpec", done: Callable[[int, int], None]) -> list[Any]:
    from clipguard.executors.ray import TASK_ATTEMPTS, ray_session

    with ray_session(spec) as ray:
        # max_retries covers a worker that dies; retry_exceptions stays off, so an error raised by
        # the task (a bad part) comes back once instead of three times.
        remote = ray.remote(num_cpus=1, max_retries=TASK_ATTEMPTS)(fn)
        pending = {remote.remote(*a): i for i, a in enumerate(args)}
        results: list[Any] = [None] * len(args)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready)
            try:
                results[i] = ray.get(ready)
            except Exception as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ClipguardError):
                    raise cause from None
                raise ClipguardError(f"task {i} of {len(args)} ({getattr(fn, '__name__', fn)}) failed on Ray: {exc}") from None
            done(len(args) - len(pending), len(args))
        return results
