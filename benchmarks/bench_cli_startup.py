"""Wall time of `clipguard --help` (and `clipguard evaluate --help`) for one or more source trees.

Each run is a fresh `python -c "from clipguard.cli.main import main; main()" --help` with the
tree on PYTHONPATH (the way a console script starts), so the figure includes the interpreter's
start and every import the app makes. Trees are run interleaved, after one warm-up run each (the
first run reads the files from disk), so that a change in the machine's load hits all of them.

Usage: python benchmarks/bench_cli_startup.py [--runs 5] [--out FILE.json] TREE [TREE ...]
e.g. `git archive f6fac01 | tar -x -C /tmp/before` for the tree before the change, and `.`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTER = "from clipguard.cli.main import main; main()"


def one_run(tree: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STARTER, *args], env=env, cwd=tree, capture_output=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or b"Usage:" not in done.stdout:
        raise SystemExit(f"{tree}: {' '.join(args)} failed: {done.stderr.decode()[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    commands = {"--help": ["--help"], "evaluate --help": ["evaluate", "--help"]}
    times: dict[str, dict[str, list[float]]] = {str(t): {name: [] for name in commands} for t in options.trees}
    for tree in options.trees:
        for args in commands.values():
            one_run(tree, args)  # warm-up: disk cache, .pyc files
    for _ in range(options.runs):
        for name, args in commands.items():
            for tree in options.trees:
                times[str(tree)][name].append(one_run(tree, args))
    load = os.getloadavg()
    report = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "load_average_after": load, "runs": options.runs,
        "trees": {tree: {name: {"median_s": statistics.median(v), "runs_s": v} for name, v in by.items()}
                  for tree, by in times.items()},
    }
    for tree, by in report["trees"].items():
        line = ", ".join(f"{name}: median {r['median_s']:.2f} s" for name, r in by.items())
        print(f"{tree}: {line}")
    print(f"{report['cpu']}, {report['cores']} cores, load average after {load[0]:.2f}")
    if options.out:
        options.out.write_text(json.dumps(report, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
