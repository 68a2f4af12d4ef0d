"""Exact sampling of the vMF and its implicit reparameterisation gradient.

A sample is x = w μ + √(1−w²) v with w = μᵀx drawn from its marginal
f(w) ∝ e^{κw} (1−w²)^{(p−3)/2} on [−1, 1] and v uniform on the unit sphere of the tangent space at μ.
Everything about w is carried as y = 1 − w ∈ [0, 2], which keeps relative precision when the sample
is close to μ (at κ = 1e8, y ≈ 1e-8 while w rounds to 1 in float32 and loses half its digits in
float64); √(1−w²) = √(y(2−y)).

* p = 3: exact inverse CDF, y = −log1p((1−u)(e^{−2κ}−1))/κ (differentiable in κ as it stands).
* every other p: Wood (1994)'s rejection sampler in a form that never cancels:
  b = (p−1)/(2κ + √(4κ² + (p−1)²)), x₀ = (1−b)/(1+b), Beta proposal z = g₁/(g₁+g₂) from two
  Gamma((p−1)/2) draws, y = 2bz/(1−(1−b)z) = 2b g₁/(g₂ + b g₁), accepted when
  2κb/(1+b) − κy + (p−1)[log1p((1−b)y/(2b)) − log1p(x₀)] ≥ log u (see `_wood_accept`), which is
  Wood's test κw + (p−1)log(1−x₀w) − c ≥ log u rewritten without differences of nearby numbers. Its acceptance
  rate is at least 0.65 for every p and κ (measured; ≈ 1 for κ ≲ p). Unless a gradient in μ is
  needed, the first proposal of every sample costs nothing: the Gaussian g drawn for the direction
  gives z = (1 + μᵀg/‖g‖)/2, which is Beta((p−1)/2, (p−1)/2) and independent of the tangent direction
  of g. (With a μ-gradient this reuse would make the noise depend on μ and bias that gradient, so
  the proposals are then drawn from Gamma variates, `first_round_proposals(n)` per sample: with
  acceptance ≳ 0.69 per proposal for p ≥ 4 (≳ 0.66 at p = 2), 8 of them leave a second round to
  ~1e-4 of the samples, which keeps small batches at one round (a round costs ~25 tensor operations,
  16 Gamma draws per sample cost less); large batches take fewer, where the draws rather than a
  second round on the few rejected samples are the cost.) The rejected samples are finished with
  `LATER_ROUND_PROPOSALS` Gamma-based proposals per sample per round: compacted after every round on
  the CPU, masked blocks of rounds with one host synchronisation per block on accelerators. Under
  torch.compile (`_wood_compiled`) there is no host check: the proposals come from uniforms (Ulrich's
  form of the symmetric Beta, fused into the compiled kernel), a second round runs on a fixed number of
  rows, the pending ones first, and the call raises in the (< 3e-15 per pending sample) case that this
  did not finish.
* The gradient dy/dκ is implicit (Figurnov et al., 2018): with the angle θ = arccos(w),
  dθ/dκ = −∫₀^θ (cos φ − A_p(κ)) e^{κ(cos φ − cos θ)} (sin φ / sin θ)^{p−2} dφ and dy/dκ = sin θ · dθ/dκ,
  or the same integral over [θ, π] with the opposite sign (the two add to zero): we take the side on
  which cos φ − A_p(κ) keeps its sign, so nothing cancels. The integrand is log-concave around the
  mode of the angle density, cos φ_m = 2κ / (p−2 + √((p−2)² + 4κ²)), so 20-point Gauss–Legendre on a
  window of ±8 Gaussian widths around its peak (clipped to the side) is accurate to ~1e-9 relative
  (measured against a 400-point rule; the tests check 1e-6 against mpmath).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import torch

from vmf_dists._bessel_table import bessel_parts
from vmf_dists._function import Refuse, RefuseWithoutJvp, apply, untraced


def first_round_proposals(n: int) -> int:
    """Proposals per sample in the first round of `sample_one_minus_w` (which has no Gaussian to reuse)."""
    return 8 if n <= 128 else 4 if n < 512 else 2


LATER_ROUND_PROPOSALS = 4
MAX_ROUNDS = 64
_QUADRATURE_NODES = 20
_WINDOW_SDS = 8.0
_WINDOW_NATS = 40.0


# --------------------------------------------------------------------------------------------------
# y = 1 − w


def _expm1_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """e^x − 1 for x ≤ 0 with relative precision. Under torch.compile as 2τ/(1 − τ), τ = tanh(x/2): inductor's
    vectorised CPU code lowers expm1 to exp(x) − 1 (pytorch/pytorch#189803, fixed after torch 2.13), which
    is 0 for |x| < 2⁻⁵⁴ and inaccurate up to |x| ~ 1e-8 (at p = 3 every sample would be μ at κ = 0)."""
    if torch.compiler.is_compiling():
        tau = torch.tanh(x * 0.5)
        return 2.0 * tau / (1.0 - tau)
    return torch.expm1(x)


def _inverse_cdf_p3(kappa: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """y = 1 − w for p = 3 from u ∈ [0, 1): w = 1 + log(1 − u(1 − e^{−2κ}))/κ (u = 0 ↦ w = 1).

    y = −log1p(u expm1(−2κ))/κ keeps relative precision down to κ = 1e-300 (there it is 2u, the κ = 0
    law, to every digit), so κ is floored there rather than special-cased; its κ-derivative is
    `_d_inverse_cdf_p3`.
    """
    kappa = kappa.clamp(min=1e-300)
    return torch.log1p(uniform * _expm1_nonpositive(-2.0 * kappa)).div_(kappa).neg_()


def _d_inverse_cdf_p3(kappa: torch.Tensor, uniform: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy/dκ of `_inverse_cdf_p3` at fixed u: (2u e^{−κ(2−y)} − y)/κ (as 1 − u(1 − e^{−2κ}) = e^{−κy}: no
    underflow of e^{−2κ} in the far tail), and below κ = 1e-5 its series −2u(1−u) + (8/3)u(1−u)(1−2u)κ
    (error O(κ²), where the closed form cancels)."""
    small = kappa < 1e-5
    safe_kappa = torch.where(small, 1.0, kappa)
    decay = torch.exp((y - 2.0).mul_(safe_kappa))
    closed = torch.addcmul(y, uniform, decay, value=-2.0).div_(safe_kappa).neg_()
    series = torch.addcmul(kappa, kappa, uniform, value=-2.0).mul_(8.0 / 3.0).sub_(2.0)  # (8/3)κ(1 − 2u) − 2
    series = series.mul_(torch.addcmul(uniform, uniform, uniform, value=-1.0))  # × u(1 − u)
    return torch.where(small, series, closed)


def _wood_accept(
    dim: int, kappa: torch.Tensor, big: torch.Tensor, small: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wood's proposal y from a Beta variate z = big/(big+small) (given as its two parts) and the test.

    With m = p − 1, h = √(4κ² + m²) (a hypot: no overflow up to κ ~ 1e307), b = m/(2κ + h),
    x₀ = (1−b)/(1+b) and D = small + b·big: y = 2b·big/D, and Wood's test
    κw + m log(1 − x₀w) − c ≥ log u becomes, without differences of nearby numbers,

        m [2κ/(2κ + h + m) + log1p(b) + log((small + big)/D)] − κy − m log 2 ≥ log u.

    Returns (y, accepted); shapes broadcast between κ and the parts. (Per-κ terms first, then the few
    per-proposal operations: at small batch the operation count is the cost.)
    """
    m = float(dim - 1)
    two_kappa = 2.0 * kappa
    denominator = two_kappa + torch.hypot(two_kappa, torch.full_like(kappa, m))
    b = torch.reciprocal(denominator).mul_(m)
    constant = torch.div(two_kappa, denominator + m).add_(torch.log1p(b)).mul_(m)
    d = torch.addcmul(small, b, big)
    y = torch.mul(big, b + b).div_(d)
    log_ratio = torch.addcmul(constant, kappa, y, value=-1.0).add_(torch.log((small + big).div_(d)), alpha=m)
    accepted = log_ratio.sub_(m * math.log(2.0)) >= torch.rand_like(y).log_()
    return y, accepted


def _wood_round(dim: int, kappa: torch.Tensor, proposals: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of Wood's sampler with `proposals` candidates per element: (y, accepted). The candidates
    come from Gamma draws, and under torch.compile from uniforms (`_symmetric_beta_parts`), which inductor
    fuses into its kernel (it calls out to eager code for Gamma draws)."""
    if torch.compiler.is_compiling():
        # proposals along a leading dimension: inductor vectorises the contiguous batch dimension (with
        # them last, its fused kernel runs the transcendental functions one element at a time, ~4× slower)
        lead = (proposals,) + kappa.shape
        u = torch.rand(lead, dtype=kappa.dtype, device=kappa.device)
        v = torch.rand(lead, dtype=kappa.dtype, device=kappa.device)
        y, accepted = _wood_accept(dim, kappa, *_symmetric_beta_parts(dim, u, v))
        # uint8, not bool: inductor's C++ for a max over bool does not build (torch 2.13)
        any_accepted, first = accepted.to(torch.uint8).max(dim=0, keepdim=True)
        return y.gather(0, first).squeeze(0), any_accepted.squeeze(0).bool()
    alpha = torch.full(kappa.shape + (proposals,), 0.5 * (dim - 1), dtype=kappa.dtype, device=kappa.device)
    y, accepted = _wood_accept(dim, kappa.unsqueeze(-1), torch._standard_gamma(alpha), torch._standard_gamma(alpha))
    any_accepted, first = accepted.max(dim=-1, keepdim=True)  # the first accepted proposal (True > False)
    return y.gather(-1, first).squeeze(-1), any_accepted.squeeze(-1)


_MASKED_ROUNDS = 6  # on accelerators: rounds run on the full tensor between two host synchronisations


def _compacts_rows(device: torch.device) -> bool:
    """Whether rejected rows are compacted after every round (CPU) or finished in masked blocks
    (accelerators). (Under torch.compile `_wood_compiled` runs instead.)"""
    return device.type == "cpu"


def _finish_rejected(dim: int, kappa: torch.Tensor, y: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """Fill the rows not `done` with further rounds (flat float64 tensors).

    On the CPU, where a host synchronisation is free, the pending rows are compacted after every round
    (least work). On other devices the rounds run masked on the full tensor, `_MASKED_ROUNDS` at a
    time, with one synchronisation per block: after the first (free) round at most ~35% of the rows are
    pending, and each later round leaves at most 0.343⁴ ≈ 1.4% of those, so one block almost always
    suffices (two synchronisations per call in all: the first check and the block's).
    """
    if bool(done.all()):  # the common case: every row accepted in the first round
        return y
    if not _compacts_rows(y.device):
        for _ in range(MAX_ROUNDS // _MASKED_ROUNDS):
            for _ in range(_MASKED_ROUNDS):
                y_new, ok = _wood_round(dim, kappa, LATER_ROUND_PROPOSALS)
                y = torch.where(ok & ~done, y_new, y)
                done = done | ok
            if bool(done.all()):
                return y
        pending_kappa = kappa[~done]
    else:
        pending = torch.nonzero(~done).squeeze(-1)
        for _ in range(MAX_ROUNDS):
            y_new, ok = _wood_round(dim, kappa[pending], LATER_ROUND_PROPOSALS)
            y[pending[ok]] = y_new[ok]
            pending = pending[~ok]
            if pending.numel() == 0:
                return y
        pending_kappa = kappa[pending]
    raise RuntimeError(
        f"vMF rejection sampler did not finish in {MAX_ROUNDS} rounds (dim={dim}, concentrations of the pending "
        f"samples from {pending_kappa.min().item():g} to {pending_kappa.max().item():g}); please report this"
    )


def _symmetric_beta_parts(dim: int, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Beta((p−1)/2, (p−1)/2) variate z = big/(big + small) from two uniforms, for compiled code.

    Ulrich (1984): z = (1 + t)/2 with t = √(1 − u^{2/(p−2)}) cos 2πv (for p = 2, t = cos 2πv); t < 0 for
    v ≥ ½ here (cos 2πv is replaced by a variable of the same law, ±sin(π(1 − f)/2)). The parts are
    1 ± t, the smaller formed as (1 − t²)/(the larger) with 1 − t² = sin²2πv + u^{2/(p−2)} cos²2πv, so
    that it keeps its relative precision as z → 0 or 1 (where the samples near the mode come from); both
    are within a few ulp of exact for every u, v (tests/test_sampling.py).
    """
    # |cos 2πv| and |sin 2πv| from a first-quadrant angle πf/2, f = 2v mod 1 (exact), each as a sine of a
    # small argument where it is small (no rounding of an angle near π/2 or π); the sign from v < ½
    negative = v >= 0.5
    f = torch.where(negative, v * 2.0 - 1.0, v * 2.0)
    cos, sin = torch.sin((1.0 - f) * (0.5 * math.pi)), torch.sin(f * (0.5 * math.pi))
    if dim == 2:
        power, complement = torch.zeros_like(u), torch.ones_like(u)
    else:  # u^e, and 1 − u^e as −expm1(e log u), which does not cancel as u^e → 1
        exponent = 2.0 / (dim - 2)
        power, complement = u.pow(exponent), -_expm1_nonpositive(torch.log(u) * exponent)
    larger = 1.0 + torch.sqrt(complement) * cos  # 1 + |t|
    smaller = (sin * sin + power * cos * cos) / larger  # 1 − |t| = (1 − t²)/(1 + |t|)
    return torch.where(negative, smaller, larger), torch.where(negative, larger, smaller)


#: Proposals per pending sample in the second stage of `_wood_compiled`: each is left without an accepted
#: one with probability < 0.35³² ≈ 3e-15.
COMPILED_SECOND_PROPOSALS = 32


def _second_stage_capacity(n: int, proposals: int) -> int:
    """Rows the second stage of `_wood_compiled` takes: more than that many of n are left pending by a first
    round of ``proposals`` (8 or 4) per sample, each accepted with probability ≥ 0.65, with probability
    < 1e-16 for every n (the binomial tail, evaluated for n ≤ 400 and at 13 sizes up to 1e8: ≤ 3e-17)."""
    mean = n * 0.35**proposals
    return min(n, math.ceil(mean + 10.0 * math.sqrt(mean) + 6.0))


def _wood_compiled(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    """y for every element of a flat float64 ``kappa`` without a host synchronisation: the form for torch.compile.

    Compiled code cannot branch on whether every sample was accepted without splitting the graph (a split
    in the sampler becomes one in every caller's frame: ~10 graphs per VAE step) nor compact the pending
    rows (a data-dependent shape). So: a first round of 8 (n ≤ 128) or 4 proposals, then a second round of
    `COMPILED_SECOND_PROPOSALS` proposals for a fixed number of rows, the pending ones first (by ``topk``
    of the pending flag; `_second_stage_capacity` of them, enough with probability > 1 − 1e-16). If the
    pending rows did not fit (< 1e-16) or one of them is still pending (< 3e-15 each), the call raises
    (``torch._assert_async``: a RuntimeError on the CPU, a device-side assert on CUDA, which ends the
    process's CUDA context) instead of returning it.
    """
    n = kappa.numel()
    first = 8 if n <= 128 else 4  # a wider first round than eagerly: its arithmetic is fused, not its count
    y, done = _wood_round(dim, kappa, first)
    capacity = _second_stage_capacity(n, first)
    pending = ~done
    _, rows = torch.topk(pending.to(kappa.dtype), capacity)
    y_rows, accepted = _wood_round(dim, kappa[rows], COMPILED_SECOND_PROPOSALS)
    filled = pending[rows]
    y = y.scatter(0, rows, torch.where(filled, y_rows, y[rows]))
    finished = (pending.sum() <= capacity) & (accepted | ~filled).all()
    torch._assert_async(finished, f"vMF rejection sampler (compiled, dim={dim}): a sample had no accepted proposal "
                        "(probability < 3e-15 per sample); please report this")
    return y


def sample_one_minus_w(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    """Draw y = 1 − μᵀx for x ~ vMF(μ, κ) on S^{dim−1}, one per element of ``kappa`` (float64, no grad)."""
    if kappa.requires_grad or kappa.dtype != torch.float64:
        kappa = kappa.detach().to(torch.float64)
    if dim == 3:
        return _inverse_cdf_p3(kappa, torch.rand_like(kappa))
    flat = kappa if kappa.dim() == 1 else kappa.reshape(-1)
    if torch.compiler.is_compiling():
        y = _wood_compiled(dim, flat)
    else:
        y, done = _wood_round(dim, flat, first_round_proposals(flat.numel()))
        y = _finish_rejected(dim, flat, y, done)
    return y if kappa.dim() == 1 else y.reshape(kappa.shape)


# --------------------------------------------------------------------------------------------------
# implicit reparameterisation: dy/dκ


def _legendre_rule(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """n-point Gauss–Legendre nodes and weights on [0, 1] as Python floats, which compiled code takes as
    constants (numpy arrays would be guarded by converting them on every call)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(((nodes + 1.0) / 2.0).tolist()), tuple((weights / 2.0).tolist())


_LEGENDRE_NODES, _LEGENDRE_WEIGHTS = _legendre_rule(_QUADRATURE_NODES)


def _gauss_legendre(device: torch.device, batch_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_QUADRATURE_NODES`-point Gauss–Legendre nodes (shape [n, 1, …, 1], ``batch_dims`` ones) and weights
    ([n]) on [0, 1] (float64), cached per device: the training step's backward then never copies them from
    the host (a copy that would wait for the GPU), and the nodes broadcast against a batch without
    reshaping it. Under torch.compile they are graph constants instead (Dynamo cannot trace a cache)."""
    if torch.compiler.is_compiling():
        return _legendre_tensors(device, batch_dims)
    return _cached_legendre_tensors(device, batch_dims)


def _legendre_tensors(device: torch.device, batch_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (_QUADRATURE_NODES,) + (1,) * batch_dims
    return (torch.tensor(_LEGENDRE_NODES, dtype=torch.float64, device=device).view(shape),
            torch.tensor(_LEGENDRE_WEIGHTS, dtype=torch.float64, device=device))


@cache
def _cached_legendre_tensors(device: torch.device, batch_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    with untraced():  # normal tensors even if the first call is under inference mode or a trace
        return _legendre_tensors(device, batch_dims)


def d_one_minus_w_d_kappa(
    dim: int, kappa: torch.Tensor, y: torch.Tensor, one_minus_a: torch.Tensor | None = None
) -> torch.Tensor:
    """dy/dκ at fixed CDF value, for y = 1 − w, by quadrature of the implicit-function formula (float64).

    With the angle θ = arccos w and m = p − 2, ∂F/∂κ = ∫_{−1}^{w} (t − A) f(t) dt = −∫_w^1 (t − A) f(t) dt,
    so (A = cos φ_A)

        dy/dκ = −sin θ ∫_0^θ (cos φ − A) e^{κ(cos φ − cos θ)} (sin φ / sin θ)^m dφ      (θ < φ_A)
              = +sin θ ∫_θ^π (cos φ − A) e^{κ(cos φ − cos θ)} (sin φ / sin θ)^m dφ      (θ ≥ φ_A),

    each the side on which cos φ − A keeps its sign, so nothing cancels; both are ≤ 0 (w grows with κ
    at a fixed CDF value), so the result is −sin θ |∫ …| on either side. `_QUADRATURE_NODES`-point
    Gauss–Legendre on the part of that side within `_WINDOW_SDS` Gaussian widths of the integrand's
    peak (for p = 2, where e^{κ cos φ} is not Gaussian far out, up to where it has dropped by
    `_WINDOW_NATS`): relative error ≲ 1e-9. In place only where no derivative needs the overwritten value,
    so that it can itself be differentiated. The nodes run along a new leading dimension, so that the
    per-sample quantities broadcast against them without reshaping (a VAE's batch is small: the
    operation count, not the arithmetic, is the cost). ``kappa``, ``y`` and ``one_minus_a`` (1 − A_p(κ)
    if already known, e.g. the distribution's cached Bessel parts) have the same shape.
    """
    kappa = kappa.to(torch.float64)
    y = y.to(torch.float64)
    m = float(dim - 2)
    if one_minus_a is None:  # 1 − A keeps its digits at large κ
        one_minus_a = bessel_parts(dim / 2.0 - 1.0, kappa, complement=True).complement
        assert one_minus_a is not None
    else:
        one_minus_a = one_minus_a.to(torch.float64)
    # in half-angles ψ = φ/2 ∈ [0, π/2], where 1 − cos φ = 2 sin²ψ and sin φ = 2 sin ψ cos ψ
    half_y = 0.5 * y  # sin²(θ/2), y ∈ [0, 2]
    half_theta = torch.asin(torch.sqrt(half_y))
    quarter = torch.addcmul(half_y, half_y, half_y, value=-1.0)  # sin²(θ/2) cos²(θ/2) = sin²θ / 4
    pole = y < one_minus_a  # θ < φ_A: integrate over [0, θ], else over [θ, π]
    if m > 0:
        # The integrand's peak within the side, and its reach: the mode φ_m of e^{κ cos φ} sin^m φ has
        # cos φ_m = 2κ/(m + h), h = √(m² + 4κ²), and curvature h there; its tails fall off at about
        # half that curvature (at large κ the e^{κ cos φ} part alone), so the window is ±K·√(2/h).
        two_kappa = 2.0 * kappa
        h = torch.hypot(two_kappa, torch.full_like(kappa, m))
        half_mode = torch.acos(two_kappa / (h + m)).mul_(0.5)
        reach = torch.rsqrt(h) * (0.5 * _WINDOW_SDS * math.sqrt(2.0))
        start = torch.where(pole, 0.0, half_theta)
        end = torch.where(pole, half_theta, 0.5 * math.pi)
        peak = torch.clamp(half_mode, min=start, max=end)
        lo = torch.clamp(peak - reach, min=start)
        hi = torch.clamp(peak + reach, max=end)
    else:  # e^{κ cos φ}: up to where it has dropped by _WINDOW_NATS from its maximum on the side
        drop = _WINDOW_NATS / kappa
        lo = torch.where(pole, 0.0, half_theta)
        hi = 0.5 * torch.where(pole, torch.minimum(2.0 * half_theta, torch.acos((1.0 - drop).clamp(min=-1.0))),
                               torch.acos((1.0 - y - drop).clamp(min=-1.0)))

    nodes, weights = _gauss_legendre(y.device, y.dim())
    width = hi - lo
    sin_sq = torch.sin(torch.addcmul(lo, width, nodes)).square()  # sin²ψ, shape [nodes, *y.shape]
    # log of e^{κ(cos φ − cos θ)} (sin φ / sin θ)^m = κy − 2κ sin²ψ + (m/2) log(sin²ψ cos²ψ / (sin²θ/4))
    if m > 0:
        offset = torch.add(kappa * y, torch.log(quarter), alpha=-0.5 * m)
        log_integrand = torch.addcmul(offset, kappa, sin_sq, value=-2.0)
        log_integrand.add_(torch.log(torch.addcmul(sin_sq, sin_sq, sin_sq, value=-1.0)), alpha=0.5 * m)
    else:
        log_integrand = torch.addcmul(kappa * y, kappa, sin_sq, value=-2.0)
    # (A − cos φ)/2 = sin²ψ − (1 − A)/2; the factors 2 (here), 2 (dφ = 2 dψ) and 2 (sin θ = 2√quarter) make 8
    integrand = torch.sub(sin_sq, one_minus_a, alpha=0.5).mul_(log_integrand.exp_())
    integral = weights @ integrand if integrand.dim() <= 2 else torch.tensordot(weights, integrand, dims=1)
    return integral.abs().mul_((torch.sqrt(quarter) * width).mul_(-8.0))


def _map_weights(
    y: torch.Tensor, tangent_norm: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, ρ, c) = (1 − y, √(y(2−y)), ρ/‖t‖) of the sample map x = w μ + c t, from float64 y, in ``dtype``."""
    w = torch.rsub(y, 1.0).to(dtype)
    rho = torch.sqrt(torch.rsub(y, 2.0).mul_(y)).to(dtype)
    return w, rho, rho / tangent_norm


class SampleMap(torch.autograd.Function):
    r"""The vMF sample as a function of (loc, κ) at fixed noise, with a hand-written backward.

    x = (1 − y) μ + √(y(2−y)) t/‖t‖ with μ = loc/‖loc‖ and t = g − (μᵀg)μ for a Gaussian g; y = 1 − w
    depends on κ (at fixed CDF value, i.e. implicitly; for p = 3 through the inverse CDF at fixed u). The
    inputs are the precomputed pieces: ``mu`` and ``loc_norm`` (no gradient), ``direction`` is t
    (``projected``) or g, ``s`` = μᵀg and ``tangent_norm`` = ‖t‖. With w = 1 − y, ρ = √(y(2−y)),
    c = ρ/‖t‖, v = t/‖t‖ and the incoming gradient G:

    * ∂L/∂κ = (−Gᵀμ + (w/ρ) Gᵀv) dy/dκ   (dρ/dy = w/ρ);
    * ∂L/∂μ = w G − c[(Gᵀμ) g + s (G − (Gᵀv) v)]   (dv = −[(gᵀdμ)μ + s(I − vvᵀ)dμ]/‖t‖), and
      ∂L/∂loc = (I − μμᵀ) ∂L/∂μ / ‖loc‖ = [(w − cs)(G − (Gᵀμ)μ) + c(s Gᵀv/‖t‖ − Gᵀμ) t] / ‖loc‖.

    One autograd node instead of ~25 (and their ~50 backward operations), the normalisation of loc
    included. The second to fourth outputs (w, ρ, c in the sample's dtype) are for the backward only.
    Second derivatives in loc (and in the incoming gradient) are exact: the map is rebuilt from its noise
    with differentiable operations; one in κ (it would need d²y/dκ²) raises when it is taken.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        loc: torch.Tensor,
        kappa: torch.Tensor,
        mu: torch.Tensor,
        loc_norm: torch.Tensor,
        direction: torch.Tensor,
        s: torch.Tensor,
        tangent_norm: torch.Tensor,
        y: torch.Tensor,
        dim: int,
        projected: bool,
        one_minus_a: torch.Tensor | None,
        uniform: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        w, rho, c = _map_weights(y, tangent_norm, mu.dtype)
        shift = w if projected else torch.addcmul(w, c, s, value=-1.0)  # x = c g + (w − c s) μ
        return torch.addcmul(shift.unsqueeze(-1) * mu, c.unsqueeze(-1), direction), w, rho, c

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        loc, kappa, mu, loc_norm, direction, s, tangent_norm, y, dim, projected, one_minus_a, uniform = inputs
        _, w, rho, c = output
        ctx.mark_non_differentiable(w, rho, c)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(loc, kappa, mu, loc_norm, direction, s, tangent_norm, y, w, rho, c, one_minus_a,
                              uniform)
        ctx.dim, ctx.projected = dim, projected

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        if grad is None:  # only the non-differentiable outputs were used (gradients are not materialised)
            return (None,) * 12
        loc, kappa, mu, loc_norm, direction, s, tangent_norm, y, w, rho, c, one_minus_a, uniform = ctx.saved_tensors
        need_loc, need_kappa = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph: exact in loc and G, refused in κ (see _graph_gradients)
            return SampleMap._graph_gradients(ctx, grad, need_loc, need_kappa) + (None,) * 10
        grad_mu_dot = (grad * mu).sum(-1)  # Gᵀμ
        grad_dir_dot = (grad * direction).sum(-1)  # Gᵀt or Gᵀg
        grad_v_dot = (
            grad_dir_dot if ctx.projected else torch.addcmul(grad_dir_dot, s, grad_mu_dot, value=-1.0)
        ) / tangent_norm
        grad_kappa = grad_loc = None
        if need_kappa:
            dy = SampleMap._dy_dkappa(ctx, kappa, y, one_minus_a, uniform).to(mu.dtype)
            # (w/ρ)·dy/dκ → 0 as ρ → 0 (dy/dκ vanishes with y); ρ is clamped so that 0/0 does not occur
            ratio = (w * dy).div_(rho.clamp(min=torch.finfo(rho.dtype).tiny))
            grad_kappa = torch.addcmul(ratio.mul_(grad_v_dot), dy, grad_mu_dot, value=-1.0)
        if need_loc:
            # (w − cs) G + α t + β μ with α = c(s Gᵀv/‖t‖ − Gᵀμ), β = −(w − cs) Gᵀμ; t = g − sμ if not projected
            shift = torch.addcmul(w, c, s, value=-1.0)
            alpha = (s * grad_v_dot).div_(tangent_norm).sub_(grad_mu_dot).mul_(c)
            beta = shift * grad_mu_dot
            beta = beta.neg_() if ctx.projected else beta.addcmul_(alpha, s).neg_()
            grad_loc = torch.addcmul(torch.addcmul(shift.unsqueeze(-1) * grad, alpha.unsqueeze(-1), direction),
                                     beta.unsqueeze(-1), mu).div_(loc_norm)
        return (grad_loc, grad_kappa) + (None,) * 10

    @staticmethod
    def _dy_dkappa(
        ctx: Any, kappa: torch.Tensor, y: torch.Tensor, one_minus_a: torch.Tensor | None, uniform: torch.Tensor | None
    ) -> torch.Tensor:
        kappa64 = kappa.detach().to(torch.float64)
        if uniform is not None:
            return _d_inverse_cdf_p3(kappa64, uniform, y)
        return d_one_minus_w_d_kappa(ctx.dim, kappa64, y, one_minus_a)

    @staticmethod
    def _graph_gradients(
        ctx: Any, grad: torch.Tensor, need_loc: bool, need_kappa: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(∂L/∂loc, ∂L/∂κ) as differentiable functions of loc, κ and G: x is rebuilt from its noise, with
        y tied to κ to first order (`_ImplicitY`), so that ∂L/∂loc keeps its dependence on κ (the mixed
        second derivative); ∂L/∂κ = (∂L/∂y)(dy/dκ) with dy/dκ held fixed, so a further derivative of it
        (which would need d²y/dκ²) raises, lazily, instead of being silently incomplete."""
        loc, kappa, mu, _, direction, s, _, y, _, _, _, one_minus_a, uniform = ctx.saved_tensors
        g = (direction + s.unsqueeze(-1) * mu if ctx.projected else direction).detach()
        y_node = y.detach().to(mu.dtype)
        dy = None
        if need_kappa:
            dy = SampleMap._dy_dkappa(ctx, kappa, y, one_minus_a, uniform).to(mu.dtype)
            y_node = apply(_ImplicitY, kappa, y_node, dy)
        unit = loc / torch.linalg.vector_norm(loc, dim=-1, keepdim=True)
        tangent = g - (g * unit).sum(-1, keepdim=True) * unit
        rho = torch.sqrt(y_node * (2.0 - y_node))
        x = (1.0 - y_node).unsqueeze(-1) * unit + (
            (rho / torch.linalg.vector_norm(tangent, dim=-1)).unsqueeze(-1) * tangent
        )
        inputs = [t for t, needed in ((loc, need_loc), (y_node, need_kappa)) if needed]
        grads = list(torch.autograd.grad(x, inputs, grad, create_graph=True))
        grad_loc = grads.pop(0) if need_loc else None
        grad_kappa = None
        if dy is not None:  # need_kappa
            grad_kappa = apply(Refuse, kappa, grads.pop(0) * dy, "vMF samples in the concentration (second derivative)",
                               compiled=RefuseWithoutJvp)
        return grad_loc, grad_kappa


class _ImplicitY(torch.autograd.Function):
    """y = 1 − w as a function of κ at a fixed CDF value, to first order: the value ``y`` with the slope
    ``slope`` = dy/dκ (`SampleMap._graph_gradients`). A derivative of the slope (d²y/dκ², a third
    derivative of the sample) raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kappa: torch.Tensor, y: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        return y.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0], inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        kappa, slope = ctx.saved_tensors
        grad_kappa = grad * slope
        if torch.is_grad_enabled():
            grad_kappa = apply(Refuse, kappa, grad_kappa, "vMF samples in the concentration (third derivative)",
                               compiled=RefuseWithoutJvp)
        return grad_kappa, None, None


def _single_direction(mu: torch.Tensor) -> torch.Tensor | None:
    """The one vector behind ``mu`` if all its batch entries are the same memory (size 1 or stride 0)."""
    if all(size == 1 or stride == 0 for size, stride in zip(mu.shape[:-1], mu.stride()[:-1])):
        return mu.reshape(-1, mu.shape[-1])[0] if mu.dim() > 1 else mu
    return None


def _expanded(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t.expand(shape)``, skipped when it would be a no-op (an expand of a tensor that requires a gradient
    adds an autograd node)."""
    return t if t.shape == shape else t.expand(shape)


def _dot_with_loc(g: torch.Tensor, mu: torch.Tensor, single: bool) -> torch.Tensor:
    """μᵀg over the last dimension; a matrix-vector product (no n×p temporary) for a ``single`` μ of shape [p]."""
    return g @ mu if single else (g * mu).sum(-1)


def rsample_vmf(loc: torch.Tensor, kappa: torch.Tensor, exact_tangent_norm: bool,
                complement: torch.Tensor | None = None) -> torch.Tensor:
    """Exact samples x = w μ + √(y(2−y)) v of vMF(loc, κ); shape ``kappa.shape + [p]``.

    ``loc`` is used as μ = loc/‖loc‖ (the gradients are those of that normalisation), broadcastable to
    ``kappa.shape + [p]`` (κ already expanded to the sample and batch shape). With g ~ N(0, I):
    s = μᵀg, t = g − sμ and v = t/‖t‖, so no Householder reflection and no degenerate μ;
    x = c g + (w − c s) μ with c = √(y(2−y))/‖t‖, in place on g when nothing needs a gradient.
    ``exact_tangent_norm`` takes ‖t‖ from t itself (small p, where ‖g‖² − s² can cancel); otherwise
    from that difference (one pass over g less). (s, ‖t‖) also give
    the first Wood proposal, z = (‖g‖ + s)/(2‖g‖), independent of v. ``complement`` is 1 − A_p(κ) of
    shape ``kappa.shape`` if already known (for the κ-gradient), else None.
    """
    dim = loc.shape[-1]
    dtype, device = loc.dtype, loc.device
    shape = kappa.shape
    in_place = not (torch.is_grad_enabled() and (loc.requires_grad or kappa.requires_grad))
    # μ = loc/‖loc‖ without a graph: s, t and ‖t‖ are noise-side inputs of the map, whose backward
    # differentiates the normalisation too
    full = shape + (dim,)
    loc_noise = loc.detach()
    compact = _single_direction(loc_noise)
    single = compact is not None
    if compact is None:
        compact = loc_noise
    loc_norm = torch.linalg.vector_norm(compact, dim=-1, keepdim=True)
    mu = compact / loc_norm  # [p] if single, else broadcastable to `full`
    if not single:
        mu = _expanded(mu, full)
    g = torch.randn(full, dtype=dtype, device=device)
    s = _dot_with_loc(g, mu, single)
    tangent = None
    if exact_tangent_norm:
        # In place on g: the map's backward recovers g = t + sμ.
        tangent = g.addcmul_(s.unsqueeze(-1), mu, value=-1.0)
        # Project a second time ("twice is enough"): when g is nearly parallel to μ, the first pass
        # leaves a μ-component of order ε|s| that 1/‖t‖ would amplify into a non-unit sample.
        tangent = tangent.addcmul_(_dot_with_loc(tangent, mu, single).unsqueeze(-1), mu, value=-1.0)
        tangent_norm = torch.linalg.vector_norm(tangent, dim=-1)
    else:
        tangent_norm = torch.sqrt((torch.linalg.vector_norm(g, dim=-1).square() - s * s).clamp(min=0.0))
    tangent_norm = tangent_norm.clamp(min=torch.finfo(dtype).tiny)

    # Beyond κ = 1e300 the samples equal μ to every float's precision; the cap keeps 2κ finite.
    kappa64 = kappa.detach().to(torch.float64).clamp(max=1e300)
    uniform = None
    if dim == 3:
        uniform = torch.rand(shape, dtype=torch.float64, device=device)
        y = _inverse_cdf_p3(kappa64, uniform)
    elif (torch.is_grad_enabled() and loc.requires_grad) or torch.compiler.is_compiling():
        # Reusing μᵀg for the proposal would make the noise (g, y) depend on μ and bias the loc
        # gradient; with a loc gradient the w-sampler draws its own proposals (so does compiled code:
        # its two rounds of uniform-based proposals are `_wood_compiled`).
        y = sample_one_minus_w(dim, kappa64)
    else:
        s64, t64 = s.detach().to(torch.float64), tangent_norm.detach().to(torch.float64)
        g_norm = torch.sqrt(s64 * s64 + t64 * t64)
        # z = (‖g‖+s)/(2‖g‖): the smaller of ‖g‖ ± s is formed as ‖t‖²/(the larger), without cancellation
        big = torch.where(s64 >= 0, g_norm + s64, t64 * t64 / (g_norm - s64))
        small = torch.where(s64 >= 0, t64 * t64 / (g_norm + s64), g_norm - s64)
        y, done = _wood_accept(dim, kappa64, big, small)
        y = _finish_rejected(dim, kappa64.reshape(-1), y.reshape(-1), done.reshape(-1)).reshape(shape)

    if not in_place:
        direction = tangent if tangent is not None else g
        sample: torch.Tensor = apply(SampleMap, _expanded(loc, full), kappa, _expanded(mu, full),
                                     _expanded(loc_norm, shape + (1,)), direction, s, tangent_norm, y, dim,
                                     tangent is not None, complement, uniform if kappa.requires_grad else None)[0]
        return sample
    w, _, c = _map_weights(y, tangent_norm, dtype)
    if tangent is not None:
        return tangent.mul_(c.unsqueeze(-1)).addcmul_(w.unsqueeze(-1), mu)
    return g.mul_(c.unsqueeze(-1)).addcmul_((w - c * s).unsqueeze(-1), mu)
