#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with clipguard and its test tools.
# Idempotent: rerunning only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch/torchvision are pinned: this pair is what open_clip and torchvision agree on here
# (2.13.0+cpu cannot import torchvision), and pip finds it on local disk on our machines.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
echo "clipguard is installed in .venv (activate with: . .venv/bin/activate)"
