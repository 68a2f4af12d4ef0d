#!/usr/bin/env bash
# All GPU checks in one call, for the device tool's GPU machine (torch + CUDA, no pyro there).
#
# Here, once per session (wheels are git-ignored, so they travel only when carried):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
# Then run with carry [".whl"]:   bash benchmarks/gpu.sh
# It runs the CUDA tests, then the benchmarks, and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
OUT_DIR="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, pyro; print('torch', torch.__version__, '| pyro', pyro.__version__, '| cuda', torch.cuda.is_available())" || exit 1

status=0
python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$OUT_DIR/tests.log" || status=1
python3 benchmarks/special.py --device cuda --n 10000000 --repeats 5 2>&1 | tee "$OUT_DIR/special.md" || status=1
python3 benchmarks/sampling.py --device cuda --n 1000000 --no-scipy --repeats 5 2>&1 | tee "$OUT_DIR/sampling.md" || status=1
python3 benchmarks/kernels.py --device cuda --max-naive-gb 40 --loop-images 8 2>&1 | tee "$OUT_DIR/kernels.md" || status=1

echo
echo "=== summary ==="
tail -n 3 "$OUT_DIR/tests.log"
sed -n '/^| p |/,/^$/p' "$OUT_DIR/special.md" | head -n 6
grep -E '^\| (p|128|512) ' "$OUT_DIR/sampling.md" | cut -d'|' -f1-6,12-13
grep -E '^\| (p|128|512) \| [0-9]+ \| ' "$OUT_DIR/kernels.md" | cut -d'|' -f1-7
exit $status
