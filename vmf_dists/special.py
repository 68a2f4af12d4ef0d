r"""Special functions of the von Mises–Fisher distribution, exact in every dimension.

Notation: p is the ambient dimension of the sphere $S^{p-1} \subset \mathbb{R}^p$, $\nu = p/2 - 1$,
and $I_\nu$ is the modified Bessel function of the first kind. The vMF density is
$f(x; \mu, \kappa) = C_p(\kappa) \exp(\kappa \mu^\top x)$ with

$$
\log C_p(\kappa) = \nu \log \kappa - \tfrac{p}{2} \log(2\pi) - \log I_\nu(\kappa),
\qquad
A_p(\kappa) = \frac{I_{p/2}(\kappa)}{I_{p/2-1}(\kappa)} = -\frac{d}{d\kappa} \log C_p(\kappa).
$$

All functions

* broadcast over their tensor arguments and return the dtype and device of the input (float32 and
  half-precision inputs are computed internally in float64 and rounded once at the end);
* are differentiable in their tensor argument through custom backward formulas (never by
  differentiating a series);
* are accurate to a few float64 ulps in $\log$ space for every order and every argument, including
  $x = 0$ and $x \to \infty$ — see the [numerics page](../numerics.md) for the method and the
  measured accuracy;
* raise `ValueError` naming the argument on bad input. Value checks (e.g. $\kappa \ge 0$) read the
  tensor on the host; they follow `torch.distributions.Distribution`'s global switch
  (`Distribution.set_default_validate_args`) or the per-call ``validate_args`` keyword, so hot loops
  can turn them off.

References:
    * F. W. J. Olver, "The asymptotic expansion of Bessel functions of large order", Phil. Trans. R.
      Soc. A 247 (1954); DLMF §10.41 (uniform asymptotic expansions).
    * D. E. Amos, "Computation of modified Bessel functions and their ratios", Math. Comp. 28 (1974).
    * S. Sra, "A short note on parameter approximation for von Mises–Fisher distributions",
      Comput. Stat. 27 (2012).
    * A. Banerjee, I. Dhillon, J. Ghosh, S. Sra, "Clustering on the unit hypersphere using von
      Mises–Fisher distributions", JMLR 6 (2005).
"""

from __future__ import annotations

import math
import numbers

import torch

from vmf_dists._bessel import log_iv_ratio_core

__all__ = [
    "log_bessel_iv",
    "bessel_iv_ratio",
    "vmf_log_normalizer",
    "mean_resultant_length",
    "inverse_mean_resultant_length",
]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------
# argument handling


def _validation_enabled(validate_args: bool | None) -> bool:
    if validate_args is None:
        return torch.distributions.Distribution._validate_args
    return bool(validate_args)


def _as_float_tensor(value, name: str, check) -> torch.Tensor:
    """A floating tensor for ``value``, after ``check`` (a validator taking a tensor). A Python number is
    checked in float64 before it is rounded to the default dtype (so that, e.g., −1e-300 is not rounded
    to −0.0 and accepted)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real floating tensor, got dtype {value.dtype}")
        value = value if value.is_floating_point() else value.to(torch.get_default_dtype())
        check(value)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number or a tensor, got {type(value).__name__}")
    check(torch.tensor(float(value), dtype=torch.float64))
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise ValueError(f"dim must be an integer ≥ 2 (the ambient dimension p), got {dim!r}")
    if dim < 2:
        raise ValueError(f"dim must be an integer ≥ 2 (the ambient dimension p), got {dim}")
    return int(dim)


def _check_order(v, validate: bool):
    """Return the order as a Python float or a float64 tensor, after checking v ≥ 0."""
    if isinstance(v, torch.Tensor):
        if v.requires_grad:
            raise NotImplementedError("the gradient with respect to the order v is not implemented; pass v.detach()")
        if validate and not bool(((v >= 0) & torch.isfinite(v)).all()):
            raise ValueError("v must be a finite non-negative order")
        return v.to(torch.float64)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"v must be a real number or a tensor, got {type(v).__name__}")
    if not v >= 0 or math.isinf(v):
        raise ValueError(f"v must be a finite non-negative order, got {v}")
    return float(v)


def _check_nonnegative(x: torch.Tensor, name: str, validate: bool) -> None:
    if validate and not bool((x >= 0).all()):
        bad = x[~(x >= 0)].flatten()[0].item()
        raise ValueError(f"{name} must be non-negative, got {bad}")


def _check_unit_interval(r: torch.Tensor, validate: bool) -> None:
    if validate and not bool(((r >= 0) & (r < 1)).all()):
        bad = r[~((r >= 0) & (r < 1))].flatten()[0].item()
        raise ValueError(f"r must lie in [0, 1), got {bad}")


def _broadcast_with_order(x: torch.Tensor, order) -> torch.Tensor:
    """Expand x to the broadcast shape with a tensor order, so its gradient reduces correctly."""
    if isinstance(order, torch.Tensor):
        return x.expand(torch.broadcast_shapes(x.shape, order.shape))
    return x


def _order_on(v, x: torch.Tensor):
    return v.to(x.device) if isinstance(v, torch.Tensor) else v


def _order_tensor(v, like: torch.Tensor) -> torch.Tensor:
    """The order as a tensor of ``like``'s dtype and device; a Python number is filled in on the device
    (``torch.as_tensor(float, device=cuda)`` would copy from the host and wait for the GPU)."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype=like.dtype, device=like.device)
    return torch.full((), float(v), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------
# autograd functions (float64 inside, the input's dtype outside)


_BELOW_ONE = 1.0 - 2.0**-53  # the largest float64 below 1


def _log_i_minus_v_log_x_at_zero(nu):
    """lim_{x→0} log I_ν(x) − ν log x = −ν log 2 − log Γ(ν+1) (ν a float or a float64 tensor)."""
    log_gamma = torch.lgamma(nu + 1.0) if isinstance(nu, torch.Tensor) else math.lgamma(nu + 1.0)
    return -nu * math.log(2.0) - log_gamma


def _ratio_from_rho(x64: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    # R = xρ < 1 for finite x; near 1 the product can round up, so cap it at the float below 1.
    return torch.where(torch.isinf(x64), torch.ones_like(rho), torch.clamp(x64 * rho, max=_BELOW_ONE))


class _LogBesselIv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, v):
        x64 = x.to(torch.float64)
        order = _order_on(v, x64)
        log_scaled, rho, _, _ = log_iv_ratio_core(order, x64)
        order64 = _order_tensor(order, x64)
        # For x ≤ 1, log I_v(x) − v log(x/2) + log Γ(v+1) = log 0F1(; v+1; x²/4) by its series, so that
        # log I_0(x) ≈ x²/4 keeps relative precision as x → 0 (the general path is exact only in
        # absolute terms, ~1e-14, there).
        q = 0.25 * torch.clamp(x64, max=1.0).square()
        small_x = _log_i_minus_v_log_x_at_zero(order64) + torch.log1p(
            _hypergeometric_0f1_minus_one(order64, q, _SMALL_X_SERIES_TERMS)
        )
        log_i_minus_v_log_x = torch.where(x64 <= 1.0, small_x, log_scaled + x64)
        out = log_i_minus_v_log_x + torch.xlogy(order64, x64)
        out = torch.where(torch.isinf(x64), x64, out)
        ctx.save_for_backward(x, _ratio_from_rho(x64, rho).to(x.dtype))
        ctx.order = order
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, ratio = ctx.saved_tensors
        order = ctx.order
        if torch.is_grad_enabled():  # create_graph: recompute the ratio differentiably
            ratio = bessel_iv_ratio(order, x, validate_args=False)
        # d/dx log I_v(x) = I_{v+1}/I_v + v/x; v/x is taken as 0 when v = 0 (including at x = 0).
        order_t = _order_tensor(order, x)
        v_over_x = order_t / torch.where(order_t == 0, torch.ones_like(x), x)
        return grad * (ratio + v_over_x), None


class _BesselIvRatio(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, v):
        x64 = x.to(torch.float64)
        rho = log_iv_ratio_core(_order_on(v, x64), x64).rho
        ctx.save_for_backward(x)
        ctx.order = v
        return _ratio_from_rho(x64, rho).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: R' as a differentiable function of x
            return grad * _RatioDerivative.apply(x, ctx.order), None
        return grad * _ratio_derivative64(ctx.order, x.to(torch.float64)).to(grad.dtype), None


def _no_higher_derivatives(what: str) -> None:
    # once_differentiable only notices a graph on the incoming gradient; a Hessian through a constant
    # incoming gradient would silently drop terms, so refuse explicitly.
    if torch.is_grad_enabled():
        raise RuntimeError(f"derivatives of order higher than implemented for {what} (create_graph=True)")


class _RatioDerivative(torch.autograd.Function):
    """R_v'(x), differentiable once: R_v'' by Richardson-extrapolated central differences of the exact R_v'."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v):
        ctx.save_for_backward(x)
        ctx.order = v
        return _ratio_derivative64(v, x.to(torch.float64)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # R_v' is an even function of x, so |x ± h| is fine near 0. It varies on the scale
        # max(x, √(2v+2)), so h = 2e-3·max(x, √(2v+2)): truncation O((h/scale)^4), rounding O(ε·scale/h);
        # ~1e-11 relative. The closed forms (e.g. −2AA' − (p−1)(A' − A/κ)/κ) cancel by a factor x at
        # large x and (p/x)² at small x.
        _no_higher_derivatives("the Bessel ratio (third derivative)")
        (x,) = ctx.saved_tensors
        order = ctx.order
        x64 = x.to(torch.float64)
        scale = torch.sqrt(2.0 * _order_tensor(order, x64) + 2.0)
        h = 2e-3 * torch.maximum(x64, scale)

        def central(step):
            return (_ratio_derivative64(order, (x64 + step).abs()) - _ratio_derivative64(order, (x64 - step).abs())) / (2.0 * step)

        second = (4.0 * central(0.5 * h) - central(h)) / 3.0
        return grad * second.to(grad.dtype), None


def _ratio_derivative64(order, x64: torch.Tensor) -> torch.Tensor:
    return log_iv_ratio_core(_order_on(order, x64), x64, with_derivative=True).derivative


class _VmfLogNormalizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, dim: int):
        k64 = kappa.to(torch.float64)
        log_scaled, rho, _, _ = log_iv_ratio_core(dim / 2.0 - 1.0, k64)
        ctx.save_for_backward(kappa, _ratio_from_rho(k64, rho).to(kappa.dtype))
        ctx.dim = dim
        out = -0.5 * dim * _LOG_2PI - log_scaled - k64
        return torch.where(torch.isinf(k64), -k64, out).to(kappa.dtype)  # log C_p(∞) = −∞

    @staticmethod
    def backward(ctx, grad):
        kappa, mean_length = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: recompute A_p differentiably
            mean_length = mean_resultant_length(ctx.dim, kappa, validate_args=False)
        return -grad * mean_length, None


class _InverseMeanResultantLength(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r: torch.Tensor, dim: int):
        kappa64 = _solve_mean_resultant_length(dim, r.to(torch.float64))
        ctx.save_for_backward(kappa64, r)
        ctx.dim = dim
        return kappa64.to(r.dtype)

    @staticmethod
    def backward(ctx, grad):
        kappa64, r = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: κ(r) and A_p'(κ) as differentiable functions of r
            kappa = _InverseMeanResultantLength.apply(r, ctx.dim)
            return grad / _RatioDerivative.apply(kappa, ctx.dim / 2.0 - 1.0), None
        return grad / _ratio_derivative64(ctx.dim / 2.0 - 1.0, kappa64).to(grad.dtype), None


# --------------------------------------------------------------------------------------------------
# public functions


def log_bessel_iv(v: float | torch.Tensor, x: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""Logarithm of the modified Bessel function of the first kind, $\log I_v(x)$.

    Exact in float64 for every real order $v \ge 0$ and every $x \ge 0$ up to the largest float (no
    overflow for large $x$, no underflow for large $v$; relative error ≲ 1e-14 against mpmath, and
    for $x \le 1$ the power series of ${}_0F_1$ keeps relative precision even where $\log I_0(x)
    \approx x^2/4$ is tiny). Limits:
    $\log I_0(0) = 0$, $\log I_v(0) = -\infty$ for $v > 0$, $\log I_v(\infty) = \infty$.

    Method: Olver's uniform (Debye) asymptotic expansion of $I_\mu(\mu z)$ in $1/\mu$ (DLMF 10.41.3,
    as many terms as float64 needs) for orders $\mu$ above a threshold; lower orders $v$ are lifted to
    $\mu = v + m$ and brought back by the backward recurrence $I_{o-1}/I_o = 2o/x + I_{o+1}/I_o$,
    which is stable for $I$; everything in scaled, logarithmic form, so nothing under- or overflows.

    The gradient is $\frac{\partial}{\partial x} \log I_v(x) = \frac{I_{v+1}(x)}{I_v(x)} + \frac{v}{x}$
    (DLMF 10.29.2), computed from `bessel_iv_ratio`, so it is itself differentiable.

    Args:
        v: order $v \ge 0$, a Python number or a tensor broadcastable with ``x`` (no gradient).
        x: argument $x \ge 0$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $v \ge 0$ and $x \ge 0$ (default: torch.distributions' global switch).

    Returns:
        $\log I_v(x)$ with the broadcast shape of ``v`` and ``x`` and the dtype and device of ``x``.

    Raises:
        ValueError: if ``v`` or ``x`` is negative or NaN, or ``v`` is infinite or not a real number.
        NotImplementedError: if ``v`` is a tensor that requires a gradient (no derivative in the order).

    References:
        * F. W. J. Olver, "The asymptotic expansion of Bessel functions of large order", Phil. Trans.
          R. Soc. A 247 (1954); DLMF §10.41.
        * D. E. Amos, "Computation of modified Bessel functions and their ratios", Math. Comp. 28 (1974).

    Example:
        >>> import torch
        >>> from vmf_dists.special import log_bessel_iv
        >>> log_bessel_iv(255.0, torch.tensor([1.0]))  # scipy.special.ive underflows to 0 here
        tensor([-1338.4636])
    """
    validate = _validation_enabled(validate_args)
    x = _as_float_tensor(x, "x", lambda t: _check_nonnegative(t, "x", validate))
    order = _check_order(v, validate)
    return _LogBesselIv.apply(_broadcast_with_order(x, order), order)


def bessel_iv_ratio(v: float | torch.Tensor, x: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""The ratio $R_v(x) = I_{v+1}(x) / I_v(x) \in [0, 1)$, stable for all $x \ge 0$.

    Limits: $R_v(x) \approx x/(2v+2)$ as $x \to 0$ and $R_v(x) \to 1$ as $x \to \infty$; it satisfies
    Amos' bounds $x / (v + 1 + \sqrt{(v+1)^2 + x^2}) \le R_v(x) \le x / (v + \tfrac12 + \sqrt{(v+\tfrac12)^2 + x^2})$.

    The gradient is $R_v'(x) = 1 - R_v^2 - \frac{2v+1}{x} R_v$ (from DLMF 10.29.2), evaluated from its
    own uniform expansion so it keeps relative precision where this formula cancels (large $x$).
    Twice differentiable ($R_v^{\prime\prime}$ by Richardson-extrapolated differences of the exact $R_v^\prime$,
    ~1e-11 relative); a third derivative raises.

    Computed, like `log_bessel_iv`, from Olver's uniform expansion and the backward recurrence
    $R_{o-1}(x) = 1/(2o/x + R_o(x))$.

    Args:
        v: order $v \ge 0$, a Python number or a tensor broadcastable with ``x`` (no gradient).
        x: argument $x \ge 0$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $v \ge 0$ and $x \ge 0$ (default: torch.distributions' global switch).

    Returns:
        $R_v(x)$ with the broadcast shape of ``v`` and ``x`` and the dtype and device of ``x``.

    Raises:
        ValueError: if ``v`` or ``x`` is negative or NaN, or ``v`` is infinite or not a real number.
        NotImplementedError: if ``v`` is a tensor that requires a gradient.

    References:
        * D. E. Amos, "Computation of modified Bessel functions and their ratios", Math. Comp. 28 (1974)
          (the bounds).
        * F. W. J. Olver, "The asymptotic expansion of Bessel functions of large order", Phil. Trans.
          R. Soc. A 247 (1954); DLMF §10.41.

    Example:
        >>> import torch
        >>> from vmf_dists import bessel_iv_ratio
        >>> bessel_iv_ratio(0.5, torch.tensor([1.0, 100.0]))  # coth(x) - 1/x
        tensor([0.3130, 0.9900])
    """
    validate = _validation_enabled(validate_args)
    x = _as_float_tensor(x, "x", lambda t: _check_nonnegative(t, "x", validate))
    order = _check_order(v, validate)
    return _BesselIvRatio.apply(_broadcast_with_order(x, order), order)


def vmf_log_normalizer(dim: int, kappa: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""Log normaliser $\log C_p(\kappa)$ of the von Mises–Fisher distribution on $S^{p-1}$.

    $$
    \log C_p(\kappa) = \nu \log\kappa - \tfrac{p}{2}\log(2\pi) - \log I_\nu(\kappa), \quad \nu = \tfrac p2 - 1,
    $$

    computed as $-\tfrac p2 \log(2\pi) - [\log I_\nu(\kappa) - \nu\log\kappa]$ with the bracket evaluated
    directly (no cancellation between two large logarithms at small $\kappa$). At $\kappa = 0$ it is
    exactly $\log\Gamma(p/2) - \log 2 - \tfrac p2 \log\pi$, minus the log surface area of $S^{p-1}$.
    The gradient is $\frac{d}{d\kappa}\log C_p(\kappa) = -A_p(\kappa)$ (see `mean_resultant_length`).

    Args:
        dim: the ambient dimension $p \ge 2$ (an integer).
        kappa: concentration $\kappa \ge 0$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $\kappa \ge 0$ (default: torch.distributions' global switch).

    Returns:
        $\log C_p(\kappa)$ with the shape, dtype and device of ``kappa`` ($-\infty$ at $\kappa = \infty$).

    Raises:
        ValueError: if ``dim`` is not an integer ≥ 2 or ``kappa`` is negative or NaN.

    Example:
        >>> from vmf_dists.special import vmf_log_normalizer
        >>> vmf_log_normalizer(3, 0.0)  # -log(4π)
        tensor(-2.5310)
    """
    dim = _check_dim(dim)
    validate = _validation_enabled(validate_args)
    kappa = _as_float_tensor(kappa, "kappa", lambda t: _check_nonnegative(t, "kappa", validate))
    return _VmfLogNormalizer.apply(kappa, dim)


def mean_resultant_length(dim: int, kappa: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""Mean resultant length $A_p(\kappa) = I_{p/2}(\kappa) / I_{p/2-1}(\kappa) \in [0, 1)$.

    For $x \sim \mathrm{vMF}(\mu, \kappa)$ on $S^{p-1}$, $\mathbb{E}[x] = A_p(\kappa)\,\mu$ and
    $A_p(\kappa) = -\frac{d}{d\kappa}\log C_p(\kappa)$. Its derivative is the variance of $\mu^\top x$,

    $$
    A_p'(\kappa) = 1 - A_p(\kappa)^2 - \frac{p-1}{\kappa} A_p(\kappa) \quad (= 1/p \text{ at } \kappa = 0),
    $$

    which the backward evaluates from its own expansion, keeping relative precision at large
    $\kappa$ where this formula cancels ($A_p' \approx (p-1)/(2\kappa^2)$).

    Args:
        dim: the ambient dimension $p \ge 2$ (an integer).
        kappa: concentration $\kappa \ge 0$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $\kappa \ge 0$ (default: torch.distributions' global switch).

    Returns:
        $A_p(\kappa)$ with the shape, dtype and device of ``kappa``.

    Raises:
        ValueError: if ``dim`` is not an integer ≥ 2 or ``kappa`` is negative or NaN.

    Example:
        >>> from vmf_dists import mean_resultant_length
        >>> mean_resultant_length(3, 10.0)  # coth(10) - 1/10
        tensor(0.9000)
    """
    dim = _check_dim(dim)
    validate = _validation_enabled(validate_args)
    kappa = _as_float_tensor(kappa, "kappa", lambda t: _check_nonnegative(t, "kappa", validate))
    return _BesselIvRatio.apply(kappa, dim / 2.0 - 1.0)


def inverse_mean_resultant_length(dim: int, r: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""The concentration $\kappa$ with $A_p(\kappa) = r$, for $r \in [0, 1)$ (the vMF MLE of $\kappa$).

    Given the mean resultant length $\bar r = \|\sum_i x_i\| / n$ of unit vectors, the maximum
    likelihood concentration is $\hat\kappa = A_p^{-1}(\bar r)$. The solve starts from Banerjee et al.'s
    approximation $\kappa_0 = r(p - r^2)/(1 - r^2)$, brackets the root with Amos' bounds on the
    Bessel ratio inverted in closed form, and runs a fixed number of Newton steps clamped to the
    bracket (vectorised; the solve itself never synchronises with the host — the optional input
    validation does). $r = 0$ gives $\kappa = 0$.
    The gradient is $d\kappa/dr = 1/A_p'(\kappa)$.

    Args:
        dim: the ambient dimension $p \ge 2$ (an integer).
        r: mean resultant length in $[0, 1)$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $0 \le r < 1$ (default: torch.distributions' global switch).

    Returns:
        $\kappa = A_p^{-1}(r)$ with the shape, dtype and device of ``r``.

    Raises:
        ValueError: if ``dim`` is not an integer ≥ 2 or ``r`` lies outside $[0, 1)$.

    References:
        * A. Banerjee, I. Dhillon, J. Ghosh, S. Sra, "Clustering on the unit hypersphere using von
          Mises–Fisher distributions", JMLR 6 (2005) (the starting point).
        * S. Sra, "A short note on parameter approximation for von Mises–Fisher distributions",
          Comput. Stat. 27 (2012) (Newton steps on $A_p(\kappa) = r$).
        * D. E. Amos, "Computation of modified Bessel functions and their ratios", Math. Comp. 28 (1974)
          (the bracketing bounds).

    Example:
        >>> from vmf_dists import inverse_mean_resultant_length
        >>> inverse_mean_resultant_length(3, 0.9)
        tensor(10.0000)
    """
    dim = _check_dim(dim)
    validate = _validation_enabled(validate_args)
    r = _as_float_tensor(r, "r", lambda t: _check_unit_interval(t, validate))
    return _InverseMeanResultantLength.apply(r, dim)


# --------------------------------------------------------------------------------------------------
# the inverse


def _invert_amos_bound(r: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Solve r = x / (a + √(b² + x²)) for x ≥ 0 (monotone in x for a ≥ 0)."""
    one_minus_r2 = (1.0 - r) * (1.0 + r)
    return r * (a + torch.sqrt(b * b + r * r * (a * a - b * b))) / one_minus_r2


_NEWTON_STEPS = 8


def _solve_mean_resultant_length(dim: int, r: torch.Tensor) -> torch.Tensor:
    nu = dim / 2.0 - 1.0
    r = r.clamp(min=0.0)
    # A_p(κ) lies between the two Amos bounds, so inverting them brackets the root.
    lower = _invert_amos_bound(r, nu + 0.5, nu + 0.5)
    upper = _invert_amos_bound(r, nu + 1.0, nu + 1.0)
    banerjee = r * (dim - r * r) / ((1.0 - r) * (1.0 + r))
    kappa = torch.minimum(torch.maximum(banerjee, lower), upper)
    for _ in range(_NEWTON_STEPS):
        _, rho, deriv, _ = log_iv_ratio_core(nu, kappa, with_derivative=True)
        step = (kappa * rho - r) / deriv
        kappa = torch.minimum(torch.maximum(kappa - step, lower), upper)
    return torch.where(r == 0, torch.zeros_like(kappa), kappa)


# --------------------------------------------------------------------------------------------------
# helpers for the distributions: float64 inside, no cancellation at small or large κ


class _LogNormalizerPlusKappa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, dim: int):
        k64 = kappa.to(torch.float64)
        log_scaled, _, _, complement = log_iv_ratio_core(dim / 2.0 - 1.0, k64, with_complement=True)
        ctx.save_for_backward(kappa, complement.to(kappa.dtype))
        ctx.dim = dim
        return (-0.5 * dim * _LOG_2PI - log_scaled).to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad):
        kappa, one_minus_a = ctx.saved_tensors
        if torch.is_grad_enabled():
            one_minus_a = mean_resultant_length_complement(ctx.dim, kappa)
        return grad * one_minus_a, None


def log_normalizer_plus_kappa(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    r"""$\log C_p(\kappa) + \kappa$, the vMF log-density at its mode, without cancellation.

    No cancellation of two numbers of size κ (what ``vmf_log_normalizer(dim, κ) + κ`` suffers in
    float32 at large κ). Derivative $1 - A_p(\kappa)$, formed in float64. No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).

    Returns:
        $\log C_p(\kappa) + \kappa$, with the shape and dtype of ``kappa``.
    """
    return _LogNormalizerPlusKappa.apply(kappa, dim)


_GAP_SERIES_LIMIT = 16.0  # use the series for κ²/4 ≤ 16 (ν+1), i.e. while log 0F1 ≲ 16
_GAP_SERIES_TERMS = 64  # term ratio ≤ 16/(k+1): 64 terms leave < 1e-20 of the sum
_SMALL_X_SERIES_TERMS = 16  # for q ≤ 1/4: term ratio ≤ 1/(4(k+1)), 16 terms leave < 1e-22


def _hypergeometric_0f1_minus_one(nu, q: torch.Tensor, terms: int = _GAP_SERIES_TERMS) -> torch.Tensor:
    """Σ_{k≥1} q^k / (k! (ν+1)_k), all terms positive (ν a float or a tensor broadcasting with q)."""
    term = q / (nu + 1.0)
    total = term.clone()
    for k in range(1, terms):
        term = term * q / ((k + 1.0) * (nu + k + 1.0))
        total = total + term
    return total


class _UniformLogNormalizerGap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, dim: int):
        nu = dim / 2.0 - 1.0
        k64 = kappa.to(torch.float64)
        q = 0.25 * k64 * k64
        limit = _GAP_SERIES_LIMIT * (nu + 1.0)
        series = torch.log1p(_hypergeometric_0f1_minus_one(nu, torch.clamp(q, max=limit)))
        log_scaled, rho, _, _ = log_iv_ratio_core(nu, k64)
        direct = log_scaled + k64 - _log_i_minus_v_log_x_at_zero(nu)
        gap = torch.where(q <= limit, series, direct)
        ctx.save_for_backward(kappa, _ratio_from_rho(k64, rho).to(kappa.dtype))
        ctx.dim = dim
        return gap.to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad):
        kappa, mean_length = ctx.saved_tensors
        if torch.is_grad_enabled():
            mean_length = mean_resultant_length(ctx.dim, kappa, validate_args=False)
        return grad * mean_length, None


def in_gap_series_region(dim: int, *kappas: torch.Tensor) -> torch.Tensor:
    r"""Where every given κ is in the range in which `uniform_log_normalizer_gap` sums its power series.

    That is κ²/4 ≤ 16(ν+1), i.e. κ² ≤ 32p: there it has relative precision, so formulas anchored at the
    uniform distribution should be used.

    Args:
        dim: the ambient dimension $p$.
        *kappas: concentration tensors (broadcasting with each other).

    Returns:
        Boolean tensor of the broadcast shape: True where every $\kappa^2 \le 32p$.
    """
    limit = 2.0 * _GAP_SERIES_LIMIT * dim
    inside = kappas[0] * kappas[0] <= limit
    for kappa in kappas[1:]:
        inside = inside & (kappa * kappa <= limit)
    return inside


def uniform_log_normalizer_gap(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    r"""$\log C_p(0) - \log C_p(\kappa) = \log {}_0F_1(; p/2; \kappa^2/4) \ge 0$, with relative precision as κ → 0.

    Its value is ≈ κ²/(2p) at small κ; computed by its power series where $\kappa^2/4 \le 8p$
    (beyond, the difference of the two log normalisers loses at most a factor |log C_p(0)|/16 of
    relative precision). It is KL(Uniform ‖ vMF); its derivative is $A_p(\kappa)$. No validation
    (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).

    Returns:
        $\log C_p(0) - \log C_p(\kappa) \ge 0$, with the shape and dtype of ``kappa``.
    """
    return _UniformLogNormalizerGap.apply(kappa, dim)


class _MeanResultantLengthComplement(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: torch.Tensor, dim: int):
        parts = log_iv_ratio_core(dim / 2.0 - 1.0, kappa.to(torch.float64), with_complement=True)
        ctx.save_for_backward(kappa)
        ctx.dim = dim
        return parts.complement.to(kappa.dtype)

    @staticmethod
    def backward(ctx, grad):
        (kappa,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return -grad * _RatioDerivative.apply(kappa, ctx.dim / 2.0 - 1.0), None
        return -grad * _ratio_derivative64(ctx.dim / 2.0 - 1.0, kappa.to(torch.float64)).to(grad.dtype), None


def mean_resultant_length_complement(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    r"""$1 - A_p(\kappa)$ with relative precision at large κ.

    Its value is ≈ (p−1)/(2κ) there, where ``1 - A`` would keep only $-\log_{10}(\epsilon\kappa)$
    digits. Derivative $-A_p'(\kappa)$. No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).

    Returns:
        $1 - A_p(\kappa)$, with the shape and dtype of ``kappa``.
    """
    return _MeanResultantLengthComplement.apply(kappa, dim)


def mean_resultant_length_derivative(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    r"""$A_p'(\kappa) = \operatorname{Var}(\mu^\top x)$ from its own expansion (no cancellation at large κ).

    In the dtype of κ; differentiable once ($A_p''$ by extrapolated differences, ~1e-11 relative).
    No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).

    Returns:
        $A_p'(\kappa)$, with the shape and dtype of ``kappa``.
    """
    return _RatioDerivative.apply(kappa, dim / 2.0 - 1.0)
