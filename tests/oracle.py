"""mpmath reference values for the Bessel / von Mises–Fisher special functions.

Everything here is computed with mpmath inside the test run, at `DPS` (≥ 40) significant digits;
no number produced by the library under test is ever used. Inputs are Python floats and are taken
*exactly* (``mpf(float)``), i.e. the reference is for the same binary64 number the library sees.

Results are memoised per process (``functools.cache``), so a grid can be shared by many tests.
Each function returns a Python float (the correctly-rounded-ish float64 of the mp value) unless its
name ends in ``_mp``.

Notes on mpmath:
* ``mpmath.besseli`` needs ``maxterms`` well above its default for large orders at large arguments
  (e.g. ν = 4095, x = 1e5: its asymptotic expansion does not converge and it falls back to the power
  series with ~1e5 terms); `MAXTERMS` is passed on every call. Such points take seconds.
* Quantities that cancel in float64 (A_p'(κ) = 1 − A² − (p−1)A/κ at large κ) are evaluated with
  2·log10(κ) extra digits, so the cancellation is harmless.
"""

from __future__ import annotations

import math
from functools import cache

from mpmath import mp

DPS = 50
#: Working precision of every mpmath evaluation (the results are good to ≳ DPS digits).
WORK_DPS = DPS + 10
MAXTERMS = 10**6

__all__ = [
    "DPS",
    "mp_besseli",
    "mp_log_iv",
    "mp_log_iv_mp",
    "mp_ratio",
    "mp_ratio_mp",
    "mp_ratio_deriv",
    "mp_ratio_deriv_mp",
    "mp_log_normalizer",
    "mp_log_normalizer_mp",
    "mp_mean_resultant_length",
    "mp_mean_resultant_length_deriv",
]


def mp_besseli(v: float, x: float, shift: int = 0, dps: int = WORK_DPS):
    """I_{v+shift}(x) at ``dps`` digits (v + shift is formed exactly in mp arithmetic); memoised."""
    return _besseli_cached(float(v), float(x), int(shift), int(dps))


@cache
def _besseli_cached(v: float, x: float, shift: int, dps: int):
    with mp.workdps(dps):
        return mp.besseli(mp.mpf(v) + shift, mp.mpf(x), maxterms=MAXTERMS)


@cache
def mp_log_iv_mp(v: float, x: float):
    """log I_v(x) as an mpf (−inf for x = 0 < v, 0 for x = v = 0, +inf for x = inf)."""
    if x == 0.0:
        return mp.mpf(0) if v == 0.0 else mp.ninf
    if math.isinf(x):
        return mp.inf
    with mp.workdps(WORK_DPS):
        return mp.log(mp_besseli(v, x))


def mp_log_iv(v: float, x: float) -> float:
    """log I_v(x) as a float."""
    return float(mp_log_iv_mp(float(v), float(x)))


@cache
def mp_ratio_mp(v: float, x: float):
    """R_v(x) = I_{v+1}(x) / I_v(x) as an mpf (0 at x = 0, 1 at x = inf)."""
    if x == 0.0:
        return mp.mpf(0)
    if math.isinf(x):
        return mp.mpf(1)
    with mp.workdps(WORK_DPS):
        return mp_besseli(v, x, 1) / mp_besseli(v, x)


def mp_ratio(v: float, x: float) -> float:
    """R_v(x) = I_{v+1}(x)/I_v(x) as a float."""
    return float(mp_ratio_mp(float(v), float(x)))


@cache
def mp_ratio_deriv_mp(v: float, x: float):
    """R_v'(x) = 1 − R² − (2v+1) R / x (DLMF 10.29.2); 1/(2v+2) at x = 0.

    The formula cancels by ≈ 2·log10(x) digits at large x, so beyond x = 1e10 the Bessel functions
    are evaluated with correspondingly more digits than WORK_DPS.
    """
    vv = mp.mpf(v)
    if x == 0.0:
        with mp.workdps(WORK_DPS):
            return 1 / (2 * vv + 2)
    # up to x = 1e10 the cancellation leaves ≥ 40 of the WORK_DPS digits (and reuses the cache)
    dps = WORK_DPS + max(0, 2 * math.ceil(math.log10(x)) - 20)
    with mp.workdps(dps):
        r = mp_besseli(v, x, 1, dps) / mp_besseli(v, x, 0, dps)
        d = 1 - r * r - (2 * vv + 1) * r / mp.mpf(x)
    with mp.workdps(WORK_DPS):
        return +d


def mp_ratio_deriv(v: float, x: float) -> float:
    return float(mp_ratio_deriv_mp(float(v), float(x)))


def _order(p: int):
    return mp.mpf(p) / 2 - 1


@cache
def mp_log_normalizer_mp(p: int, kappa: float):
    """log C_p(κ) = ν log κ − (p/2) log 2π − log I_ν(κ); the closed-form limit at κ = 0."""
    with mp.workdps(WORK_DPS):
        if kappa == 0.0:
            return mp.loggamma(mp.mpf(p) / 2) - mp.log(2) - mp.mpf(p) / 2 * mp.log(mp.pi)
        nu = _order(p)
        return nu * mp.log(mp.mpf(kappa)) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp_log_iv_mp(float(nu), float(kappa))


def mp_log_normalizer(p: int, kappa: float) -> float:
    return float(mp_log_normalizer_mp(int(p), float(kappa)))


def mp_mean_resultant_length(p: int, kappa: float) -> float:
    """A_p(κ) = I_{p/2}(κ)/I_{p/2−1}(κ); A_p(0) = 0."""
    return mp_ratio(float(_order(p)), kappa)


def mp_mean_resultant_length_deriv(p: int, kappa: float) -> float:
    """A_p'(κ) = 1 − A² − (p−1) A/κ (high precision); A_p'(0) = 1/p."""
    return mp_ratio_deriv(float(_order(p)), kappa)
