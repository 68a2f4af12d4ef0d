#!/usr/bin/env bash
# The default test suite on the oldest versions the package declares: torch 2.3 and pyro-ppl 1.9
# (pyproject.toml: torch>=2.3, pyro-ppl>=1.9), in a separate .venv-oldest, so the declared floor is
# a tested claim. PyPI has only the CUDA build of torch 2.3.1 (about 2.6 GB with its nvidia-* wheels);
# it runs on the CPU. Run by CI after the main suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-oldest/bin/python ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
        echo "scripts/test_oldest.sh: torch 2.3.1 has wheels for Python 3.8-3.12 only; set PYTHON=python3.12 (or 3.10, 3.11)" >&2
        exit 2
    fi
    "$PYTHON" -m venv .venv-oldest
fi
.venv-oldest/bin/python -m pip install --quiet --upgrade pip
.venv-oldest/bin/python -m pip install --quiet "torch==2.3.1" "pyro-ppl==1.9.0" -e ".[dml,dev]"
.venv-oldest/bin/python -c "import torch, pyro; print('oldest: torch', torch.__version__, '| pyro', pyro.__version__)"
VENV=.venv-oldest exec bash scripts/test.sh "$@"
