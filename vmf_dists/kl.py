r"""Closed-form KL divergences between `VonMisesFisher` and `HypersphericalUniform`, registered with
`torch.distributions.kl.register_kl` (so `torch.distributions.kl_divergence`, Pyro's
`TraceMeanField_ELBO` and `pyro.distributions.kl_divergence` find them).

With $A = A_p(\kappa_1)$, $\tilde C(\kappa) = \log C_p(\kappa) + \kappa$:

* $\mathrm{KL}(\mathrm{vMF}_1 \| \mathrm{vMF}_2)
  = \log C_p(\kappa_1) - \log C_p(\kappa_2) + A(\kappa_1 - \kappa_2\mu_1^\top\mu_2)$,
  evaluated as
  $\tilde C(\kappa_1) - \tilde C(\kappa_2) + (\kappa_2 - \kappa_1)(1 - A) + \kappa_2 A\|\mu_1 - \mu_2\|^2/2$
  (no terms of size κ cancel), and where both $\kappa^2 \le 32p$ as
  $G(\kappa_2) - G(\kappa_1) + A(\kappa_1 - \kappa_2\mu_1^\top\mu_2)$ with $G(\kappa) = \log {}_0F_1(; p/2; \kappa^2/4)$
  (relative precision as κ → 0).
* $\mathrm{KL}(\mathrm{vMF} \| U) = \log C_p(\kappa) + \kappa A + \log|S^{p-1}|
  = \kappa A - \log {}_0F_1(; p/2; \kappa^2/4)$,
  which keeps relative precision as κ → 0 (value ≈ κ²/(2p)); for large κ it is evaluated as
  $\tilde C(\kappa) + \log|S^{p-1}| - \kappa(1 - A)$. Never a difference of entropies.
* $\mathrm{KL}(U \| \mathrm{vMF}) = \log C_p(0) - \log C_p(\kappa) = \log {}_0F_1(; p/2; \kappa^2/4)$.
* $\mathrm{KL}(U \| U) = 0$.

All computed in float64 and returned in the parameters' dtype, differentiable in every parameter.
Mismatched dimensions raise `ValueError`.

References:
    * K. V. Mardia, P. E. Jupp, *Directional Statistics*, Wiley (2000).
    * T. R. Davidson, L. Falorsi, N. De Cao, T. Kipf, J. M. Tomczak, "Hyperspherical Variational
      Auto-Encoders", UAI 2018 (KL(vMF ‖ Uniform) as the prior term of a hyperspherical VAE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch.distributions import Distribution

if TYPE_CHECKING:  # torch's register_kl is unannotated; it returns the function it registers unchanged
    _KL = TypeVar("_KL", bound=Callable[..., torch.Tensor])

    def register_kl(type_p: type[Distribution], type_q: type[Distribution]) -> Callable[[_KL], _KL]: ...
else:
    from torch.distributions.kl import register_kl

from vmf_dists._checks import broadcast_shapes, check_same_sphere
from vmf_dists.special import (
    _RATIO,
    _evaluate,
    _nu,
    in_gap_series_region,
    log_normalizer_plus_kappa,
    mean_resultant_length_complement,
    uniform_log_normalizer_gap,
)
from vmf_dists.special import kl_vmf_uniform as _kl_to_uniform
from vmf_dists.uniform import HypersphericalUniform
from vmf_dists.von_mises_fisher import VonMisesFisher

__all__ = ["kl_vmf_vmf", "kl_vmf_uniform", "kl_uniform_vmf", "kl_uniform_uniform"]


def _broadcast_batch_shapes(p: Distribution, q: Distribution) -> torch.Size:
    try:
        shape: torch.Size = broadcast_shapes(p.batch_shape, q.batch_shape)
        return shape
    except RuntimeError:
        raise ValueError(f"batch shapes {tuple(p.batch_shape)} and {tuple(q.batch_shape)} do not broadcast") from None


@register_kl(VonMisesFisher, VonMisesFisher)
def kl_vmf_vmf(p: VonMisesFisher, q: VonMisesFisher) -> torch.Tensor:
    r"""KL(vMF(μ₁, κ₁) ‖ vMF(μ₂, κ₂)) in closed form.

    $$
    \mathrm{KL} = \log C_p(\kappa_1) - \log C_p(\kappa_2) + A_p(\kappa_1)(\kappa_1 - \kappa_2\mu_1^\top\mu_2),
    $$

    evaluated without cancellation (see the module docstring). Where both κ are small (κ² ≤ 32p) it is
    anchored at the uniform distribution: G(κ₂) − G(κ₁) + A(κ₁ − κ₂ μ₁ᵀμ₂) with
    G(κ) = log C_p(0) − log C_p(κ) = log ₀F₁(; p/2; κ²/4) from its series, so that it keeps relative
    precision as κ → 0 (and is exactly 0 for p = q). Rounding below 0 is clamped to 0.

    Args:
        p: the first vMF.
        q: the second vMF on the same sphere; batch shapes broadcast.

    Returns:
        KL ≥ 0 of shape ``broadcast(p.batch_shape, q.batch_shape)``, in the promoted dtype of the locs.

    Raises:
        ValueError: if p and q live on spheres of different dimensions or their batch shapes do not broadcast.
    """
    dim = check_same_sphere(p, q)
    _broadcast_batch_shapes(p, q)
    k1, k2 = p._kappa64, q._kappa64
    parts1, parts2 = p._parts(), q._parts()
    mu1, mu2 = p._unit_loc64, q._unit_loc64
    sq_dist = (mu1 - mu2).square().sum(-1)
    complement = mean_resultant_length_complement(dim, k1, parts1)  # 1 − A, precise at large κ
    mean_length = _evaluate(_RATIO, k1, _nu(dim), parts1)  # A, precise at small κ
    large = (
        log_normalizer_plus_kappa(dim, k1, parts1)
        - log_normalizer_plus_kappa(dim, k2, parts2)
        + (k2 - k1) * complement
        + 0.5 * k2 * mean_length * sq_dist
    )
    # log C(κ₁) − log C(κ₂) = G(κ₂) − G(κ₁) with G(κ) = log C(0) − log C(κ) (series: relative precision)
    anchored = (
        uniform_log_normalizer_gap(dim, k2, parts2)
        - uniform_log_normalizer_gap(dim, k1, parts1)
        + mean_length * (k1 - k2 * (1.0 - 0.5 * sq_dist))
    )
    kl = torch.where(in_gap_series_region(dim, k1, k2), anchored, large).clamp(min=0.0)
    return kl.to(torch.promote_types(p.loc.dtype, q.loc.dtype))


@register_kl(VonMisesFisher, HypersphericalUniform)
def kl_vmf_uniform(p: VonMisesFisher, q: HypersphericalUniform) -> torch.Tensor:
    r"""KL(vMF(μ, κ) ‖ Uniform), ≥ 0, with relative precision as κ → 0.

    $$
    \mathrm{KL} = \log C_p(\kappa) + \kappa A_p(\kappa) + \log|S^{p-1}|
    = \kappa A_p(\kappa) - \log {}_0F_1(; p/2; \kappa^2/4),
    $$

    independent of μ (the prior term of a hyperspherical VAE, Davidson et al. 2018).

    Args:
        p: the vMF.
        q: the uniform distribution on the same sphere.

    Returns:
        KL of shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: if p and q live on spheres of different dimensions or their batch shapes do not broadcast.
    """
    dim = check_same_sphere(p, q)
    shape = _broadcast_batch_shapes(p, q)
    dtype = p.loc.dtype if p.loc.dtype == q.dtype else torch.promote_types(p.loc.dtype, q.dtype)
    value = _kl_to_uniform(dim, p.concentration, p._parts()).to(dtype)
    return value if value.shape == shape else value.expand(shape).clone()


@register_kl(HypersphericalUniform, VonMisesFisher)
def kl_uniform_vmf(p: HypersphericalUniform, q: VonMisesFisher) -> torch.Tensor:
    r"""KL(Uniform ‖ vMF(μ, κ)) $= \log C_p(0) - \log C_p(\kappa) = \log {}_0F_1(; p/2; \kappa^2/4)$.

    Args:
        p: the uniform distribution.
        q: the vMF on the same sphere.

    Returns:
        KL ≥ 0 of shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: if p and q live on spheres of different dimensions or their batch shapes do not broadcast.
    """
    dim = check_same_sphere(p, q)
    shape = _broadcast_batch_shapes(p, q)
    value = uniform_log_normalizer_gap(dim, q.concentration, q._parts()).to(torch.promote_types(p.dtype, q.loc.dtype))
    return value if value.shape == shape else value.expand(shape).clone()


@register_kl(HypersphericalUniform, HypersphericalUniform)
def kl_uniform_uniform(p: HypersphericalUniform, q: HypersphericalUniform) -> torch.Tensor:
    """KL(Uniform ‖ Uniform) = 0.

    Args:
        p: a uniform distribution.
        q: a uniform distribution on the same sphere.

    Returns:
        Zeros of shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: if p and q live on spheres of different dimensions or their batch shapes do not broadcast.
    """
    check_same_sphere(p, q)
    shape = _broadcast_batch_shapes(p, q)
    return torch.zeros(shape, dtype=torch.promote_types(p.dtype, q.dtype), device=p.device)
