"""Benchmark: VonMisesFisher.rsample against the Gaussian floor, scipy and the s-vae / reference sampler.

    .venv/bin/python benchmarks/sampling.py [--n 100000] [--device cpu] [--dims 3 128 512 2048]
                                            [--kappas 1 100 10000] [--repeats 3] [--no-scipy]

For each (p, κ) it draws n samples with

* floor: ``torch.randn(n, p)`` normalised to unit length — the cost of any sampler that needs an
  isotropic direction;
* ours: ``VonMisesFisher(μ, κ).rsample((n,))`` with parameters that need no gradient, and again with
  ``requires_grad`` on both parameters (the path a VAE or the dml loss takes);
* scipy: ``scipy.stats.vonmises_fisher(μ, κ).rvs(n)`` (float64, CPU);
* s-vae: a faithful vectorised port of the rejection sampler of s-vae-pytorch, which the reference
  code of Kirchhof et al. (ECCV 2022) also uses: Wood's algorithm with b blended into the large-κ
  approximation (p−1)/(4κ) for every κ > 10, 20 proposals per round, a host-synchronising while
  loop, and a Householder reflection from e₁ to μ; for p = 3 its exact inverse CDF. The port is
  ``benchmarks/svae.py`` (shared with ``benchmarks/small_batch.py``), an anchor only.

Bias is the z-score of the sample mean of μᵀx against A_p(κ) (|z| ≲ 3 for a correct sampler).
Prints a markdown table; ratios are to the floor measured in the same process.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svae import SvaeVonMisesFisher  # noqa: E402

from vmf_dists import VonMisesFisher, mean_resultant_length  # noqa: E402


def svae_sample(loc: torch.Tensor, kappa: float, n: int, proposals: int = 20) -> torch.Tensor:
    """n samples of vMF(loc, κ) by s-vae-pytorch's algorithm (the port in ``benchmarks/svae.py``), with
    ``proposals`` candidates per pending sample per round."""
    scale = torch.tensor([float(kappa)], dtype=loc.dtype, device=loc.device)
    with torch.no_grad():
        return SvaeVonMisesFisher(loc, scale, proposals=proposals).rsample((n,))


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    out = fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def bias_z(x: torch.Tensor, loc: torch.Tensor, dim: int, kappa: float) -> float:
    w = (x.double() @ loc.double()).cpu()
    target = mean_resultant_length(dim, torch.tensor(kappa, dtype=torch.float64)).item()
    se = w.std().item() / math.sqrt(w.numel())
    return (w.mean().item() - target) / se if se > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 128, 512, 2048])
    parser.add_argument("--kappas", type=float, nargs="+", default=[1.0, 100.0, 1e4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-scipy", action="store_true", help="skip scipy (slow at high p)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)  # scipy is single-threaded: compare like with like
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 thread"
    print(f"device: {name}; torch {torch.__version__}, scipy {scipy.__version__}; n = {args.n}, {args.dtype}, "
          f"best of {args.repeats}")
    print()
    print("| p | κ | floor | ours | ours/floor | ours, grad | grad/floor | scipy | scipy/ours | s-vae | s-vae/ours | "
          "bias z: ours | scipy | s-vae |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for dim in args.dims:
        loc = torch.randn(dim, dtype=dtype, device=device)
        loc = loc / loc.norm()
        for kappa in args.kappas:
            def floor(dim=dim):
                g = torch.randn(args.n, dim, dtype=dtype, device=device)
                return g / torch.linalg.vector_norm(g, dim=-1, keepdim=True)

            dist = VonMisesFisher(loc, torch.tensor(kappa, dtype=dtype, device=device))
            loc_g = loc.clone().requires_grad_(True)
            kappa_g = torch.tensor(kappa, dtype=dtype, device=device, requires_grad=True)

            def ours_grad(loc_g=loc_g, kappa_g=kappa_g):
                return VonMisesFisher(loc_g, kappa_g, validate_args=False).rsample((args.n,))

            t_floor, _ = timed(floor, args.repeats, sync)
            t_ours, x_ours = timed(lambda dist=dist: dist.rsample((args.n,)), args.repeats, sync)
            t_grad, _ = timed(ours_grad, args.repeats, sync)
            t_svae, x_svae = timed(lambda loc=loc, kappa=kappa: svae_sample(loc, kappa, args.n), args.repeats, sync)
            if args.no_scipy:
                t_scipy, z_scipy = math.nan, math.nan
            else:
                mu_np = loc.double().cpu().numpy()
                vmf = scipy.stats.vonmises_fisher(mu_np, kappa)
                start = time.perf_counter()
                x_scipy = vmf.rvs(args.n, random_state=np.random.default_rng(0))
                t_scipy = time.perf_counter() - start
                z_scipy = bias_z(torch.from_numpy(np.asarray(x_scipy)), loc.double().cpu(), dim, kappa)
            z_ours = bias_z(x_ours, loc, dim, kappa)
            z_svae = bias_z(x_svae, loc, dim, kappa)
            scipy_cells = "– | – " if args.no_scipy else f"{t_scipy * 1e3:.0f} ms | {t_scipy / t_ours:.0f}× "
            z_scipy_cell = "–" if args.no_scipy else f"{z_scipy:+.1f}"
            print(
                f"| {dim} | {kappa:g} | {t_floor * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | {t_ours / t_floor:.2f} | "
                f"{t_grad * 1e3:.1f} ms | {t_grad / t_floor:.2f} | {scipy_cells}| "
                f"{t_svae * 1e3:.1f} ms | {t_svae / t_ours:.1f}× | {z_ours:+.1f} | {z_scipy_cell} | {z_svae:+.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
