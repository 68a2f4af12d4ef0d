"""Benchmark: vmf_log_normalizer + backward vs scipy's ive-based log normaliser.

    .venv/bin/python benchmarks/special.py [--n 1000000] [--repeats 5] [--device cpu]

For each dimension p it times, on the same n concentrations (log-uniform in [1e-2, 1e4]):

* ours: ``vmf_log_normalizer(p, κ)`` forward + backward (the gradient is −A_p(κ)), float64 and float32;
* scipy: log C_p(κ) = ν log κ − (p/2) log 2π − log(ive(ν, κ)) − κ and its gradient
  −ive(ν+1, κ)/ive(ν, κ) (two `scipy.special.ive` calls), float64.

It then scans a (p, κ) grid for scipy's failure region: where its value or gradient is not finite
(ive underflows to 0 at high order and small κ), while ours stays finite. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import scipy
import scipy.special
import torch

from vmf_dists.special import vmf_log_normalizer


def scipy_log_normalizer_and_grad(dim: int, kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nu = dim / 2.0 - 1.0
    with np.errstate(all="ignore"):
        ive_nu = scipy.special.ive(nu, kappa)
        ive_next = scipy.special.ive(nu + 1.0, kappa)
        value = nu * np.log(kappa) - 0.5 * dim * math.log(2 * math.pi) - np.log(ive_nu) - kappa
        grad = -ive_next / ive_nu
    return value, grad


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_ours(dim: int, kappa: np.ndarray, dtype: torch.dtype, device: str, repeats: int) -> float:
    base = torch.tensor(kappa, dtype=dtype, device=device)

    def run():
        k = base.detach().requires_grad_(True)
        vmf_log_normalizer(dim, k, validate_args=False).sum().backward()
        if device != "cpu":
            torch.cuda.synchronize()
        return k.grad

    return best_time(run, repeats)


def failure_region(dims: list[int]) -> list[str]:
    rows = []
    kappas = np.array([0.0] + [10.0**e for e in range(-8, 9)])
    for dim in dims:
        value, grad = scipy_log_normalizer_and_grad(dim, kappas)
        bad = kappas[~(np.isfinite(value) & np.isfinite(grad))]
        ours = vmf_log_normalizer(dim, torch.tensor(kappas, dtype=torch.float64))
        ours_ok = bool(torch.isfinite(ours).all())
        where = ", ".join(f"{k:g}" for k in bad) if bad.size else "none"
        rows.append(f"| {dim} | {where} | {'all finite' if ours_ok else 'NOT FINITE'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # scipy is single-threaded: compare like with like

    rng = np.random.default_rng(0)
    kappa = 10.0 ** rng.uniform(-2.0, 4.0, size=args.n)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"scipy {scipy.__version__}; device {args.device}; n = {args.n:.0e}, κ log-uniform in [1e-2, 1e4], "
          f"best of {args.repeats}{', 1 torch thread' if args.device == 'cpu' else ''}")
    print()
    print("| p | scipy ive (f64) value+grad | ours f64 fwd+bwd | ours f32 fwd+bwd | scipy / ours f64 | "
          "scipy non-finite |")
    print("|---|---|---|---|---|---|")
    for dim in args.dims:
        t_scipy = best_time(lambda dim=dim: scipy_log_normalizer_and_grad(dim, kappa), args.repeats)
        value, grad = scipy_log_normalizer_and_grad(dim, kappa)
        nonfinite = float(np.mean(~(np.isfinite(value) & np.isfinite(grad))))
        t64 = time_ours(dim, kappa, torch.float64, args.device, args.repeats)
        t32 = time_ours(dim, kappa, torch.float32, args.device, args.repeats)
        print(f"| {dim} | {t_scipy * 1e3:.0f} ms | {t64 * 1e3:.0f} ms | {t32 * 1e3:.0f} ms | "
              f"{t_scipy / t64:.2f}× | {100 * nonfinite:.1f}% |")
    print()
    print("scipy's failure region (κ where its value or gradient is not finite) on κ ∈ {0, 1e-8, …, 1e8}:")
    print()
    print("| p | scipy not finite at κ = | ours |")
    print("|---|---|---|")
    for row in failure_region([2, 3, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]):
        print(row)


if __name__ == "__main__":
    main()
