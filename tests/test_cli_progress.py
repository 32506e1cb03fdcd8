"""Progress when stderr is not a terminal (CI logs, nohup, slurm): a plain line every few seconds
with what is done, the rate and the ETA, written while the command runs, not at its end."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from clipguard.cli.progress import DEFAULT_INTERVAL_S, INTERVAL_ENV, ProgressReporter, progress_interval
from conftest import TINY_MODEL, simple_samples, write_shard

ROOT = Path(__file__).resolve().parents[1]
CLOCK = r"\d+:\d\d:\d\d"


def plain_reporter(interval: float) -> tuple[ProgressReporter, io.StringIO]:
    out = io.StringIO()
    return ProgressReporter(Console(file=out, force_terminal=False, width=200), interval=interval), out


def test_plain_lines_carry_done_rate_and_eta_and_a_closing_line():
    reporter, out = plain_reporter(interval=0)
    with reporter:
        task = reporter.task("score", total=4, steps="shards", unit="pairs")
        for shard in range(5):
            time.sleep(0.01)
            task.update(completed=shard, done=shard * 100)
        task.finish()  # already closed by reaching its total: no second closing line
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert re.fullmatch(rf"score: 2/4 shards, 200 pairs, [\d,.]+ pairs/s, elapsed {CLOCK}, ETA {CLOCK}", lines[2])
    assert lines[0].endswith("ETA ?")  # nothing finished yet: no estimate rather than a wrong one
    assert re.fullmatch(rf"score: 4/4 shards, 400 pairs, [\d,.]+ pairs/s, elapsed {CLOCK}, done", lines[-1])


def test_at_most_one_line_per_interval_then_the_closing_line():
    reporter, out = plain_reporter(interval=3600)
    with reporter:
        task = reporter.task("finetune", total=1000, steps="steps")
        for step in range(1, 301):
            task.update(completed=step, rate=50.0, note="loss 0.5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("finetune: 1/1,000 steps, 50.0 pairs/s, loss 0.5")
    assert lines[1].startswith("finetune: 300/1,000 steps") and lines[1].endswith("stopped")


def test_eta_of_a_resumed_run_counts_from_where_it_resumed():
    reporter, out = plain_reporter(interval=0)
    with reporter:
        task = reporter.task("finetune", total=100, steps="steps")
        task.update(completed=50)
        task.state.first_update -= 10.0  # as if the ten steps below took ten seconds
        task.update(completed=60)
    eta = out.getvalue().splitlines()[1].split("ETA ")[1]
    assert eta in ("0:00:40", "0:00:41")  # 40 steps left at 1 step/s, not at 60 steps / 10 s


def test_a_silent_task_still_gets_a_line_every_interval():
    reporter, out = plain_reporter(interval=0.2)
    with reporter:
        stage = reporter.task("evaluate every model on the test split")
        time.sleep(1.0)
        stage.finish()
        reporter.task("a stage that raised")
    lines = out.getvalue().splitlines()
    running = [line for line in lines if line.startswith("evaluate every model on the test split: running, elapsed")]
    assert len(running) >= 2, lines
    assert lines[-2].startswith("evaluate every model on the test split: done, elapsed")
    assert lines[-1].startswith("a stage that raised: stopped, elapsed")  # never finished


def test_on_a_terminal_it_draws_bars_and_logs_text_literally():
    out = io.StringIO()
    reporter = ProgressReporter(Console(file=out, force_terminal=True, width=120), interval=0)
    assert reporter.live
    with reporter:
        task = reporter.task("score", total=3, steps="shards")
        for shard in range(4):
            task.update(completed=shard, done=shard * 10)
        reporter.log("caption [bold]x[/] from the data")
    text = out.getvalue()
    assert "3/3" in text and "30 pairs" in text and "pairs/s" in text
    assert "caption [bold]x[/] from the data" in text  # attacker-written text is not markup
    assert "score: " not in text  # no plain lines on a terminal


@pytest.mark.parametrize("raw, expected", [("", DEFAULT_INTERVAL_S), ("0.5", 0.5), ("0", 0.0),
                                           ("soon", DEFAULT_INTERVAL_S), ("-1", DEFAULT_INTERVAL_S),
                                           ("nan", DEFAULT_INTERVAL_S)])
def test_interval_comes_from_the_environment_and_a_typo_keeps_the_default(monkeypatch, raw, expected):
    monkeypatch.setenv(INTERVAL_ENV, raw)
    assert progress_interval() == expected


def test_score_writes_progress_lines_to_a_pipe_while_it_runs(tmp_path):
    shards = tmp_path / "shards"
    for s in range(4):
        write_shard(shards / f"{s:05d}.tar", simple_samples(s, 24))
    env = {**os.environ, "PYTHONPATH": str(ROOT), INTERVAL_ENV: "0.05", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "clipguard", "score", str(shards), "--out", str(tmp_path / "scores"),
               "--model", TINY_MODEL, "--pretrained", "none", "--batch-size", "8", "--workers", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line_with_eta, still_running = None, False
    try:
        for line in process.stderr:  # read as it arrives: a line buffered until exit fails below
            if re.search(rf"^score: [1-3]/4 shards, [\d,]+ pairs, [\d,.]+ pairs/s, elapsed {CLOCK}, ETA {CLOCK}$", line):
                line_with_eta, still_running = line, process.poll() is None
                break
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert line_with_eta is not None
    assert still_running, "the progress line arrived only after the command had ended"
    assert process.returncode == 0
    assert "96 (96 ok)" in rest


def test_finetune_cli_reports_steps_rate_loss_and_eta(tmp_path, tiny_checkpoint, monkeypatch):
    import torch

    from clipguard.cli.main import app

    monkeypatch.setenv(INTERVAL_ENV, "0")
    data = tmp_path / "data"
    for s in range(2):
        write_shard(data / f"{s:05d}.tar", simple_samples(s, 10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps on busy shared cores (see tests/test_finetune.py)
    try:
        result = CliRunner().invoke(app, ["finetune", str(tiny_checkpoint), "--data", str(data), "--out",
                                          str(tmp_path / "m.safetensors"), "--max-steps", "3", "--batch-size", "4"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert re.search(rf"finetune: 2/3 steps, [\d,.]+ pairs/s, loss \d+\.\d{{4}}, elapsed {CLOCK}, ETA {CLOCK}", result.output)
    assert re.search(rf"finetune: 3/3 steps, .*, done", result.output)


@pytest.mark.slow  # a fresh process that imports torch: about 20 s on 2 busy cores
def test_a_fine_tune_in_a_pool_process_sends_its_progress_through_a_queue(tmp_path, tiny_checkpoint):
    """The demo's fine-tunes run in other processes; their steps still reach the parent."""
    import multiprocessing

    from clipguard.model.loading import ModelSpec
    from clipguard.training import FinetuneConfig, FinetuneJob, run_finetune_job, side_by_side_pool

    data = tmp_path / "data"
    write_shard(data / "00000.tar", simple_samples(0, 12))
    manager = multiprocessing.get_context("spawn").Manager()
    try:
        events = manager.Queue()
        config = FinetuneConfig(max_steps=3, batch_size=4, shuffle_buffer=0, warmup_steps=0)
        job = FinetuneJob(ModelSpec(str(tiny_checkpoint)), str(data), config, tmp_path / "m.safetensors",
                          progress=events, name="fine-tune clean")
        with side_by_side_pool(1) as pool:
            result = pool.submit(run_finetune_job, job).result()
        received = [events.get(timeout=10) for _ in range(result.steps)]
    finally:
        manager.shutdown()
    assert [name for name, _ in received] == ["fine-tune clean"] * 3
    assert [(e.step, e.total_steps) for _, e in received] == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.slow  # a whole (tiny) demo in this process
def test_demo_shows_each_stage_and_each_training_job(tmp_path, monkeypatch):
    from clipguard.cli.main import app
    from clipguard.demo import DemoConfig
    from clipguard.synth import WorldSpec

    tiny = WorldSpec(train_images=64, train_class_skew=0.0, reference_images=32, test_images_per_class=1,
                     validation_images_per_class=1, shard_size=64)
    config = DemoConfig(world=tiny, rate=0.05, victim_epochs=1, batch_size=16, labels=60, sterilize_steps=2,
                        sterilize_eval_every=1, workers=1)
    # `--quick` at a size a test can afford; the CLI path is the same (the sizes are the core's).
    monkeypatch.setattr(DemoConfig, "for_world", classmethod(lambda cls, noise, quick: config))
    monkeypatch.setenv(INTERVAL_ENV, "0")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    for stage in ("synthesize the world", "score the poisoned data with the reference model", "filter the poisoned data",
                  "evaluate every model on the test split"):
        assert re.search(rf"^{stage}: done, elapsed {CLOCK}$", out, re.M), stage
    assert re.search(rf"^score: \d/2 shards, [\d,]+ pairs, [\d,.]+ pairs/s, elapsed {CLOCK}, ETA", out, re.M)
    for job in ("fine-tune poisoned", "fine-tune clean", "fine-tune filtered", "sterilize"):
        assert re.search(rf"^{job}: 1/\d+ steps, \d+ pairs, [\d,.]+ pairs/s, loss [\d.]+, elapsed {CLOCK}, ETA", out, re.M), job
