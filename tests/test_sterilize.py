"""Post-training defence: fine-tune on clean data with a watch, early stop and a utility budget."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clipguard.attacks import parse_goal
from clipguard.cli.main import app
from clipguard.datasets import DatasetNameError, resolve_dataset
from clipguard.evaluation import evaluate, load_test_set
from clipguard.labels import make_labeler
from clipguard.model.loading import ModelSpec, load_model
from clipguard.sterilize import SterilizeConfig, SterilizeJob, Watch, plot_curve, run_sterilize_job, sterilize
from clipguard.synth import WorldSpec, generate_world
from clipguard.training import side_by_side_pool

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, WorldSpec(seed=3, train_images=40, reference_images=400, test_images_per_class=10, shard_size=200))
    return out


@pytest.fixture(scope="module")
def test_set(world):
    return load_test_set([str(world / "test")], make_labeler())


def test_dataset_names_resolve_through_the_config_file(tmp_path, world):
    config = tmp_path / "datasets.toml"
    config.write_text(f'[datasets]\nvg = "{world}/reference/{{000000..000001}}.tar"\nboth = ["{world}/test", "{world}/train"]\n')
    assert resolve_dataset(["vg"], config) == [f"{world}/reference/{{000000..000001}}.tar"]
    assert resolve_dataset(["both", str(world / "train")], config) == [f"{world}/test", f"{world}/train", str(world / "train")]
    with pytest.raises(DatasetNameError, match="Known names: both, vg"):
        resolve_dataset(["coco"], config)
    with pytest.raises(DatasetNameError, match="no datasets defined"):
        resolve_dataset(["coco"], tmp_path / "missing.toml")


def test_sterilizing_a_clean_model_keeps_utility(tmp_path, world, test_set):
    model = load_model(ModelSpec("clipguard-victim"))
    goal = parse_goal("sheep:aeroplane")
    config = SterilizeConfig(max_steps=12, batch_size=32, eval_every=6, warmup_steps=2, stop_at_baseline=False)
    result = sterilize(model, [str(world / "reference")], tmp_path / "s.safetensors", config, Watch([goal], test_set))
    assert result.saved and result.steps == 12
    assert [p.step for p in result.curve] == [0, 6, 12]
    assert abs(result.utility_drop) <= 0.02, result.utility_drop
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["made_by"] == "clipguard sterilize" and len(sidecar["curve"]) == 3
    reloaded = load_model(ModelSpec(str(result.checkpoint)))
    after = evaluate(reloaded, test_set, [goal])
    assert after.goal("sheep:aeroplane").model.hits[10] == result.curve[-1].hits_at_10["sheep:aeroplane"]
    png = plot_curve(result, tmp_path / "curve.png")
    assert png.stat().st_size > 10_000


def test_a_sterilize_job_in_a_worker_process_gives_what_it_gives_here(tmp_path, world, test_set):
    """The demo sterilizes in a side_by_side_pool process beside a fine-tune: same curve, same
    weights, the baseline model loaded there from its spec."""
    goal = parse_goal("sheep:aeroplane")
    config = SterilizeConfig(max_steps=4, batch_size=16, eval_every=2, warmup_steps=1, stop_at_baseline=False)
    job = SterilizeJob(
        model=ModelSpec("clipguard-victim"), clean_shards=[str(world / "reference")],
        out_path=tmp_path / "there.safetensors", config=config, goals=(goal,),
        watch_shards=[str(world / "test")], baseline=ModelSpec("clipguard-victim"),
    )
    with side_by_side_pool(workers=2) as pool:
        there = pool.submit(run_sterilize_job, job).result()
    baseline = load_model(ModelSpec("clipguard-victim"))
    watch = Watch([goal], test_set, baseline=baseline)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker has: sums split over threads round differently
    try:
        here = sterilize(ModelSpec("clipguard-victim"), [str(world / "reference")], tmp_path / "here.safetensors", config, watch)
    finally:
        torch.set_num_threads(threads)
    assert there.saved and there.checkpoint == tmp_path / "there.safetensors"
    assert [p.step for p in there.curve] == [0, 2, 4]
    assert [asdict(p) for p in there.curve] == [asdict(p) for p in here.curve]
    clean_level = evaluate(baseline, test_set, [goal]).goal(str(goal)).model.hits[10]
    assert there.curve[0].baseline_hits_at_10 == {str(goal): clean_level}
    there_weights, here_weights = load_file(there.checkpoint), load_file(here.checkpoint)
    assert there_weights.keys() == here_weights.keys()
    assert all(torch.equal(there_weights[k], here_weights[k]) for k in there_weights)


def _goal_at_baseline(model, test_set):
    candidates = [parse_goal(g) for g in ("sheep:tvmonitor", "bottle:horse", "car:bird", "chair:cat", "boat:dog")]
    report = evaluate(model, test_set, candidates)
    at_zero = [g for g, r in zip(candidates, report.goals) if r.model.hits[10] <= r.random_text.hits[10]]
    assert at_zero, "the bundled victim should have some goal already at its random-text baseline"
    return at_zero[0]


def test_stops_once_the_goal_is_at_baseline(tmp_path, world, test_set):
    model = load_model(ModelSpec("clipguard-victim"))
    goal = _goal_at_baseline(model, test_set)
    config = SterilizeConfig(max_steps=30, batch_size=16, eval_every=2, warmup_steps=1)
    result = sterilize(model, [str(world / "reference")], tmp_path / "s.safetensors", config, Watch([goal], test_set))
    assert result.stopped_early and result.steps == 2 and result.saved


def test_does_not_stop_at_baseline_while_utility_is_past_the_budget(tmp_path, world, test_set):
    model = load_model(ModelSpec("clipguard-victim"))
    goal = _goal_at_baseline(model, test_set)
    # lr 0.05 wrecks utility at once: stopping at step 2 would only lead to a refusal, so it trains on.
    config = SterilizeConfig(lr=0.05, max_steps=6, batch_size=16, eval_every=2, warmup_steps=1, max_utility_drop=0.0)
    result = sterilize(model, [str(world / "reference")], tmp_path / "s.safetensors", config, Watch([goal], test_set))
    assert not result.stopped_early and result.steps == 6
    at_baseline = [p.step for p in result.curve if p.hits_at_10[str(goal)] <= p.baseline_hits_at_10[str(goal)]]
    assert [s for s in at_baseline if s > 0], result.curve  # it was at baseline, yet it did not stop
    assert not result.saved and "not saved" in result.refused_reason


def test_refuses_to_save_past_the_utility_budget(tmp_path, world):
    out = tmp_path / "wrecked.safetensors"
    result = runner.invoke(app, [
        "sterilize", "clipguard-victim", "--clean", str(world / "reference"), "--out", str(out),
        "--lr", "0.05", "--max-steps", "6", "--batch-size", "32", "--goal", "sheep:aeroplane",
        "--test", str(world / "test"), "--eval-every", "3", "--max-utility-drop", "0.0", "--no-early-stop",
    ])
    assert result.exit_code == 1, result.output
    assert "not saved" in result.output and not out.exists()


def test_unknown_dataset_name_is_a_clear_cli_error(tmp_path):
    result = runner.invoke(app, ["sterilize", "clipguard-victim", "--clean", "vg", "--out", str(tmp_path / "x"),
                                 "--datasets-config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "neither shards nor a known dataset name" in result.output


@pytest.mark.parametrize("flags, message", [
    (["--test", "{world}/test"], "--test without --goal or --manifest: nothing to watch"),
    (["--goal", "sheep:aeroplane"], "watching a goal needs --test SHARDS"),
    (["--goal", "sheep:aeroplane", "--test", "{world}/test", "--target-image", "000000001"],
     "--target-image needs --target-shards"),
])
def test_a_watch_missing_its_other_half_is_a_clear_cli_error(tmp_path, world, flags, message):
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["sterilize", "clipguard-victim", "--clean", str(world / "reference"), "--out", str(out),
                                 *[f.format(world=world) for f in flags]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and not out.exists()
