"""Oracle tests for `vmf_dists.special` against mpmath (see `tests/oracle.py`).

Every reference value is computed by mpmath during the test run (≥ 50 digits); nothing produced by
the library is pasted in. Tolerances are the acceptance spec of the special-functions issue:

* float64: |Δ log C_p| ≤ 1e-12·max(1, |log C_p|) (likewise log I_v); relative error of A_p / R_v and of
  d/dκ log C_p = −A_p ≤ 1e-10; relative error of A_p' / R_v' ≤ 1e-9.
* float32 inputs: |Δ log C_p| ≤ 1e-5·max(1, |log C_p|); A_p relative ≤ 1e-5.
* inverse round trip: relative ≤ 1e-6 for κ ∈ [1e-3, 1e5].

A few tests go beyond the grid to check claims of the docstrings ("every x ≥ 0, no overflow",
"a few ulps of the result", R ∈ [0, 1), ValueError on negative input): `test_extreme_arguments`,
`test_extreme_kappa`, `test_log_bessel_i0_relative_accuracy_at_small_x`,
`test_ratio_stays_below_one_at_large_x`, `test_tiny_negative_python_numbers_are_rejected`.

The one grid point where mpmath needs a ~1e5-term power series (p = 8192, κ = 1e5: ≈ 15 s per Bessel
value) is checked only under ``-m slow``.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpmath import mp

import vmf_dists.special as special
from tests.oracle import (
    WORK_DPS,
    mp_besseli,
    mp_log_iv,
    mp_log_iv_mp,
    mp_log_normalizer,
    mp_mean_resultant_length,
    mp_mean_resultant_length_deriv,
    mp_ratio,
    mp_ratio_deriv,
    mp_ratio_mp,
)
from vmf_dists.special import (
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    mean_resultant_length,
    vmf_log_normalizer,
)

F64 = torch.float64
F32 = torch.float32

# --------------------------------------------------------------------------------------------------
# tolerances (the spec)

LOG_TOL_F64 = 1e-12  # absolute, times max(1, |value|)
RATIO_TOL_F64 = 1e-10  # relative: A_p, R_v, d/dκ log C_p
DERIV_TOL_F64 = 1e-9  # relative: A_p', R_v'
LOG_TOL_F32 = 1e-5
RATIO_TOL_F32 = 1e-5
INVERSE_TOL = 1e-6

# --------------------------------------------------------------------------------------------------
# grids

DIMS = [2, 3, 4, 5, 7, 8, 16, 31, 64, 100, 128, 255, 256, 512, 1000, 1024, 2048, 4096, 8192]
KAPPAS = [0.0] + [10.0**e for e in range(-8, 9)]
#: mpmath takes ~15 s per Bessel value here (its asymptotic series diverges, the power series is long)
SLOW_GRID_POINTS = [(8192, 1e5)]

ORDERS = [0.0, 0.3, 1.0, 2.7, 24.9, 25.0, 25.1, 60.5, 1000.2]
XS = [0.0] + [10.0**e for e in range(-8, 9)] + [0.37, 3.7, 24.9, 37.0, 370.0, 3700.0]


def _fast_kappas(p: int) -> list[float]:
    return [k for k in KAPPAS if (p, k) not in SLOW_GRID_POINTS]


def _f32(value: float) -> float:
    """The float32 number nearest to ``value`` (what a float32 tensor actually holds), as a float."""
    return float(torch.tensor(value, dtype=F32).item())


def _log_err(got: float, ref: float) -> float:
    """|got − ref| / max(1, |ref|); 0 when both are the same infinity."""
    if math.isinf(ref) and got == ref:
        return 0.0
    return abs(got - ref) / max(1.0, abs(ref))


def _rel_err(got: float, ref: float) -> float:
    """Relative error; where the reference is exactly 0 the result must be exactly 0."""
    if ref == 0.0:
        return 0.0 if got == 0.0 else math.inf
    return abs(got - ref) / abs(ref)


def _assert_errors(errors: list[tuple[float, object]], tol: float, what: str) -> None:
    bad = [(e, pt) for e, pt in errors if not e <= tol]  # `not <=` also catches NaN
    worst = max(errors, key=lambda t: t[0] if not math.isnan(t[0]) else math.inf)
    assert not bad, f"{what}: {len(bad)} point(s) above {tol:g}; worst {worst[0]:.3e} at {worst[1]}; all bad: {bad}"


# --------------------------------------------------------------------------------------------------
# 0. the oracle itself


@pytest.mark.parametrize("x", [1e-8, 0.3, 1.0, 7.5, 50.0, 700.0, 1e4, 1e8])
def test_oracle_matches_closed_forms(x):
    """mpmath's I_{1/2}, I_{3/2} against the elementary closed forms (DLMF 10.49.i)."""
    with mp.workdps(WORK_DPS):
        xx = mp.mpf(x)
        i_half = mp.sqrt(2 / (mp.pi * xx)) * mp.sinh(xx)
        i_three_half = mp.sqrt(2 / (mp.pi * xx)) * (mp.cosh(xx) - mp.sinh(xx) / xx)
        assert abs(mp.log(i_half) - mp_log_iv_mp(0.5, x)) <= mp.mpf(10) ** (-45) * max(1, abs(mp.log(i_half)))
        assert abs(i_three_half / i_half - mp_ratio_mp(0.5, x)) <= mp.mpf(10) ** (-45) * (i_three_half / i_half)


# (mpmath's besselk stalls at some moderate arguments, e.g. K_2(37), K_25(3); these points are quick)
@pytest.mark.parametrize(
    ("v", "x"), [(0.0, 1e8), (0.3, 1e5), (24.9, 1e-3), (60.5, 1e3), (1000.2, 3700.0), (4095.0, 1e4), (2047.0, 1e8)]
)
def test_oracle_wronskian_and_recurrence(v, x):
    """mpmath's I against the Wronskian I_v K_{v+1} + I_{v+1} K_v = 1/x (DLMF 10.28.2) and the
    three-term recurrence, including points where mpmath uses its large-argument expansion."""
    with mp.workdps(WORK_DPS):
        vv, xx = mp.mpf(v), mp.mpf(x)
        i0, i1, i2 = mp_besseli(v, x, 0), mp_besseli(v, x, 1), mp_besseli(v, x, 2)
        k0 = mp.besselk(vv, xx, maxterms=10**6)
        k1 = mp.besselk(vv + 1, xx, maxterms=10**6)
        assert abs((i0 * k1 + i1 * k0) * xx - 1) < mp.mpf(10) ** (-40)
        assert abs((i0 - i2) / ((2 * (vv + 1) / xx) * i1) - 1) < mp.mpf(10) ** (-40)


def test_amos_bounds_hold_in_mpmath():
    """The bounds used below (Amos 1974, eq. 16 and its ν+½ variant) are true: checked with mpmath."""
    for v in [0.0, 0.3, 1.0, 2.7, 24.9, 60.5, 1000.2]:
        for x in [1e-6, 1e-2, 0.5, 2.0, 10.0, 100.0, 1e4, 1e8]:
            with mp.workdps(WORK_DPS):
                r = mp_ratio_mp(v, x)
                vv, xx = mp.mpf(v), mp.mpf(x)
                lower = xx / (vv + 1 + mp.sqrt((vv + 1) ** 2 + xx**2))
                upper = xx / (vv + mp.mpf(0.5) + mp.sqrt((vv + mp.mpf(0.5)) ** 2 + xx**2))
                assert lower <= r <= upper, (v, x)


# --------------------------------------------------------------------------------------------------
# 1. the (p, κ) grid


def _grid_check(p: int, kappas: list[float], dtype: torch.dtype) -> dict[str, list[tuple[float, object]]]:
    """Run every public vMF function on ``kappas`` in ``dtype``; return per-quantity error lists."""
    kappa = torch.tensor(kappas, dtype=dtype, requires_grad=True)
    log_c = vmf_log_normalizer(p, kappa)
    a = mean_resultant_length(p, kappa)
    (dlog_c,) = torch.autograd.grad(log_c.sum(), kappa)
    (da,) = torch.autograd.grad(a.sum(), kappa)
    for name, out in [("log C_p", log_c), ("A_p", a), ("d log C_p", dlog_c), ("A_p'", da)]:
        assert out.dtype == dtype, (name, out.dtype)
        assert torch.isfinite(out).all(), f"{name} not finite for p={p} at κ={kappa[~torch.isfinite(out)].tolist()}"
    errs: dict[str, list] = {"log C_p": [], "A_p": [], "d log C_p": [], "A_p'": []}
    for i, k in enumerate(kappas):
        k_exact = k if dtype == F64 else _f32(k)
        ref_a = mp_mean_resultant_length(p, k_exact)
        errs["log C_p"].append((_log_err(log_c[i].item(), mp_log_normalizer(p, k_exact)), (p, k)))
        errs["A_p"].append((_rel_err(a[i].item(), ref_a), (p, k)))
        errs["d log C_p"].append((_rel_err(-dlog_c[i].item(), ref_a), (p, k)))
        errs["A_p'"].append((_rel_err(da[i].item(), mp_mean_resultant_length_deriv(p, k_exact)), (p, k)))
    return errs


@pytest.mark.parametrize("p", DIMS)
def test_grid_float64(p):
    errs = _grid_check(p, _fast_kappas(p), F64)
    _assert_errors(errs["log C_p"], LOG_TOL_F64, "log C_p float64")
    _assert_errors(errs["A_p"], RATIO_TOL_F64, "A_p float64")
    _assert_errors(errs["d log C_p"], RATIO_TOL_F64, "autograd d/dκ log C_p vs −A_p float64")
    _assert_errors(errs["A_p'"], DERIV_TOL_F64, "autograd A_p' float64")


@pytest.mark.parametrize("p", DIMS)
def test_grid_float32(p):
    errs = _grid_check(p, _fast_kappas(p), F32)
    _assert_errors(errs["log C_p"], LOG_TOL_F32, "log C_p float32")
    _assert_errors(errs["A_p"], RATIO_TOL_F32, "A_p float32")
    _assert_errors(errs["d log C_p"], RATIO_TOL_F32, "autograd d/dκ log C_p vs −A_p float32")


@pytest.mark.slow
@pytest.mark.parametrize(("p", "kappa"), SLOW_GRID_POINTS)
def test_grid_slow_points(p, kappa):
    errs = _grid_check(p, [kappa], F64)
    _assert_errors(errs["log C_p"], LOG_TOL_F64, "log C_p float64")
    _assert_errors(errs["A_p"], RATIO_TOL_F64, "A_p float64")
    _assert_errors(errs["d log C_p"], RATIO_TOL_F64, "autograd d/dκ log C_p vs −A_p float64")
    _assert_errors(errs["A_p'"], DERIV_TOL_F64, "autograd A_p' float64")
    errs = _grid_check(p, [kappa], F32)
    _assert_errors(errs["log C_p"], LOG_TOL_F32, "log C_p float32")
    _assert_errors(errs["A_p"], RATIO_TOL_F32, "A_p float32")


@pytest.mark.parametrize("p", DIMS)
def test_kappa_zero_closed_forms(p):
    """κ = 0: log C_p = lgamma(p/2) − log 2 − (p/2) log π exactly-ish, A_p = 0 exactly, A_p' = 1/p."""
    kappa = torch.zeros(1, dtype=F64, requires_grad=True)
    expected = math.lgamma(p / 2) - math.log(2.0) - p / 2 * math.log(math.pi)
    assert _log_err(vmf_log_normalizer(p, kappa).item(), expected) <= LOG_TOL_F64
    a = mean_resultant_length(p, kappa)
    assert a.item() == 0.0
    (da,) = torch.autograd.grad(a.sum(), kappa)
    assert _rel_err(da.item(), 1.0 / p) <= DERIV_TOL_F64


ROUND_TRIP_KAPPAS = [10.0**e for e in range(-3, 6)] + [3e-3, 0.3, 3.0, 30.0, 300.0, 3e3, 3e4]


@pytest.mark.parametrize("p", DIMS)
def test_inverse_round_trip(p):
    """inverse_mean_resultant_length(p, A_p(κ)) = κ to 1e-6, κ ∈ [1e-3, 1e5] (library A_p, float64)."""
    kappa = torch.tensor(ROUND_TRIP_KAPPAS, dtype=F64)
    back = inverse_mean_resultant_length(p, mean_resultant_length(p, kappa))
    errs = [(_rel_err(b, k), (p, k)) for b, k in zip(back.tolist(), ROUND_TRIP_KAPPAS)]
    _assert_errors(errs, INVERSE_TOL, "inverse round trip")


@pytest.mark.parametrize("p", [2, 3, 5, 16, 100, 256, 1000, 4096])
def test_inverse_against_mpmath(p):
    """The inverse applied to mpmath's A_p(κ) (rounded to float64) returns κ, and dκ/dr = 1/A_p'(κ)."""
    kappas = ROUND_TRIP_KAPPAS
    r = torch.tensor([mp_mean_resultant_length(p, k) for k in kappas], dtype=F64, requires_grad=True)
    kappa = inverse_mean_resultant_length(p, r)
    (dk,) = torch.autograd.grad(kappa.sum(), r)
    _assert_errors([(_rel_err(g, k), (p, k)) for g, k in zip(kappa.tolist(), kappas)], INVERSE_TOL, "inverse(mp A_p)")
    _assert_errors(
        [(_rel_err(g, 1.0 / mp_mean_resultant_length_deriv(p, k)), (p, k)) for g, k in zip(dk.tolist(), kappas)],
        INVERSE_TOL,
        "d inverse / dr",
    )


def test_inverse_at_zero():
    assert inverse_mean_resultant_length(3, torch.zeros(2, dtype=F64)).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------------------
# 2. log I_v and R_v for general orders


@pytest.mark.parametrize("v", ORDERS)
def test_log_bessel_iv_and_ratio_float64(v):
    x = torch.tensor(XS, dtype=F64, requires_grad=True)
    log_i = log_bessel_iv(v, x)
    ratio = bessel_iv_ratio(v, x)
    (dlog_i,) = torch.autograd.grad(log_i[1:].sum(), x)  # x = 0 excluded: d/dx log I_v(0) = ∞ for v > 0
    (dratio,) = torch.autograd.grad(ratio.sum(), x)
    assert log_i.dtype == ratio.dtype == F64
    e_log, e_ratio, e_dlog, e_dratio = [], [], [], []
    for i, xi in enumerate(XS):
        e_log.append((_log_err(log_i[i].item(), mp_log_iv(v, xi)), (v, xi)))
        e_ratio.append((_rel_err(ratio[i].item(), mp_ratio(v, xi)), (v, xi)))
        e_dratio.append((_rel_err(dratio[i].item(), mp_ratio_deriv(v, xi)), (v, xi)))
        if xi > 0:
            with mp.workdps(WORK_DPS):
                ref = float(mp_ratio_mp(v, xi) + mp.mpf(v) / mp.mpf(xi))
            e_dlog.append((_rel_err(dlog_i[i].item(), ref), (v, xi)))
    _assert_errors(e_log, LOG_TOL_F64, "log I_v float64")
    _assert_errors(e_ratio, RATIO_TOL_F64, "R_v float64")
    _assert_errors(e_dlog, RATIO_TOL_F64, "autograd d/dx log I_v float64")
    _assert_errors(e_dratio, DERIV_TOL_F64, "autograd R_v' float64")


@pytest.mark.parametrize("v", ORDERS)
def test_log_bessel_iv_and_ratio_float32(v):
    xs = XS
    x = torch.tensor(xs, dtype=F32)
    log_i = log_bessel_iv(v, x)
    ratio = bessel_iv_ratio(v, x)
    assert log_i.dtype == ratio.dtype == F32
    e_log = [(_log_err(log_i[i].item(), mp_log_iv(v, _f32(xi))), (v, xi)) for i, xi in enumerate(xs)]
    e_ratio = [(_rel_err(ratio[i].item(), mp_ratio(v, _f32(xi))), (v, xi)) for i, xi in enumerate(xs)]
    _assert_errors(e_log, LOG_TOL_F32, "log I_v float32")
    _assert_errors(e_ratio, RATIO_TOL_F32, "R_v float32")


def test_log_bessel_i0_relative_accuracy_at_small_x():
    """The docstring promises "a few ulps of the result"; log I_0(x) ≈ x²/4 at small x is a well-
    conditioned (x f'/f ≈ 2) but tiny value, so that is a relative statement. Checked at a lenient
    relative 1e-10 (the grid tests use the spec's absolute 1e-12·max(1, |·|), which it passes)."""
    xs = [1e-20, 1e-12, 1e-8, 1e-6, 1e-4, 1e-2, 0.1]
    out = log_bessel_iv(0.0, torch.tensor(xs, dtype=F64)).tolist()
    errs = [(_rel_err(g, mp_log_iv(0.0, x)), (x, g, mp_log_iv(0.0, x))) for g, x in zip(out, xs)]
    _assert_errors(errs, RATIO_TOL_F64, "relative error of log I_0(x) at small x")


def test_limits_at_zero_and_infinity():
    zero = torch.zeros(1, dtype=F64)
    assert log_bessel_iv(0.0, zero).item() == 0.0
    for v in [1e-3, 0.3, 1.0, 24.9, 25.0, 60.5, 1000.2]:
        assert log_bessel_iv(v, zero).item() == -math.inf
    for v in [0.0, 0.3, 25.0, 1000.2]:
        assert bessel_iv_ratio(v, zero).item() == 0.0
        inf = torch.full((1,), math.inf, dtype=F64)
        assert log_bessel_iv(v, inf).item() == math.inf
        assert bessel_iv_ratio(v, inf).item() == 1.0


EXTREME_XS = [1e10, 1e15, 1e20, 1e50, 1e100, 1e154, 1e156, 1e200, 1e300, 1.7e308]


@pytest.mark.parametrize("v", [0.0, 0.5, 3.0, 24.9, 25.0, 100.0])
def test_extreme_arguments(v):
    """The docstring promises every x ≥ 0 with no overflow for large x: check up to float64's max.

    Values only (the derivative reference would need thousands of digits there).
    """
    x = torch.tensor(EXTREME_XS, dtype=F64)
    log_i = log_bessel_iv(v, x).tolist()
    ratio = bessel_iv_ratio(v, x).tolist()
    problems = []
    for xi, li, ri in zip(EXTREME_XS, log_i, ratio):
        e_log, e_ratio = _log_err(li, mp_log_iv(v, xi)), _rel_err(ri, mp_ratio(v, xi))
        if not e_log <= LOG_TOL_F64:
            problems.append(f"x={xi:g}: log I_v={li} (rel. err {e_log:.1e})")
        if not e_ratio <= RATIO_TOL_F64:
            problems.append(f"x={xi:g}: R_v={ri} (rel. err {e_ratio:.1e})")
        if not 0.0 <= ri <= 1.0:  # the true value is < 1, so at most 1.0 after rounding
            problems.append(f"x={xi:g}: R_v={ri!r} outside [0, 1]")
    assert not problems, f"v={v}: " + "; ".join(problems)


@pytest.mark.parametrize("p", [2, 3, 50, 100])
def test_extreme_kappa(p):
    kappa = torch.tensor([1e20, 1e100, 1e200, 1e300], dtype=F64)
    log_c = vmf_log_normalizer(p, kappa)
    a = mean_resultant_length(p, kappa)
    e_log = [(_log_err(log_c[i].item(), mp_log_normalizer(p, k)), (p, k)) for i, k in enumerate(kappa.tolist())]
    e_a = [(_rel_err(a[i].item(), mp_mean_resultant_length(p, k)), (p, k)) for i, k in enumerate(kappa.tolist())]
    _assert_errors(e_log, LOG_TOL_F64, "log C_p at huge κ")
    _assert_errors(e_a, RATIO_TOL_F64, "A_p at huge κ")


def test_tensor_order_broadcasting_matches_scalar_loop():
    v = torch.tensor([[0.3], [24.9], [100.5]], dtype=F64)
    xs = [0.0, 0.5, 30.0, 1e4]
    x = torch.tensor(xs, dtype=F64, requires_grad=True)
    for fn in (log_bessel_iv, bessel_iv_ratio):
        out = fn(v, x)
        assert out.shape == (3, 4) and out.dtype == F64
        loop = torch.stack([fn(float(vi), torch.tensor(xs, dtype=F64)) for vi in v.flatten().tolist()])
        torch.testing.assert_close(out.detach(), loop, rtol=1e-14, atol=0.0)
    # the gradient w.r.t. x reduces over the order dimension: Σ_v d/dx f_v(x)
    x_pos = torch.tensor(xs[1:], dtype=F64, requires_grad=True)
    for fn in (log_bessel_iv, bessel_iv_ratio):
        (g,) = torch.autograd.grad(fn(v, x_pos).sum(), x_pos)
        expected = torch.zeros_like(g)
        for vi in v.flatten().tolist():
            xi = x_pos.detach().clone().requires_grad_(True)
            (gi,) = torch.autograd.grad(fn(vi, xi).sum(), xi)
            expected += gi
        torch.testing.assert_close(g, expected, rtol=1e-13, atol=0.0)
    # tensor order with a Python-number argument
    out = log_bessel_iv(torch.tensor([0.3, 25.0, 60.5], dtype=F64), 2.0)
    assert out.shape == (3,)


# --------------------------------------------------------------------------------------------------
# 3. gradients

GRAD_XS = [1e-3, 0.5, 3.0, 30.0, 300.0, 5e3]


@pytest.mark.parametrize("v", [0.0, 0.3, 2.7, 24.9, 25.1, 60.5, 1000.2])
def test_gradcheck_bessel(v):
    x = torch.tensor(GRAD_XS, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: log_bessel_iv(v, t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: log_bessel_iv(v, t), (x,))
    assert torch.autograd.gradcheck(lambda t: bessel_iv_ratio(v, t), (x,))


@pytest.mark.parametrize("p", [2, 3, 5, 16, 256, 1000])
def test_gradcheck_vmf(p):
    kappa = torch.tensor(GRAD_XS, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: vmf_log_normalizer(p, k), (kappa,))
    assert torch.autograd.gradgradcheck(lambda k: vmf_log_normalizer(p, k), (kappa,))
    assert torch.autograd.gradcheck(lambda k: mean_resultant_length(p, k), (kappa,))
    r = torch.tensor([0.01, 0.3, 0.7, 0.9, 0.99, 0.999], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: inverse_mean_resultant_length(p, t), (r,))


@pytest.mark.parametrize("p", [2, 3, 16, 256, 4096])
def test_second_derivative_of_log_normalizer(p):
    """d²/dκ² log C_p = −A_p' through double backward, against mpmath at small and large κ."""
    kappas = [1e-4, 1.0, 100.0, 1e4, 1e6, 1e8]
    kappa = torch.tensor(kappas, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(vmf_log_normalizer(p, kappa).sum(), kappa, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), kappa)
    errs = [(_rel_err(-hi, mp_mean_resultant_length_deriv(p, k)), (p, k)) for hi, k in zip(h.tolist(), kappas)]
    _assert_errors(errs, DERIV_TOL_F64, "d²/dκ² log C_p")


# --------------------------------------------------------------------------------------------------
# 4. the order-25 switch (and the lift count, which changes at every integer order below 25)

SWITCH_XS = [1e-6, 1e-3, 0.1, 1.0, 10.0, 25.0, 100.0, 1e4, 1e6]
DELTA = 1e-9


@pytest.mark.parametrize("k", [25.0, 24.0, 12.0, 2.0, 1.0])
@pytest.mark.parametrize("tensor_order", [False, True], ids=["float-order", "tensor-order"])
def test_continuity_in_order(k, tensor_order):
    """f(k + δ) − f(k − δ) equals mpmath's difference to 1e-12 (value) / 1e-10 (derivatives)."""
    lo, hi = k - DELTA, k + DELTA
    x = torch.tensor(SWITCH_XS, dtype=F64, requires_grad=True)

    def run(v):
        order = torch.tensor([v], dtype=F64) if tensor_order else v
        log_i, ratio = log_bessel_iv(order, x), bessel_iv_ratio(order, x)
        (dlog,) = torch.autograd.grad(log_i.sum(), x)
        (dratio,) = torch.autograd.grad(ratio.sum(), x)
        return [t.detach().reshape(-1).tolist() for t in (log_i, ratio, dlog, dratio)]

    (l_lo, r_lo, dl_lo, dr_lo), (l_hi, r_hi, dl_hi, dr_hi) = run(lo), run(hi)
    e_log, e_ratio, e_dlog, e_dratio = [], [], [], []
    with mp.workdps(WORK_DPS):
        for i, xi in enumerate(SWITCH_XS):
            pt = (k, xi)
            ref_dl = mp_log_iv_mp(hi, xi) - mp_log_iv_mp(lo, xi)
            ref_dr = mp_ratio_mp(hi, xi) - mp_ratio_mp(lo, xi)
            e_log.append((abs((l_hi[i] - l_lo[i]) - float(ref_dl)) / max(1.0, abs(l_hi[i])), pt))
            e_ratio.append((abs((r_hi[i] - r_lo[i]) - float(ref_dr)) / r_hi[i], pt))
            ref_ddl = (mp_ratio_mp(hi, xi) + mp.mpf(hi) / xi) - (mp_ratio_mp(lo, xi) + mp.mpf(lo) / xi)
            e_dlog.append((abs((dl_hi[i] - dl_lo[i]) - float(ref_ddl)) / abs(dl_hi[i]), pt))
            ref_ddr = mp_ratio_deriv(hi, xi) - mp_ratio_deriv(lo, xi)
            e_dratio.append((abs((dr_hi[i] - dr_lo[i]) - ref_ddr) / abs(dr_hi[i]), pt))
    _assert_errors(e_log, LOG_TOL_F64, "jump of log I_v across the order")
    _assert_errors(e_ratio, 1e-12, "jump of R_v across the order")
    _assert_errors(e_dlog, RATIO_TOL_F64, "jump of d/dx log I_v across the order")
    _assert_errors(e_dratio, RATIO_TOL_F64, "jump of R_v' across the order")


FD_ORDERS = [0.0, 0.3, 1.0, 12.5, 24.0, 24.999999, 25.0, 25.000001, 25.5, 40.0, 1000.5]
FD_XS = [10.0**e for e in range(-6, 7)] + [24.0, 25.0, 26.0, 999.0, 1001.0]


@pytest.mark.parametrize("v", FD_ORDERS)
def test_central_differences_match_autograd(v):
    """Central differences (step 1e-4·x) at x and at x·(1 ± 1e-3), i.e. on both sides of each point,
    agree with the autograd derivative: relative 1e-6, plus the rounding floor 16 ε max|f| / h of the
    difference quotient (which dominates only for R_v at x ≳ 1e5, where R_v' ~ 1/x² and R_v ≈ 1)."""
    eps = torch.finfo(F64).eps
    centres = sorted({x * s for x in FD_XS for s in (1 - 1e-3, 1.0, 1 + 1e-3)})
    c = torch.tensor(centres, dtype=F64)
    h = 1e-4 * c
    xp, xm = (c + h), (c - h)
    span = xp - xm  # exact denominators
    x = c.clone().requires_grad_(True)
    for name, fn in [("log I_v", log_bessel_iv), ("R_v", bessel_iv_ratio)]:
        (ad,) = torch.autograd.grad(fn(v, x).sum(), x)
        fp, fm = fn(v, xp), fn(v, xm)
        fd = (fp - fm) / span
        tol = 1e-6 * ad.abs() + 16 * eps * torch.maximum(fp.abs(), fm.abs()) / span
        bad = (fd - ad).abs() > tol
        assert not bad.any(), (
            f"{name}, v={v}: FD vs autograd mismatch at x={c[bad].tolist()}: fd={fd[bad].tolist()} "
            f"ad={ad[bad].tolist()}"
        )


# --------------------------------------------------------------------------------------------------
# 5. properties (hypothesis)

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
ORACLE_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

orders = st.floats(min_value=0.0, max_value=3000.0, allow_nan=False, allow_infinity=False)
log10_xs = st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, allow_infinity=False)


def _t(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=F64)


@PROPERTY_SETTINGS
@given(v=st.floats(min_value=1.0, max_value=3000.0), lx=log10_xs)
def test_recurrence_in_ratios(v, lx):
    """1/R_{v−1}(x) = 2v/x + R_v(x) (DLMF 10.29.1); both sides positive, so relative 2·1e-10."""
    x = 10.0**lx
    lhs = 1.0 / bessel_iv_ratio(v - 1.0, _t(x)).item()
    rhs = 2.0 * v / x + bessel_iv_ratio(v, _t(x)).item()
    assert abs(lhs - rhs) <= 2 * RATIO_TOL_F64 * rhs, (v, x, lhs, rhs)


@PROPERTY_SETTINGS
@given(v=st.floats(min_value=1.0, max_value=3000.0), lx=log10_xs)
def test_recurrence_in_log_space(v, lx):
    """log I_{v−1} = logaddexp(log I_{v+1}, log(2v/x) + log I_v) (DLMF 10.29.1)."""
    x = 10.0**lx
    lm, l0, lp = (log_bessel_iv(o, _t(x)).item() for o in (v - 1.0, v, v + 1.0))
    rhs = torch.logaddexp(torch.tensor(lp, dtype=F64), torch.tensor(math.log(2.0 * v / x) + l0, dtype=F64)).item()
    scale = max(1.0, abs(lm), abs(l0), abs(lp), abs(math.log(2.0 * v / x)))
    assert abs(lm - rhs) <= 3 * LOG_TOL_F64 * scale, (v, x, lm, rhs)


@PROPERTY_SETTINGS
@given(v=orders, lx=log10_xs)
def test_amos_bounds_and_range(v, lx):
    """x/(v+1+√((v+1)²+x²)) ≤ R_v(x) ≤ x/(v+½+√((v+½)²+x²)), up to the spec's 1e-10, and 0 ≤ R < 1."""
    x = 10.0**lx
    r = bessel_iv_ratio(v, _t(x)).item()
    lower = x / (v + 1.0 + math.hypot(v + 1.0, x))
    upper = x / (v + 0.5 + math.hypot(v + 0.5, x))
    assert 0.0 <= r < 1.0, (v, x, r)
    assert lower * (1 - RATIO_TOL_F64) <= r <= upper * (1 + RATIO_TOL_F64), (v, x, lower, r, upper)


@pytest.mark.parametrize("v", [0.0, 0.5, 1.0, 3.0, 24.9, 25.0, 100.0, 1000.5])
def test_ratio_stays_below_one_at_large_x(v):
    """R_v(x) is never above 1 (the range is [0, 1), and mean_resultant_length's output must be a
    valid input of inverse_mean_resultant_length), and is < 1 wherever its true value is below 1 by
    ~100 ulps (1 − R ≈ (2v+1)/(2x) > 1e-14). A dense deterministic scan of x ∈ [1e8, 1e17]."""
    x = torch.logspace(8, 17, 9001, dtype=F64)
    r = bessel_iv_ratio(v, x)
    must_be_below_one = (2 * v + 1) / (2 * x) > 1e-14
    bad = (r > 1.0) | ((r >= 1.0) & must_be_below_one)
    assert not bad.any(), (
        f"v={v}: {int(bad.sum())} of {x.numel()} x with R_v ≥ 1, e.g. R_v({x[bad][0].item()!r}) = {r[bad][0].item()!r}"
    )
    if v == 0.0:  # the same through the vMF API (p = 2), which the inverse then rejects
        a = mean_resultant_length(2, x)
        assert not (a >= 1.0)[must_be_below_one].any(), (
            f"A_2(κ) ≥ 1 at κ = {x[(a >= 1.0) & must_be_below_one][0].item()!r}"
        )


@PROPERTY_SETTINGS
@given(p=st.integers(min_value=2, max_value=10000), lk=log10_xs, lfactor=st.floats(min_value=-3.0, max_value=1.0))
def test_mean_resultant_length_increasing_in_kappa(p, lk, lfactor):
    k1 = 10.0**lk
    k2 = k1 * (1.0 + 10.0**lfactor)
    a = mean_resultant_length(p, torch.tensor([k1, k2], dtype=F64)).tolist()
    assert 0.0 <= a[0] < a[1] < 1.0, (p, k1, k2, a)


@PROPERTY_SETTINGS
@given(v=st.floats(min_value=0.0, max_value=2000.0), dv=st.floats(min_value=0.01, max_value=100.0), lx=log10_xs)
def test_ratio_decreasing_in_order(v, dv, lx):
    x = _t(10.0**lx)
    r1, r2 = bessel_iv_ratio(v, x).item(), bessel_iv_ratio(v + dv, x).item()
    assert 0.0 < r2 < r1 < 1.0, (v, dv, x.item(), r1, r2)


@ORACLE_SETTINGS
@given(v=st.floats(min_value=0.0, max_value=1200.0), lx=log10_xs)
def test_random_points_against_mpmath(v, lx):
    x = 10.0**lx
    xt = torch.tensor([x], dtype=F64, requires_grad=True)
    log_i, ratio = log_bessel_iv(v, xt), bessel_iv_ratio(v, xt)
    (dratio,) = torch.autograd.grad(ratio.sum(), xt)
    assert _log_err(log_i.item(), mp_log_iv(v, x)) <= LOG_TOL_F64, (v, x)
    assert _rel_err(ratio.item(), mp_ratio(v, x)) <= RATIO_TOL_F64, (v, x)
    assert _rel_err(dratio.item(), mp_ratio_deriv(v, x)) <= DERIV_TOL_F64, (v, x)


@ORACLE_SETTINGS
@given(p=st.integers(min_value=2, max_value=3000), lk=log10_xs)
def test_random_vmf_points_against_mpmath(p, lk):
    k = 10.0**lk
    kt = torch.tensor([k], dtype=F64, requires_grad=True)
    log_c = vmf_log_normalizer(p, kt)
    (g,) = torch.autograd.grad(log_c.sum(), kt)
    ref_a = mp_mean_resultant_length(p, k)
    assert _log_err(log_c.item(), mp_log_normalizer(p, k)) <= LOG_TOL_F64, (p, k)
    assert _rel_err(mean_resultant_length(p, kt).item(), ref_a) <= RATIO_TOL_F64, (p, k)
    assert _rel_err(-g.item(), ref_a) <= RATIO_TOL_F64, (p, k)


# --------------------------------------------------------------------------------------------------
# 6. argument checking, dtype and device


@pytest.mark.parametrize("dim", [1, 0, -3, 2.5, True, "3", None])
def test_bad_dim(dim):
    for fn, arg in [(vmf_log_normalizer, 1.0), (mean_resultant_length, 1.0), (inverse_mean_resultant_length, 0.5)]:
        with pytest.raises(ValueError, match=r"\bdim\b"):
            fn(dim, torch.tensor([arg], dtype=F64))


@pytest.mark.parametrize("bad", [-1.0, -1e-30, math.nan, -math.inf])
def test_bad_kappa(bad):
    for fn in (vmf_log_normalizer, mean_resultant_length):
        with pytest.raises(ValueError, match=r"\bkappa\b"):
            fn(3, torch.tensor([1.0, bad], dtype=F64))
        with pytest.raises(ValueError, match=r"\bkappa\b"):
            fn(3, bad)


@pytest.mark.parametrize("bad", [-0.1, -1e-30, 1.0, 1.5, math.nan, math.inf])
def test_bad_r(bad):
    with pytest.raises(ValueError, match=r"\br\b"):
        inverse_mean_resultant_length(3, torch.tensor([0.5, bad], dtype=F64))
    with pytest.raises(ValueError, match=r"\br\b"):
        inverse_mean_resultant_length(3, bad)


def test_tiny_negative_python_numbers_are_rejected():
    """A negative Python float is invalid whatever its size; -1e-300 must not pass as κ = 0 / r = 0
    (it does if the number is first rounded to float32, the default dtype, where it becomes -0.0)."""
    tiny = torch.tensor([-1e-300], dtype=F64)
    with pytest.raises(ValueError, match=r"\bkappa\b"):
        vmf_log_normalizer(3, tiny)  # the float64 tensor is rejected ...
    with pytest.raises(ValueError, match=r"\bkappa\b"):
        vmf_log_normalizer(3, -1e-300)  # ... and so must be the Python number
    with pytest.raises(ValueError, match=r"\bkappa\b"):
        mean_resultant_length(3, -1e-300)
    with pytest.raises(ValueError, match=r"\br\b"):
        inverse_mean_resultant_length(3, -1e-300)
    with pytest.raises(ValueError, match=r"\bx\b"):
        log_bessel_iv(1.0, -1e-300)


@pytest.mark.parametrize("fn", [log_bessel_iv, bessel_iv_ratio])
def test_bad_order_and_argument(fn):
    x = torch.tensor([1.0], dtype=F64)
    for bad_v in [-0.5, -1e-300, math.nan, torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([math.nan], dtype=F64)]:
        with pytest.raises(ValueError, match=r"\bv\b"):
            fn(bad_v, x)
    for bad_x in [-1.0, math.nan, torch.tensor([2.0, -1e-3], dtype=F64), torch.tensor([math.nan], dtype=F64)]:
        with pytest.raises(ValueError, match=r"\bx\b"):
            fn(1.0, bad_x)


def test_validate_args_false_does_not_raise():
    neg = torch.tensor([-1.0, 2.0], dtype=F64)
    vmf_log_normalizer(3, neg, validate_args=False)
    mean_resultant_length(3, neg, validate_args=False)
    log_bessel_iv(1.5, neg, validate_args=False)
    bessel_iv_ratio(1.5, neg, validate_args=False)
    inverse_mean_resultant_length(3, torch.tensor([0.5, 1.5], dtype=F64), validate_args=False)


def test_global_validation_switch():
    dist = torch.distributions.Distribution
    old = dist._validate_args
    try:
        dist.set_default_validate_args(False)
        vmf_log_normalizer(3, torch.tensor([-1.0], dtype=F64))
        with pytest.raises(ValueError, match=r"\bkappa\b"):
            vmf_log_normalizer(3, torch.tensor([-1.0], dtype=F64), validate_args=True)
        dist.set_default_validate_args(True)
        with pytest.raises(ValueError, match=r"\bkappa\b"):
            vmf_log_normalizer(3, torch.tensor([-1.0], dtype=F64))
    finally:
        dist.set_default_validate_args(old)


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


CALLS = [
    ("log_bessel_iv", lambda t: log_bessel_iv(2.7, t), [[0.5, 3.0], [7.0, 9.0]]),
    ("bessel_iv_ratio", lambda t: bessel_iv_ratio(30.5, t), [[0.5, 3.0], [7.0, 9.0]]),
    ("vmf_log_normalizer", lambda t: vmf_log_normalizer(5, t), [[0.0, 3.0], [7.0, 9.0]]),
    ("mean_resultant_length", lambda t: mean_resultant_length(64, t), [[0.5, 3.0], [7.0, 90.0]]),
    ("inverse_mean_resultant_length", lambda t: inverse_mean_resultant_length(64, t), [[0.0, 0.3], [0.7, 0.9]]),
]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [F64, F32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("name", "fn", "values"), CALLS, ids=[c[0] for c in CALLS])
def test_dtype_and_device_preserved(name, fn, values, dtype, device):
    t = torch.tensor(values, dtype=dtype, device=device)
    out = fn(t)
    assert out.dtype == dtype and out.device == t.device and out.shape == t.shape
    # "computed internally in float64 and rounded once at the end"
    ref = fn(t.to(device="cpu", dtype=F64))
    torch.testing.assert_close(out.cpu(), ref.to(dtype), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    kappa = torch.tensor(KAPPAS, dtype=F64)
    for p in [3, 256, 4096]:
        torch.testing.assert_close(
            vmf_log_normalizer(p, kappa.cuda()).cpu(), vmf_log_normalizer(p, kappa), rtol=1e-14, atol=0
        )
        torch.testing.assert_close(
            mean_resultant_length(p, kappa.cuda()).cpu(), mean_resultant_length(p, kappa), rtol=1e-14, atol=0
        )


def test_python_number_inputs():
    dflt = torch.get_default_dtype()
    for out in [
        log_bessel_iv(2.7, 3.0),
        bessel_iv_ratio(2, 3),
        vmf_log_normalizer(3, 0.0),
        vmf_log_normalizer(3, 2),
        mean_resultant_length(3, 2.0),
        inverse_mean_resultant_length(3, 0.5),
    ]:
        assert isinstance(out, torch.Tensor) and out.dtype == dflt and out.shape == ()
    assert _log_err(vmf_log_normalizer(3, 0.0).item(), -math.log(4 * math.pi)) <= LOG_TOL_F32
    assert _rel_err(mean_resultant_length(3, 2.0).item(), mp_mean_resultant_length(3, 2.0)) <= RATIO_TOL_F32


def test_integer_tensor_input_is_promoted():
    out = vmf_log_normalizer(3, torch.tensor([0, 1, 2]))
    assert out.dtype == torch.get_default_dtype()


def test_no_gradient_in_order():
    v = torch.tensor([2.5], dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError):
        log_bessel_iv(v, torch.tensor([1.0], dtype=F64))


# --------------------------------------------------------------------------------------------------
# 7. doctests


def test_docstring_examples():
    result = doctest.testmod(special, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
