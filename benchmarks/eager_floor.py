"""Benchmark: how close any eager-PyTorch vMF VAE step can come to torch's Normal — a lower bound, not a sampler.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eager_floor.py [--dims 3 10 64] [--batches 1 64 1024]
        [--rounds 7] [--block-seconds 0.05]

Issue #12 asks the step of `small_batch.py` (``z = q.rsample(); (q.log_prob(z).sum() +
KL(q ‖ U).sum()).backward()``, float32, one thread) to cost at most 2× torch's ``Normal``. Per ATen
operation the two cost about the same (~5 µs on the project's 2-core VM), so at small batch the ratio is
about the ratio of operation counts, and at batch 1024 the arithmetic of the random draws and of the
κ-gradient is added. This script measures what is left when everything that is not the algorithm is
taken away: the **floor** is the same step written with the fewest operations that the algorithms of
`vmf_dists` allow —

* the Bessel parts as one lookup of two columns of the real per-order table (`order_table`): no
  de-normalisation, no other part, no float64;
* w = μᵀx by the inverse CDF (p = 3) or one round of Wood's sampler with the library's number of
  proposals per sample (`first_round_proposals`), **assumed to accept** (no check, no later round);
* the direction from one projection of one Gaussian (no second projection, no clamping);
* the κ-gradient by the same 20-point Gauss–Legendre rule over the whole side of the implicit-function
  integral (no peak window), the loc-gradient by the hand-written map derivative, log_prob and the
  KL as one autograd node each with their derivatives;
* float32 throughout; no validation, no broadcasting, no caching, no second-derivative support.

Its values are **not** correct vMF values (the table columns are used un-normalised, the quadrature is
not accurate at large κ, the rejection step is skipped), so it bounds time only: any exact
implementation with these algorithms does at least this work, in eager mode, and every safeguard comes
on top. Prints a markdown table with the floor, ``vmf_dists`` and ``Normal`` timed in one run
(interleaved, median of ``--rounds`` blocks; see `small_batch.py`) and their ratios to ``Normal``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_batch import _fmt_ms, make_steps, ops_per_call, time_per_call  # noqa: E402

from vmf_dists._bessel_table import order_table  # noqa: E402
from vmf_dists._sampling import first_round_proposals  # noqa: E402


def _lookup(coefficients: torch.Tensor, exponents: torch.Tensor, kappa: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two interpolated table columns at κ: the operations of one table lookup, nothing else."""
    intervals = coefficients.shape[0]
    eta = torch.reciprocal(kappa + 1.0)
    s = eta * intervals
    index = s.to(torch.int64).clamp(0, intervals - 1)
    u = s - index
    values = (coefficients.index_select(0, index) * torch.pow(u.unsqueeze(-1), exponents).unsqueeze(-2)).sum(-1)
    return values.unbind(-1)


class _FloorSample(torch.autograd.Function):
    """x = w μ + √(1−w²) t/‖t‖ with w from the inverse CDF (p = 3) or one Wood round; hand-written backward."""

    @staticmethod
    def forward(ctx: Any, mu: torch.Tensor, kappa: torch.Tensor, one_minus_a: torch.Tensor,
                nodes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        batch, dim = mu.shape
        if dim == 3:
            uniform = torch.rand_like(kappa)
            y = torch.log1p(uniform * torch.expm1(-2.0 * kappa)).div(kappa).neg()
        else:
            m = dim - 1.0
            uniform = None
            two_kappa = 2.0 * kappa
            b = m / (two_kappa + torch.sqrt(two_kappa * two_kappa + m * m))
            constant = m * (two_kappa / (two_kappa + m / b + m) + torch.log1p(b))
            alpha = torch.full((batch, first_round_proposals(batch)), 0.5 * m)
            big, small = torch._standard_gamma(alpha), torch._standard_gamma(alpha)
            d = torch.addcmul(small, b.unsqueeze(-1), big)
            proposals = big * (2.0 * b).unsqueeze(-1) / d
            log_ratio = torch.addcmul(constant.unsqueeze(-1), kappa.unsqueeze(-1), proposals, value=-1.0)
            accepted = log_ratio.add(torch.log((big + small) / d), alpha=m) >= torch.rand_like(proposals).log()
            y = proposals.gather(-1, accepted.max(-1, keepdim=True)[1]).squeeze(-1)
        g = torch.randn(batch, dim)
        s = (g * mu).sum(-1)
        tangent = torch.addcmul(g, s.unsqueeze(-1), mu, value=-1.0)
        tangent_norm = torch.linalg.vector_norm(tangent, dim=-1)
        w = 1.0 - y
        rho = torch.sqrt(y * (2.0 - y))
        c = rho / tangent_norm
        ctx.save_for_backward(mu, kappa, one_minus_a, tangent, s, tangent_norm, y, w, rho, c, uniform, nodes, weights)
        return torch.addcmul(w.unsqueeze(-1) * mu, c.unsqueeze(-1), tangent)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mu, kappa, one_minus_a, tangent, s, tangent_norm, y, w, rho, c, uniform, nodes, weights = ctx.saved_tensors
        grad_mu_dot = (grad * mu).sum(-1)
        grad_v_dot = (grad * tangent).sum(-1) / tangent_norm
        if uniform is not None:  # p = 3: dy/dκ in closed form
            dy = torch.addcmul(y, uniform, torch.exp((y - 2.0) * kappa), value=-2.0).div(kappa).neg()
        else:  # the implicit-function integral over the side of θ, 20-point Gauss–Legendre, no window
            m = mu.shape[-1] - 2.0
            half_theta = torch.asin(torch.sqrt(0.5 * y))
            quarter = 0.5 * y * (1.0 - 0.5 * y)
            pole = y < one_minus_a
            lo = torch.where(pole, 0.0, half_theta)
            width = torch.where(pole, half_theta, 0.5 * math.pi) - lo
            sin_sq = torch.sin(torch.addcmul(lo, width, nodes)).square()
            log_integrand = torch.addcmul(kappa * y - 0.5 * m * torch.log(quarter), kappa, sin_sq, value=-2.0)
            log_integrand = log_integrand + 0.5 * m * torch.log(sin_sq - sin_sq * sin_sq)
            integrand = (sin_sq - 0.5 * one_minus_a) * log_integrand.exp()
            dy = (weights @ integrand).abs() * (torch.sqrt(quarter) * width) * -8.0
        grad_kappa = (w * dy / rho) * grad_v_dot - dy * grad_mu_dot
        alpha = c * (s * grad_v_dot / tangent_norm - grad_mu_dot)
        grad_mu = torch.addcmul(torch.addcmul(w.unsqueeze(-1) * grad, alpha.unsqueeze(-1), tangent),
                                (-w * grad_mu_dot).unsqueeze(-1), mu)
        return grad_mu, grad_kappa, None, None, None


class _FloorLogProb(torch.autograd.Function):
    """[log C + κ] − κ‖x − μ‖²/2 and its derivatives."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, mode: torch.Tensor,
                one_minus_a: torch.Tensor) -> torch.Tensor:
        diff = x - mu
        sq_dist = diff.square().sum(-1)
        ctx.save_for_backward(diff, kappa, sq_dist, one_minus_a)
        return torch.addcmul(mode, kappa, sq_dist, value=-0.5)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        diff, kappa, sq_dist, one_minus_a = ctx.saved_tensors
        scaled = (grad * kappa).unsqueeze(-1) * diff
        return -scaled, scaled, grad * torch.add(one_minus_a, sq_dist, alpha=-0.5), None, None


class _FloorKl(torch.autograd.Function):
    """KL(q ‖ U) = [log C + κ] − κ(1 − A) + log|S^{p−1}|, derivative κ A'(κ) = κ(1 − A² − (p−1)A/κ)."""

    @staticmethod
    def forward(ctx: Any, kappa: torch.Tensor, mode: torch.Tensor, one_minus_a: torch.Tensor,
                dim: int) -> torch.Tensor:
        ctx.save_for_backward(kappa, one_minus_a)
        ctx.dim = dim
        return torch.addcmul(mode, kappa, one_minus_a, value=-1.0).add(1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kappa, one_minus_a = ctx.saved_tensors
        a = 1.0 - one_minus_a
        return grad * (kappa * (1.0 - a * a) - (ctx.dim - 1.0) * a), None, None, None


def make_floor_step(dim: int, batch: int, seed: int = 0) -> Callable[[], None]:
    """The floor step on the same leaf parameters as `small_batch.make_steps` (same seed, float32)."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(batch, dim, generator=gen).requires_grad_()
    kappa = torch.exp(torch.rand(batch, generator=gen) * math.log(100.0)).requires_grad_()
    table = order_table(dim / 2.0 - 1.0, torch.device("cpu"))
    coefficients = table.coefficients[:, 1:3].float().contiguous()
    exponents = table.exponents.float()
    x, w = np.polynomial.legendre.leggauss(20)
    nodes = torch.tensor((x + 1.0) / 2.0, dtype=torch.float32).view(20, 1)
    weights = torch.tensor(w / 2.0, dtype=torch.float32)

    def floor() -> None:
        mu = loc / loc.norm(dim=-1, keepdim=True)
        mode, one_minus_a = _lookup(coefficients, exponents, kappa.detach())
        z = _FloorSample.apply(mu, kappa, one_minus_a, nodes, weights)
        loss = _FloorLogProb.apply(z, mu, kappa, mode, one_minus_a).sum() + _FloorKl.apply(
            kappa, mode, one_minus_a, dim).sum()
        loss.backward()

    return floor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--dims", type=int, nargs="+", default=[3, 10, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block-seconds", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, 1 thread; torch {torch.__version__}; "
          f"float32; median of {args.rounds} rounds")
    print()
    print("| p | batch | Normal | ops | floor | ops | vmf_dists | ops | floor/Normal | vmf_dists/Normal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for batch in args.batches:
            library = make_steps(dim, batch, torch.float32)
            steps = {"Normal": library["Normal"], "floor": make_floor_step(dim, batch),
                     "vmf_dists": library["vmf_dists"]}
            ops = {name: ops_per_call(step) for name, step in steps.items()}
            times = time_per_call(steps, args.rounds, args.block_seconds)
            cells = " | ".join(f"{_fmt_ms(times[name])} | {ops[name]}" for name in steps)
            print(f"| {dim} | {batch} | {cells} | {times['floor'] / times['Normal']:.2f} | "
                  f"{times['vmf_dists'] / times['Normal']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
