#!/usr/bin/env bash
# All GPU checks in one call, for the device tool's GPU machine (torch + CUDA, no pyro there).
#
# How to run. Here, once per session (wheels are git-ignored, so they travel only when carried):
#     mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2
# Then one call of the device tool:   run  command "bash benchmarks/gpu.sh"  carry [".whl"]  timeout_s 600
# It takes an estimated 8-9 minutes on an H100 (machine start not counted; never run there yet) and stops
# starting new parts after GPU_SH_BUDGET_S seconds (default 540), so that the summary always prints inside the
# 10-minute limit. Order: the issues' targets first (the train-step cell and the pairwise-kernel table), then
# the CUDA tests, the full train-throughput grid, the special-function and sampling benchmarks; a short
# summary table last. Logs go to $OUT (they come back with the reply):
# target.md, tests.log, special.md, sampling.md, kernels.md, throughput.md, throughput.json (7 files; the
# device tool returns at most 8).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import pyro" >/dev/null 2>&1; then
    if ls .whl/pyro_ppl-*.whl .whl/pyro_api-*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "pyro is not installed and .whl/pyro_ppl-*.whl + .whl/pyro_api-*.whl were not carried: see the top of $0"
        exit 1
    fi
fi
OUT_DIR="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, pyro; print('torch', torch.__version__, '| pyro', pyro.__version__, '| cuda', torch.cuda.is_available())" || exit 1

BUDGET_S="${GPU_SH_BUDGET_S:-540}"
START_S=$SECONDS
status=0
# part NAME LIMIT_S CMD...: run CMD under `timeout`, at most LIMIT_S and never past the budget (15 s kept for the summary)
part() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( BUDGET_S - (SECONDS - START_S) - 15 ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then
        echo "=== $name: skipped, out of time ($(( SECONDS - START_S )) s used of $BUDGET_S)"
        return 1
    fi
    echo "=== $name (limit ${limit} s, at $(( SECONDS - START_S )) s)"
    timeout -k 10 "$limit" "$@"
}

# 1. the issues' targets first: the train-step cell of #6 (resnet50, p = 512, C = 11318, el_nivmf vs the paper's
#    per-image loop; ~40 s), then the pairwise-kernel table of #4 (ours vs GEMM floor, naive, loop; ~90 s)
part target 120 python3 benchmarks/train_throughput.py --device cuda --backbones resnet50 --dims 512 --classes 11318 \
    --losses el_nivmf --steps 40 --warmup 10 --loop-repeats 2 2>&1 | tee "$OUT_DIR/target.md" || status=1
part kernels 120 python3 benchmarks/kernels.py --device cuda --max-naive-gb 14 --loop-images 8 2>&1 | tee "$OUT_DIR/kernels.md" || status=1
# 2. the CUDA tests: vmf_dists on the device vs the CPU, no host sync in a loss backward, tiny training runs with
#    bf16 / channels-last / device augmentation / torch.compile, torchrun with NCCL (~2-3 min)
part tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/dml/test_cuda.py \
    tests/dml/test_evaluation.py::test_cuda_matches_cpu 2>&1 | tee "$OUT_DIR/tests.log" || status=1
# 3. the whole train-throughput grid: 2 backbones × p ∈ {128, 512} × C ∈ {100, 1000, 11318} × 3 losses + the
#    paper loop per (p, C) (~3 min)
part throughput 240 python3 benchmarks/train_throughput.py --device cuda --steps 30 --warmup 8 --loop-repeats 1 \
    --json "$OUT_DIR/throughput.json" 2>&1 | tee "$OUT_DIR/throughput.md" || status=1
# 4. the special-function and sampling benchmarks (scipy on the host as the anchor; n kept small for it)
part special 60 python3 benchmarks/special.py --device cuda --n 2000000 --repeats 3 2>&1 | tee "$OUT_DIR/special.md" || status=1
part sampling 60 python3 benchmarks/sampling.py --device cuda --n 200000 --no-scipy --repeats 3 2>&1 | tee "$OUT_DIR/sampling.md" || status=1

echo
echo "=== summary ($(( SECONDS - START_S )) s) ==="
tail -n 3 "$OUT_DIR/tests.log" 2>/dev/null
sed -n '/^| p |/,/^$/p' "$OUT_DIR/special.md" 2>/dev/null | head -n 6
grep -E '^\| (p|128|512) ' "$OUT_DIR/sampling.md" 2>/dev/null | cut -d'|' -f1-6,12-13
grep -E '^\| (p \| C|(128|512) \| [0-9]+) \| ' "$OUT_DIR/kernels.md" 2>/dev/null | cut -d'|' -f1-7
echo
if grep -q '^## train step throughput' "$OUT_DIR/throughput.md" 2>/dev/null; then
    grep '^## train step throughput' "$OUT_DIR/throughput.md"
    grep -E '^\| (backbone|[a-z][a-z_0-9]* \| [0-9]+ \| [0-9]+ \|)' "$OUT_DIR/throughput.md"
    grep -E '^\| (p|[0-9]+) \| [A-Za-z0-9]+ \| [^|]+ \| [^|]+ \| [^|]+ \|$' "$OUT_DIR/throughput.md"
else
    echo "(throughput grid did not finish; its progress lines:)"
    grep -E '^  ' "$OUT_DIR/throughput.md" 2>/dev/null | tail -n 40
fi
echo
for f in target throughput; do sed -n "s/^target check/[$f run] target check/p" "$OUT_DIR/$f.md" 2>/dev/null; done
exit $status
