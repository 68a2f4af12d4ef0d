#!/usr/bin/env bash
# One-command test run. One BLAS/OpenMP thread per process: two threads on two busy cores is
# 10-1000x slower; pytest-xdist uses the cores instead. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m slow` for the long statistical suites). VENV picks another
# environment (scripts/test_oldest.sh: VENV=.venv-oldest).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec "${VENV:-.venv}/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
