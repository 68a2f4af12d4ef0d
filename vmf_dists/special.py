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
  half-precision inputs are computed internally in float64 and rounded once at the end; a Python
  number is computed from its exact value and returned in torch's default dtype);
* are differentiable in their tensor argument through custom backward formulas (never by
  differentiating a series), twice where a second derivative is stated, and work under
  ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jvp``) and ``torch.compile``;
* are accurate to a few float64 ulps for every order and every argument, including $x = 0$ and
  $x \to \infty$ — see the [numerics page](../numerics.md) for the method and the measured accuracy;
* cost a few dozen tensor operations per call, whatever the order (no loop over orders or terms);
* raise `ValueError` naming the argument on bad input. Value checks (e.g. $\kappa \ge 0$) read the
  tensor on the host; they follow `torch.distributions.Distribution`'s global switch
  (`Distribution.set_default_validate_args`) or the per-call ``validate_args`` keyword, so hot loops
  can turn them off, and are skipped inside ``torch.func`` transforms and ``torch.compile``, which
  cannot read values.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch

from vmf_dists._bessel import BesselParts
from vmf_dists._bessel_table import bessel_parts
from vmf_dists._function import Refuse, RefuseWithoutJvp, apply, without_jvp

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
    """Whether value checks run: the per-call switch, else torch.distributions' global one; never inside
    ``torch.func`` transforms or ``torch.compile``, which cannot read a tensor's values on the host."""
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return False
    if validate_args is None:
        return torch.distributions.Distribution._validate_args
    return bool(validate_args)


def _is_real_number(value: object) -> TypeGuard[float]:
    """A Python or NumPy real number (`numbers.Real`) other than a bool (typed as the float it acts as)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _is_integer(value: object) -> TypeGuard[int]:
    """A Python or NumPy integer (`numbers.Integral`) other than a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _as_float_tensor(
    value: object, name: str, check: Callable[[torch.Tensor], None]
) -> tuple[torch.Tensor, torch.dtype]:
    """(a floating tensor for ``value``, the dtype of the result), after ``check`` (a validator taking a
    tensor). A Python number becomes a float64 tensor, so that it is checked and computed from its exact
    value (e.g. −1e-300 is not rounded to −0.0 and accepted, r = 1 − 1e-10 is not rounded to 1), and
    the result is returned in torch's default dtype."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real floating tensor, got dtype {value.dtype}")
        value = value if value.is_floating_point() else value.to(torch.get_default_dtype())
        check(value)
        return value, value.dtype
    if not _is_real_number(value):
        raise ValueError(f"{name} must be a real number or a tensor, got {type(value).__name__}")
    value = torch.tensor(float(value), dtype=torch.float64)
    check(value)
    return value, torch.get_default_dtype()


def _check_dim(dim: object) -> int:
    if isinstance(dim, torch.Tensor) and dim.dim() == 0 and not dim.is_floating_point() and dim.dtype != torch.bool:
        dim = int(dim)  # a traced size (torch.jit.trace turns shapes into tensors)
    if not _is_integer(dim):
        raise ValueError(f"dim must be an integer ≥ 2 (the ambient dimension p), got {dim!r}")
    if dim < 2:
        raise ValueError(f"dim must be an integer ≥ 2 (the ambient dimension p), got {dim}")
    return int(dim)


def _check_order(v: object, validate: bool) -> float | torch.Tensor:
    """Return the order as a Python float or a float64 tensor, after checking v ≥ 0."""
    if isinstance(v, torch.Tensor):
        if v.requires_grad:
            raise NotImplementedError("the gradient with respect to the order v is not implemented; pass v.detach()")
        if validate and not bool(((v >= 0) & torch.isfinite(v)).all()):
            raise ValueError("v must be a finite non-negative order")
        return v.to(torch.float64)
    if not _is_real_number(v):
        raise ValueError(f"v must be a real number or a tensor, got {type(v).__name__}")
    if not v >= 0 or math.isinf(v):
        raise ValueError(f"v must be a finite non-negative order, got {v}")
    return float(v)


def _first_bad(x: torch.Tensor, bad: torch.Tensor) -> str:
    count = int(bad.sum())
    first = x[bad].flatten()[0].item()
    return f"{first}" + (f" (and {count - 1} more of {x.numel()} entries)" if count > 1 else "")


def _check_nonnegative(x: torch.Tensor, name: str, validate: bool) -> None:
    if validate:
        bad = ~(x >= 0)
        if bool(bad.any()):
            raise ValueError(f"{name} must be non-negative, got {_first_bad(x, bad)}")


def _check_unit_interval(r: torch.Tensor, validate: bool) -> None:
    if validate:
        bad = ~((r >= 0) & (r < 1))
        if bool(bad.any()):
            raise ValueError(f"r must lie in [0, 1), got {_first_bad(r, bad)}")


def _broadcast_with_order(x: torch.Tensor, order: float | torch.Tensor) -> torch.Tensor:
    """Expand x to the broadcast shape with a tensor order, so its gradient reduces correctly."""
    if isinstance(order, torch.Tensor):
        try:
            shape = torch.broadcast_shapes(x.shape, order.shape)
        except RuntimeError:
            raise ValueError(
                f"the order v of shape {tuple(order.shape)} does not broadcast with x of shape {tuple(x.shape)}"
            ) from None
        return x.expand(shape)
    return x


def _order_on(v: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    return v.to(x.device) if isinstance(v, torch.Tensor) else v


# --------------------------------------------------------------------------------------------------
# one autograd Function for every elementwise special function


@dataclass(eq=False)
class _Kernel:
    """An elementwise function f(x) of `bessel_parts`, with its first derivative.

    ``order(arg)`` maps the Function's argument (an order v, or a dimension p) to the Bessel order;
    ``value``/``derivative`` build f and f' from float64 parts; ``needs``/``derivative_needs`` name the
    parts they read; ``graph_derivative(arg, x)`` is f' as a differentiable function of x (used for
    double backward and forward mode), or raises where no higher derivative is implemented.
    ``passes_through`` marks kernels whose value or derivative is one of the parts itself.
    """

    name: str
    order: Callable[[Any], float | torch.Tensor]  # arg ↦ ν
    needs: tuple[str, ...]
    value: Callable[..., torch.Tensor]  # (arg, x64, parts) ↦ f(x)
    derivative_needs: tuple[str, ...]
    derivative: Callable[..., torch.Tensor]  # (arg, x64, parts) ↦ f'(x)
    graph_derivative: Callable[[Any, torch.Tensor], torch.Tensor]  # (arg, x) ↦ f'(x), differentiable
    passes_through: bool = False

    def __post_init__(self) -> None:  # plain attributes (torch.compile cannot trace functools.cached_property)
        self._value_flags = {name: True for name in self.needs}
        self._all_flags = {name: True for name in self.needs + self.derivative_needs}

    def parts(self, arg: Any, x64: torch.Tensor, with_derivative: bool) -> BesselParts:
        flags = self._all_flags if with_derivative else self._value_flags
        return bessel_parts(_order_on(self.order(arg), x64), x64, **flags)

    def lacks_derivative_parts(self, parts: BesselParts) -> bool:
        return any(getattr(parts, name) is None for name in self.derivative_needs)


def _output(t: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """``t`` in ``dtype`` as a tensor of its own (``copy``: it may be one of the cached parts, which
    autograd would detach in place and share between Functions)."""
    if t.dtype != dtype:
        return t.to(dtype)
    return t.clone() if copy else t


class _SpecialFunction(torch.autograd.Function):
    """f(x) for a `_Kernel`: float64 inside, the input's dtype outside; the derivative is computed in the
    forward when x requires a gradient (so the backward costs one multiplication)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, kernel: _Kernel, arg: Any, parts: BesselParts | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x64 = x if x.dtype == torch.float64 else x.to(torch.float64)
        with_derivative = x.requires_grad
        if parts is None or (with_derivative and kernel.lacks_derivative_parts(parts)):
            parts = kernel.parts(arg, x64, with_derivative)
        value = _output(kernel.value(arg, x64, parts), x.dtype, kernel.passes_through)
        derivative = (
            _output(kernel.derivative(arg, x64, parts), x.dtype, kernel.passes_through) if with_derivative else None
        )
        return value, derivative

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        x, kernel, arg, _ = inputs
        derivative = output[1]
        if derivative is not None:
            ctx.mark_non_differentiable(derivative)
        ctx.set_materialize_grads(False)  # no zero tensors for the extra outputs' (unused) gradients
        ctx.save_for_backward(x, derivative)
        ctx.save_for_forward(x)
        ctx.kernel, ctx.arg = kernel, arg

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None, _: Any) -> tuple[torch.Tensor | None, None, None, None]:
        if grad is None:  # only the derivative output was used (gradients are not materialised)
            return None, None, None, None
        x, derivative = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: f' as a differentiable function of x
            derivative = ctx.kernel.graph_derivative(ctx.arg, x)
        elif derivative is None:
            x64 = x.to(torch.float64)
            derivative = ctx.kernel.derivative(ctx.arg, x64, ctx.kernel.parts(ctx.arg, x64, True)).to(x.dtype)
        return grad * derivative, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor, *_: Any) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return x_tangent * ctx.kernel.graph_derivative(ctx.arg, x), None


_SpecialFunctionWithoutJvp = without_jvp(_SpecialFunction)


def _evaluate(kernel: _Kernel, x: torch.Tensor, arg: Any, parts: BesselParts | None = None) -> torch.Tensor:
    value: torch.Tensor = apply(_SpecialFunction, x, kernel, arg, parts, compiled=_SpecialFunctionWithoutJvp)[0]
    return value


def _highest_derivative(
    derivative: Callable[..., torch.Tensor], what: str
) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """A ``graph_derivative`` for the highest implemented order: the value of ``derivative`` at x, tied to x
    so that one more derivative in x raises (`vmf_dists._function.Refuse`)."""

    def graph_derivative(arg: Any, x: torch.Tensor) -> torch.Tensor:
        value = derivative(arg, x.detach().to(torch.float64), None).to(x.dtype)
        tied: torch.Tensor = apply(Refuse, x, value, what, compiled=RefuseWithoutJvp)
        return tied

    return graph_derivative


def _nu(dim: int) -> float:
    return dim / 2.0 - 1.0


def _identity(arg: float | torch.Tensor) -> float | torch.Tensor:
    return arg


def _v_over_x(v: float | torch.Tensor, x64: torch.Tensor) -> torch.Tensor:
    """v/x, taken as 0 where v = 0 (including at x = 0)."""
    if isinstance(v, torch.Tensor):
        return torch.where(v == 0, 0.0, v / x64)
    return v / x64 if v != 0 else torch.zeros_like(x64)


def _log_bessel_value(v: float | torch.Tensor, x64: torch.Tensor, parts: BesselParts) -> torch.Tensor:
    # log I_v(x) = G + v log(x/2) − log Γ(v+1) for x ≤ 1 (G keeps relative precision: log I_0(x) ≈ x²/4),
    # L + x + v log x beyond.
    assert parts.log_series is not None and parts.log_scaled is not None  # _LOG_BESSEL.needs
    lgamma = torch.lgamma(v + 1.0) if isinstance(v, torch.Tensor) else math.lgamma(v + 1.0)
    small = parts.log_series + torch.xlogy(v, 0.5 * x64) - lgamma
    out = torch.where(x64 <= 1.0, small, parts.log_scaled + x64 + torch.xlogy(v, x64))
    return torch.where(torch.isinf(x64), x64, out)


def _log_bessel_graph_derivative(v: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return bessel_iv_ratio(v, x, validate_args=False) + _v_over_x(v, x)


_LOG_BESSEL = _Kernel(
    "log I_v", _identity, ("log_series", "log_scaled"), _log_bessel_value,
    ("ratio",), lambda v, x64, parts: parts.ratio + _v_over_x(v, x64), _log_bessel_graph_derivative,
)
_RATIO = _Kernel(
    "R_v", _identity, ("ratio",), lambda v, x64, parts: parts.ratio,
    ("derivative",), lambda v, x64, parts: parts.derivative,
    lambda v, x: _evaluate(_RATIO_DERIVATIVE, x, v), passes_through=True,
)


def _ratio_second_derivative(v: float | torch.Tensor, x64: torch.Tensor, parts: BesselParts | None) -> torch.Tensor:
    # R_v' is an even function of x, so |x ± h| is fine near 0. It varies on the scale
    # max(x, √(2v+2)), so h = 2e-3·max(x, √(2v+2)): truncation O((h/scale)^4), rounding O(ε·scale/h);
    # ~1e-11 relative (Richardson-extrapolated central differences of the exact R_v').
    scale = torch.sqrt(2.0 * torch.as_tensor(v, dtype=torch.float64, device=x64.device) + 2.0)
    h = 2e-3 * torch.maximum(x64, scale)
    steps = torch.stack([0.5 * h, h])
    points = torch.stack([x64 + steps, (x64 - steps).abs()])  # [2 (sign), 2 (step), ...]
    d = bessel_parts(v if not isinstance(v, torch.Tensor) else v.expand_as(points), points, derivative=True).derivative
    assert d is not None
    central = (d[0] - d[1]) / (2.0 * steps)
    return (4.0 * central[0] - central[1]) / 3.0


_RATIO_DERIVATIVE: _Kernel = _Kernel(
    "R_v'", _identity, ("derivative",), lambda v, x64, parts: parts.derivative,
    (), _ratio_second_derivative, _highest_derivative(_ratio_second_derivative, "the Bessel ratio (third derivative)"),
    passes_through=True,
)


def _log_normalizer_value(dim: int, k64: torch.Tensor, parts: BesselParts) -> torch.Tensor:
    assert parts.log_scaled is not None  # _LOG_NORMALIZER.needs
    out = -0.5 * dim * _LOG_2PI - parts.log_scaled - k64
    return torch.where(torch.isinf(k64), -k64, out)  # log C_p(∞) = −∞


_LOG_NORMALIZER = _Kernel(
    "log C_p", _nu, ("log_scaled",), _log_normalizer_value,
    ("ratio",), lambda dim, k64, parts: -parts.ratio,
    lambda dim, k: -mean_resultant_length(dim, k, validate_args=False),
)
_MODE_LOG_DENSITY = _Kernel(
    "log C_p + κ", _nu, ("log_scaled",), lambda dim, k64, parts: -0.5 * dim * _LOG_2PI - parts.log_scaled,
    ("complement",), lambda dim, k64, parts: parts.complement,
    lambda dim, k: mean_resultant_length_complement(dim, k), passes_through=True,
)
_GAP = _Kernel(
    "log C_p(0) − log C_p", _nu, ("log_series",), lambda dim, k64, parts: parts.log_series,
    ("ratio",), lambda dim, k64, parts: parts.ratio,
    lambda dim, k: mean_resultant_length(dim, k, validate_args=False), passes_through=True,
)
_COMPLEMENT = _Kernel(
    "1 − A_p", _nu, ("complement",), lambda dim, k64, parts: parts.complement,
    ("derivative",), lambda dim, k64, parts: -parts.derivative,
    lambda dim, k: -mean_resultant_length_derivative(dim, k), passes_through=True,
)


def log_sphere_area(dim: int) -> float:
    r"""The log surface area of the unit sphere $S^{p-1} \subset \mathbb{R}^p$.

    $$
    \log |S^{p-1}| = \log 2 + \tfrac p2 \log\pi - \log\Gamma(p/2),
    $$

    the negative log density of `HypersphericalUniform` and $-\log C_p(0)$ of the vMF.

    Args:
        dim: the ambient dimension $p$ (not checked here; $p \ge 2$ in this package).

    Returns:
        $\log |S^{p-1}|$ as a Python float (e.g. $\log 4\pi$ for $p = 3$).
    """
    return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)


def _kl_uniform_value(dim: int, k64: torch.Tensor, parts: BesselParts) -> torch.Tensor:
    # κA − G near κ = 0 (relative precision, ≈ κ²/(2p)); [log C + κ] + log|S| − κ(1 − A) beyond.
    assert parts.ratio is not None and parts.log_series is not None  # _KL_UNIFORM.needs
    assert parts.log_scaled is not None and parts.complement is not None
    near_zero = (k64 * parts.ratio).sub_(parts.log_series)
    large = torch.addcmul(
        (-0.5 * dim * _LOG_2PI + log_sphere_area(dim)) - parts.log_scaled, k64, parts.complement, value=-1.0
    )
    return torch.where(k64 <= math.sqrt(32.0 * dim), near_zero, large).clamp(min=0.0)


_KL_UNIFORM = _Kernel(
    "KL(vMF ‖ U)", _nu, ("ratio", "log_series", "log_scaled", "complement"), _kl_uniform_value,
    ("derivative",), lambda dim, k64, parts: k64 * parts.derivative,
    lambda dim, k: k * mean_resultant_length_derivative(dim, k),
)


def _entropy_value(dim: int, k64: torch.Tensor, parts: BesselParts) -> torch.Tensor:
    # −[log C + κ] + κ(1 − A): no terms of size κ cancel
    assert parts.log_scaled is not None and parts.complement is not None  # _ENTROPY.needs
    return torch.addcmul(parts.log_scaled + 0.5 * dim * _LOG_2PI, k64, parts.complement)


_ENTROPY = _Kernel(
    "H(vMF)", _nu, ("log_scaled", "complement"), _entropy_value,
    ("derivative",), lambda dim, k64, parts: -k64 * parts.derivative,
    lambda dim, k: -k * mean_resultant_length_derivative(dim, k),
)

#: Everything the distributions read, for `vmf_parts`.
_VMF_PARTS = ("log_scaled", "ratio", "complement", "log_series")


def vmf_parts(dim: int, kappa64: torch.Tensor, with_derivative: bool) -> BesselParts:
    r"""All Bessel parts a `VonMisesFisher` uses (log_prob, entropy, KL, sampler gradient), in one call.

    Args:
        dim: the ambient dimension $p$ (not checked).
        kappa64: float64 concentrations (not checked).
        with_derivative: also $A_p'(\kappa)$ (for gradients in κ).

    Returns:
        `BesselParts` of order $p/2 - 1$ at κ (float64, no gradient).
    """
    names = _VMF_PARTS + (("derivative",) if with_derivative else ())
    return bessel_parts(_nu(dim), kappa64, **{name: True for name in names})


# --------------------------------------------------------------------------------------------------
# public functions


def log_bessel_iv(
    v: float | torch.Tensor, x: float | torch.Tensor, *, validate_args: bool | None = None
) -> torch.Tensor:
    r"""Logarithm of the modified Bessel function of the first kind, $\log I_v(x)$.

    Exact in float64 for every real order $v \ge 0$ and every $x \ge 0$ up to the largest float (no
    overflow for large $x$, no underflow for large $v$; a few ulps against mpmath, and for $x \le 1$
    the power series of ${}_0F_1$ keeps relative precision even where $\log I_0(x) \approx x^2/4$ is
    tiny). Limits: $\log I_0(0) = 0$, $\log I_v(0) = -\infty$ for $v > 0$, $\log I_v(\infty) = \infty$.

    Method: where $r = \sqrt{v^2 + x^2} \ge 24$, Olver's uniform asymptotic expansion (DLMF 10.41.3)
    written as a series in $1/r$, which holds for every order down to $v = 0$ (there it is Hankel's
    expansion); below, the power series of ${}_0F_1(;v+1;x^2/4)$ (positive terms). Both are a few
    vectorised operations; everything in scaled, logarithmic form, so nothing under- or overflows.

    The gradient is $\frac{\partial}{\partial x} \log I_v(x) = \frac{I_{v+1}(x)}{I_v(x)} + \frac{v}{x}$
    (DLMF 10.29.2), computed from `bessel_iv_ratio`, so it is itself differentiable.

    Args:
        v: order $v \ge 0$, a Python number or a tensor broadcastable with ``x`` (no gradient).
        x: argument $x \ge 0$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $v \ge 0$ and $x \ge 0$ (default: torch.distributions' global switch).

    Returns:
        $\log I_v(x)$ with the broadcast shape of ``v`` and ``x`` and the dtype and device of ``x``.

    Raises:
        ValueError: if ``v`` or ``x`` is negative or NaN, ``v`` is infinite or not a real number, or the
            shapes of ``v`` and ``x`` do not broadcast.
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
    x, dtype = _as_float_tensor(x, "x", lambda t: _check_nonnegative(t, "x", validate))
    order = _check_order(v, validate)
    return _evaluate(_LOG_BESSEL, _broadcast_with_order(x, order), _order_on(order, x)).to(dtype)


def bessel_iv_ratio(
    v: float | torch.Tensor, x: float | torch.Tensor, *, validate_args: bool | None = None
) -> torch.Tensor:
    r"""The ratio $R_v(x) = I_{v+1}(x) / I_v(x) \in [0, 1)$, stable for all $x \ge 0$.

    Limits: $R_v(x) \approx x/(2v+2)$ as $x \to 0$ and $R_v(x) \to 1$ as $x \to \infty$; it satisfies
    Amos' bounds $x / (v + 1 + \sqrt{(v+1)^2 + x^2}) \le R_v(x) \le x / (v + \tfrac12 + \sqrt{(v+\tfrac12)^2 + x^2})$.

    The gradient is $R_v'(x) = 1 - R_v^2 - \frac{2v+1}{x} R_v$ (from DLMF 10.29.2), evaluated without
    the cancellation of this formula: from the uniform expansion where $\sqrt{v^2+x^2} \ge 24$ and as
    $N/(2(v+1)F^2)$ below, with $F = {}_0F_1(;v+1;x^2/4)$ and $N = {}_1F_2(v+\tfrac12; v+2, 2v+2; x^2)$,
    both series of positive terms. Twice differentiable ($R_v^{\prime\prime}$ by Richardson-extrapolated
    differences of the exact $R_v^\prime$, ~1e-11 relative); a third derivative raises.

    Computed, like `log_bessel_iv`, from the uniform expansion in $1/r$ or the power series.

    Args:
        v: order $v \ge 0$, a Python number or a tensor broadcastable with ``x`` (no gradient).
        x: argument $x \ge 0$, a Python number or a tensor of any shape ``[...]``.
        validate_args: check $v \ge 0$ and $x \ge 0$ (default: torch.distributions' global switch).

    Returns:
        $R_v(x)$ with the broadcast shape of ``v`` and ``x`` and the dtype and device of ``x``.

    Raises:
        ValueError: if ``v`` or ``x`` is negative or NaN, ``v`` is infinite or not a real number, or the
            shapes of ``v`` and ``x`` do not broadcast.
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
    x, dtype = _as_float_tensor(x, "x", lambda t: _check_nonnegative(t, "x", validate))
    order = _check_order(v, validate)
    return _evaluate(_RATIO, _broadcast_with_order(x, order), _order_on(order, x)).to(dtype)


def vmf_log_normalizer(dim: int, kappa: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""Log normaliser $\log C_p(\kappa)$ of the von Mises–Fisher distribution on $S^{p-1}$.

    $$
    \log C_p(\kappa) = \nu \log\kappa - \tfrac{p}{2}\log(2\pi) - \log I_\nu(\kappa), \quad \nu = \tfrac p2 - 1,
    $$

    computed as $-\tfrac p2 \log(2\pi) - [\log I_\nu(\kappa) - \nu\log\kappa - \kappa] - \kappa$ with the
    bracket evaluated directly (no cancellation between two large logarithms at small $\kappa$). At
    $\kappa = 0$ it is exactly $\log\Gamma(p/2) - \log 2 - \tfrac p2 \log\pi$, minus the log surface area
    of $S^{p-1}$. The gradient is $\frac{d}{d\kappa}\log C_p(\kappa) = -A_p(\kappa)$ (see
    `mean_resultant_length`); twice differentiable.

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
    kappa, dtype = _as_float_tensor(kappa, "kappa", lambda t: _check_nonnegative(t, "kappa", validate))
    return _evaluate(_LOG_NORMALIZER, kappa, dim).to(dtype)


def mean_resultant_length(dim: int, kappa: float | torch.Tensor, *, validate_args: bool | None = None) -> torch.Tensor:
    r"""Mean resultant length $A_p(\kappa) = I_{p/2}(\kappa) / I_{p/2-1}(\kappa) \in [0, 1)$.

    For $x \sim \mathrm{vMF}(\mu, \kappa)$ on $S^{p-1}$, $\mathbb{E}[x] = A_p(\kappa)\,\mu$ and
    $A_p(\kappa) = -\frac{d}{d\kappa}\log C_p(\kappa)$. Its derivative is the variance of $\mu^\top x$,

    $$
    A_p'(\kappa) = 1 - A_p(\kappa)^2 - \frac{p-1}{\kappa} A_p(\kappa) \quad (= 1/p \text{ at } \kappa = 0),
    $$

    which the backward evaluates without the cancellation of this formula (see `bessel_iv_ratio`),
    keeping relative precision at large $\kappa$ where $A_p' \approx (p-1)/(2\kappa^2)$.

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
    kappa, dtype = _as_float_tensor(kappa, "kappa", lambda t: _check_nonnegative(t, "kappa", validate))
    return _evaluate(_RATIO, kappa, _nu(dim)).to(dtype)


def inverse_mean_resultant_length(
    dim: int, r: float | torch.Tensor, *, validate_args: bool | None = None
) -> torch.Tensor:
    r"""The concentration $\kappa$ with $A_p(\kappa) = r$, for $r \in [0, 1)$ (the vMF MLE of $\kappa$).

    Given the mean resultant length $\bar r = \|\sum_i x_i\| / n$ of unit vectors, the maximum
    likelihood concentration is $\hat\kappa = A_p^{-1}(\bar r)$. The solve starts from Banerjee et al.'s
    approximation $\kappa_0 = r(p - r^2)/(1 - r^2)$, brackets the root with Amos' bounds on the
    Bessel ratio inverted in closed form, and runs a fixed number of Newton steps clamped to the
    bracket (vectorised; the solve itself never synchronises with the host — the optional input
    validation does). $r = 0$ gives $\kappa = 0$. A Python number is solved from its exact value, so
    that $r = 1 - 10^{-10}$ gives a finite κ even where the default dtype would round it to 1.
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
        tensor(10.)
    """
    dim = _check_dim(dim)
    validate = _validation_enabled(validate_args)
    r, dtype = _as_float_tensor(r, "r", lambda t: _check_unit_interval(t, validate))
    return _inverse(r, dim).to(dtype)


# --------------------------------------------------------------------------------------------------
# the inverse


class _InverseMeanResultantLength(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(r: torch.Tensor, dim: int) -> torch.Tensor:
        return _solve_mean_resultant_length(dim, r.to(torch.float64)).to(r.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        r, dim = inputs
        ctx.save_for_backward(r, output)
        ctx.save_for_forward(r, output)
        ctx.dim = dim

    @staticmethod
    def _graph_slope(ctx: Any) -> torch.Tensor:
        """dκ/dr = 1/A_p'(κ(r)) as a differentiable function of r."""
        r, _ = ctx.saved_tensors
        return 1.0 / mean_resultant_length_derivative(ctx.dim, _inverse(r, ctx.dim))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if torch.is_grad_enabled():  # create_graph: κ(r) and A_p'(κ) as differentiable functions of r
            return grad * _InverseMeanResultantLength._graph_slope(ctx), None
        _, kappa = ctx.saved_tensors
        deriv = bessel_parts(_nu(ctx.dim), kappa.to(torch.float64), derivative=True).derivative
        assert deriv is not None
        return grad / deriv.to(grad.dtype), None

    @staticmethod
    def jvp(ctx: Any, r_tangent: torch.Tensor, _: Any) -> torch.Tensor:
        return r_tangent * _InverseMeanResultantLength._graph_slope(ctx)


_InverseMeanResultantLengthWithoutJvp = without_jvp(_InverseMeanResultantLength)


def _inverse(r: torch.Tensor, dim: int) -> torch.Tensor:
    kappa: torch.Tensor = apply(_InverseMeanResultantLength, r, dim, compiled=_InverseMeanResultantLengthWithoutJvp)
    return kappa


def _invert_amos_bound(r: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Solve r = x / (a + √(b² + x²)) for x ≥ 0 (monotone in x for a ≥ 0)."""
    one_minus_r2 = (1.0 - r) * (1.0 + r)
    return r * (a + torch.sqrt(b * b + r * r * (a * a - b * b))) / one_minus_r2


_NEWTON_STEPS = 8


def _solve_mean_resultant_length(dim: int, r: torch.Tensor) -> torch.Tensor:
    nu = _nu(dim)
    r = r.clamp(min=0.0)
    # A_p(κ) lies between the two Amos bounds, so inverting them brackets the root.
    lower = _invert_amos_bound(r, nu + 0.5, nu + 0.5)
    upper = _invert_amos_bound(r, nu + 1.0, nu + 1.0)
    banerjee = r * (dim - r * r) / ((1.0 - r) * (1.0 + r))
    kappa = torch.minimum(torch.maximum(banerjee, lower), upper)
    for _ in range(_NEWTON_STEPS):
        parts = bessel_parts(nu, kappa, ratio=True, derivative=True)
        assert parts.ratio is not None and parts.derivative is not None
        step = (parts.ratio - r) / parts.derivative
        kappa = torch.minimum(torch.maximum(kappa - step, lower), upper)
    return torch.where(r == 0, torch.zeros_like(kappa), kappa)


# --------------------------------------------------------------------------------------------------
# helpers for the distributions: float64 inside, no cancellation at small or large κ


def log_normalizer_plus_kappa(dim: int, kappa: torch.Tensor, parts: BesselParts | None = None) -> torch.Tensor:
    r"""$\log C_p(\kappa) + \kappa$, the vMF log-density at its mode, without cancellation.

    No cancellation of two numbers of size κ (what ``vmf_log_normalizer(dim, κ) + κ`` suffers in
    float32 at large κ). Derivative $1 - A_p(\kappa)$, formed in float64. No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).
        parts: `vmf_parts` of ``kappa`` if already computed (a distribution's cache), else None.

    Returns:
        $\log C_p(\kappa) + \kappa$, with the shape and dtype of ``kappa``.
    """
    return _evaluate(_MODE_LOG_DENSITY, kappa, dim, parts)


def in_gap_series_region(dim: int, *kappas: torch.Tensor) -> torch.Tensor:
    r"""Where every given κ is small enough for formulas anchored at the uniform distribution.

    That is κ² ≤ 32p (κ²/4 ≤ 8p): there `uniform_log_normalizer_gap` has relative precision (it is
    summed as a power series), so KL divergences and kernels are written as differences from κ = 0.

    Args:
        dim: the ambient dimension $p$.
        *kappas: concentration tensors (broadcasting with each other).

    Returns:
        Boolean tensor of the broadcast shape: True where every $\kappa^2 \le 32p$.
    """
    limit = math.sqrt(32.0 * dim)
    inside = kappas[0] <= limit
    for kappa in kappas[1:]:
        inside = inside & (kappa <= limit)
    return inside


def uniform_log_normalizer_gap(dim: int, kappa: torch.Tensor, parts: BesselParts | None = None) -> torch.Tensor:
    r"""$\log C_p(0) - \log C_p(\kappa) = \log {}_0F_1(; p/2; \kappa^2/4) \ge 0$, with relative precision as κ → 0.

    Its value is ≈ κ²/(2p) at small κ; computed by its power series where $\kappa^2/4 \le 8p$ (and at
    every κ < 24 for p < 50); beyond, from $\log C_p(\kappa)$, losing at most a factor
    $|\log C_p(0)|/16$ of relative precision. It is KL(Uniform ‖ vMF); its derivative is $A_p(\kappa)$.
    No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).
        parts: `vmf_parts` of ``kappa`` if already computed, else None.

    Returns:
        $\log C_p(0) - \log C_p(\kappa) \ge 0$, with the shape and dtype of ``kappa``.
    """
    return _evaluate(_GAP, kappa, dim, parts)


def mean_resultant_length_complement(dim: int, kappa: torch.Tensor, parts: BesselParts | None = None) -> torch.Tensor:
    r"""$1 - A_p(\kappa)$ with relative precision at large κ.

    Its value is ≈ (p−1)/(2κ) there, where ``1 - A`` would keep only $-\log_{10}(\epsilon\kappa)$
    digits. Derivative $-A_p'(\kappa)$. No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).
        parts: `vmf_parts` of ``kappa`` if already computed, else None.

    Returns:
        $1 - A_p(\kappa)$, with the shape and dtype of ``kappa``.
    """
    return _evaluate(_COMPLEMENT, kappa, dim, parts)


def mean_resultant_length_derivative(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    r"""$A_p'(\kappa) = \operatorname{Var}(\mu^\top x)$ without cancellation at large κ.

    In the dtype of κ; differentiable once ($A_p''$ by extrapolated differences, ~1e-11 relative).
    No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).

    Returns:
        $A_p'(\kappa)$, with the shape and dtype of ``kappa``.
    """
    return _evaluate(_RATIO_DERIVATIVE, kappa, _nu(dim))


def kl_vmf_uniform(dim: int, kappa: torch.Tensor, parts: BesselParts | None = None) -> torch.Tensor:
    r"""KL(vMF(μ, κ) ‖ Uniform) $= \kappa A_p(\kappa) - \log {}_0F_1(; p/2; \kappa^2/4)$, ≥ 0.

    Near κ = 0 (κ² ≤ 32p) this form keeps relative precision (value ≈ κ²/(2p)); beyond it is evaluated
    as $[\log C_p(\kappa) + \kappa] + \log|S^{p-1}| - \kappa(1 - A_p(\kappa))$. Derivative
    $\kappa A_p'(\kappa)$. One autograd node. No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).
        parts: `vmf_parts` of ``kappa`` if already computed, else None.

    Returns:
        The KL divergence, with the shape and dtype of ``kappa``.
    """
    return _evaluate(_KL_UNIFORM, kappa, dim, parts)


def vmf_entropy(dim: int, kappa: torch.Tensor, parts: BesselParts | None = None) -> torch.Tensor:
    r"""Differential entropy $H = -\log C_p(\kappa) - \kappa A_p(\kappa)$ of the vMF, without cancellation.

    Evaluated as $-[\log C_p(\kappa) + \kappa] + \kappa(1 - A_p(\kappa))$; derivative
    $-\kappa A_p'(\kappa)$. One autograd node. No validation (internal).

    Args:
        dim: the ambient dimension $p \ge 2$ (not checked).
        kappa: concentrations $\kappa \ge 0$, a floating tensor of any shape ``[...]`` (not checked).
        parts: `vmf_parts` of ``kappa`` if already computed, else None.

    Returns:
        The entropy in nats, with the shape and dtype of ``kappa``.
    """
    return _evaluate(_ENTROPY, kappa, dim, parts)
