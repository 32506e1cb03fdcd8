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
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test,ray,ray-data,s3]'
# The labelling page's browser tests drive headless Chromium. Install it only where that can work
# (root, apt-get, not there yet) and never fail the set-up over it: without it those tests skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } \
    || echo "note: chromium could not be installed; the labelling page's browser tests will skip" >&2
fi
echo "clipguard is installed in .venv (activate with: . .venv/bin/activate)"
