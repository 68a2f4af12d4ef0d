r"""Float64 kernels for $I_\nu$: no autograd, no validation, a handful of vectorised operations per call.

For an order ν ≥ 0 and arguments x ≥ 0 (inf allowed) `bessel_parts` returns any of

* ``log_scaled`` $L = \log I_\nu(x) - \nu\log x - x$,
* ``ratio`` $R = I_{\nu+1}(x)/I_\nu(x)$, ``complement`` $1 - R$ (relative precision as R → 1) and
  ``derivative`` $R'(x)$ (relative precision everywhere, though $R' = 1 - R^2 - (2\nu+1)R/x$ cancels),
* ``log_series`` $G = \log {}_0F_1(;\nu+1;x^2/4) = \log I_\nu(x) - \nu\log(x/2) + \log\Gamma(\nu+1)$
  (relative precision as x → 0, where G ≈ x²/(4ν+4)),

from two expansions, each valid in a region of the (ν, x) plane (see docs/numerics.md):

* **r = √(ν² + x²) ≥ R₀** (`_debye.DEBYE_RADIUS`): Olver's uniform expansion as a series in 1/r
  (`vmf_dists._debye`). With t = ν/r and zt = x/r, one matrix product of the powers of 1/r (small
  orders; of t for ν ≥ R₀) with a per-order table gives U, tU'(t), W and tW'(t), and

      L  = ν²/(r+x) − ν log(ν+r) − ½ log(2πr) + log U
      R  = zt (1/(1+t) + W/U),         1 − R = t(1 + t/(1+zt))/(1+t) − zt W/U   (W < 0)
      R' = (1/r) [t² g + zt² t/(1+t)² − zt² (tW'U − W tU')/U²],   g = 1/(1+t) + W/U,

  where every term is positive or a small correction, so nothing cancels; at ν = 0 it is Hankel's
  expansion. Accurate to the first omitted term, ≤ 1e-17, for r ≥ R₀.
* **r < R₀** (orders below R₀ at small x): power series in q = x²/4 with positive terms only,
  F₁ = ₀F₁(;ν+1;q), F₂ = ₀F₁(;ν+2;q) and N = ₁F₂(ν+½; ν+2, 2ν+2; 4q):

      L = log(F₁ e^{−x}) − ν log 2 − log Γ(ν+1),   R = x F₂ / (2(ν+1) F₁),   R' = N / (2(ν+1) F₁²).

  The last identity (R' as a ratio of positive series; N's term ratio is
  4(n+ν+½)/((n+1)(n+ν+2)(n+2ν+2))) replaces the cancelling formula above. The terms are one
  cumulative product over a stacked dimension of `SERIES_TERMS` term ratios.

G comes from its series wherever q ≤ max(16(ν+1), R₀²/4 − ν²/4) and from L elsewhere.

A Python-number order uses coefficient tables cached per (order, device); a tensor of orders
(broadcasting with x) evaluates the same formulas with per-element coefficients. For a Python-number
order `vmf_dists._bessel_table` evaluates these results from piecewise polynomials (fewer operations);
`expansion_parts` is the reference it is built from and checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vmf_dists import _debye
from vmf_dists._function import untraced

__all__ = ["BesselParts", "expansion_parts", "gap_series_limit", "DEBYE_RADIUS"]

DEBYE_RADIUS = _debye.DEBYE_RADIUS
#: Terms of the power series: at r < R₀ (q < 144) and for G at q ≤ 16(ν+1) the rest is < 1e-19 of the sum.
SERIES_TERMS = 64
#: G is summed as a series where q = x²/4 ≤ GAP_SERIES_LIMIT·(ν+1) (or r < R₀).
GAP_SERIES_LIMIT = 16.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_BELOW_ONE = 1.0 - 2.0**-53  # the largest float64 below 1


class BesselParts(NamedTuple):
    """Float64 results of `bessel_parts`; those not requested are None."""

    log_scaled: torch.Tensor | None = None  # log I_ν(x) − ν log x − x
    ratio: torch.Tensor | None = None  # I_{ν+1}(x) / I_ν(x), in [0, 1)
    complement: torch.Tensor | None = None  # 1 − I_{ν+1}(x) / I_ν(x)
    derivative: torch.Tensor | None = None  # d/dx I_{ν+1}(x) / I_ν(x)
    log_series: torch.Tensor | None = None  # log 0F1(; ν+1; x²/4)


class _Request(NamedTuple):
    """The parts `_debye_parts` and `_series_parts` compute: those that are not None."""

    log_scaled: bool | None = None
    ratio: bool | None = None
    complement: bool | None = None
    derivative: bool | None = None
    log_series: bool | None = None


# --------------------------------------------------------------------------------------------------
# per-order constants


def _series_ratio_rows(nu: float | torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """Term ratios (to be multiplied by q) of F₁, F₂ and N for k = 1 … K (ν a float or a [..., 1] tensor)."""
    return [
        1.0 / (k * (nu + k)),
        1.0 / (k * (nu + 1.0 + k)),
        4.0 * (k - 0.5 + nu) / (k * (k + nu + 1.0) * (k + 2.0 * nu + 1.0)),
    ]


def gap_series_limit(nu: float) -> float:
    """The x up to which G = log 0F1(;ν+1;x²/4) is summed as a series: q ≤ 16(ν+1), or r < R₀."""
    return max(2.0 * math.sqrt(GAP_SERIES_LIMIT * (nu + 1.0)), math.sqrt(max(DEBYE_RADIUS**2 - nu * nu, 0.0)))


@dataclass(frozen=True)
class _ScalarOrder:
    """Everything `bessel_parts` needs for one Python-number order on one device."""

    nu: float
    nu_tensor: torch.Tensor  # 0-dim, for torch.hypot
    radial: bool  # the Debye table is in powers of 1/r (ν < R₀) rather than of t = ν/r
    debye: torch.Tensor  # [J, 4]: rows j = 1 … J of (U − 1, tU', W, tW')
    series: torch.Tensor  # [3, SERIES_TERMS] term ratios of F₁, F₂, N
    small_x: float  # r < R₀ ⟺ x < small_x (0 for ν ≥ R₀)
    gap_x: float  # G by its series for x ≤ gap_x
    log_at_zero: float  # lim_{x→0} L = −ν log 2 − log Γ(ν+1)
    log_u_at_zero: float  # log U at x = 0 (t = 1), for ν ≥ R₀ (≈ −(log Γ(ν+1) − Stirling's approximation))


_SCALAR_ORDERS: dict[tuple[float, torch.device], _ScalarOrder] = {}


def _u_at_zero(table: list[tuple[float, float, float, float]], nu: float, radial: bool) -> float:
    """U − 1 at x = 0 (t = 1, τ = 1/ν) from a Debye table (rows j = 1 … J)."""
    s = 1.0 / nu if radial else 1.0
    return sum(row[0] * s ** (j + 1) for j, row in enumerate(table))


def _scalar_order(nu: float, device: torch.device) -> _ScalarOrder:
    key = (nu, device)
    found = _SCALAR_ORDERS.get(key)
    if found is not None:
        return found
    radial = nu < DEBYE_RADIUS
    num_terms = _debye.terms_needed(max(nu, DEBYE_RADIUS))
    table = _debye.radial_table(nu, num_terms) if radial else _debye.order_table(nu, num_terms)
    with untraced():
        k = torch.arange(1, SERIES_TERMS + 1, dtype=torch.float64)
        series = torch.stack(_series_ratio_rows(nu, k)).to(device)
        entry = _ScalarOrder(
            nu=nu,
            nu_tensor=torch.tensor(nu, dtype=torch.float64, device=device),
            radial=radial,
            debye=torch.tensor(table, dtype=torch.float64, device=device),
            series=series,
            small_x=math.sqrt(max(DEBYE_RADIUS**2 - nu * nu, 0.0)),
            gap_x=gap_series_limit(nu),
            log_at_zero=-nu * math.log(2.0) - math.lgamma(nu + 1.0),
            log_u_at_zero=math.log1p(_u_at_zero(table, nu, radial)) if not radial else 0.0,
        )
    _SCALAR_ORDERS[key] = entry
    return entry


_EXPANSION: dict[torch.device, torch.Tensor] = {}


def _expansion_tensor(device: torch.device) -> torch.Tensor:
    """`_debye.expansion_coefficients` as a [2K+1, K·4] tensor (rows: powers of t; columns: (k, c))."""
    found = _EXPANSION.get(device)
    if found is None:
        num_terms = _debye.MAX_TERMS
        with untraced():
            e = torch.zeros(num_terms, 2 * num_terms + 1, 4, dtype=torch.float64)
            for k, row in enumerate(_debye.expansion_coefficients(num_terms)):
                e[k, : len(row)] = torch.tensor(row, dtype=torch.float64)
            found = e.permute(1, 0, 2).reshape(2 * num_terms + 1, num_terms * 4).to(device)
        _EXPANSION[device] = found
    return found


# --------------------------------------------------------------------------------------------------
# the two expansions


def _powers(s: torch.Tensor, count: int) -> torch.Tensor:
    """[..., count]: s¹ … s^count (one cumulative product)."""
    return torch.cumprod(s.unsqueeze(-1).expand(*s.shape, count), dim=-1)


def _debye_sums(
    order: _ScalarOrder | torch.Tensor, x: torch.Tensor, r: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """[..., 4]: (U − 1, tU'(t), W, tW'(t)) of the uniform expansion."""
    if isinstance(order, _ScalarOrder):
        s = tau if order.radial else tau * order.nu
        return _powers(s, order.debye.shape[0]) @ order.debye
    # a tensor of orders: Σ_k τ^k Σ_d e[k, d] t^d with t = ν/r ≤ 1 and τ ≤ 1/R₀ (no overflow for any ν)
    num_terms = _debye.MAX_TERMS
    t = order * tau
    t_powers = torch.cat([torch.ones_like(t).unsqueeze(-1), _powers(t, 2 * num_terms)], dim=-1)
    by_term: torch.Tensor = (t_powers @ _expansion_tensor(x.device)).unflatten(-1, (num_terms, 4))
    return (by_term * _powers(tau, num_terms).unsqueeze(-1)).sum(-2)


def _add_scaled(acc: torch.Tensor, scale: float | torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """acc += scale·term in place (scale a Python number or a tensor)."""
    return acc.add_(term, alpha=scale) if isinstance(scale, float) else acc.add_(term * scale)


def _debye_parts(
    order: _ScalarOrder | torch.Tensor,
    nu: float | torch.Tensor,
    x: torch.Tensor,
    want: _Request,
    clamp: bool,
    log_at_zero: float | torch.Tensor | None = None,
) -> BesselParts:
    nu_tensor = order.nu_tensor if isinstance(order, _ScalarOrder) else order
    r = torch.hypot(x, nu_tensor)
    if clamp:  # entries with r < R₀ are discarded; clamping keeps them finite
        r = r.clamp(min=DEBYE_RADIUS)
    tau = torch.reciprocal(r)
    su, tdu, w, tdw = _debye_sums(order, x, r, tau).unbind(-1)
    zero_order = isinstance(nu, float) and nu == 0.0
    t = None if zero_order else tau * nu  # None exactly for ν = 0 (below, `t is None` marks that case)
    log_scaled = ratio = complement = derivative = None
    if want.log_scaled is not None:
        # ν²/(r+x) − ν log(ν+r) − ½ log(2πr) + log U, with −ν log(ν+r) − ½ log r = −(ν+½) log r − ν log1p(t)
        log_scaled = _add_scaled(torch.log1p(su), -(nu + 0.5), torch.log(r)).sub_(_HALF_LOG_2PI)
        if t is not None:
            log_scaled = _add_scaled(_add_scaled(log_scaled, -nu, torch.log1p(t)), nu * nu, torch.reciprocal(r + x))
    if want.ratio is not None or want.complement is not None or want.derivative is not None:
        u = su + 1.0
        zt = x / r  # ≤ 1 (x·τ can round above 1)
        w_over_u = w / u
        if t is None:
            g = w_over_u + 1.0
        else:
            inv_one_plus_t = torch.reciprocal(t + 1.0)
            g = inv_one_plus_t + w_over_u
        if want.ratio is not None:
            ratio = (zt * g).clamp(max=_BELOW_ONE)  # R < 1 for finite x; the product can round up to 1
        if want.complement is not None:  # t(1 + t/(1+zt))/(1+t) − zt W/U, both terms ≥ 0
            complement = (zt * w_over_u).neg_() if t is None else (
                torch.div(t, zt + 1.0).add_(1.0).mul_(t).mul_(inv_one_plus_t).addcmul_(zt, w_over_u, value=-1.0)
            )
        if want.derivative is not None:  # (1/r)[t²g + zt²(t/(1+t)² − (tW'U − W tU')/U²)]
            inner = torch.addcmul(tdw / u, w_over_u, tdu / u, value=-1.0).mul_(zt * zt)
            if t is None:
                inner = inner.neg_()
            else:
                inner = (t * inv_one_plus_t).mul_(inv_one_plus_t).mul_(zt * zt).sub_(inner).addcmul_(t * t, g)
            derivative = inner.mul_(tau)
    log_series = None
    if want.log_series is not None:
        log_series = _debye_log_series(order, nu, x, r, su, log_scaled, log_at_zero)
    return BesselParts(log_scaled, ratio, complement, derivative, log_series)


def _debye_log_series(
    order: _ScalarOrder | torch.Tensor,
    nu: float | torch.Tensor,
    x: torch.Tensor,
    r: torch.Tensor,
    su: torch.Tensor,
    log_scaled: torch.Tensor | None,
    log_at_zero: float | torch.Tensor | None,
) -> torch.Tensor:
    """G = log 0F1(;ν+1;x²/4) where r ≥ R₀.

    For ν ≥ R₀, G = L + x + ν log 2 + log Γ(ν+1) would subtract numbers of size ν log ν from each other;
    expanding L and Stirling's series (of which log U at x = 0 is the Debye form) instead gives, with
    d = r − ν = x²/(r + ν), the cancellation-free G = d − ν log1p(d/(2ν)) − ½ log1p(d/ν) + log U − log U(0).
    For ν < R₀ that form does not converge at x = 0, and G is large wherever r ≥ R₀: L + x − lim L is used.
    """
    assert log_scaled is not None and log_at_zero is not None  # always passed with log_series requested
    from_l = log_scaled + x - log_at_zero
    if isinstance(order, _ScalarOrder) and order.radial:
        return from_l
    log_u_at_zero: float | torch.Tensor
    if isinstance(order, _ScalarOrder):
        log_u_at_zero = order.log_u_at_zero
    else:  # per element, at x = 0 (meaningless for ν < R₀, where from_l is taken); a tensor order is ν itself
        safe_nu = order.clamp(min=DEBYE_RADIUS)
        log_u_at_zero = torch.log1p(_debye_sums(safe_nu, x, safe_nu, torch.reciprocal(safe_nu))[..., 0])
    d = (x * x) / (r + nu)
    stable = (d - nu * torch.log1p(d / (2.0 * nu)) - 0.5 * torch.log1p(d / nu)) + (torch.log1p(su) - log_u_at_zero)
    return stable if isinstance(order, _ScalarOrder) else torch.where(order >= DEBYE_RADIUS, stable, from_l)


def _series_sums(q: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """[..., m]: Σ_{k≥1} Π_{i≤k} q·ratio_i for each of the m rows of ``ratios`` ([m, K] or [..., m, K])."""
    return torch.cumprod(q.unsqueeze(-1).unsqueeze(-1) * ratios, dim=-1).sum(-1)


def _series_parts(
    order: _ScalarOrder | torch.Tensor,
    nu: float | torch.Tensor,
    x: torch.Tensor,
    q: torch.Tensor,
    ratios: torch.Tensor,
    want: _Request,
    log_at_zero: float | torch.Tensor,
) -> BesselParts:
    rows = ratios.shape[-2]
    sums = _series_sums(q, ratios)
    s1 = sums[..., 0]
    f1 = s1 + 1.0
    log_scaled = ratio = complement = derivative = log_series = None
    if want.log_series is not None:
        log_series = torch.log1p(s1)
    if want.log_scaled is not None:
        log_scaled = torch.log(torch.exp(-x).mul_(f1)).add_(log_at_zero)
    if rows > 1:
        two_nu_plus_two = 2.0 * (nu + 1.0)
        if want.ratio is not None or want.complement is not None:
            ratio = (sums[..., 1] + 1.0).mul_(x).div_(f1 * two_nu_plus_two)
            if want.complement is not None:
                complement = 1.0 - ratio
        if want.derivative is not None and rows > 2:
            derivative = (sums[..., 2] + 1.0).div_((f1 * f1).mul_(two_nu_plus_two))
    return BesselParts(log_scaled, ratio, complement, derivative, log_series)


# --------------------------------------------------------------------------------------------------
# the entry point


def _merge(mask: torch.Tensor | None, first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor:
    """``first`` where ``mask``, else ``second``; either alone when the other was not computed (at least one was)."""
    if first is None:
        assert second is not None
        return second
    if second is None:
        return first
    assert mask is not None  # both computed: there is a small-x region
    return torch.where(mask, first, second)


_AT_INFINITY = {"log_scaled": -math.inf, "ratio": 1.0, "complement": 0.0, "derivative": 0.0, "log_series": math.inf}
_NAMES = ("log_scaled", "ratio", "complement", "derivative")


@torch.no_grad()
def expansion_parts(
    order: float | torch.Tensor,
    x: torch.Tensor,
    *,
    log_scaled: bool = False,
    ratio: bool = False,
    complement: bool = False,
    derivative: bool = False,
    log_series: bool = False,
) -> BesselParts:
    """The requested parts of I_ν at x from the two expansions (float64; see the module docstring).

    Both expansions are evaluated where either could be needed and merged elementwise; this is the
    reference from which `vmf_dists._bessel_table` builds its per-order tables, and the evaluation
    for a tensor of orders.

    Args:
        order: ν ≥ 0, a Python float or a float64 tensor broadcastable with ``x``.
        x: float64 tensor with x ≥ 0 (inf allowed).
        log_scaled, ratio, complement, derivative, log_series: which parts to compute.

    Returns:
        `BesselParts` with the requested entries set (the broadcast shape of order and x).
    """
    flags = (log_scaled, ratio, complement, derivative)
    main = _Request(*(True if flag else None for flag in flags))
    needs_main = any(flags)
    spec: _ScalarOrder | torch.Tensor
    nu: float | torch.Tensor
    small_x: float | torch.Tensor
    gap_x: float | torch.Tensor
    log_at_zero: float | torch.Tensor
    if isinstance(order, torch.Tensor):
        broadcast: tuple[torch.Tensor, ...] = torch.broadcast_tensors(order.to(x), x)
        nu, x = broadcast
        k = torch.arange(1, SERIES_TERMS + 1, dtype=x.dtype, device=x.device)
        ratios = torch.stack(_series_ratio_rows(nu.unsqueeze(-1), k), dim=-2)
        small_x = torch.sqrt((DEBYE_RADIUS**2 - nu * nu).clamp(min=0.0))
        gap_x = torch.maximum(torch.sqrt(GAP_SERIES_LIMIT * (nu + 1.0)) * 2.0, small_x)
        log_at_zero = -nu * math.log(2.0) - torch.lgamma(nu + 1.0)
        spec, has_small = nu, True
    else:
        spec = _scalar_order(float(order), x.device)
        nu, ratios, small_x, gap_x, log_at_zero = spec.nu, spec.series, spec.small_x, spec.gap_x, spec.log_at_zero
        has_small = small_x > 0.0
    inf_x = torch.isinf(x)
    x = torch.where(inf_x, 0.0, x)

    debye_want = main._replace(
        log_scaled=True if log_series else main.log_scaled, log_series=True if log_series else None
    )
    debye = _debye_parts(spec, nu, x, debye_want, clamp=has_small, log_at_zero=log_at_zero)
    # q capped where the series is not used, so that the discarded terms stay finite
    q = torch.minimum(x, torch.as_tensor(gap_x, dtype=x.dtype, device=x.device)).square().mul_(0.25)
    if not (needs_main and has_small):
        ratios = ratios[..., :1, :]
    elif not derivative:
        ratios = ratios[..., :2, :]
    series_want = (main if has_small else _Request())._replace(log_series=True if log_series else None)
    series = _series_parts(spec, nu, x, q, ratios, series_want, log_at_zero)

    parts: dict[str, torch.Tensor] = {}
    in_small = x < small_x if has_small else None
    for name, flag in zip(_NAMES, flags):
        if flag:
            parts[name] = _merge(in_small, getattr(series, name), getattr(debye, name))
    if log_series:
        assert series.log_series is not None and debye.log_series is not None  # both requested above
        parts["log_series"] = torch.where(x <= gap_x, series.log_series, debye.log_series)
    parts = {name: torch.where(inf_x, _AT_INFINITY[name], value) for name, value in parts.items()}
    return BesselParts(**parts)
