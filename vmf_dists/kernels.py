r"""Expected-likelihood and probability product kernels between distributions on the sphere.

The probability product kernel (Jebara, Kondor, Howard 2004) of two densities is
$\mathrm{PPK}_\rho(p, q) = \int p(x)^\rho q(x)^\rho\,dx$; $\rho = 1$ is the expected likelihood
$\mathrm{EL}(p, q) = \int p\,q = \mathbb{E}_{x\sim p}[q(x)]$ and $\rho = \tfrac12$ the Bhattacharyya
coefficient. For two von Mises–Fisher distributions the moment generating function
$\mathbb{E}[e^{a^\top x}] = C_p(\kappa)/C_p(\|\kappa\mu + a\|)$ gives the closed form

$$
\log \mathrm{PPK}_\rho = \rho[\log C_p(\kappa_1) + \log C_p(\kappa_2)] -
\log C_p(\rho\,\|\kappa_1\mu_1 + \kappa_2\mu_2\|),
$$

evaluated here with $\tilde C(\kappa) = \log C_p(\kappa) + \kappa$ as
$\rho[\tilde C(\kappa_1) + \tilde C(\kappa_2)] - \tilde C(r) -
\rho\,\frac{\kappa_1\kappa_2\|\mu_1-\mu_2\|^2}{\kappa_1+\kappa_2+\|\kappa_1\mu_1+\kappa_2\mu_2\|}$
with $r = \rho\|\kappa_1\mu_1 + \kappa_2\mu_2\|$, so nothing of size κ cancels (the last term uses
$(\kappa_1+\kappa_2)^2 - \|\kappa_1\mu_1+\kappa_2\mu_2\|^2 = \kappa_1\kappa_2\|\mu_1-\mu_2\|^2$).
`HypersphericalUniform` arguments are treated as vMFs with κ = 0.

`log_expected_likelihood` and `pairwise_log_expected_likelihood` also take a `NonIsotropicVMF` as the
second argument; there is no closed form, and they estimate by Monte Carlo over ``num_samples``
reparameterised samples (log-mean-exp, biased low by Jensen's inequality, bias O(1/S)). For closed-form
pairs ``num_samples`` is ignored, since the exact value beats any estimate.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution

from vmf_dists._checks import check_same_sphere
from vmf_dists.special import (
    _validation_enabled,
    in_gap_series_region,
    log_normalizer_plus_kappa,
    uniform_log_normalizer_gap,
)
from vmf_dists.uniform import HypersphericalUniform, log_sphere_area
from vmf_dists.von_mises_fisher import VonMisesFisher

__all__ = [
    "log_expected_likelihood",
    "log_probability_product_kernel",
    "log_bhattacharyya_coefficient",
    "pairwise_log_expected_likelihood",
    "pairwise_log_probability_product_kernel",
]


def _as_vmf_parameters(d: Distribution, other: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit loc [..., p], κ [...]) in float64 for a vMF, or for a uniform (κ = 0, any loc), the latter
    on the device of the ``other`` argument when that is a vMF (a uniform's own device is irrelevant)."""
    if isinstance(d, VonMisesFisher):
        return d._unit_loc64, d.concentration.to(torch.float64)
    assert isinstance(d, HypersphericalUniform)  # the other closed-form family (`_check_pair`)
    device = other.loc.device if isinstance(other, VonMisesFisher) else d.device
    loc = torch.zeros(d.batch_shape + d.event_shape, dtype=torch.float64, device=device)
    loc[..., 0] = 1.0
    return loc, torch.zeros(d.batch_shape, dtype=torch.float64, device=device)


def _closed_form_inputs(
    p: Distribution, q: Distribution, *, pairwise: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(κ₁, κ₂, ‖μ₁ − μ₂‖²) in float64: broadcast for single pairs, or [B, 1], [1, C], [B, C] for all pairs."""
    mu1, k1 = _as_vmf_parameters(p, q)
    mu2, k2 = _as_vmf_parameters(q, p)
    if not pairwise:
        return k1, k2, (mu1 - mu2).square().sum(-1)
    _check_pairwise_shapes(p, q)
    # One [B, p] × [p, C] product, in float64: 2 − 2μ_bᵀμ_c cancels for nearby directions, and at
    # large κ that error is multiplied by κ.
    sq_dist = (2.0 - 2.0 * (mu1 @ mu2.T)).clamp(min=0.0)
    return k1.unsqueeze(-1), k2.unsqueeze(0), sq_dist


def _result_dtype(p: Distribution, q: Distribution) -> torch.dtype:
    def dtype(d: Distribution) -> torch.dtype:
        if isinstance(d, VonMisesFisher):
            return d.loc.dtype
        assert isinstance(d, HypersphericalUniform)  # the other closed-form family (`_check_pair`)
        return d.dtype

    return torch.promote_types(dtype(p), dtype(q))


def _check_pair(p: Distribution, q: Distribution, rho: float) -> int:
    for d in (p, q):
        if not isinstance(d, (VonMisesFisher, HypersphericalUniform)):
            raise NotImplementedError(
                f"no kernel implemented for {type(d).__name__}; closed forms exist for VonMisesFisher and "
                "HypersphericalUniform"
            )
    check_same_sphere(p, q)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    return p.event_shape[0]


def _log_ppk_closed_form(
    dim: int, k1: torch.Tensor, k2: torch.Tensor, sq_dist: torch.Tensor, rho: float
) -> torch.Tensor:
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
    small = in_gap_series_region(dim, k1, k2, r)
    return torch.where(small, anchored, large)


def log_probability_product_kernel(
    p: Distribution, q: Distribution, rho: float, *, num_samples: int | None = None
) -> torch.Tensor:
    r"""$\log \int p(x)^\rho q(x)^\rho\,dx$ for two distributions on the same sphere (closed form for vMFs).

    For $p = \mathrm{vMF}(\mu_1, \kappa_1)$ and $q = \mathrm{vMF}(\mu_2, \kappa_2)$ the moment generating
    function gives

    $$
    \log \mathrm{PPK}_\rho(p, q) = \rho[\log C_p(\kappa_1) + \log C_p(\kappa_2)] -
    \log C_p(\rho\,\|\kappa_1\mu_1 + \kappa_2\mu_2\|),
    $$

    evaluated in float64 without cancellation (see the module docstring); a `HypersphericalUniform`
    is the case $\kappa = 0$.

    Args:
        p: a `VonMisesFisher` or `HypersphericalUniform`.
        q: a `VonMisesFisher` or `HypersphericalUniform` on the same sphere; batch shapes broadcast.
        rho: the exponent $\rho > 0$ (1: expected likelihood, ½: Bhattacharyya coefficient).
        num_samples: reserved for pairs without a closed form; ignored here.

    Returns:
        Tensor of the broadcast batch shape ``broadcast(p.batch_shape, q.batch_shape)``, in the promoted
        dtype of the parameters, differentiable in all parameters.

    Raises:
        ValueError: on different dimensions or $\rho \le 0$.
        NotImplementedError: for distribution types without a kernel (e.g. `NonIsotropicVMF`).

    References:
        T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).
    """
    dim = _check_pair(p, q, rho)
    k1, k2, sq_dist = _closed_form_inputs(p, q, pairwise=False)
    return _log_ppk_closed_form(dim, k1, k2, sq_dist, float(rho)).to(_result_dtype(p, q))


def _closed_form_pair(p: Distribution, q: Distribution) -> bool:
    closed = (VonMisesFisher, HypersphericalUniform)
    return isinstance(p, closed) and isinstance(q, closed)


def _check_temperature(temperature: float | torch.Tensor) -> float | torch.Tensor:
    """A positive float, or a positive 0-dim tensor kept as a tensor (a learnable temperature gets its gradient).

    A tensor's sign is checked only under torch's validation switch: the check is a host sync.
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise ValueError(
                f"temperature must be a float or a 0-dim floating tensor, got shape {tuple(temperature.shape)}"
            )
        if _validation_enabled(None) and not bool(temperature.detach() > 0):
            raise ValueError(f"temperature must be positive, got {temperature.item()}")
        return temperature
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def _is_one(temperature: float | torch.Tensor) -> bool:
    # A tensor temperature always takes the general path (no host sync, gradient in T).
    return not isinstance(temperature, torch.Tensor) and temperature == 1.0


def _check_num_samples(num_samples: int | None) -> int:
    if num_samples is None:
        raise ValueError("num_samples is required: this pair has no closed form and is estimated by Monte Carlo")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    return num_samples


def _log_tempered_closed_form(
    dim: int, kp: torch.Tensor, kq: torch.Tensor, sq_dist: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """log E_{x~vMF(μp,κp)}[exp(log vMF(x; μq, κq)/T)] = C̃(κq)/T − κq/T + log C(κp) − log C(‖κpμp + (κq/T)μq‖).

    Written with C̃ = log C + κ as C̃(κq)/T + C̃(κp) − C̃(r) − κp a ‖μp − μq‖²/(κp + a + r), a = κq/T.
    """
    a = kq / temperature
    norm_sq = ((kp + a).square() - kp * a * sq_dist).clamp(min=0.0)
    positive = norm_sq > 0
    r = torch.where(positive, torch.sqrt(torch.where(positive, norm_sq, 1.0)), 0.0)
    denom = (kp + a + r).clamp(min=torch.finfo(torch.float64).tiny)
    log_el: torch.Tensor = (
        log_normalizer_plus_kappa(dim, kq) / temperature
        + log_normalizer_plus_kappa(dim, kp)
        - log_normalizer_plus_kappa(dim, r)
        - kp * a * sq_dist / denom
    )
    return log_el


def _log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(values, dim=0) - math.log(values.shape[0])


def log_expected_likelihood(
    p: Distribution, q: Distribution, *, num_samples: int | None = None, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""$\log \mathrm{EL}(p, q) = \log \int p\,q = \log \mathbb{E}_{x\sim p}[q(x)]$, or its tempered form
    $\log \mathbb{E}_{x\sim p}[\exp(\log q(x)/T)]$.

    * Two `VonMisesFisher` / `HypersphericalUniform`: closed form (the probability product kernel with
      ρ = 1; for $T \ne 1$ the moment generating function gives
      $\log C_p(\kappa_q)/T + \log C_p(\kappa_p) - \log C_p(\|\kappa_p\mu_p + \kappa_q\mu_q/T\|)$).
      ``num_samples`` is ignored.
    * Otherwise (e.g. a `VonMisesFisher` p and a `NonIsotropicVMF` q): Monte Carlo over $S$ =
      ``num_samples`` reparameterised samples of p, $\log \frac1S\sum_s \exp(\log q(x_s)/T)$. This
      log-mean-exp is biased low (Jensen); by the delta method the bias is
      $\approx -\operatorname{Var}[e^{\log q(x)/T}] / (2S\,\mathbb{E}[e^{\log q(x)/T}]^2)$, i.e. it shrinks as $1/S$,
      and it is differentiable in the parameters of both p and q.

    Args:
        p: the distribution averaged over (must have ``rsample`` for the Monte-Carlo path).
        q: the distribution whose (tempered) likelihood is averaged.
        num_samples: $S$, required when there is no closed form.
        temperature: $T > 0$, a float or a 0-dim tensor (e.g. a learnable temperature, which then gets its
            gradient; its sign is checked only when torch's argument validation is on).

    Returns:
        Tensor of the broadcast batch shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: on different dimensions, $T \le 0$, a temperature tensor that is not 0-dim, or a
            missing or non-positive ``num_samples`` where one is needed.
        NotImplementedError: for distribution types other than `VonMisesFisher`,
            `HypersphericalUniform` and `NonIsotropicVMF`.

    References:
        T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).

    Example:
        >>> import torch
        >>> from vmf_dists import VonMisesFisher, log_expected_likelihood
        >>> p = VonMisesFisher(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 5.0)
        >>> q = VonMisesFisher(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 5.0)
        >>> round(log_expected_likelihood(p, p).item(), 4)  # 2 log C_3(5) - log C_3(10)
        -0.9215
        >>> bool(log_expected_likelihood(p, p) > log_expected_likelihood(p, q))
        True
    """
    temperature = _check_temperature(temperature)
    if _closed_form_pair(p, q):
        if _is_one(temperature):
            return log_probability_product_kernel(p, q, 1.0)
        dim = _check_pair(p, q, 1.0)
        k1, k2, sq_dist = _closed_form_inputs(p, q, pairwise=False)
        return _log_tempered_closed_form(dim, k1, k2, sq_dist, temperature).to(_result_dtype(p, q))
    from vmf_dists.nonisotropic import NonIsotropicVMF

    ours = (VonMisesFisher, HypersphericalUniform, NonIsotropicVMF)
    if not (isinstance(p, ours) and isinstance(q, ours)):
        raise NotImplementedError(
            f"no kernel implemented for {type(p).__name__} × {type(q).__name__}; supported: VonMisesFisher, "
            "HypersphericalUniform and NonIsotropicVMF"
        )
    check_same_sphere(p, q)
    x = p.rsample((_check_num_samples(num_samples),))
    return _log_mean_exp(q.log_prob(x) / temperature)


def log_bhattacharyya_coefficient(p: Distribution, q: Distribution, *, num_samples: int | None = None) -> torch.Tensor:
    r"""$\log \int \sqrt{p\,q}$, the log Bhattacharyya coefficient (probability product kernel, ρ = ½); ≤ 0,
    = 0 iff p = q.

    For two vMFs,
    $\tfrac12[\log C_p(\kappa_1) + \log C_p(\kappa_2)] - \log C_p(\tfrac12\|\kappa_1\mu_1 + \kappa_2\mu_2\|)$;
    see `log_probability_product_kernel`.

    Args:
        p: a `VonMisesFisher` or `HypersphericalUniform`.
        q: a `VonMisesFisher` or `HypersphericalUniform` on the same sphere; batch shapes broadcast.
        num_samples: reserved for pairs without a closed form; ignored here.

    Returns:
        Tensor of the broadcast batch shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
        ValueError: on different dimensions.
        NotImplementedError: for distribution types without a closed form (e.g. `NonIsotropicVMF`).

    References:
        * A. Bhattacharyya, "On a measure of divergence between two statistical populations defined
          by their probability distributions", Bull. Calcutta Math. Soc. 35 (1943).
        * T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).
    """
    return log_probability_product_kernel(p, q, 0.5, num_samples=num_samples)


def pairwise_log_probability_product_kernel(
    p: Distribution, q: Distribution, rho: float, *, num_samples: int | None = None
) -> torch.Tensor:
    r"""All pairs: $\log\mathrm{PPK}_\rho(p_b, q_c)$ for ``p`` with batch shape ``[B]`` and ``q`` with batch ``[C]``.

    Uses $\|\kappa_b\mu_b + \kappa_c\mu_c\|^2 = (\kappa_b+\kappa_c)^2 - \kappa_b\kappa_c\|\mu_b-\mu_c\|^2$ with
    $\|\mu_b - \mu_c\|^2 = 2 - 2\mu_b^\top\mu_c$ from one ``[B, p] × [p, C]`` matrix product; no
    ``[B, C, p]`` tensor is formed. The product and the rest (elementwise on ``[B, C]``) run in float64,
    since $2 - 2\mu_b^\top\mu_c$ cancels for nearby directions and κ multiplies that error.

    Args:
        p: a `VonMisesFisher` or `HypersphericalUniform` with batch shape ``[B]``.
        q: a `VonMisesFisher` or `HypersphericalUniform` with batch shape ``[C]`` on the same sphere.
        rho: the exponent $\rho > 0$.
        num_samples: reserved for pairs without a closed form; ignored here.

    Returns:
        Tensor of shape ``[B, C]``.

    Raises:
        ValueError: if the batch shapes are not one-dimensional, on different dimensions or $\rho \le 0$.
        NotImplementedError: for distribution types without a kernel.

    References:
        T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).
    """
    dim = _check_pair(p, q, rho)
    k1, k2, sq_dist = _closed_form_inputs(p, q, pairwise=True)
    return _log_ppk_closed_form(dim, k1, k2, sq_dist, float(rho)).to(_result_dtype(p, q))


def pairwise_log_expected_likelihood(
    p: Distribution, q: Distribution, *, num_samples: int | None = None, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""All pairs $\log\mathrm{EL}(p_b, q_c)$ (tempered by $T$), shape ``[B, C]`` for batch shapes ``[B]`` and ``[C]``.

    * Two vMF / uniform families: closed form from one ``[B, p] × [p, C]`` matrix product (see
      `pairwise_log_probability_product_kernel`; $T \ne 1$ as in `log_expected_likelihood`).
    * ``p`` a `VonMisesFisher` (images) and ``q`` a `NonIsotropicVMF` (proxies): Monte Carlo over
      $S$ = ``num_samples`` reparameterised samples $x$ of each $p_b$. With $k_c$, $\mu_c$ the proxies'
      parameters, the two data-dependent quantities of $\log q_c(x)$ are
      $\theta_c^\top K_c x = x \cdot (k_c^2 \odot \mu_c)$ and $\|K_c x\|^2 = (x \odot x)\cdot k_c^2$: two
      ``[S·B, p] × [p, C]`` products in the parameters' dtype (float32 on a GPU is fine), then
      $\log q_c(x) = [\log C_p(\|\theta_c\|) + \|\theta_c\|] - \|\theta_c\|(1 - \cos) + \sum_d \log k_{c,d} -
      \tfrac p2\log\|K_cx\|^2$
      with $\cos = \theta_c^\top K_c x / (\|\theta_c\|\,\|K_c x\|)$ and a log-mean-exp over $S$. No
      ``[S, B, C, p]`` tensor is formed. Jensen bias as in `log_expected_likelihood`.

    ``temperature`` may be a 0-dim tensor (a learnable temperature gets its gradient), as in
    `log_expected_likelihood`.

    Args:
        p: a `VonMisesFisher` with batch shape ``[B]``, or a `HypersphericalUniform`
            when ``q`` is one of the closed-form families.
        q: a `VonMisesFisher`, `HypersphericalUniform` or `NonIsotropicVMF` with batch shape ``[C]``
            on the same sphere.
        num_samples: $S$, required for a `NonIsotropicVMF` ``q``; ignored for closed-form pairs.
        temperature: $T > 0$, a float or a 0-dim tensor.

    Returns:
        Tensor of shape ``[B, C]``; the Monte-Carlo path returns it in the parameters' dtype, the closed
        form in their promoted dtype.

    Raises:
        ValueError: on batch shapes that are not one-dimensional, different dimensions, $T \le 0$ or a
            missing ``num_samples``.
        NotImplementedError: for other pairs of families.

    References:
        * T. Jebara, R. Kondor, A. Howard, "Probability product kernels", JMLR 5 (2004).
        * M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on
          Proxy-based Deep Metric Learning", ECCV 2022 (vMF images against nivMF proxies).
    """
    from vmf_dists.nonisotropic import NonIsotropicVMF  # kernels is imported by nonisotropic's users

    temperature = _check_temperature(temperature)
    if _closed_form_pair(p, q):
        if _is_one(temperature):
            return pairwise_log_probability_product_kernel(p, q, 1.0)
        dim = _check_pair(p, q, 1.0)
        k1, k2, sq_dist = _closed_form_inputs(p, q, pairwise=True)
        return _log_tempered_closed_form(dim, k1, k2, sq_dist, temperature).to(_result_dtype(p, q))
    if not (isinstance(p, VonMisesFisher) and isinstance(q, NonIsotropicVMF)):
        raise NotImplementedError(
            f"pairwise kernel for {type(p).__name__} × {type(q).__name__}; supported: vMF/uniform pairs and "
            "VonMisesFisher × NonIsotropicVMF"
        )
    check_same_sphere(p, q)
    _check_pairwise_shapes(p, q)
    samples = _check_num_samples(num_samples)
    dim = p.dim
    x = p.rsample((samples,))  # [S, B, p]
    flat = x.reshape(-1, dim)
    k = q.concentration
    k_sq = k * k
    theta = q.theta  # k ⊙ μ, [C, p]
    theta_norm = torch.linalg.vector_norm(theta, dim=-1)  # [C]
    dot = flat @ (k * theta).T  # θ_cᵀ K_c x = x · (k_c² ⊙ μ_c), [S·B, C]
    kx_sq = (flat * flat) @ k_sq.T  # ‖K_c x‖², [S·B, C]
    kx_norm = torch.sqrt(kx_sq)
    cosine = dot / (theta_norm * kx_norm)
    log_q = (
        (log_normalizer_plus_kappa(dim, theta_norm) + torch.log(k).sum(-1))
        - theta_norm * (1.0 - cosine)
        - dim * torch.log(kx_norm)
    )
    return _log_mean_exp(log_q.reshape(samples, -1, log_q.shape[-1]) / temperature)


def _check_pairwise_shapes(p: Distribution, q: Distribution) -> None:
    if len(p.batch_shape) != 1 or len(q.batch_shape) != 1:
        raise ValueError(
            f"pairwise kernels need batch shapes [B] and [C], got {tuple(p.batch_shape)} and {tuple(q.batch_shape)}"
        )
