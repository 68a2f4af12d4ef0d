"""Float64 kernels for log I_ν(x) and the ratio I_{ν+1}(x)/I_ν(x); no autograd, no validation.

Method (see docs/numerics.md):

* For orders μ ≥ `MIN_ORDER` the uniform (Debye) expansion of `vmf_dists._debye` gives, with
  z = x/μ, t = 1/√(1+z²), s = 1/t, U = Σ u_k(t) μ^{−k}, W = Σ w_k(t) μ^{−k},

      log I_μ(x) − μ log x − x = μ (1/(s+z) − log(1+s) − log μ) − ½ log(2πμ) − ½ log s + log U,
      ρ_μ(x) := I_{μ+1}(x) / (x I_μ(x)) = (t/μ) [1/(1+t) + W/U],
      R'_μ(x) = (t³/μ) [1/(1+t) + W/U + z²t/(1+t)² − z²t (W'U − WU')/U²].

  Every term is positive or an O(μ^{−1}) correction, so nothing cancels, at any x ≥ 0; the number of
  terms is chosen so that the first omitted one is below 1e-17.
* Lower orders ν are lifted to μ = ν + m ≥ `MIN_ORDER` and brought back by the backward recurrence
  I_{o−1}/I_o = 2o/x + R_o, i.e. ρ_{o−1} = 1/(2o + x²ρ_o), which is the stable direction for the
  minimal solution I (errors are damped at every step). The logarithm follows from
  I_ν = I_{ν+m} / Π_j R_{ν+j}; we multiply the well-scaled factors τ = ρ(1+x) ∈ [1/(2o+2), 1] and take
  one logarithm, so neither x → 0 nor x → ∞ under- or overflows.

Everything works on ρ = R/x rather than R, so x = 0 needs no special case (ρ_ν(0) = 1/(2ν+2)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from vmf_dists import _debye

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LIFT_STEPS = math.ceil(_debye.MIN_ORDER)


def _series_in_inverse_order(table: tuple[tuple[float, ...], ...], order: float | torch.Tensor):
    """Coefficients c_j(μ) = Σ_k table[j][k] μ^{−k} (Python floats for a float order, else tensors)."""
    inv = 1.0 / order
    out = []
    for row in table:
        acc = row[-1]
        for a in reversed(row[:-1]):
            acc = acc * inv + a
        out.append(acc)
    return out


def _horner(coeffs, t: torch.Tensor) -> torch.Tensor:
    # In place: at 1e6 elements a fresh buffer per step costs more (page faults) than the arithmetic.
    acc = torch.zeros_like(t).add_(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc.mul_(t).add_(c)
    return acc


def _horner_derivative(coeffs, t: torch.Tensor) -> torch.Tensor:
    deriv = [j * coeffs[j] for j in range(1, len(coeffs))]
    return _horner(deriv, t) if deriv else torch.zeros_like(t)


class BesselParts(NamedTuple):
    """Float64 results of `log_iv_ratio_core` (optional ones are None unless requested)."""

    log_scaled: torch.Tensor  # log I_ν(x) − ν log x − x
    rho: torch.Tensor  # I_{ν+1}(x) / (x I_ν(x))
    derivative: torch.Tensor | None = None  # d/dx I_{ν+1}(x)/I_ν(x)
    complement: torch.Tensor | None = None  # 1 − I_{ν+1}(x)/I_ν(x)


def _log1p_nonnegative(x: torch.Tensor) -> torch.Tensor:
    """log(1 + x) for float64 x ≥ 0 up to the largest float: torch < 2.5's log1p returns inf above ~1e307."""
    return torch.where(x < 1e300, torch.log1p(x), torch.log(x))  # log1p(x) = log x + O(1e-300) there


def _uniform_expansion(order: float | torch.Tensor, x: torch.Tensor, with_derivative: bool, with_complement: bool):
    """`BesselParts` by the uniform expansion, for orders μ ≥ MIN_ORDER.

    A tensor ``order`` keeps its own (small) shape for the coefficient sums and broadcasts against
    ``x`` only in the Horner steps. The complement 1 − R = t(1 + t/(1+zt))/(1+t) − zt W/U has no
    cancellation at large z (both terms are positive there since W < 0).
    """
    is_tensor = isinstance(order, torch.Tensor)
    num_terms = _debye.terms_needed(_debye.MIN_ORDER if is_tensor else order)
    u_table, w_table = _debye.combined_coefficients(num_terms)
    u_coeffs = _series_in_inverse_order(u_table, order)
    w_coeffs = _series_in_inverse_order(w_table, order)
    log_order = torch.log(order) if is_tensor else math.log(order)

    z = x / order
    s = torch.hypot(torch.ones_like(z), z)
    t = torch.reciprocal(s)
    u = _horner(u_coeffs, t)
    w = _horner(w_coeffs, t)
    # μ (s − z − log(1+s) − log μ) − ½ log μ − ½ log 2π − ½ log s + log U, with s − z = 1/(s + z) and
    # log(1+s) = log s + log1p(t) (torch < 2.5's float64 log1p returns inf above ~1e307)
    log_s = torch.log(s)
    log_i = torch.log1p(t).add_(log_s).neg_().add_(torch.reciprocal(s + z)).sub_(log_order).mul_(order)
    log_i.sub_(log_s.mul_(0.5)).add_(torch.log(u)).sub_(0.5 * log_order + _HALF_LOG_2PI)
    g = torch.div(w, u).add_(torch.reciprocal(t + 1.0))  # 1/(1+t) + W/U
    rho = torch.mul(t, g).div_(order)
    deriv = None
    if with_derivative:
        du = _horner_derivative(u_coeffs, t)
        dw = _horner_derivative(w_coeffs, t)
        zt = z * t  # in [0, 1): the products below neither overflow nor underflow early
        zt2t = zt * zt * t
        one_plus_t = 1.0 + t
        deriv = t / order * (t * t * g + zt2t / (one_plus_t * one_plus_t) - zt2t * (dw * u - w * du) / (u * u))
    complement = None
    if with_complement:
        zt = z * t
        complement = t * (1.0 + t / (1.0 + zt)) / (1.0 + t) - zt * w / u
    return BesselParts(log_i, rho, deriv, complement)


@torch.no_grad()
def log_iv_ratio_core(order, x: torch.Tensor, with_derivative: bool = False, with_complement: bool = False) -> BesselParts:
    """Float64 core: log I_ν(x) − ν log x − x, ρ_ν(x) = I_{ν+1}(x)/(x I_ν(x)), and optionally R'_ν(x), 1 − R_ν(x).

    The first value is the exponentially scaled log, so that callers who need log I_ν(x) − x (the
    vMF log-likelihood at its mode, KL divergences, kernels) never subtract two numbers of size x.

    Args:
        order: ν ≥ 0, a Python float or a float64 tensor broadcastable with ``x``.
        x: float64 tensor with x ≥ 0 (inf allowed).
        with_derivative: also return d/dx I_{ν+1}(x)/I_ν(x).
        with_complement: also return 1 − I_{ν+1}(x)/I_ν(x) with relative precision at large x.
    """
    inf_x = torch.isinf(x)
    finite_x = torch.where(inf_x, torch.zeros_like(x), x)
    if isinstance(order, torch.Tensor):
        lift = torch.clamp(torch.ceil(_debye.MIN_ORDER - order), min=0.0)
        steps = _LIFT_STEPS
    else:
        lift = float(max(0, math.ceil(_debye.MIN_ORDER - order)))
        steps = int(lift)
    log_i, rho, deriv, complement = _uniform_expansion(order + lift, finite_x, with_derivative, with_complement)

    if steps:
        one_plus_x = 1.0 + finite_x
        # Π ρ_o (1+x) over the lifted orders: each factor lies in [1/(2o+2), 1], so no under/overflow.
        scaled_product = torch.ones_like(log_i)
        for j in range(steps - 1, -1, -1):
            two_o_plus_2 = 2.0 * (order + j + 1.0)  # 2(o+1) for the order o = ν + j computed here
            # x²ρ and x²R' formed as x(xρ), x(xR'): no overflow up to the largest float x
            denom = torch.mul(finite_x, rho).mul_(finite_x).add_(two_o_plus_2)
            if with_derivative:
                new_deriv = (two_o_plus_2 - finite_x * (finite_x * deriv)) / (denom * denom)
            if with_complement:  # 1 − R_o = (2(o+1) − x(1 − R_{o+1})) / denom
                new_complement = (two_o_plus_2 - finite_x * complement) / denom
            if isinstance(lift, torch.Tensor):
                active = lift > j
                rho = torch.where(active, torch.reciprocal(denom), rho)
                scaled_product = torch.where(active, scaled_product * rho * one_plus_x, scaled_product)
                if with_derivative:
                    deriv = torch.where(active, new_deriv, deriv)
                if with_complement:
                    complement = torch.where(active, new_complement, complement)
            else:
                rho = denom.reciprocal_()
                scaled_product.mul_(rho).mul_(one_plus_x)
                if with_derivative:
                    deriv = new_deriv
                if with_complement:
                    complement = new_complement
        log_i = log_i - torch.log(scaled_product) + lift * _log1p_nonnegative(finite_x)

    log_i = torch.where(inf_x, torch.full_like(log_i, -math.inf), log_i)
    rho = torch.where(inf_x, torch.zeros_like(rho), rho)
    if with_derivative:
        deriv = torch.where(inf_x, torch.zeros_like(deriv), deriv)
    if with_complement:
        complement = torch.where(inf_x, torch.zeros_like(complement), complement)
    return BesselParts(log_i, rho, deriv, complement)
