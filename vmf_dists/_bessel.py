"""Float64 kernels for log I_ν(x) and the ratio I_{ν+1}(x)/I_ν(x); no autograd, no validation.

Method (see docs/numerics.md):

* For orders μ ≥ `MIN_ORDER` the uniform (Debye) expansion of `vmf_dists._debye` gives, with
  z = x/μ, t = 1/√(1+z²), s = 1/t, U = Σ u_k(t) μ^{−k}, W = Σ w_k(t) μ^{−k},

      log I_μ(x) − μ log x = μ (s − log(1+s) − log μ) − ½ log(2πμ) − ½ log s + log U,
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
    acc = torch.zeros_like(t) + coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * t + c
    return acc


def _horner_derivative(coeffs, t: torch.Tensor) -> torch.Tensor:
    deriv = [j * coeffs[j] for j in range(1, len(coeffs))]
    return _horner(deriv, t) if deriv else torch.zeros_like(t)


def _uniform_expansion(order: float | torch.Tensor, x: torch.Tensor, with_derivative: bool):
    """(log I_μ(x) − μ log x, ρ_μ(x), R'_μ(x) or None) by the uniform expansion, for μ ≥ MIN_ORDER."""
    if isinstance(order, torch.Tensor):
        num_terms = _debye.terms_needed(_debye.MIN_ORDER)
    else:
        num_terms = _debye.terms_needed(order)
    u_table, w_table = _debye.combined_coefficients(num_terms)
    u_coeffs = _series_in_inverse_order(u_table, order)
    w_coeffs = _series_in_inverse_order(w_table, order)

    z = x / order
    s = torch.hypot(torch.ones_like(z), z)
    t = 1.0 / s
    u = _horner(u_coeffs, t)
    w = _horner(w_coeffs, t)
    if isinstance(order, torch.Tensor):
        log_order = torch.log(order)
    else:
        log_order = math.log(order)
    log_i = order * (s - torch.log1p(s) - log_order) - 0.5 * log_order - _HALF_LOG_2PI - 0.5 * torch.log(s) + torch.log(u)
    g = 1.0 / (1.0 + t) + w / u
    rho = t / order * g
    deriv = None
    if with_derivative:
        du = _horner_derivative(u_coeffs, t)
        dw = _horner_derivative(w_coeffs, t)
        z2t = z * z * t
        one_plus_t = 1.0 + t
        deriv = t**3 / order * (g + z2t / (one_plus_t * one_plus_t) - z2t * (dw * u - w * du) / (u * u))
    return log_i, rho, deriv


def log_iv_ratio_core(order, x: torch.Tensor, with_derivative: bool = False):
    """Float64 core: (log I_ν(x) − ν log x, ρ_ν(x) = I_{ν+1}(x)/(x I_ν(x)), R'_ν(x) or None).

    Args:
        order: ν ≥ 0, a Python float or a float64 tensor broadcastable with ``x``.
        x: float64 tensor with x ≥ 0 (inf allowed).
        with_derivative: also return d/dx I_{ν+1}(x)/I_ν(x).
    """
    finite_x = torch.where(torch.isinf(x), torch.zeros_like(x), x)
    if isinstance(order, torch.Tensor):
        order, finite_x = torch.broadcast_tensors(order, finite_x)
        lift = torch.clamp(torch.ceil(_debye.MIN_ORDER - order), min=0.0)
        steps = _LIFT_STEPS
    else:
        lift = float(max(0, math.ceil(_debye.MIN_ORDER - order)))
        steps = int(lift)
    top = order + lift
    log_i, rho, deriv = _uniform_expansion(top, finite_x, with_derivative)

    if steps:
        x2 = finite_x * finite_x
        scaled_product = torch.ones_like(finite_x)
        for j in range(steps - 1, -1, -1):
            o = order + j  # the order computed in this step
            denom = 2.0 * (o + 1.0) + x2 * rho
            new_rho = 1.0 / denom
            new_deriv = (2.0 * (o + 1.0) - x2 * deriv) / (denom * denom) if with_derivative else None
            factor = new_rho * (1.0 + finite_x)
            if isinstance(lift, torch.Tensor):
                active = lift > j
                rho = torch.where(active, new_rho, rho)
                scaled_product = torch.where(active, scaled_product * factor, scaled_product)
                if with_derivative:
                    deriv = torch.where(active, new_deriv, deriv)
            else:
                rho = new_rho
                scaled_product = scaled_product * factor
                deriv = new_deriv
        log_i = log_i - torch.log(scaled_product) + lift * torch.log1p(finite_x)

    inf_x = torch.isinf(x)
    log_i = torch.where(inf_x, torch.full_like(log_i, math.inf), log_i)
    rho = torch.where(inf_x, torch.zeros_like(rho), rho)
    if with_derivative:
        deriv = torch.where(inf_x, torch.zeros_like(deriv), deriv)
    return log_i, rho, deriv
