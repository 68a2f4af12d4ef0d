r"""`bessel_parts`: the parts of $I_\nu$ for a fixed order from a piecewise-polynomial table (~30 operations).

The expansions of `vmf_dists._bessel` cost 30–70 tensor operations per call, depending on which of the
two regions the arguments fall in; at the batch sizes of VAEs and Pyro models that count, not the
arithmetic, is the cost. For a Python-number order every part is a smooth function of one variable, so
at first use per (order, device) we tabulate it once:

* the variable is η = c/(x + c) ∈ (0, 1] with c = ν + 1 (x = 0 ↦ 1, x = ∞ ↦ 0), cut into `INTERVALS`
  equal intervals, and on each the five *normalised* parts are interpolated by a polynomial of degree
  `DEGREE` in the local coordinate u ∈ [0, 1] (Chebyshev nodes, monomial coefficients);
* the normalisations make every tabulated quantity O(1) and smooth at both ends, so that relative
  precision survives where a part vanishes or diverges (ω = 1 − η = x/(x + c)):

      L = Q_L − (ν + ½) log(x + c),   R = ω Q_R,   1 − R = η Q_C,   R' = η² Q_D,   G = x ω Q_G

  (L = log I_ν(x) − ν log x − x; R = I_{ν+1}/I_ν ≈ x/(2ν+2) at 0 and → 1; 1 − R ≈ (2ν+1)/(2x) and
  R' ≈ (2ν+1)/(2x²) at ∞; G = log ₀F₁(;ν+1;x²/4) ≈ x²/(4ν+4) at 0). G is taken from its table up to
  x = 8c (towards ∞ it carries a log x/x term that no polynomial in η follows); beyond, from
  G = L + x + ν log 2 + log Γ(ν+1), where G ≳ 7c makes the cancellation harmless.

An evaluation is then: η, the interval index and u (a few operations), one gather of the coefficients,
the powers of u (one ``pow``), one product and sum for all five, and the de-normalisations. The table
is built from `expansion_parts` at the Chebyshev nodes and checked against
it at points between the nodes (the interval count doubles until the check passes): it agrees with the
expansions to a few ulps (log I and R), and to the expansions' own accuracy near their seam for
1 − R and R'; see docs/numerics.md for the measurements against mpmath.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vmf_dists._bessel import BesselParts, expansion_parts
from vmf_dists._function import untraced

__all__ = ["bessel_parts", "order_table", "INTERVALS", "DEGREE"]

#: Intervals of η at the first attempt (doubled until the build-time check passes, at most 16×).
INTERVALS = 64
#: Polynomial degree per interval.
DEGREE = 8
#: Largest accepted difference from the expansions at the check points, in ulps, per part
#: (L, R, G: relative to max(1, |L|), R, G; 1 − R and R': loose, the expansions are themselves ~50 ulps
#: off near their seam at √(ν² + x²) = 24, where interpolation cannot do better than its data).
_CHECK_ULPS = (16.0, 16.0, 512.0, 512.0, 64.0)
_BELOW_ONE = 1.0 - 2.0**-53
_POW_MAX_POINTS = 32
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class OrderTable:
    """The tabulated parts of one order on one device."""

    nu: float
    scale: float  # c = ν + 1
    gap_offset: float  # ν log 2 + log Γ(ν + 1)
    gap_eta: float  # G from the table for η ≥ gap_eta (x ≤ 8c), from L beyond
    coefficients: torch.Tensor  # [intervals, 5, DEGREE + 1]: monomial coefficients in u of Q_L, Q_R, Q_C, Q_D, Q_G
    exponents: torch.Tensor  # 0, 1, …, DEGREE (float64, on the table's device)
    intervals: int  # a plain int: reading a cached tensor's size inside torch.jit.trace captures the tensor


def _normalised(nu: float, c: float, x: torch.Tensor, parts: BesselParts) -> torch.Tensor:
    """[..., 5]: Q_L, Q_R, Q_C, Q_D, Q_G at finite x > 0 from the expansions' parts."""
    assert parts.log_scaled is not None and parts.ratio is not None and parts.complement is not None  # all requested
    assert parts.derivative is not None and parts.log_series is not None
    xc = x + c
    eta, omega = c / xc, x / xc
    return torch.stack([
        parts.log_scaled + (nu + 0.5) * torch.log(xc),
        parts.ratio / omega,
        parts.complement / eta,
        parts.derivative / (eta * eta),
        parts.log_series / (x * omega),
    ], dim=-1)


def _evaluate_normalised(table: OrderTable, eta: torch.Tensor) -> torch.Tensor:
    """[..., 5]: the interpolated Q at η (float64)."""
    m = table.intervals
    s = eta * m
    index = s.to(torch.int64).clamp(0, m - 1)  # also keeps NaN input (validation off) in range
    u = s.sub_(index)  # ∈ [0, 1] within the interval
    if torch.compiler.is_compiling():  # Horner: one fused loop (inductor's code for the powers and the
        # product-sum below is ~3× slower than eager at batch 1024; eagerly Horner costs 2·DEGREE operations)
        coefficients = table.coefficients[index]
        u = u.unsqueeze(-1)
        value = coefficients[..., DEGREE]
        for degree in range(DEGREE - 1, -1, -1):
            value = value * u + coefficients[..., degree]
        return value
    # [..., DEGREE + 1]: u⁰ … u^DEGREE, by one pow for a few points (fewest operations) and by a running
    # product beyond (a tensor-exponent pow costs ~10× more per element)
    if u.numel() <= _POW_MAX_POINTS:
        powers = torch.pow(u.unsqueeze(-1), table.exponents)
    else:
        powers = torch.nn.functional.pad(u.unsqueeze(-1).expand(*u.shape, DEGREE).cumprod(-1), (1, 0), value=1.0)
    # index_select is several times faster than advanced indexing for the usual 1-D batch
    coefficients = table.coefficients.index_select(0, index) if index.dim() == 1 else table.coefficients[index]
    return (coefficients * powers.unsqueeze(-2)).sum(-1)


def _chebyshev_nodes() -> torch.Tensor:
    """Chebyshev nodes mapped to the local coordinate u ∈ (0, 1) (interior: η is never 0 at a node)."""
    k = torch.arange(DEGREE + 1, dtype=torch.float64)
    return 0.5 * (1.0 + torch.cos(math.pi * (k + 0.5) / (DEGREE + 1)))


def _order_constants(nu: float) -> tuple[float, float, float]:
    """(c, gap_offset, gap_eta) of `OrderTable` for order ν."""
    gap_eta = 1.0 / 9.0  # x ≤ 8c: beyond, G ≳ 7c and L-based G loses at most a factor |L|/G ~ log(8ν)/7
    return nu + 1.0, nu * math.log(2.0) + math.lgamma(nu + 1.0), gap_eta


def _build(nu: float, device: torch.device) -> OrderTable:
    c, gap_offset, gap_eta = _order_constants(nu)
    nodes = _chebyshev_nodes()
    exponents = torch.arange(DEGREE + 1, dtype=torch.float64)
    vandermonde = nodes.unsqueeze(-1) ** exponents
    check_u = 0.5 * (nodes[1:] + nodes[:-1])  # between the nodes
    for doubling in range(5):
        m = INTERVALS * 2**doubling
        start = torch.arange(m, dtype=torch.float64).unsqueeze(-1)
        eta = (start + nodes) / m
        x = c / eta - c
        parts = expansion_parts(nu, x.reshape(-1), log_scaled=True, ratio=True, complement=True, derivative=True,
                                log_series=True)
        values = _normalised(nu, c, x.reshape(-1), parts).reshape(m, DEGREE + 1, 5)
        coefficients = torch.linalg.solve(vandermonde, values).transpose(-1, -2).contiguous()
        table = OrderTable(nu, c, gap_offset, gap_eta, coefficients, exponents, m)
        if _agrees_with_expansions(table, ((start + check_u) / m).reshape(-1)):
            break
    return OrderTable(nu, c, gap_offset, gap_eta, table.coefficients.to(device), exponents.to(device), table.intervals)


def _agrees_with_expansions(table: OrderTable, eta: torch.Tensor) -> bool:
    """Whether the table matches the expansions at ``eta`` (one host read, at build time)."""
    x = table.scale / eta - table.scale
    flags = dict(log_scaled=True, ratio=True, complement=True, derivative=True, log_series=True)
    reference = expansion_parts(table.nu, x, **flags)
    agree = []
    for i, (value, ref) in enumerate(zip(_evaluate(table, x, **flags), reference)):
        assert value is not None and ref is not None  # all requested
        scale = ref.abs().clamp(min=1.0) if i == 0 else ref.abs()
        ok = (value - ref).abs() <= _CHECK_ULPS[i] * _EPS * scale
        if i == 4:  # G: where both take it from L, the difference is L's rounding times |L|/G
            ok = ok | (eta < table.gap_eta)
        agree.append(ok.all())
    return all(torch.stack(agree).tolist())


def _evaluate(table: OrderTable, x: torch.Tensor, *, log_scaled: bool, ratio: bool, complement: bool,
              derivative: bool, log_series: bool) -> BesselParts:
    c = table.scale
    xc = x + c
    eta = torch.reciprocal(xc).mul_(c)
    q_l, q_r, q_c, q_d, q_g = _evaluate_normalised(table, eta).unbind(-1)
    omega = None
    if ratio or log_series:  # x/(x + c), 1 at x = ∞
        finite = x.clamp(max=1e300)
        omega = finite / (finite + c)
    log_scaled_value = torch.add(q_l, torch.log(xc), alpha=-(table.nu + 0.5)) if log_scaled or log_series else None
    series = None
    if log_series:  # x ω Q_G up to x = 8c; beyond, G = L + x + ν log 2 + log Γ(ν+1), which no longer cancels
        assert omega is not None and log_scaled_value is not None
        series = torch.where(eta >= table.gap_eta, (x * omega).mul_(q_g), (log_scaled_value + x).add_(table.gap_offset))
    ratio_value = None
    if ratio:  # R < 1 for finite x (the product can round up), and exactly 1 at x = ∞ (η = 0)
        assert omega is not None
        ratio_value = (omega * q_r).clamp(max=_BELOW_ONE).masked_fill_(eta == 0.0, 1.0)
    return BesselParts(
        log_scaled_value if log_scaled else None,
        ratio_value,
        eta * q_c if complement else None,
        (eta * eta).mul_(q_d) if derivative else None,
        series,
    )


_TABLES: dict[tuple[float, torch.device], OrderTable] = {}
_MAX_TABLES = 512


def order_table(nu: float, device: torch.device) -> OrderTable:
    """The table of order ν on ``device``, built at first use (a few milliseconds) and cached."""
    key = (nu, device)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:  # many distinct orders: drop the oldest
            _TABLES.pop(next(iter(_TABLES)))
        with untraced():
            table = _TABLES[key] = _build(nu, device)
    if torch.jit.is_tracing():  # a cached tensor used by two traced Functions breaks the tracer: copies
        with untraced():
            table = dataclasses.replace(
                table, coefficients=table.coefficients.clone(), exponents=table.exponents.clone()
            )
    return table


@torch.no_grad()
def bessel_parts(
    order: float | torch.Tensor,
    x: torch.Tensor,
    *,
    log_scaled: bool = False,
    ratio: bool = False,
    complement: bool = False,
    derivative: bool = False,
    log_series: bool = False,
) -> BesselParts:
    """The requested parts of I_ν at x (float64 tensors): tabulated for a Python-number order, from the
    expansions for a tensor of orders (see `vmf_dists._bessel.expansion_parts`).

    Args:
        order: ν ≥ 0, a Python float or a float64 tensor broadcastable with ``x``.
        x: float64 tensor with x ≥ 0 (inf allowed).
        log_scaled, ratio, complement, derivative, log_series: which parts to compute.

    Returns:
        `BesselParts` with the requested entries set.
    """
    if isinstance(order, torch.Tensor):
        return expansion_parts(order, x, log_scaled=log_scaled, ratio=ratio, complement=complement,
                               derivative=derivative, log_series=log_series)
    flags = dict(log_scaled=log_scaled, ratio=ratio, complement=complement, derivative=derivative,
                 log_series=log_series)
    table = (_compiled_table if torch.compiler.is_compiling() else order_table)(float(order), x.device)
    return _evaluate(table, x, **flags)


def _coefficient_values(nu: float, device: torch.device) -> tuple[float, ...]:
    """The coefficients of order ν's table as Python floats (flat), building the table if it is new. Marked as
    a constant result, so that Dynamo calls it for real while it traces (a table is never built inside a
    graph) and keeps its result as a constant of the graph. (Floats, not the cached tensor: Dynamo names a
    constant result after the function, and two tensors under one name clash in a graph with two orders.)"""
    return tuple(order_table(nu, device).coefficients.reshape(-1).tolist())


# What torch.compiler.assume_constant_result does, without importing Dynamo when vmf_dists is imported
# (~1.5 s): the decorator only sets this attribute (tests/test_compile.py checks that it still does).
_coefficient_values._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _compiled_table(nu: float, device: torch.device) -> OrderTable:
    """Order ν's table inside torch.compile: its coefficients a constant of the graph, the rest rebuilt from ν,
    so that the evaluation around them is traced and fused like any other code."""
    coefficients = torch.tensor(_coefficient_values(nu, device), dtype=torch.float64, device=device)
    coefficients = coefficients.view(-1, len(BesselParts._fields), DEGREE + 1)  # [intervals, parts, DEGREE + 1]
    exponents = torch.arange(DEGREE + 1, dtype=torch.float64, device=device)
    return OrderTable(nu, *_order_constants(nu), coefficients, exponents, coefficients.shape[0])
