r"""The normalised non-isotropic von Mises–Fisher distribution (nivMF)."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import lazy_property

from vmf_dists._checks import broadcast_shapes, check_sample_on_sphere, check_unit_and_nonnegative, check_values
from vmf_dists.special import _validation_enabled, log_normalizer_plus_kappa
from vmf_dists.von_mises_fisher import VonMisesFisher, _check_loc, _unit

__all__ = ["NonIsotropicVMF"]

_NO_CLOSED_FORM = (
    "NonIsotropicVMF has no closed-form {what}; {how}"
)
_FROM_SAMPLES = "estimate it from samples, e.g. d.sample((n,)).{stat}(0) (sampling is exact)"
_WITH_MONTE_CARLO = ("estimate it with vmf_dists.monte_carlo.entropy (an estimate and its standard error; "
                     "kl_divergence and expected_likelihood are there too)")


class NonIsotropicVMF(TorchDistribution):
    r"""Non-isotropic vMF: the push-forward of a vMF through a diagonal stretch of the sphere.

    With a unit direction $\mu$, per-dimension concentrations $k \in \mathbb{R}^p_{>0}$, $K = \operatorname{diag}(k)$
    and $\theta = K\mu$: draw $y \sim \mathrm{vMF}(\theta/\|\theta\|, \|\theta\|)$ and return
    $x = K^{-1}y/\|K^{-1}y\|$. The inverse map $x \mapsto Kx/\|Kx\|$ has Jacobian $|\det K|/\|Kx\|^p$ on
    $S^{p-1}$, so the density is

    $$
    \log p(x) = \log C_p(\|\theta\|) + \frac{\theta^\top K x}{\|Kx\|} + \sum_d \log k_d - p \log \|Kx\|,
    $$

    which integrates to 1 exactly, equals $\mathrm{vMF}(\mu, c)$ when $k = c\mathbf{1}$, and keeps the
    geometry of Kirchhof et al. (2022): dividing by $k$ shrinks the coordinates with large $k_d$, so the
    mass is tight along those dimensions and spreads along the ones with small $k_d$ (the mode is in
    general not $\mu$).
    Sampling is exact and reparameterised in both parameters (through the vMF sampler's gradients).
    The paper's own "nivMF" log-likelihoods differ from this by the Jacobian and are not normalised; see
    the docs page "Non-isotropic vMF".

    ``mean``, ``mode``, ``entropy`` and ``variance`` have no closed form and raise
    `NotImplementedError`; `vmf_dists.monte_carlo` estimates entropy, KL divergences and expected
    likelihoods with standard errors.

    Numerics: float64 inside, the parameters' dtype outside; the first two terms are evaluated as
    $[\log C_p(\|\theta\|) + \|\theta\|] - \|\theta\|\,\|\hat\theta - \widehat{Kx}\|^2/2$ (no cancellation at
    large $\|\theta\|$).

    Args:
        loc: mean direction $\mu$, unit vectors of shape ``[..., p]``, $p \ge 2$.
        concentration: positive per-dimension concentrations $k$ of shape ``[..., p]`` (broadcasting
            with ``loc`` over the batch dimensions).
        validate_args: check unit ``loc``, positive finite ``concentration`` and samples on the sphere.

    Raises:
        ValueError: if ``loc`` is not a floating tensor ``[..., p]`` with $p \ge 2$, on shape mismatch
            (``concentration``'s last dimension must be p; batch shapes must broadcast) or, with
            validation, non-unit ``loc`` or non-positive or non-finite ``concentration``.

    References:
        * M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
          Deep Metric Learning", ECCV 2022.

    Example:
        >>> import torch
        >>> from vmf_dists import NonIsotropicVMF
        >>> d = NonIsotropicVMF(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 20.0, 5.0]))
        >>> x = d.rsample((4,))
        >>> x.shape, d.log_prob(x).shape
        (torch.Size([4, 3]), torch.Size([4]))
    """

    arg_constraints = {
        "loc": constraints.sphere,
        "concentration": constraints.independent(constraints.positive, 1),
    }
    support = constraints.sphere
    has_rsample = True

    def __init__(self, loc: torch.Tensor, concentration: torch.Tensor, validate_args: bool | None = None):
        _check_loc(loc)
        concentration = torch.as_tensor(concentration, device=loc.device)
        if not concentration.is_floating_point():
            concentration = concentration.to(loc.dtype)
        if concentration.dim() < 1 or concentration.shape[-1] != loc.shape[-1]:
            raise ValueError(
                f"concentration must have shape [..., p] with p = {loc.shape[-1]} (one per dimension), "
                f"got {tuple(concentration.shape)}"
            )
        dtype = torch.promote_types(loc.dtype, concentration.dtype)
        loc, concentration = loc.to(dtype), concentration.to(dtype)
        try:
            batch_shape = broadcast_shapes(loc.shape[:-1], concentration.shape[:-1])
        except RuntimeError as error:
            raise ValueError(
                f"batch shapes of loc {tuple(loc.shape[:-1])} and concentration {tuple(concentration.shape[:-1])} "
                "do not broadcast"
            ) from error
        validate = _validation_enabled(validate_args)
        if validate:
            check_unit_and_nonnegative(loc, concentration)
            if concentration.numel() and not bool((concentration > 0).all()):
                check_values(concentration, "concentration", positive=True)
        event_shape = loc.shape[-1:]
        self.loc = loc.expand(batch_shape + event_shape)
        self.concentration = concentration.expand(batch_shape + event_shape)
        super().__init__(batch_shape, event_shape, validate_args=False)
        self._validate_args = validate

    @classmethod
    def infer_shapes(  # type: ignore[override]  # Pyro's base is the catch-all (**arg_shapes); this names them
        cls, loc: tuple[int, ...], concentration: tuple[int, ...]
    ) -> tuple[torch.Size, torch.Size]:
        """(batch_shape, event_shape) of a distribution built from arguments of these shapes (Pyro's protocol).

        Args:
            loc: the shape of ``loc``, ``[..., p]``.
            concentration: the shape of ``concentration``, ``[..., p]``.

        Returns:
            ``(broadcast(loc[:-1], concentration[:-1]), loc[-1:])``.
        """
        return torch.Size(torch.broadcast_shapes(tuple(loc[:-1]), tuple(concentration[:-1]))), torch.Size(loc[-1:])

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: NonIsotropicVMF | None = None
    ) -> NonIsotropicVMF:
        """The same distribution with its batch shape expanded (what Pyro's ``plate`` calls).

        Args:
            batch_shape: the new batch shape, to which the current one broadcasts.
            _instance: for subclasses (torch.distributions' ``expand`` protocol).

        Returns:
            A `NonIsotropicVMF` with batch shape ``batch_shape`` (parameters expanded, not copied).

        Raises:
            RuntimeError: if the current batch shape does not broadcast to ``batch_shape``.
        """
        new: NonIsotropicVMF = self._get_checked_instance(NonIsotropicVMF, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape + self.event_shape)
        super(NonIsotropicVMF, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def dim(self) -> int:
        """The ambient dimension $p$ (a Python int, also under ``torch.jit.trace``, which traces sizes as tensors)."""
        return int(self.event_shape[0])

    @lazy_property
    def theta(self) -> torch.Tensor:
        r"""The natural parameter $\theta = K\mu = k \odot \mu$ of the base vMF, shape ``batch_shape + [p]``."""
        return self.concentration * _unit(self.loc)

    @lazy_property
    def _theta64(self) -> torch.Tensor:
        # θ in float64: with float32 concentrations near the ends of the range (1e-30, 1e38) the products
        # and their norm would under- or overflow
        return self.concentration.to(torch.float64) * _unit(self.loc.to(torch.float64))

    @lazy_property
    def base_vmf(self) -> VonMisesFisher:
        r"""The vMF that is pushed forward: $\mathrm{vMF}(\theta/\|\theta\|, \|\theta\|)$, batch shape
        ``batch_shape``."""
        norm = torch.linalg.vector_norm(self._theta64, dim=-1)
        direction = self._theta64 / norm.unsqueeze(-1)
        return VonMisesFisher(direction.to(self.loc.dtype), norm.to(self.loc.dtype), validate_args=False)

    def _validate_sample(self, value: torch.Tensor) -> None:
        check_sample_on_sphere(self, value)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log density of points on the sphere (normalised: it integrates to 1).

        $$
        \log p(x) = [\log C_p(\|\theta\|) + \|\theta\|] - \|\theta\|\,\|\hat\theta - \widehat{Kx}\|^2/2
          + \sum_d \log k_d - p\log\|Kx\|,
        $$

        with $\hat v = v/\|v\|$; the first two terms equal $\log C_p(\|\theta\|) + \theta^\top Kx/\|Kx\|$.
        Computed in float64.

        Args:
            value: unit vectors $x$ of shape ``[..., p]``, ``value.shape[:-1]`` broadcastable with
                ``batch_shape``.

        Returns:
            The log density, shape ``broadcast(value.shape[:-1], batch_shape)``, in the promoted dtype of
            ``loc`` and ``value``; differentiable in ``loc``, ``concentration`` and ``value``.

        Raises:
            ValueError: with validation, if ``value`` does not lie on the unit sphere.
        """
        if self._validate_args:
            check_sample_on_sphere(self, value)
        k = self.concentration.to(torch.float64)
        theta = self._theta64
        theta_norm = torch.linalg.vector_norm(theta, dim=-1)
        kx = k * value.to(torch.float64)
        kx_norm = torch.linalg.vector_norm(kx, dim=-1)
        sq_dist = (theta / theta_norm.unsqueeze(-1) - kx / kx_norm.unsqueeze(-1)).square().sum(-1)
        out: torch.Tensor = (
            log_normalizer_plus_kappa(self.dim, theta_norm)
            - 0.5 * theta_norm * sq_dist
            + torch.log(k).sum(-1)
            - self.dim * torch.log(kx_norm)
        )
        return out.to(torch.promote_types(self.loc.dtype, value.dtype))

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        r"""Exact, reparameterised samples $x = K^{-1}y/\|K^{-1}y\|$ with $y$ from `base_vmf`.

        Gradients reach ``loc`` and ``concentration`` through $\theta$ and the map (the base vMF's
        concentration gradient is the implicit reparameterisation of Figurnov et al., 2018).

        Args:
            sample_shape: leading shape of independent draws.

        Returns:
            Unit vectors of shape ``sample_shape + batch_shape + [p]``.

        Raises:
            RuntimeError: as `VonMisesFisher.rsample`.
        """
        y = self.base_vmf.rsample(sample_shape)
        # x is unchanged by scaling k, so divide by k/max(k) in float64: no overflow for tiny k in float32
        k = self.concentration.to(torch.float64)
        z = y.to(torch.float64) / (k / k.detach().amax(-1, keepdim=True))
        x: torch.Tensor = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)
        return x.to(y.dtype)

    @property
    def mean(self) -> torch.Tensor:
        """Not available in closed form: raises `NotImplementedError` (average samples from `rsample`)."""
        raise NotImplementedError(_NO_CLOSED_FORM.format(what="mean", how=_FROM_SAMPLES.format(stat="mean")))

    @property
    def mode(self) -> torch.Tensor:
        """Not available in closed form: raises `NotImplementedError`."""
        how = "locate it numerically, e.g. by maximising log_prob over the sphere"
        raise NotImplementedError(_NO_CLOSED_FORM.format(what="mode", how=how))

    @property
    def variance(self) -> torch.Tensor:
        """Not available in closed form: raises `NotImplementedError` (use sample variances)."""
        raise NotImplementedError(_NO_CLOSED_FORM.format(what="variance", how=_FROM_SAMPLES.format(stat="var")))

    def entropy(self) -> torch.Tensor:
        """Not available in closed form; use `vmf_dists.monte_carlo.entropy`.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(_NO_CLOSED_FORM.format(what="entropy", how=_WITH_MONTE_CARLO))
