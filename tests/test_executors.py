"""One shard, one unit of work (issue 14): per-shard files, executors, merging, one model a folder.

Ray runs for real: a local instance started here with two CPUs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.errors import MixedModelsError
from clipguard.model.loading import ModelSpec
from clipguard.scoring.run import ExecutorSpec, ScoreConfig, load_manifest, score_shard, score_shards
from clipguard.scoring.scorefiles import read_scores
from clipguard.scoring.stats import TIMING_KEYS, folder_summary
from conftest import simple_samples, write_shard
from flaky_http import FlakyServer

runner = CliRunner()


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("four") / "shards"
    for s in range(4):
        write_shard(folder / f"{s:05d}.tar", simple_samples(s, 12 + s))
    return folder


@pytest.fixture(scope="module")
def saved_model(tiny_checkpoint):
    """The tiny model from a weights file: what a Ray actor can rebuild byte for byte."""
    from clipguard.model.loading import load_model

    return load_model(ModelSpec(str(tiny_checkpoint)))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def stats_without_timings(folder: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(folder.glob("*_stats.json")):
        stats = json.loads(path.read_text())
        assert set(stats["seconds"]) == set(TIMING_KEYS)
        stats.pop("seconds")
        found[path.name] = stats
    return found


def parquet_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def test_score_shard_builds_its_model_and_writes_its_files(tmp_path, four_shards, tiny_checkpoint):
    shard = resolve_shards(str(four_shards / "00001.tar"))[0]
    result = score_shard(shard, ModelSpec(str(tiny_checkpoint)), ScoreConfig(batch_size=8), tmp_path)
    assert result.samples == result.ok == 13
    stats = json.loads((tmp_path / "00001_stats.json").read_text())
    assert stats["status"] == "complete" and stats["result"]["ok"] == 13
    assert stats["run"]["fingerprint"]["architecture"] == "clipguard-tiny-victim" and stats["run"]["clipguard_version"]
    assert all(stats["seconds"][k] >= 0 for k in TIMING_KEYS)
    assert folder_summary(tmp_path)["pairs"] == 13


def test_ray_and_local_executors_write_the_same_bytes(tmp_path, four_shards, saved_model, local_ray):
    shards = resolve_shards(str(four_shards))
    # One inference thread each: float sums are split by thread, so equal bytes need equal threads
    # (at two threads here against one an actor, 2 of 4 shards differed by 1.5e-8).
    score_shards(shards, saved_model, tmp_path / "local", ScoreConfig(batch_size=8, threads=1))
    on_ray = ScoreConfig(batch_size=8, threads=1, executor=ExecutorSpec(kind="ray", workers=2))
    summary = score_shards(shards, saved_model, tmp_path / "ray", on_ray)
    assert summary.pairs == sum(12 + s for s in range(4)) and not summary.failed
    assert parquet_bytes(tmp_path / "ray") == parquet_bytes(tmp_path / "local")
    assert stats_without_timings(tmp_path / "ray") == stats_without_timings(tmp_path / "local")


def test_filter_and_gate_score_through_ray(tmp_path, four_shards, tiny_checkpoint, local_ray):
    base = ["--model", str(tiny_checkpoint), "--executor", "ray", "--workers", "2"]
    gate = runner.invoke(app, ["gate", str(four_shards), "--gamma", "2", "--max-flagged-rate", "0", *base])
    assert gate.exit_code == 0, gate.output
    result = runner.invoke(app, ["filter", str(four_shards), "--gamma", "2", "--out", str(tmp_path / "c"), "--quarantine", str(tmp_path / "q"), *base])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "c" / "filter_manifest.json").read_text())["totals"]["kept"] == 54


def test_two_halves_merged_equal_the_whole(tmp_path, four_shards, tiny_loaded):
    shards = resolve_shards(str(four_shards))
    config = ScoreConfig(batch_size=8)
    score_shards(shards, tiny_loaded, tmp_path / "whole", config)
    score_shards(shards[:2], tiny_loaded, tmp_path / "a", config)
    score_shards(shards[2:], tiny_loaded, tmp_path / "b", config)
    merged = tmp_path / "merged"
    merged.mkdir()
    for half in ("a", "b"):
        for path in (tmp_path / half).iterdir():
            if path.name.endswith((".parquet", "_stats.json")):
                shutil.copy(path, merged / path.name)
    assert parquet_bytes(merged) == parquet_bytes(tmp_path / "whole")
    assert stats_without_timings(merged) == stats_without_timings(tmp_path / "whole")
    assert folder_summary(merged) == folder_summary(tmp_path / "whole")
    assert folder_summary(merged)["complete"] and folder_summary(merged)["shards_done"] == 4
    # And the merged folder resumes as a finished one: nothing is scored again.
    rerun = score_shards(shards, tiny_loaded, merged, config)
    assert all(r.skipped_on_resume for r in rerun.shards)


def test_a_folder_holding_two_models_is_refused_naming_both(tmp_path, four_shards, tiny_loaded, tiny_checkpoint):
    shards = resolve_shards(str(four_shards))
    score_shards(shards[:2], tiny_loaded, tmp_path / "a", ScoreConfig())
    runner.invoke(app, ["score", str(four_shards / "00002.tar"), "--out", str(tmp_path / "b"), "--model", "clipguard-reference", "--workers", "0"])
    for path in (tmp_path / "b").glob("00002*"):
        shutil.copy(path, tmp_path / "a" / path.name)
    for read in (load_manifest, read_scores):
        with pytest.raises(MixedModelsError) as caught:
            read(tmp_path / "a")
        assert "clipguard-tiny-victim" in str(caught.value) and "clipguard-tiny-reference" in str(caught.value)
    (tmp_path / "labels.csv").write_text("key,shard,label\n000000000,00000,clean\n")
    for command in (["sample", str(tmp_path / "a"), "--out", str(tmp_path / "s"), "-n", "3"],
                    ["calibrate", str(tmp_path / "a"), "--labels", str(tmp_path / "labels.csv")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "two models" in " ".join(result.output.split()), result.output


def test_a_missing_http_shard_fails_the_run_and_the_rerun_fetches_only_it(tmp_path, four_shards, tiny_checkpoint):
    served = tmp_path / "served"
    served.mkdir()
    for s in range(3):
        shutil.copy(four_shards / f"{s:05d}.tar", served)
    with FlakyServer(served) as server:
        args = ["score", f"{server.url}/{{00000..00003}}.tar", "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--workers", "0"]
        first = runner.invoke(app, args)
        said = " ".join(first.output.split())
        assert first.exit_code == 2 and "00003: cannot open shard: HTTP Error 404" in said, first.output
        assert load_manifest(tmp_path / "o")["failed_shards"][0]["shard"] == "00003"
        shutil.copy(four_shards / "00003.tar", served)
        before = dict(server.requests)
        second = runner.invoke(app, args)
        assert second.exit_code == 0, second.output
        fetched = {name: server.requests[name] - before.get(name, 0) for name in server.requests}
        assert fetched == {"00000.tar": 0, "00001.tar": 0, "00002.tar": 0, "00003.tar": 1}
    assert load_manifest(tmp_path / "o")["complete"]


def test_a_task_whose_actor_dies_is_retried_on_a_live_one(tmp_path, four_shards, saved_model, local_ray):
    """The first read of this shard kills the Ray actor reading it (a real SIGKILL, no mock);
    the shard is scored again on a restarted actor and the run completes."""
    marker = tmp_path / "killed-once"
    source = four_shards / "00000.tar"
    command = f"pipe:if [ -e {marker} ]; then cat {source}; else touch {marker}; kill -9 $PPID; fi"
    shards = resolve_shards([command], allow_pipe=True)
    on_ray = ScoreConfig(batch_size=8, executor=ExecutorSpec(kind="ray", workers=1))
    summary = score_shards(shards, saved_model, tmp_path / "o", on_ray)
    assert marker.exists() and summary.pairs == 12 and not summary.failed


def test_cli_local_and_ray_at_one_thread_write_the_same_score_files(tmp_path, four_shards, tiny_checkpoint, local_ray):
    base = [str(four_shards), "--model", str(tiny_checkpoint), "--threads", "1", "--batch-size", "8"]
    assert runner.invoke(app, ["score", *base, "--out", str(tmp_path / "l"), "--workers", "0"]).exit_code == 0
    ray = runner.invoke(app, ["score", *base, "--out", str(tmp_path / "r"), "--executor", "ray", "--workers", "2"])
    assert ray.exit_code == 0, ray.output
    assert parquet_bytes(tmp_path / "r") == parquet_bytes(tmp_path / "l")
