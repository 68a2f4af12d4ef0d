"""Benchmark: how long ``torch.compile`` takes for vMF training objectives, cold and warm, and what it buys.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_time.py [--dim 16] [--batch 32]

Two objectives, with ``q = VonMisesFisher(loc, κ)``, compiled with ``torch.compile`` (inductor, CPU) and
run forward and backward:

* ``q.log_prob(x).sum() + KL(q ‖ HypersphericalUniform(p)).sum()`` at a given x, ``fullgraph=True``;
* a VAE step, ``z = q.rsample()`` and the same with x = z (compiled without ``fullgraph``, as before
  rsample traced into one graph at every p; the recorded numbers are for that setting).

Each measurement is a fresh Python process:

* **cold**: an empty inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``), as on a new machine;
* **warm**: the same directory again, as on every later run on that machine.

The time is from the first call of the compiled function to the end of its backward (the compile
itself, code generation and one evaluation); two eager calls of the same objective are printed for scale
(the first builds the order's Bessel table and warms up the dispatcher), and the steady time per call,
compiled and eager, after both have run (median of 5 blocks of ~0.2 s, interleaved).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import sys, time, torch
from torch.distributions import kl_divergence
from vmf_dists import HypersphericalUniform, VonMisesFisher
torch.set_num_threads(1)
dim, batch, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
loc = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
kappa = (torch.rand(batch) * 30).requires_grad_()
x = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)

def objective(loc, kappa, x):
    q = VonMisesFisher(loc, kappa)
    if name == "step":
        x = q.rsample()
    return q.log_prob(x).sum() + kl_divergence(q, HypersphericalUniform(dim)).sum()

start = time.perf_counter()
objective(loc, kappa, x).backward()
eager_first = time.perf_counter() - start
start = time.perf_counter()
objective(loc, kappa, x).backward()
eager = time.perf_counter() - start
compiled = torch.compile(objective, fullgraph=name != "step")
start = time.perf_counter()
compiled(loc, kappa, x).backward()
compile_time = time.perf_counter() - start
blocks = {objective: [], compiled: []}
for _ in range(5):
    for fn in blocks:
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.2:
            fn(loc, kappa, x).backward()
            calls += 1
        blocks[fn].append((time.perf_counter() - start) / calls)
steady = [sorted(times)[2] for times in blocks.values()]
print(f"{compile_time:.3f} {eager_first:.4f} {eager:.6f} {steady[0]:.6f} {steady[1]:.6f}")
"""


_OBJECTIVES = {"logprob_kl": "log_prob + KL to the uniform, fwd + bwd (`fullgraph=True`)",
               "step": "VAE step: rsample, log_prob + KL, fwd + bwd"}


def _run(cache_dir: str, dim: int, batch: int, name: str) -> list[float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(dim), str(batch), name], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return [float(value) for value in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16, help="dimension p (default 16)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    args = parser.parse_args()
    import torch  # only for the version line

    rows = []
    for name, label in _OBJECTIVES.items():
        with tempfile.TemporaryDirectory() as cache_dir:
            cold, eager_first, eager, steady_eager, steady_compiled = _run(cache_dir, args.dim, args.batch, name)
            warm = _run(cache_dir, args.dim, args.batch, name)[0]
        rows.append(f"| {label} | {cold:.1f} s | {warm:.1f} s | {eager_first * 1e3:.0f} ms | {eager * 1e3:.2f} ms "
                    f"| {steady_eager * 1e3:.3f} ms | {steady_compiled * 1e3:.3f} ms |")
    print(f"torch {torch.__version__}, p = {args.dim}, batch {args.batch}, one thread")
    print()
    print("| objective | compile, cold cache | compile, warm cache | eager, first call | eager, second call "
          "| eager, steady | compiled, steady |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n(whole run {time.perf_counter() - started:.0f} s)")
