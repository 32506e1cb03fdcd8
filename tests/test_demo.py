"""The README's main command, `clipguard demo --quick`, end to end on the synthetic web-like world."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipguard.attacks import parse_goal
from clipguard.cli.main import app
from clipguard.demo import DemoConfig, DemoError, run_demo
from clipguard.evaluation import evaluate, load_test_set
from clipguard.labels import make_labeler
from clipguard.model.loading import ModelSpec, load_model
from clipguard.synth import WorldSpec

runner = CliRunner()


@dataclass
class DemoRun:
    output: str
    report: dict
    rows: dict[str, dict]  # table row name -> row
    out: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoRun:
    out = tmp_path_factory.mktemp("demo")
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    return DemoRun(result.output, report, {row["name"]: row for row in report["table"]}, out)


@pytest.mark.slow
def test_demo_prints_the_paper_shaped_table_and_writes_its_report(demo):
    output, report, rows = demo.output, demo.report, demo.rows
    assert list(rows) == ["pretrained victim", "clean fine-tune", "poisoned", "filtered", "sterilized"]
    for name in rows:
        assert name in output
    assert "paper" in output and "Hit@10" in output and "poisons quarantined" in output
    assert report["phi"] == pytest.approx(DemoConfig.for_world("web", quick=True).rate, abs=0.001)
    for figure in report["figures"]:
        assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = (demo.out / "report.html").read_text(encoding="utf-8")
    assert report["html_report"] == str(demo.out / "report.html")
    pairs = report["filter"]["read"]
    assert f'id="summary-pairs" data-value="{pairs}"' in page and 'id="classes"' in page
    assert len(report["sterilization"]["curve"]) >= 2
    # Pair distance alone beside the combination (or the reason the combination was not used),
    # each measured on every pair against the manifest.
    rules = {row["rule"]: row for row in report["detection"]}
    assert set(rules) == {"pair distance alone", "distance + audit findings"} and "Pair distance alone" in output
    # On the web-like world (the default) distance alone misses most poisons at a 1% FPR; the
    # audit's findings catch them, within the same budget.
    alone, combined = rules["pair distance alone"], rules["distance + audit findings"]
    assert 0 <= alone["false_positive_rate"] <= 1 and alone["recall"] < 0.5
    assert combined["recall"] >= 0.9 and combined["false_positive_rate"] <= DemoConfig.for_world("web", quick=True).target_fpr


@pytest.mark.slow
def test_filter_quarantines_the_poisons_and_loses_nothing(demo):
    report = demo.report
    counts = report["filter"]
    assert counts["kept"] + counts["flagged"] + counts["errored"] == counts["read"]
    # The filter's recall on the poisons (known from the manifest) lies inside the error bars that
    # calibration stated from the 500 labels alone.
    recall = report["poisons_quarantined"] / report["poisons"]
    stated = report["calibration"]["recall"]
    assert stated["lower"] <= recall <= stated["upper"], (recall, stated)
    assert recall >= 0.9, recall
    assert report["calibration"]["labelled"] <= 500


@pytest.mark.slow
def test_filtered_and_sterilized_models_match_the_clean_one(demo):
    rows = demo.rows
    clean = rows["clean fine-tune"]
    # The goal back at the clean level, and no utility lost on the way. Sterilizing trains on the
    # curated reference split, so on the web world it ends above a fine-tune on noisy captions
    # (TR@10 0.95 against 0.73, measured); the filtered run keeps all but one clean pair and
    # trains a model of its own, within 0.04 of the clean one (measured: TR@10 0.694 vs 0.728).
    for name in ("filtered", "sterilized"):
        assert abs(rows[name]["hits"]["10"] - clean["hits"]["10"]) <= 0.05, (name, rows[name])
        assert rows[name]["utility_ir_10"] >= clean["utility_ir_10"] - 0.04, (name, rows[name])
        assert rows[name]["utility_tr_10"] >= clean["utility_tr_10"] - 0.04, (name, rows[name])


@pytest.mark.slow
def test_the_attack_works_in_the_demo(demo):
    rows = demo.rows
    poisoned, clean = rows["poisoned"], rows["clean fine-tune"]
    assert poisoned["hits"]["10"] >= 0.5, poisoned
    assert poisoned["min_rank"] < clean["min_rank"] / 3, (poisoned, clean)


@pytest.mark.slow
def test_sterilizing_is_watched_on_validation_and_reported_on_test(demo):
    report, rows, out = demo.report, demo.rows, demo.out
    sterilization = report["sterilization"]
    assert sterilization["watched_split"] == "validation"
    # The curve starts at the poisoned model as the validation split sees it, a split of its own:
    # the table's test figures played no part in when sterilizing stopped.
    goal = DemoConfig.for_world("web", quick=True).goal
    poisoned = load_model(ModelSpec(str(out / "models" / "poisoned.safetensors")))
    on_validation = evaluate(poisoned, load_test_set([str(out / "world" / "validation")], make_labeler()),
                             [parse_goal(goal)]).goal(goal).model
    start = sterilization["curve"][0]
    assert start["step"] == 0
    assert start["min_rank"][goal] == pytest.approx(on_validation.min_rank)
    assert start["hits_at_10"][goal] == pytest.approx(on_validation.hits[10])
    assert start["min_rank"][goal] != pytest.approx(rows["poisoned"]["min_rank"])


def test_a_refused_sterilize_is_a_clear_demo_error_and_the_in_process_path_runs(tmp_path):
    # A budget no model can meet (utility would have to rise by 1): sterilizing refuses to save,
    # and the demo says so instead of failing later on a missing checkpoint. workers=1 runs the
    # four training jobs in this process, one after the other.
    tiny = WorldSpec(train_images=200, train_class_skew=0.0, reference_images=64, test_images_per_class=2,
                     validation_images_per_class=2, shard_size=200)
    config = DemoConfig(world=tiny, rate=0.02, victim_epochs=1, batch_size=16, labels=100, sterilize_steps=2,
                        sterilize_eval_every=1, sterilize_max_utility_drop=-1.0, workers=1)
    with pytest.raises(DemoError, match="sterilizing the poisoned victim saved nothing: utility .* not saved"):
        run_demo(tmp_path, config)
    assert (tmp_path / "models" / "filtered.safetensors").is_file()
    assert not (tmp_path / "models" / "sterilized.safetensors").exists()
