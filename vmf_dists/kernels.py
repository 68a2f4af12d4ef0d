r"""Expected-likelihood and probability product kernels between distributions on the sphere.

The probability product kernel (Jebara, Kondor, Howard 2004) of two densities is
$\mathrm{PPK}_\rho(p, q) = \int p(x)^\rho q(x)^\rho\,dx$; $\rho = 1$ is the expected likelihood
$\mathrm{EL}(p, q) = \int p\,q = \mathbb{E}_{x\sim p}[q(x)]$ and $\rho = \tfrac12$ the Bhattacharyya
coefficient. For two von Mises–Fisher distributions the moment generating function
$\mathbb{E}[e^{a^\top x}] = C_p(\kappa)/C_p(\|\kappa\mu + a\|)$ gives the closed form

$$
\log \mathrm{PPK}_\rho = \rho[\log C_p(\kappa_1) + \log C_p(\kappa_2)] - \log C_p(\rho\,\|\kappa_1\mu_1 + \kappa_2\mu_2\|),
$$

evaluated here with $\tilde C(\kappa) = \log C_p(\kappa) + \kappa$ as
$\rho[\tilde C(\kappa_1) + \tilde C(\kappa_2)] - \tilde C(r) - \rho\,\frac{\kappa_1\kappa_2\|\mu_1-\mu_2\|^2}{\kappa_1+\kappa_2+\|\kappa_1\mu_1+\kappa_2\mu_2\|}$
with $r = \rho\|\kappa_1\mu_1 + \kappa_2\mu_2\|$, so nothing of size κ cancels (the last term uses
$(\kappa_1+\kappa_2)^2 - \|\kappa_1\mu_1+\kappa_2\mu_2\|^2 = \kappa_1\kappa_2\|\mu_1-\mu_2\|^2$).
`HypersphericalUniform` arguments are treated as vMFs with κ = 0.

The keyword ``num_samples`` is reserved for pairs without a closed form (Monte Carlo); for the
closed-form pairs here it is ignored, since the exact value beats any estimate.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from vmf_dists.special import in_gap_series_region, log_normalizer_plus_kappa, uniform_log_normalizer_gap
from vmf_dists.uniform import HypersphericalUniform, log_sphere_area
from vmf_dists.von_mises_fisher import VonMisesFisher

__all__ = [
    "log_expected_likelihood",
    "log_probability_product_kernel",
    "log_bhattacharyya_coefficient",
    "pairwise_log_expected_likelihood",
    "pairwise_log_probability_product_kernel",
]


def _as_vmf_parameters(d, other) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit loc [..., p], κ [...]) in float64 for a vMF, or for a uniform (κ = 0, any loc), the latter
    on the device of the ``other`` argument when that is a vMF (a uniform's own device is irrelevant)."""
    if isinstance(d, VonMisesFisher):
        return d._unit_loc64, d.concentration.to(torch.float64)
    device = other.loc.device if isinstance(other, VonMisesFisher) else d.device
    loc = torch.zeros(d.batch_shape + d.event_shape, dtype=torch.float64, device=device)
    loc[..., 0] = 1.0
    return loc, torch.zeros(d.batch_shape, dtype=torch.float64, device=device)


def _result_dtype(p, q) -> torch.dtype:
    def dtype(d) -> torch.dtype:
        return d.loc.dtype if isinstance(d, VonMisesFisher) else d.dtype

    return torch.promote_types(dtype(p), dtype(q))


def _check_pair(p, q, rho: float) -> int:
    for d in (p, q):
        if not isinstance(d, (VonMisesFisher, HypersphericalUniform)):
            raise NotImplementedError(
                f"no kernel implemented for {type(d).__name__}; closed forms exist for VonMisesFisher and "
                "HypersphericalUniform"
            )
    if p.event_shape != q.event_shape:
        raise ValueError(f"kernel between spheres of different dimensions: {p.event_shape[0]} vs {q.event_shape[0]}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    return p.event_shape[0]


def _log_ppk_closed_form(dim: int, k1, k2, sq_dist, rho: float) -> torch.Tensor:
    """The closed form from κ₁, κ₂ and ‖μ₁ − μ₂‖² (broadcast), float64.

    Large κ: ρ[C̃(κ₁) + C̃(κ₂)] − C̃(r) − ρ κ₁κ₂‖μ₁−μ₂‖²/(κ₁+κ₂+‖κ₁μ₁+κ₂μ₂‖), with C̃ = log C + κ.
    Small κ (all of κ₁, κ₂, r with κ² ≤ 32p): anchored at the uniform, with G(κ) = log C(0) − log C(κ),
    (2ρ − 1) log C(0) − ρ[G(κ₁) + G(κ₂)] + G(r), so that e.g. the log Bhattacharyya coefficient
    (≈ −κ²·const) keeps relative precision.
    """
    norm_sq = ((k1 + k2).square() - k1 * k2 * sq_dist).clamp(min=0.0)
    positive = norm_sq > 0
    norm = torch.where(positive, torch.sqrt(torch.where(positive, norm_sq, 1.0)), 0.0)  # safe gradient at 0
    r = rho * norm
    denom = (k1 + k2 + norm).clamp(min=torch.finfo(torch.float64).tiny)
    large = (
        rho * (log_normalizer_plus_kappa(dim, k1) + log_normalizer_plus_kappa(dim, k2))
        - log_normalizer_plus_kappa(dim, r)
        - rho * k1 * k2 * sq_dist / denom
    )
    anchored = (
        -(2.0 * rho - 1.0) * log_sphere_area(dim)
        - rho * (uniform_log_normalizer_gap(dim, k1) + uniform_log_normalizer_gap(dim, k2))
        + uniform_log_normalizer_gap(dim, r)
    )
    small = in_gap_series_region(dim, k1) & in_gap_series_region(dim, k2) & in_gap_series_region(dim, r)
    return torch.where(small, anchored, large)


def log_probability_product_kernel(p: Distribution, q: Distribution, rho: float, *, num_samples: int | None = None) -> torch.Tensor:
    r"""$\log \int p(x)^\rho q(x)^\rho\,dx$ for two distributions on the same sphere (closed form for vMFs).

    Args:
        p: a `VonMisesFisher` or `HypersphericalUniform`.
        q: a `VonMisesFisher` or `HypersphericalUniform` on the same sphere; batch shapes broadcast.
        rho: the exponent $\rho > 0$ (1: expected likelihood, ½: Bhattacharyya coefficient).
        num_samples: reserved for pairs without a closed form; ignored here.

    Returns:
        Tensor of the broadcast batch shape, differentiable in all parameters.

    Raises:
        ValueError: on different dimensions or $\rho \le 0$.
        NotImplementedError: for distribution types without a kernel.
    """
    dim = _check_pair(p, q, rho)
    mu1, k1 = _as_vmf_parameters(p, q)
    mu2, k2 = _as_vmf_parameters(q, p)
    sq_dist = (mu1 - mu2).square().sum(-1)
    return _log_ppk_closed_form(dim, k1, k2, sq_dist, float(rho)).to(_result_dtype(p, q))


def log_expected_likelihood(p: Distribution, q: Distribution, *, num_samples: int | None = None) -> torch.Tensor:
    r"""$\log \mathrm{EL}(p, q) = \log \int p\,q = \log \mathbb{E}_{x\sim p}[q(x)]$ (probability product kernel, ρ = 1).

    Example:
        >>> import torch
        >>> from vmf_dists import VonMisesFisher, log_expected_likelihood
        >>> mu = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        >>> log_expected_likelihood(VonMisesFisher(mu, 5.0), VonMisesFisher(mu, 5.0)).item() > 0
        True
    """
    return log_probability_product_kernel(p, q, 1.0, num_samples=num_samples)


def log_bhattacharyya_coefficient(p: Distribution, q: Distribution, *, num_samples: int | None = None) -> torch.Tensor:
    r"""$\log \int \sqrt{p\,q}$, the log Bhattacharyya coefficient (probability product kernel, ρ = ½); ≤ 0, = 0 iff p = q."""
    return log_probability_product_kernel(p, q, 0.5, num_samples=num_samples)


def pairwise_log_probability_product_kernel(p: Distribution, q: Distribution, rho: float, *, num_samples: int | None = None) -> torch.Tensor:
    r"""All pairs: $\log\mathrm{PPK}_\rho(p_b, q_c)$ for ``p`` with batch shape ``[B]`` and ``q`` with batch ``[C]``.

    Uses $\|\kappa_b\mu_b + \kappa_c\mu_c\|^2 = (\kappa_b+\kappa_c)^2 - \kappa_b\kappa_c\|\mu_b-\mu_c\|^2$ with
    $\|\mu_b - \mu_c\|^2 = 2 - 2\mu_b^\top\mu_c$ from one ``[B, p] × [p, C]`` matrix product; no
    ``[B, C, p]`` tensor is formed. The product and the rest (elementwise on ``[B, C]``) run in float64,
    since $2 - 2\mu_b^\top\mu_c$ cancels for nearby directions and κ multiplies that error.

    Returns:
        Tensor of shape ``[B, C]``.

    Raises:
        ValueError: if the batch shapes are not one-dimensional, on different dimensions or $\rho \le 0$.
    """
    dim = _check_pair(p, q, rho)
    if len(p.batch_shape) != 1 or len(q.batch_shape) != 1:
        raise ValueError(f"pairwise kernels need batch shapes [B] and [C], got {tuple(p.batch_shape)} and {tuple(q.batch_shape)}")
    dtype = _result_dtype(p, q)
    mu1, k1 = _as_vmf_parameters(p, q)
    mu2, k2 = _as_vmf_parameters(q, p)
    # In float64: 2 − 2μ_bᵀμ_c cancels for nearby directions, and at large κ that error is multiplied by κ.
    sq_dist = (2.0 - 2.0 * (mu1 @ mu2.T)).clamp(min=0.0)
    return _log_ppk_closed_form(dim, k1.unsqueeze(-1), k2.unsqueeze(0), sq_dist, float(rho)).to(dtype)


def pairwise_log_expected_likelihood(p: Distribution, q: Distribution, *, num_samples: int | None = None) -> torch.Tensor:
    r"""All pairs $\log\mathrm{EL}(p_b, q_c)$, shape ``[B, C]`` (see `pairwise_log_probability_product_kernel`)."""
    return pairwise_log_probability_product_kernel(p, q, 1.0, num_samples=num_samples)
