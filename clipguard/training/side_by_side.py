"""Independent fine-tunes (and other CPU-bound jobs) side by side, one process each.

A small model cannot keep several CPU cores busy: its matrix products are too small to split well
across threads. Several fine-tunes on a share of the cores each therefore finish sooner than the
same ones one after the other on all of them (benchmarks/bench_side_by_side.py, three tiny-victim
fine-tunes on 2 cores: 1.24x at 400 steps on an Intel CPU with AMX, 1.14x at 200 on an EPYC).

Each job runs in a fresh ("spawn") process, so a job cannot inherit the parent's thread pools or
CUDA state. When a job fails, the jobs not yet started are cancelled, the running ones finish,
and the first failure is raised in the caller. `side_by_side_pool` is the pool itself, for callers
whose jobs depend on each other (the demo sterilizes the poisoned victim once it exists).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipguard.model.loading import ModelSpec
from clipguard.training.config import FinetuneConfig, FinetuneResult
from clipguard.training.loop import finetune


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune: what ``finetune(model, shards, config, out_path)`` is called with."""

    model: ModelSpec
    shards: str | list[str]
    config: FinetuneConfig
    out_path: Path
    # A process of the pool cannot call back into its parent: with a queue here (one that other
    # processes reach, multiprocessing.Manager().Queue()), the job puts (name, TrainProgress)
    # on it after every step instead.
    progress: Any = None
    name: str = "fine-tune"


def finetune_side_by_side(jobs: Sequence[FinetuneJob], workers: int | None = None) -> list[FinetuneResult]:
    """Run ``jobs`` in up to ``workers`` processes (default: one per job, at most one per core),
    splitting the cores evenly between them, at least one thread each. Results come back in the
    order of ``jobs``. One worker runs the jobs in this process, one after the other, with all
    the cores. More workers than cores is allowed: three one-thread jobs on two cores share them,
    where two-then-one would leave a core idle for the third."""
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers <= 1:
        return [run_finetune_job(job) for job in jobs]
    with side_by_side_pool(workers) as pool:
        futures = [pool.submit(run_finetune_job, job) for job in jobs]
        return [future.result() for future in futures]


@contextlib.contextmanager
def side_by_side_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """``workers`` fresh processes with an equal share of the cores each (at least one thread).
    Jobs must be module-level functions of picklable arguments. On an error in the ``with``
    block (a job's, raised by ``result()``), the jobs not yet started are cancelled."""
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_use_threads,
                             initargs=(max(1, cores // workers),)) as pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _use_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_finetune_job(job: FinetuneJob) -> FinetuneResult:
    send = None if job.progress is None else (lambda event: job.progress.put((job.name, event)))
    return finetune(job.model, job.shards, job.config, job.out_path, progress_callback=send)
