"""What the benchmarks record about the machine they ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def cpu_name() -> str:
    """lscpu's model name, else what the platform module says."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def run_header(repo: Path) -> dict:
    """What every benchmark record starts with: the day, the CPU, the cores it may use and the
    repository's commit."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
            "head": head.stdout.strip()}
