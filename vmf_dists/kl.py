r"""Closed-form KL divergences between `VonMisesFisher` and `HypersphericalUniform`, registered with
`torch.distributions.kl.register_kl` (so `torch.distributions.kl_divergence`, Pyro's
`TraceMeanField_ELBO` and `pyro.distributions.kl_divergence` find them).

With $A = A_p(\kappa_1)$, $\tilde C(\kappa) = \log C_p(\kappa) + \kappa$:

* $\mathrm{KL}(\mathrm{vMF}_1 \| \mathrm{vMF}_2) = \log C_p(\kappa_1) - \log C_p(\kappa_2) + A(\kappa_1 - \kappa_2\mu_1^\top\mu_2)$,
  evaluated as $\tilde C(\kappa_1) - \tilde C(\kappa_2) + (\kappa_2 - \kappa_1)(1 - A) + \kappa_2 A\|\mu_1 - \mu_2\|^2/2$
  (no terms of size κ cancel).
* $\mathrm{KL}(\mathrm{vMF} \| U) = \log C_p(\kappa) + \kappa A + \log|S^{p-1}| = \kappa A - \log {}_0F_1(; p/2; \kappa^2/4)$,
  which keeps relative precision as κ → 0 (value ≈ κ²/(2p)); for large κ it is evaluated as
  $\tilde C(\kappa) + \log|S^{p-1}| - \kappa(1 - A)$. Never a difference of entropies.
* $\mathrm{KL}(U \| \mathrm{vMF}) = \log C_p(0) - \log C_p(\kappa) = \log {}_0F_1(; p/2; \kappa^2/4)$.
* $\mathrm{KL}(U \| U) = 0$.

All computed in float64 and returned in the parameters' dtype, differentiable in every parameter.
Mismatched dimensions raise `ValueError`.
"""

from __future__ import annotations

import torch
from torch.distributions.kl import register_kl

from vmf_dists.special import (
    log_normalizer_plus_kappa,
    mean_resultant_length,
    mean_resultant_length_complement,
    uniform_log_normalizer_gap,
)
from vmf_dists.uniform import HypersphericalUniform, log_sphere_area
from vmf_dists.von_mises_fisher import VonMisesFisher

__all__ = ["kl_vmf_vmf", "kl_vmf_uniform", "kl_uniform_vmf", "kl_uniform_uniform"]


def _check_same_dim(p, q) -> int:
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"KL divergence between distributions on spheres of different dimensions: "
            f"{p.event_shape[0]} vs {q.event_shape[0]}"
        )
    return p.event_shape[0]


@register_kl(VonMisesFisher, VonMisesFisher)
def kl_vmf_vmf(p: VonMisesFisher, q: VonMisesFisher) -> torch.Tensor:
    """KL(vMF(μ₁, κ₁) ‖ vMF(μ₂, κ₂)) in closed form (see the module docstring)."""
    dim = _check_same_dim(p, q)
    k1, k2 = p.concentration.to(torch.float64), q.concentration.to(torch.float64)
    mu1, mu2 = p._unit_loc.to(torch.float64), q._unit_loc.to(torch.float64)
    sq_dist = (mu1 - mu2).square().sum(-1)
    complement = mean_resultant_length_complement(dim, k1)
    kl = (
        log_normalizer_plus_kappa(dim, k1)
        - log_normalizer_plus_kappa(dim, k2)
        + (k2 - k1) * complement
        + 0.5 * k2 * (1.0 - complement) * sq_dist
    )
    return kl.to(torch.promote_types(p.loc.dtype, q.loc.dtype))


def _kl_vmf_uniform_value(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    k = kappa.to(torch.float64)
    small = k * k <= 32.0 * dim  # κ²/4 ≤ 16(ν+1): where uniform_log_normalizer_gap sums its series
    near_zero = k * mean_resultant_length(dim, k, validate_args=False) - uniform_log_normalizer_gap(dim, k)
    large = log_normalizer_plus_kappa(dim, k) + log_sphere_area(dim) - k * mean_resultant_length_complement(dim, k)
    return torch.where(small, near_zero, large).clamp(min=0.0).to(kappa.dtype)


@register_kl(VonMisesFisher, HypersphericalUniform)
def kl_vmf_uniform(p: VonMisesFisher, q: HypersphericalUniform) -> torch.Tensor:
    """KL(vMF(μ, κ) ‖ Uniform), ≥ 0, with relative precision as κ → 0."""
    dim = _check_same_dim(p, q)
    value = _kl_vmf_uniform_value(dim, p.concentration)
    return value.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@register_kl(HypersphericalUniform, VonMisesFisher)
def kl_uniform_vmf(p: HypersphericalUniform, q: VonMisesFisher) -> torch.Tensor:
    """KL(Uniform ‖ vMF(μ, κ)) = log ₀F₁(; p/2; κ²/4)."""
    dim = _check_same_dim(p, q)
    value = uniform_log_normalizer_gap(dim, q.concentration)
    return value.expand(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@register_kl(HypersphericalUniform, HypersphericalUniform)
def kl_uniform_uniform(p: HypersphericalUniform, q: HypersphericalUniform) -> torch.Tensor:
    """KL(Uniform ‖ Uniform) = 0."""
    _check_same_dim(p, q)
    shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    return torch.zeros(shape, dtype=p.dtype, device=p.device)
