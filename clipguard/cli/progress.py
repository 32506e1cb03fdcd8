"""One progress reporter for every long-running command.

On a terminal it draws rich bars. Anywhere else (CI logs, nohup, slurm, a pipe) rich would draw
nothing until the end, so it writes a plain line instead, at most one every
CLIPGUARD_PROGRESS_INTERVAL seconds (default 5): what is done, the rate and the ETA. A quiet
thread repeats the running tasks' lines when no update came for two intervals, so a stage whose core
reports nothing for minutes (evaluating five models) still shows it is alive.

    with ProgressReporter(err_console) as progress:
        task = progress.task("score", total=len(shards), steps="shards", unit="pairs")
        ...  task.update(completed=shards_done, done=pairs_done)

The core never sees this module: commands turn the core's progress events into `update` calls.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

INTERVAL_ENV = "CLIPGUARD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 5.0


def progress_interval() -> float:
    """Seconds between plain progress lines, from CLIPGUARD_PROGRESS_INTERVAL (0: every update)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S  # a typo in an env variable must not stop a long run
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL_S


@dataclass
class _TaskState:
    name: str
    total: float | None
    steps: str  # what completed/total count: shards, steps
    unit: str  # what done counts, and the rate is of: pairs, samples
    started: float = field(default_factory=time.perf_counter)
    completed: float = 0
    # A resumed run starts past 0: the ETA counts from the first update, its time and position.
    first_completed: float | None = None
    first_update: float | None = None
    done: int | None = None
    rate_given: float | None = None
    note: str = ""
    outcome: str | None = None  # "done" or "stopped" once the task has ended
    changed: bool = False  # updated since its last line

    def elapsed(self, now: float) -> float:
        return max(now - self.started, 1e-9)

    def rate(self, now: float) -> float:
        """Items of `unit` per second: the core's own figure when it gives one, else done / elapsed."""
        if self.rate_given is not None:
            return self.rate_given
        return (self.done or 0) / self.elapsed(now)

    def eta(self, now: float) -> float | None:
        if self.total is None or self.first_completed is None or self.first_update is None:
            return None
        progressed = self.completed - self.first_completed
        if progressed <= 0:
            return None
        return max(self.total - self.completed, 0) * max(now - self.first_update, 1e-9) / progressed


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _count(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.1f}"


def describe(state: _TaskState, now: float) -> str:
    """One plain line: `score: 2/5 shards, 1,234 pairs, 98.7 pairs/s, elapsed 0:00:12, ETA 0:00:18`."""
    if state.first_completed is None and state.done is None and state.total is None:
        # A task nobody updates is an activity (a demo stage): say that it runs, and for how long.
        return f"{state.name}: {state.outcome or 'running'}, elapsed {_clock(state.elapsed(now))}"
    if state.total is not None:
        parts = [f"{_count(state.completed)}/{_count(state.total)} {state.steps}"]
    else:
        parts = [f"{_count(state.completed)} {state.steps}"]
    if state.done is not None:
        parts.append(f"{state.done:,} {state.unit}")
    if state.done is not None or state.rate_given is not None:
        parts.append(f"{state.rate(now):,.1f} {state.unit}/s")
    else:
        parts.append(f"{state.completed / state.elapsed(now):,.2f} {state.steps}/s")
    if state.note:
        parts.append(state.note)
    parts.append(f"elapsed {_clock(state.elapsed(now))}")
    parts.append(state.outcome or f"ETA {_clock(state.eta(now))}")
    return f"{state.name}: " + ", ".join(parts)


class ProgressTask:
    """A handle on one line of progress; `update` is safe to call from any thread."""

    def __init__(self, reporter: ProgressReporter, state: _TaskState, bar_id: TaskID | None):
        self._reporter, self.state, self._bar_id = reporter, state, bar_id

    def update(
        self,
        completed: float | None = None,
        total: float | None = None,
        done: int | None = None,
        rate: float | None = None,
        note: str | None = None,
    ) -> None:
        """Set what changed: completed of total (steps), done (items of unit), the core's own rate
        of items per second if it has one, and a short note (a loss, a phase)."""
        self._reporter._update(self, completed, total, done, rate, note)

    def finish(self) -> None:
        """The work is done (an early stop included): write the closing line, as far as it got."""
        self._reporter._finish(self, "done")


class ProgressReporter:
    """Rich bars on a terminal, periodic plain lines elsewhere; see the module docstring."""

    def __init__(self, console: Console, interval: float | None = None, live: bool | None = None):
        self.console = console
        self.interval = progress_interval() if interval is None else interval
        self.live = console.is_terminal if live is None else live
        self._tasks: list[ProgressTask] = []
        self._lock = threading.RLock()
        self._last_line = -math.inf  # the first update always gets a line
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._bars = self._make_bars() if self.live else None

    def _make_bars(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )

    def __enter__(self) -> ProgressReporter:
        if self._bars is not None:
            self._bars.start()
        elif self.interval > 0:
            self._heartbeat = threading.Thread(target=self._beat, name="clipguard-progress", daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=1.0)
        if self._bars is not None:
            self._bars.stop()
            return
        with self._lock:  # a closing line for each task the command did not finish: it stopped
            for task in self._tasks:
                self._finish(task, "stopped")

    def task(self, name: str, total: float | None = None, steps: str = "steps", unit: str = "pairs") -> ProgressTask:
        """A new line of progress; one that is never updated reads as an activity ("running")."""
        with self._lock:
            state = _TaskState(name=name, total=total, steps=steps, unit=unit)
            bar_id = self._bars.add_task(escape(name), total=total, detail="") if self._bars is not None else None
            task = ProgressTask(self, state, bar_id)
            self._tasks.append(task)
            return task

    def log(self, message: str) -> None:
        """A line of its own (above the bars on a terminal), not markup: it may quote data."""
        with self._lock:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _update(self, task: ProgressTask, completed, total, done, rate, note) -> None:
        with self._lock:
            state, now = task.state, time.perf_counter()
            if total is not None:
                state.total = total
            if completed is not None:
                state.completed = completed
                if state.first_completed is None:
                    state.first_completed, state.first_update = completed, now
            if done is not None:
                state.done = done
            if rate is not None:
                state.rate_given = rate
            if note is not None:
                state.note = note
            state.changed = True
            if state.total is not None and state.completed >= state.total:
                self._finish(task, "done")  # its closing line now, not repeated while the command wraps up
                return
            if self._bars is not None:
                self._refresh_bar(task)
            elif now - self._last_line >= self.interval:
                # One line for every task that moved (fine-tunes side by side each get theirs).
                for moved in [t for t in self._tasks if t.state.changed and t.state.outcome is None]:
                    self._write(moved, now)

    def _finish(self, task: ProgressTask, outcome: str) -> None:
        with self._lock:
            state = task.state
            if state.outcome is not None:
                return
            state.outcome = outcome
            if self._bars is not None:
                self._refresh_bar(task)
            else:
                self._write(task, time.perf_counter())

    def _refresh_bar(self, task: ProgressTask) -> None:
        state, now = task.state, time.perf_counter()
        detail = []
        if state.done is not None:
            detail.append(f"{state.done:,} {state.unit}")
        if state.done is not None or state.rate_given is not None:
            detail.append(f"{state.rate(now):,.1f} {state.unit}/s")
        if state.note:
            detail.append(state.note)
        self._bars.update(task._bar_id, completed=state.completed, total=state.total, detail=escape("  ".join(detail)))

    def _write(self, task: ProgressTask, now: float) -> None:
        self._last_line = now
        task.state.changed = False
        self.console.print(describe(task.state, now), markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()  # a pipe is block-buffered: without this, lines arrive at the end

    def _beat(self) -> None:
        """Repeat the running tasks' lines when nothing was written for two intervals (one would
        race the updates of tasks that are moving)."""
        while not self._stop.wait(min(self.interval, 1.0)):
            with self._lock:
                now = time.perf_counter()
                if now - self._last_line >= 2 * self.interval:
                    for task in [t for t in self._tasks if t.state.outcome is None]:
                        self._write(task, now)
