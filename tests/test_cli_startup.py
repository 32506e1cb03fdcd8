"""The CLI starts fast and its help reads at 80 columns: `--help` builds without torch, every
command has -h and an example, and text such as `A:B:` is not turned into an emoji."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from clipguard.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
# Every registered command, so that one added later is held to the same start-up and help rules.
COMMANDS = sorted(typer.main.get_command(app).commands)
HEAVY = ("torch", "open_clip", "open_clip_train", "scipy", "webdataset", "matplotlib", "pyarrow", "PIL", "numpy")

# Run in a fresh interpreter: this test process has torch loaded by its neighbours already.
_HELP_PROBE = """
import json, sys
from clipguard.cli.main import app
found = {}
for args in [["--help"], ["-h"]] + [[command, "--help"] for command in json.loads(sys.argv[1])]:
    try:
        app(args, prog_name="clipguard")
    except SystemExit as exit:
        assert exit.code in (0, None), (args, exit.code)
    found[" ".join(args)] = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print("PROBE" + json.dumps(found))
"""


def _help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("CLIPGUARD_CONSOLE_WIDTH", None)
    result = CliRunner().invoke(app, list(args), env=env, prog_name="clipguard", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_help_of_the_app_and_every_command_imports_no_heavy_module():
    assert {"score", "sample", "calibrate", "attack", "evaluate", "filter", "gate", "finetune", "sterilize",
            "synth", "demo"} <= set(COMMANDS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, json.dumps(COMMANDS), json.dumps(HEAVY)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.rsplit("PROBE", 1)[1])
    assert set(found) == {"--help", "-h"} | {f"{c} --help" for c in COMMANDS}
    assert {args: heavy for args, heavy in found.items() if heavy} == {}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_short_help_an_example_and_fits_80_columns(command):
    text = _help(command, "-h")
    assert text == _help(command, "--help")
    assert f"clipguard {command} " in text.split("Example:", 1)[1].split("\n\n")[0]
    assert max(len(line) for line in text.splitlines()) <= 80, text
    # Option help gets a real column: the widest line of the options block is not a squeezed
    # 15-character strip (as rich's panels made it at 80 columns).
    options = text.split("Options:", 1)[1]
    assert max(len(line) for line in options.splitlines()) >= 60, text


def test_evaluate_help_keeps_goal_syntax_literal_at_80_columns():
    text = _help("evaluate", "--help")
    assert "A:B: class-A test texts query all test" in text
    assert "--goal sheep:aeroplane" in text
    assert "\U0001F171" not in text  # rich's :b: emoji
    assert all(ord(ch) < 0x2000 for ch in text), [ch for ch in text if ord(ch) >= 0x2000]


def test_version_and_completion_options():
    from clipguard import __version__

    result = CliRunner().invoke(app, ["--version"], prog_name="clipguard")
    assert result.exit_code == 0 and result.output.strip() == f"clipguard {__version__}"
    top = _help("-h")
    assert "--install-completion" in top and "--show-completion" in top and "-h, --help" in top


def test_python_dash_m_clipguard_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "clipguard", "--version"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("clipguard "), done.stderr


def test_cli_choices_and_defaults_match_the_core():
    """cli/choices.py copies what the signatures show; each copy must equal the core's value."""
    from clipguard import attacks
    from clipguard.cli import choices
    from clipguard.data import pairs
    from clipguard.filtering import gate, run
    from clipguard.model import loading
    from clipguard.synth import WorldSpec
    from clipguard.training import FinetuneConfig

    assert (choices.DEFAULT_MODEL, choices.DEFAULT_PRETRAINED) == (loading.DEFAULT_MODEL, loading.DEFAULT_PRETRAINED)
    assert (choices.DEFAULT_MAX_PIXELS, choices.DEFAULT_MAX_CAPTION_BYTES) == (pairs.DEFAULT_MAX_PIXELS, pairs.DEFAULT_MAX_CAPTION_BYTES)
    assert choices.DEFAULT_SHARD_SIZE == run.DEFAULT_SHARD_SIZE
    from clipguard import convert
    from clipguard.convert import pipeline as convert_pipeline
    from clipguard.reporting import contents as report_contents

    assert choices.DEFAULT_CONVERT_SHARD_SIZE == convert_pipeline.DEFAULT_SHARD_SIZE
    assert choices.DEFAULT_WORST == report_contents.DEFAULT_WORST
    from clipguard.scoring.run import EXECUTORS

    assert tuple(m.value for m in choices.ExecutorKind) == EXECUTORS
    from clipguard.scoring.from_embeddings import LAYOUTS

    assert tuple(m.value for m in choices.EmbeddingLayout) == LAYOUTS
    from clipguard.audit.neighbours import CODES

    assert tuple(m.value for m in choices.IndexCodes) == CODES
    for name in ("DatasetKind", "CaptionChoice"):
        cli_choice, core_choice = getattr(choices, name), getattr(convert, name)
        assert [m.value for m in cli_choice] == [m.value for m in core_choice]
    assert (choices.DEFAULT_MAX_ERROR_RATE, choices.DEFAULT_EXAMPLES) == (gate.DEFAULT_MAX_ERROR_RATE, gate.DEFAULT_EXAMPLES)
    from clipguard.audit import AuditConfig
    from clipguard.synth.noise import NOISE_KINDS, WebNoiseConfig

    assert tuple(m.value for m in choices.NoiseKind) == NOISE_KINDS
    audit_config = AuditConfig(scores=Path("scores"), out=Path("audit"))
    for copy, core in [(choices.FINETUNE_DEFAULTS, FinetuneConfig()), (choices.WORLD_DEFAULTS, WorldSpec()),
                       (choices.AUDIT_DEFAULTS, audit_config), (choices.WEB_NOISE_DEFAULTS, WebNoiseConfig())]:
        for field in dataclasses.fields(copy):
            assert getattr(copy, field.name) == getattr(core, field.name), field.name
    assert choices.DEFAULT_SURROGATE == attacks.DEFAULT_SURROGATE
    for name in ("AttackKind", "CaptionSource", "KeyPolicy", "TriggerPattern", "TriggerPosition", "EvadeVariant"):
        cli_enum, core_enum = getattr(choices, name), getattr(attacks, name)
        assert [(m.name, m.value) for m in cli_enum] == [(m.name, m.value) for m in core_enum], name
        assert all(choices.core_enum(core_enum, m) is core_enum(m.value) for m in cli_enum)
