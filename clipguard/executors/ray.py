"""Score shards on a Ray cluster: one actor per worker builds its model once, a shard per task.

The steps do not know where they run: each task is `clipguard.scoring.run.score_shard`, the
same function the local executor's path ends in, so a shard's files are the same bytes either
way (at the same inference thread count). Each actor writes its shard's Parquet and stats files
straight into the output folder, which must therefore be one every worker can reach: a shared
file system, or an object-store URL (each actor uploads what it wrote).
A task whose actor dies is run again on the restarted actor, and a task that raises is handed to
the next free actor, up to ``TASK_ATTEMPTS`` times each; a shard still failing after that fails
the run with its reason.

Ray is an optional extra (``pip install 'clipguard[ray]'``). Without ``address`` a local Ray
instance is started with one CPU per worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from clipguard.data.shardspec import Shard
from clipguard.errors import ClipguardError

if TYPE_CHECKING:
    from clipguard.data.storage import OutputFolder
    from clipguard.model.loading import LoadedModel
    from clipguard.scoring.run import ExecutorSpec, ScoreConfig, ShardResult

TASK_ATTEMPTS = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise ClipguardError(
            "the ray executor needs Ray: pip install 'clipguard[ray]' (or use --executor local)"
        ) from None
    return ray


@contextlib.contextmanager
def ray_session(spec: "ExecutorSpec") -> Iterator:
    """Ray, joined at ``spec.address`` or started locally with ``spec.workers`` CPUs, and shut down
    afterwards only if it was started here (a caller's own ``ray.init`` is left running)."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=spec.address, num_cpus=None if spec.address else spec.workers,
                 include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


class RayExecutor:
    def __init__(self, spec: "ExecutorSpec"):
        self.spec = spec

    def run(
        self, pending: list[Shard], loaded: "LoadedModel", out_dir: "OutputFolder", config: "ScoreConfig",
        on_rows: Callable[[str, int], None],
    ) -> Iterator["ShardResult"]:
        if not pending:
            return
        model_spec = _rebuildable_spec(loaded)
        with ray_session(self.spec) as ray:
            yield from self._run(ray, pending, model_spec, out_dir.location, config, on_rows)

    def _run(self, ray, pending, model_spec, out_dir, config, on_rows):
        threads = config.threads or 1
        # An actor that dies is restarted, and Ray itself runs its unfinished task again there;
        # a task that raises comes back to the loop below, which hands it to the next free actor.
        actor_class = ray.remote(
            num_cpus=threads, num_gpus=self.spec.gpus_per_worker, max_restarts=TASK_ATTEMPTS, max_task_retries=TASK_ATTEMPTS,
        )(ScoreActor)
        actors = [actor_class.remote(model_spec, _in_actor(config), out_dir) for _ in range(min(self.spec.workers, len(pending)))]
        queue = list(pending)
        attempts: dict[str, int] = {}
        running: dict = {}  # object ref -> (actor, shard)

        def submit(actor) -> None:
            shard = queue.pop(0)
            attempts[shard.name] = attempts.get(shard.name, 0) + 1
            running[actor.score.remote(shard)] = (actor, shard)

        for actor in actors:
            if queue:
                submit(actor)
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(ready)
            try:
                result = ray.get(ready)
            except Exception as exc:  # an actor died or the task raised: try again elsewhere
                if attempts[shard.name] >= TASK_ATTEMPTS:
                    raise ClipguardError(f"shard {shard.name} failed on Ray {TASK_ATTEMPTS} times: {exc}") from None
                queue.append(shard)
            else:
                on_rows(result.shard, result.samples)
                yield result
            if queue:
                submit(actor)


class ScoreActor:
    """A Ray worker: its model, loaded once, and the shards it is handed."""

    def __init__(self, model_spec, config, out_dir: str):
        import torch

        from clipguard.scoring.run import cached_model

        torch.set_num_threads(config.threads or 1)  # the CPUs Ray reserved for this actor
        self.config, self.out_dir = config, out_dir  # a folder path or object-store URL
        self.loaded = cached_model(model_spec)

    def score(self, shard: Shard):
        from clipguard.scoring.run import score_shard

        return score_shard(shard, self.loaded, self.config, self.out_dir)


def _rebuildable_spec(loaded: "LoadedModel"):
    if loaded.spec is None or loaded.info.weights_sha256 is None:
        raise ClipguardError(
            "the ray executor rebuilds the model in each worker, so it needs weights from a file, a "
            "bundled model or a hub tag (random weights differ in every process); use --executor local"
        )
    return loaded.spec


def _in_actor(config: "ScoreConfig") -> "ScoreConfig":
    """Inside an actor: no DataLoader workers, no executor of its own, and the thread count fixed
    (the actor sets it once, for every shard)."""
    from dataclasses import replace

    from clipguard.executors.spec import ExecutorSpec

    return replace(config, workers=0, executor=ExecutorSpec(), threads=config.threads or 1)
