"""Benchmark: how long ``torch.compile`` takes for a vMF training objective, cold and warm.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compile_time.py [--dim 16] [--batch 32]

The objective is ``q.log_prob(x).sum() + KL(q ‖ HypersphericalUniform(p)).sum()`` with
``q = VonMisesFisher(loc, κ)``, compiled with ``torch.compile(fullgraph=True)`` (inductor, CPU) and run
forward and backward once. Each measurement is a fresh Python process:

* **cold**: an empty inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``), as on a new machine;
* **warm**: the same directory again, as on every later run on that machine.

The time is from the first call of the compiled function to the end of its backward (the compile
itself, code generation and one evaluation); two eager calls of the same objective are printed for scale
(the first builds the order's Bessel table and warms up the dispatcher).
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
dim, batch = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
loc = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
kappa = (torch.rand(batch) * 30).requires_grad_()
x = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)

def objective(loc, kappa, x):
    q = VonMisesFisher(loc, kappa)
    return q.log_prob(x).sum() + kl_divergence(q, HypersphericalUniform(dim)).sum()

start = time.perf_counter()
objective(loc, kappa, x).backward()
eager_first = time.perf_counter() - start
start = time.perf_counter()
objective(loc, kappa, x).backward()
eager = time.perf_counter() - start
compiled = torch.compile(objective, fullgraph=True)
start = time.perf_counter()
compiled(loc, kappa, x).backward()
print(f"{time.perf_counter() - start:.3f} {eager_first:.4f} {eager:.6f}")
"""


def _run(cache_dir: str, dim: int, batch: int) -> tuple[float, float, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(dim), str(batch)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16, help="dimension p (default 16)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    args = parser.parse_args()
    import torch  # only for the version line

    with tempfile.TemporaryDirectory() as cache_dir:
        cold, eager_first, eager = _run(cache_dir, args.dim, args.batch)
        warm, _, _ = _run(cache_dir, args.dim, args.batch)
    print(f"torch {torch.__version__}, p = {args.dim}, batch {args.batch}, one thread")
    print()
    print("| objective | compile, cold cache | compile, warm cache | eager, first call | eager, second call |")
    print("|---|---|---|---|---|")
    print(f"| log_prob + KL to the uniform, fwd + bwd | {cold:.1f} s | {warm:.1f} s | {eager_first * 1e3:.0f} ms "
          f"| {eager * 1e3:.2f} ms |")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n(whole run {time.perf_counter() - started:.0f} s)")
