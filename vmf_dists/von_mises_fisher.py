r"""The von Mises–Fisher distribution on the unit sphere $S^{p-1} \subset \mathbb{R}^p$."""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import lazy_property

from vmf_dists._bessel import BesselParts
from vmf_dists._bessel_table import bessel_parts
from vmf_dists._checks import (
    broadcast_shapes,
    check_sample_on_sphere,
    check_unit_and_nonnegative,
    check_unit_vectors,
    check_values,
    finite_nonnegative,
)
from vmf_dists._function import apply, without_jvp
from vmf_dists._sampling import _expanded, rsample_vmf
from vmf_dists.special import (
    _LOG_2PI,
    _validation_enabled,
    inverse_mean_resultant_length,
    mean_resultant_length,
    mean_resultant_length_complement,
    mean_resultant_length_derivative,
    vmf_entropy,
    vmf_parts,
)

__all__ = ["VonMisesFisher"]

# Below this dimension the tangent norm is computed from the projected Gaussian (‖g‖² − (μᵀg)² can
# cancel when g is nearly parallel to μ, which is likely only in low dimensions).
_EXACT_TANGENT_NORM_MAX_DIM = 16


def _check_loc(loc: object) -> None:
    """A floating tensor of shape [..., p] with p ≥ 2, or ValueError (the unit norm is a constraint)."""
    if not isinstance(loc, torch.Tensor) or not loc.is_floating_point():
        raise ValueError("loc must be a floating-point tensor of shape [..., p]")
    if loc.dim() < 1 or loc.shape[-1] < 2:
        raise ValueError(f"loc must have shape [..., p] with p ≥ 2, got {tuple(loc.shape)}")


def _unit(loc: torch.Tensor) -> torch.Tensor:
    """loc/‖loc‖, normalising only the distinct vectors of a broadcast (stride-0) loc and expanding
    back, so that a shared direction stays one vector in memory (Pyro plates expand distributions)."""
    compact = loc
    for d, (size, stride) in enumerate(zip(loc.shape[:-1], loc.stride()[:-1])):
        if stride == 0 and size > 1:
            compact = compact.narrow(d, 0, 1)
    unit: torch.Tensor = compact / torch.linalg.vector_norm(compact, dim=-1, keepdim=True)
    return unit.expand(loc.shape)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class _LogDensity(torch.autograd.Function):
    r"""log f(x) = [log C_p(κ) + κ] − κ‖x − μ‖²/2 as one autograd node, with a hand-written backward.

    μ = loc/‖loc‖ is never rounded as a vector: x − μ is formed as (x − loc) + (1 − 1/‖loc‖)·loc, whose
    rounding moves μ only along itself, which changes ‖x − μ‖² at second order. (Rounding μ's
    components would shift the log density by ~κ‖x − μ‖·ε: 50 ulps at κ = 1e8.)
    ∂/∂x = −κ(x − μ), ∂/∂μ = κ(x − μ) (and ∂/∂loc its tangent part over ‖loc‖),
    ∂/∂κ = (1 − A_p(κ)) − ‖x − μ‖²/2; double backward rebuilds them from differentiable operations.
    ``parts`` are the distribution's cached Bessel parts (or None).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        value: torch.Tensor, loc: torch.Tensor, kappa: torch.Tensor, dim: int, parts: BesselParts | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        norm = torch.linalg.vector_norm(loc, dim=-1, keepdim=True)
        diff = torch.addcmul(value - loc, 1.0 - torch.reciprocal(norm), loc)  # x − loc/‖loc‖
        sq_dist = diff.square().sum(-1)
        with_complement = kappa.requires_grad
        if parts is None or (with_complement and parts.complement is None):
            parts = bessel_parts(dim / 2.0 - 1.0, kappa.detach().to(torch.float64), log_scaled=True,
                                 complement=with_complement)
        assert parts.log_scaled is not None  # requested above, or one of vmf_parts
        mode = (-0.5 * dim * _LOG_2PI - parts.log_scaled).to(kappa.dtype)  # log C_p(κ) + κ
        complement = parts.complement.to(kappa.dtype) if with_complement and parts.complement is not None else None
        return torch.addcmul(mode, kappa, sq_dist, value=-0.5), diff, sq_dist, complement, norm

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor | None, ...]) -> None:
        value, loc, kappa, dim, _ = inputs
        _, diff, sq_dist, complement, norm = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        ctx.set_materialize_grads(False)  # no zero tensors for the extra outputs' (unused) gradients
        ctx.save_for_backward(value, loc, kappa, diff, sq_dist, complement, norm)
        ctx.save_for_forward(value, loc, kappa, diff, sq_dist, complement, norm)
        ctx.dim = dim

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor | None, *_: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        if grad is None:  # only the non-differentiable outputs were used (gradients are not materialised)
            return None, None, None, None, None
        value, loc, kappa, diff, sq_dist, complement, norm = ctx.saved_tensors
        need_value, need_loc, need_kappa = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: the same derivatives, from differentiable operations
            norm = torch.linalg.vector_norm(loc, dim=-1, keepdim=True)  # ‖loc‖ too: the loc-Hessian needs it
            diff = value - loc / norm
            sq_dist = diff.square().sum(-1)
            complement = mean_resultant_length_complement(ctx.dim, kappa) if need_kappa else None
        elif need_kappa and complement is None:
            complement = bessel_parts(ctx.dim / 2.0 - 1.0, kappa.detach().to(torch.float64), complement=True).complement
            assert complement is not None
            complement = complement.to(kappa.dtype)
        grad_value = grad_loc = grad_kappa = None
        if need_value or need_loc:
            scaled = (grad * kappa).unsqueeze(-1) * diff  # −∂/∂x = ∂/∂μ
            grad_value = _reduce_to(-scaled, value.shape) if need_value else None
            if need_loc:
                grad_loc = _tangent_part(_reduce_to(scaled, loc.shape), loc, norm)
        if need_kappa:
            grad_kappa = _reduce_to(grad * torch.add(complement, sq_dist, alpha=-0.5), kappa.shape)
        return grad_value, grad_loc, grad_kappa, None, None

    @staticmethod
    def jvp(
        ctx: Any,
        value_tangent: torch.Tensor | None,
        loc_tangent: torch.Tensor | None,
        kappa_tangent: torch.Tensor | None,
        *_: Any,
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        value, loc, kappa, _, _, _, norm = ctx.saved_tensors
        diff = value - loc / torch.linalg.vector_norm(loc, dim=-1, keepdim=True)
        tangent = None
        if value_tangent is not None or loc_tangent is not None:
            mu_tangent = None if loc_tangent is None else _tangent_part(loc_tangent, loc, norm)
            if mu_tangent is None:
                moved = value_tangent
            else:
                moved = -mu_tangent if value_tangent is None else value_tangent - mu_tangent
            tangent = -kappa * (diff * moved).sum(-1)
        if kappa_tangent is not None:
            slope = torch.add(mean_resultant_length_complement(ctx.dim, kappa), diff.square().sum(-1), alpha=-0.5)
            tangent = slope * kappa_tangent if tangent is None else tangent + slope * kappa_tangent
        return tangent, None, None, None, None


def _tangent_part(vector: torch.Tensor, loc: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(I − μμᵀ) v / ‖loc‖ with μ = loc/‖loc‖: the derivative of loc ↦ loc/‖loc‖ applied to v."""
    mu = loc / norm
    return torch.addcmul(vector, (vector * mu).sum(-1, keepdim=True), mu, value=-1.0) / norm


_LogDensityWithoutJvp = without_jvp(_LogDensity)


class VonMisesFisher(TorchDistribution):
    r"""The von Mises–Fisher distribution $\mathrm{vMF}(\mu, \kappa)$ on the unit sphere $S^{p-1} \subset \mathbb{R}^p$.

    A distribution of unit vectors $x$ around a mean direction $\mu$ (``loc``), concentrated the more
    tightly the larger $\kappa \ge 0$ (``concentration``); $\kappa = 0$ is the uniform distribution
    (exactly). Its density with respect to the surface measure of the sphere is

    $$
    f(x; \mu, \kappa) = C_p(\kappa)\, e^{\kappa \mu^\top x}, \qquad
    \log C_p(\kappa) = \nu\log\kappa - \tfrac p2 \log 2\pi - \log I_\nu(\kappa),\ \nu = \tfrac p2 - 1
    $$

    (`vmf_log_normalizer`), exact for every $p \ge 2$ and $0 \le \kappa \le 10^8$. Moments, with
    $A = A_p(\kappa)$ (`mean_resultant_length`): $\mathbb{E}[x] = A\mu$,
    $\operatorname{Cov}[x] = \tfrac{A}{\kappa} I + (A_p'(\kappa) - \tfrac A\kappa)\mu\mu^\top$
    (so $\operatorname{Var}[\mu^\top x] = A_p'(\kappa) = 1 - A^2 - \tfrac{p-1}{\kappa}A$), entropy
    $H = -\log C_p(\kappa) - \kappa A$. Closed-form KL divergences to another vMF and to
    `HypersphericalUniform` are registered with `torch.distributions.kl_divergence` (`vmf_dists.kl`);
    `fit` is the maximum-likelihood estimate.

    Sampling (`rsample`) is exact: $w = \mu^\top x$ by the inverse CDF for $p = 3$ and by Wood's
    (1994) rejection sampler otherwise, vectorised (all proposals of a round drawn at once; on
    accelerators the rounds run in masked blocks with ~2 host synchronisations per call; under
    ``torch.compile`` a form without host synchronisation, see the sampling guide), then
    $x = w\mu + \sqrt{1-w^2}\,v$ with $v$ the normalised tangent part of a Gaussian (no Householder
    reflection). Gradients: in ``loc`` by the reparameterisation; in ``concentration`` by implicit
    reparameterisation (Figurnov et al., 2018), unbiased. ``loc`` is used as ``loc / ‖loc‖``, which
    is the identity on valid input and makes its gradients tangent to the sphere.

    Numerics: everything is computed in float64 internally and rounded once to the parameters' dtype;
    ``log_prob`` is evaluated as $[\log C_p(\kappa) + \kappa] - \kappa\|x - \mu\|^2/2$, so float32 keeps
    relative precision at the mode up to κ = 1e8.

    Args:
        loc: mean direction $\mu$, unit vectors of shape ``[..., p]`` with $p \ge 2$.
        concentration: finite $\kappa \ge 0$, shape broadcastable with ``loc.shape[:-1]``; a Python
            number is accepted (and takes ``loc``'s dtype).
        validate_args: check the constraints (unit ``loc``, $\kappa \ge 0$, samples on the sphere).
            Default: torch.distributions' global switch.

    Raises:
        ValueError: if ``loc`` has no last dimension of size ≥ 2, the shapes do not broadcast, or (with
            validation) ``loc`` is not unit-norm or ``concentration`` is negative or NaN.

    References:
        * K. V. Mardia, P. E. Jupp, *Directional Statistics*, Wiley (2000), §9.3.
        * A. T. A. Wood, "Simulation of the von Mises Fisher distribution", *Commun. Stat. Simul.
          Comput.* 23 (1994).
        * M. Figurnov, S. Mohamed, A. Mnih, "Implicit reparameterization gradients", NeurIPS 2018.
        * A. Banerjee et al., "Clustering on the unit hypersphere using von Mises–Fisher
          distributions", JMLR 6 (2005) (maximum likelihood).

    Example:
        >>> import torch
        >>> from vmf_dists import VonMisesFisher
        >>> d = VonMisesFisher(torch.tensor([0.0, 0.0, 1.0]), 10.0)
        >>> x = d.rsample((5,))
        >>> x.shape, d.log_prob(x).shape
        (torch.Size([5, 3]), torch.Size([5]))
        >>> d.mean  # A_3(10) μ
        tensor([0.0000, 0.0000, 0.9000])
        >>> batch = VonMisesFisher(torch.eye(3), torch.tensor([1.0, 10.0, 100.0]))  # batch_shape [3]
        >>> batch.rsample((4,)).shape
        torch.Size([4, 3, 3])
    """

    arg_constraints = {"loc": constraints.sphere, "concentration": finite_nonnegative}
    support = constraints.sphere
    has_rsample = True

    def __init__(self, loc: torch.Tensor, concentration: torch.Tensor | float, validate_args: bool | None = None):
        _check_loc(loc)
        validate = _validation_enabled(validate_args)
        if isinstance(concentration, torch.Tensor):
            if not concentration.is_floating_point():
                concentration = concentration.to(loc.dtype)
            if concentration.device != loc.device:  # e.g. a CPU scalar with a CUDA loc
                concentration = concentration.to(device=loc.device)
            same = loc.dtype == concentration.dtype
            dtype = loc.dtype if same else torch.promote_types(loc.dtype, concentration.dtype)
        else:  # a Python number takes loc's dtype, as in torch.distributions
            if validate:
                check_values(torch.tensor(float(concentration), dtype=torch.float64), "concentration")
            concentration = torch.as_tensor(concentration, dtype=loc.dtype, device=loc.device)
            dtype = loc.dtype
        try:
            batch_shape = broadcast_shapes(loc.shape[:-1], concentration.shape)
        except RuntimeError as error:
            raise ValueError(
                f"concentration of shape {tuple(concentration.shape)} does not broadcast with "
                f"loc.shape[:-1] = {tuple(loc.shape[:-1])}"
            ) from error
        if validate:  # each at its own precision, before the dtypes are promoted
            check_unit_and_nonnegative(loc, concentration)
        loc = loc if loc.dtype == dtype else loc.to(dtype)
        concentration = concentration if concentration.dtype == dtype else concentration.to(dtype)
        loc_shape = batch_shape + loc.shape[-1:]
        self.loc = loc if loc.shape == loc_shape else loc.expand(loc_shape)
        self.concentration = concentration if concentration.shape == batch_shape else concentration.expand(batch_shape)
        super().__init__(batch_shape, loc.shape[-1:], validate_args=False)
        self._validate_args = validate

    @classmethod
    def infer_shapes(  # type: ignore[override]  # Pyro's base is the catch-all (**arg_shapes); this names them
        cls, loc: tuple[int, ...], concentration: tuple[int, ...] = ()
    ) -> tuple[torch.Size, torch.Size]:
        """(batch_shape, event_shape) of a distribution built from arguments of these shapes (Pyro's protocol).

        Args:
            loc: the shape of ``loc``, ``[..., p]``.
            concentration: the shape of ``concentration`` (``()`` for a number).

        Returns:
            ``(broadcast(loc[:-1], concentration), loc[-1:])``.
        """
        return torch.Size(torch.broadcast_shapes(tuple(loc[:-1]), tuple(concentration))), torch.Size(loc[-1:])

    def expand(
        self, batch_shape: torch.Size | list[int] | tuple[int, ...], _instance: VonMisesFisher | None = None
    ) -> VonMisesFisher:
        """The same distribution with its batch shape expanded (what Pyro's ``plate`` calls).

        The parameters are expanded views, not copies, and the validation setting is kept.

        Args:
            batch_shape: the new batch shape, to which ``batch_shape`` broadcasts.
            _instance: for subclasses (torch.distributions' ``expand`` protocol).

        Returns:
            A `VonMisesFisher` with batch shape ``batch_shape`` and event shape ``[p]``.

        Raises:
            RuntimeError: if the current batch shape does not broadcast to ``batch_shape``.
        """
        new: VonMisesFisher = self._get_checked_instance(VonMisesFisher, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.concentration = self.concentration.expand(batch_shape)
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def dim(self) -> int:
        """The ambient dimension $p$ (a Python int, also under ``torch.jit.trace``, which traces sizes as tensors)."""
        return int(self.event_shape[0])

    @lazy_property
    def _unit_loc(self) -> torch.Tensor:
        return _unit(self.loc)

    @lazy_property
    def _unit_loc64(self) -> torch.Tensor:
        # normalised in float64, so that float32 rounding of ‖loc‖ does not enter 2 − 2μ₁ᵀμ₂ and the like
        return _unit(self.loc.to(torch.float64))

    @lazy_property
    def _kappa64(self) -> torch.Tensor:
        return self.concentration.to(torch.float64)

    def _validate_sample(self, value: torch.Tensor) -> None:
        check_sample_on_sphere(self, value)

    def _parts(self) -> BesselParts | None:
        """The Bessel parts of κ that log_prob, entropy, the KLs and the sampler's gradient read, computed
        once per distribution (one evaluation instead of one per method: at small batch sizes the
        evaluation, not the arithmetic, is the cost). Recomputed if κ was modified in place; None under
        ``torch.func`` transforms, ``torch.compile`` and ``torch.jit.trace``, where each method computes its own."""
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        kappa = self.concentration
        if kappa.is_inference():  # no version counter to tell an in-place change: not cached
            return vmf_parts(self.dim, kappa.to(torch.float64), False)
        key = (kappa._version, kappa.requires_grad)
        cached = self.__dict__.get("_parts_cache")
        if cached is None or cached[0] != key:
            cached = (key, vmf_parts(self.dim, kappa.detach().to(torch.float64), kappa.requires_grad))
            self._parts_cache = cached
        return cached[1]

    # ---------------------------------------------------------------------------------------------

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log density $\log f(x; \mu, \kappa) = \log C_p(\kappa) + \kappa\mu^\top x$ of points on the sphere.

        Evaluated as $[\log C_p(\kappa) + \kappa] - \kappa\|x - \mu\|^2/2$ (equal for unit $x$), which
        keeps relative precision near the mode at large κ.

        Args:
            value: unit vectors $x$ of shape ``[..., p]``, ``value.shape[:-1]`` broadcastable with
                ``batch_shape`` (e.g. ``sample_shape + batch_shape + [p]``).

        Returns:
            The log density, shape ``broadcast(value.shape[:-1], batch_shape)``, differentiable in
            ``loc``, ``concentration`` and ``value``.

        Raises:
            ValueError: with validation, if ``value`` does not lie on the unit sphere.
        """
        if self._validate_args:
            check_sample_on_sphere(self, value)
        log_density: torch.Tensor = apply(_LogDensity, value, self.loc, self.concentration, self.dim, self._parts(),
                                          compiled=_LogDensityWithoutJvp)[0]
        return log_density

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = torch.Size()) -> torch.Tensor:
        r"""Exact, reparameterised samples.

        $w = \mu^\top x$ comes from the exact inverse CDF ($p = 3$) or Wood's (1994) rejection
        sampler, and $x = w\mu + \sqrt{1 - w^2}\,v$ with $v$ a uniform unit tangent vector at $\mu$.
        Gradients flow to ``loc`` through this map and to ``concentration`` by implicit
        reparameterisation, $\partial w/\partial\kappa = -(\partial F(w;\kappa)/\partial\kappa) / f(w;\kappa)$
        with $F$ the CDF of $w$ (Figurnov et al., 2018), evaluated by Gauss–Legendre quadrature.
        (``sample`` returns the same without gradients.)

        Args:
            sample_shape: leading shape of independent draws (default: one draw per batch element).

        Returns:
            Unit vectors of shape ``sample_shape + batch_shape + [p]`` in the dtype of ``loc``.

        Raises:
            RuntimeError: on a second derivative in ``concentration`` through the samples (not
                implemented), or if the rejection sampler has not finished after 64 rounds (its
                acceptance rate is at least 0.65 per proposal, so in practice never; compiled code
                raises if a sample is pending after its two rounds, probability < 3e-15 per sample,
                on CUDA as a device-side assert).
            NotImplementedError: inside a ``torch.func`` transform (sample outside it).

        References:
            * A. T. A. Wood, "Simulation of the von Mises Fisher distribution", *Commun. Stat. Simul.
              Comput.* 23 (1994).
            * M. Figurnov, S. Mohamed, A. Mnih, "Implicit reparameterization gradients", NeurIPS 2018.
        """
        if torch._C._are_functorch_transforms_active():
            raise NotImplementedError(
                "VonMisesFisher.rsample/sample is not supported inside torch.func transforms (grad, vmap, jacrev, "
                "jvp): its implicit gradient needs eager autograd and its rejection loop host control flow; draw "
                "the samples outside the transform and pass them in")
        shape = torch.Size(sample_shape) + self.batch_shape
        kappa = _expanded(self.concentration, shape)
        parts = self._parts() if kappa.requires_grad else None
        complement = _expanded(parts.complement, shape) if parts is not None and parts.complement is not None else None
        return rsample_vmf(self.loc, kappa, exact_tangent_norm=self.dim <= _EXACT_TANGENT_NORM_MAX_DIM,
                           complement=complement)

    def entropy(self) -> torch.Tensor:
        r"""Differential entropy $H = -\log C_p(\kappa) - \kappa A_p(\kappa)$ (in nats).

        Evaluated as $-[\log C_p(\kappa) + \kappa] + \kappa(1 - A_p(\kappa))$ in float64 (no
        cancellation at large κ); $\log|S^{p-1}|$ at $\kappa = 0$. Its derivative is $-\kappa A_p'(\kappa)$.

        Returns:
            The entropy, shape ``batch_shape``, in the dtype of ``concentration``.
        """
        return vmf_entropy(self.dim, self.concentration, self._parts())

    @property
    def mean(self) -> torch.Tensor:
        r"""The mean $\mathbb{E}[x] = A_p(\kappa)\mu$ (inside the ball: its norm is $A_p(\kappa) < 1$), shape
        ``batch_shape + [p]``."""
        a = mean_resultant_length(self.dim, self.concentration, validate_args=False)
        return a.unsqueeze(-1) * self._unit_loc

    @property
    def mode(self) -> torch.Tensor:
        """The mode, the mean direction μ, shape ``batch_shape + [p]`` (for κ = 0 every point is a mode; μ is
        returned)."""
        return self._unit_loc

    @property
    def variance(self) -> torch.Tensor:
        r"""Per-coordinate variances: the diagonal of
        $\operatorname{Cov}[x] = \rho I + (A_p'(\kappa) - \rho)\mu\mu^\top$.

        Here $\rho = A_p(\kappa)/\kappa$ ($1/p$ at $\kappa = 0$); shape ``batch_shape + [p]``, computed
        in float64 as $\rho(1 - \mu_d^2) + A_p'(\kappa)\mu_d^2$ (no cancellation along μ).
        """
        p, k = self.dim, self._kappa64
        a = mean_resultant_length(p, k, validate_args=False)
        safe_k = torch.where(k > 0, k, torch.ones_like(k))
        rho = torch.where(k > 0, a / safe_k, torch.full_like(k, 1.0 / p))
        a_prime = mean_resultant_length_derivative(p, k)  # not 1 − A² − (p−1)ρ, which cancels at large κ
        mu2 = self._unit_loc.to(torch.float64).square()
        var = rho.unsqueeze(-1) * (1.0 - mu2) + a_prime.unsqueeze(-1) * mu2  # no cancellation along μ
        return var.to(self.loc.dtype)

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, x: torch.Tensor, weights: torch.Tensor | None = None, validate_args: bool | None = None
    ) -> VonMisesFisher:
        r"""Maximum-likelihood vMF for unit vectors ``x`` (optionally weighted).

        $\hat\mu = \sum_i w_i x_i / \|\sum_i w_i x_i\|$ and $\hat\kappa = A_p^{-1}(\bar r)$ with
        $\bar r = \|\sum_i w_i x_i\| / \sum_i w_i$, solved exactly by `inverse_mean_resultant_length`
        (no approximation, every dimension). If all points coincide ($\bar r = 1$) the MLE is
        $\kappa = \infty$; $\bar r$ is then capped at $1 - 10^{-15}$, giving a large finite κ.

        Args:
            x: unit vectors, shape ``[n, *batch_shape, p]`` (samples along the first dimension).
            weights: non-negative weights of shape ``[n, *batch_shape]`` (default: all ones), e.g.
                responsibilities in an EM algorithm for mixtures.
            validate_args: validation of the inputs and of the returned distribution.

        Returns:
            A `VonMisesFisher` with batch shape ``batch_shape``.

        Raises:
            ValueError: if ``x`` has fewer than 2 dimensions, no samples or a last dimension below 2, is not on the
                sphere (with validation), or ``weights`` has the wrong shape or (with validation) is
                negative or sums to zero.

        References:
            * A. Banerjee, I. Dhillon, J. Ghosh, S. Sra, "Clustering on the unit hypersphere using von
              Mises–Fisher distributions", JMLR 6 (2005).
            * S. Sra, "A short note on parameter approximation for von Mises–Fisher distributions",
              Comput. Stat. 27 (2012).

        Example:
            >>> import torch
            >>> from vmf_dists import VonMisesFisher
            >>> x = VonMisesFisher(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 10.0).sample((10_000,))
            >>> fitted = VonMisesFisher.fit(x)
            >>> fitted.batch_shape, bool((fitted.concentration - 10.0).abs() < 1.0)
            (torch.Size([]), True)
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] < 2:
            raise ValueError("x must be a tensor of unit vectors of shape [n, *batch_shape, p] with p ≥ 2")
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one sample along its first dimension, got shape {tuple(x.shape)}")
        validate = _validation_enabled(validate_args)
        if validate:
            check_unit_vectors(x, "x")
        x64 = x.to(torch.float64)
        if weights is None:
            total = x64.sum(0)
            weight_sum = torch.full(total.shape[:-1], float(x.shape[0]), dtype=torch.float64, device=x.device)
        else:
            if weights.shape != x.shape[:-1]:
                raise ValueError(f"weights must have shape {tuple(x.shape[:-1])}, got {tuple(weights.shape)}")
            w64 = weights.to(torch.float64)
            if validate:
                check_values(w64, "weights")
                if not bool((w64.sum(0) > 0).all()):
                    raise ValueError("weights must have a positive sum over the samples for every batch element")
            total = (w64.unsqueeze(-1) * x64).sum(0)
            weight_sum = w64.sum(0)
        norm = torch.linalg.vector_norm(total, dim=-1)
        r_bar = (norm / weight_sum).clamp(0.0, 1.0 - 1e-15)
        kappa = inverse_mean_resultant_length(x.shape[-1], r_bar, validate_args=False)
        loc = total / norm.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(-1)
        # Σ wᵢxᵢ = 0: κ̂ = 0 (uniform) and every direction is an MLE; take the first basis vector.
        first_axis = torch.zeros_like(loc)
        first_axis[..., 0] = 1.0
        loc = torch.where((norm > 0).unsqueeze(-1), loc, first_axis)
        return cls(loc.to(x.dtype), kappa.to(x.dtype), validate_args=validate_args)
