"""Polynomials of the uniform (Debye) asymptotic expansion of I_ν(νz).

DLMF 10.41.3 and 10.41.10 (Olver 1954): with t = 1/√(1+z²) and
η = √(1+z²) + log(z / (1+√(1+z²))),

    I_ν(νz)  ~ e^{νη} / (√(2πν) (1+z²)^{1/4}) · Σ_k u_k(t) / ν^k,
    I'_ν(νz) ~ (1+z²)^{1/4} e^{νη} / (√(2πν) z) · Σ_k v_k(t) / ν^k,

uniformly in z ∈ [0, ∞). The u_k follow from the recurrence (DLMF 10.41.9)

    u_{k+1}(t) = ½ t²(1−t²) u_k'(t) + ⅛ ∫₀ᵗ (1−5s²) u_k(s) ds,   u_0 = 1,

and v_k = u_k + t(t²−1)(½u_{k−1} + t u'_{k−1}) (DLMF 10.41.11). We never form v_k: the Bessel
ratio needs only (v_k − u_k)/(1−t²) = −t(½u_{k−1} + t u'_{k−1}) =: w_k, whose use avoids the
cancellation in I'_ν/I_ν − ν/x at small z (see `vmf_dists.special`).

All coefficients are generated here in exact rational arithmetic, so nothing is transcribed from a
table by hand; the bounds max_{t∈[0,1]} |u_k(t)|, |w_k(t)| decide how many terms a given order needs.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

Poly = tuple[Fraction, ...]  # coefficients in ascending powers of t

#: Highest term index kept in the tables; enough for ν ≥ `MIN_ORDER` to float64 precision.
MAX_TERMS = 16
#: Orders below this are lifted by the backward recurrence before the expansion is used.
MIN_ORDER = 25.0
#: Truncation target for the first omitted term, relative to the leading term 1.
TRUNCATION_TOLERANCE = 1e-17


def _derivative(c: Poly) -> Poly:
    return tuple(i * c[i] for i in range(1, len(c))) or (Fraction(0),)


def _multiply(a: Poly, b: Poly) -> Poly:
    out = [Fraction(0)] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return tuple(out)


def _add(a: Poly, b: Poly) -> Poly:
    n = max(len(a), len(b))
    return tuple((a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n))


def _integral(c: Poly) -> Poly:
    return (Fraction(0),) + tuple(c[i] / (i + 1) for i in range(len(c)))


def _scale(c: Poly, s: Fraction) -> Poly:
    return tuple(s * x for x in c)


@lru_cache(maxsize=None)
def u_polynomials() -> tuple[Poly, ...]:
    """u_0 … u_MAX_TERMS as exact rational coefficient tuples."""
    half_t2_one_minus_t2 = (Fraction(0), Fraction(0), Fraction(1, 2), Fraction(0), Fraction(-1, 2))
    one_minus_5t2 = (Fraction(1), Fraction(0), Fraction(-5))
    polys: list[Poly] = [(Fraction(1),)]
    for _ in range(MAX_TERMS):
        u = polys[-1]
        a = _multiply(half_t2_one_minus_t2, _derivative(u))
        b = _scale(_integral(_multiply(one_minus_5t2, u)), Fraction(1, 8))
        polys.append(_add(a, b))
    return tuple(polys)


@lru_cache(maxsize=None)
def w_polynomials() -> tuple[Poly, ...]:
    """w_k = (v_k − u_k)/(1−t²) = −t(½u_{k−1} + t u'_{k−1}); w_0 = 0."""
    us = u_polynomials()
    polys: list[Poly] = [(Fraction(0),)]
    for k in range(1, MAX_TERMS + 1):
        u = us[k - 1]
        inner = _add(_scale(u, Fraction(1, 2)), _multiply((Fraction(0), Fraction(1)), _derivative(u)))
        polys.append(_scale(_multiply((Fraction(0), Fraction(1)), inner), Fraction(-1)))
    return tuple(polys)


def _max_abs_on_unit_interval(c: Poly, samples: int = 2001) -> float:
    coeffs = [float(x) for x in c]
    best = 0.0
    for i in range(samples):
        t = i / (samples - 1)
        value = 0.0
        for a in reversed(coeffs):
            value = value * t + a
        best = max(best, abs(value))
    return best


@lru_cache(maxsize=None)
def term_bounds() -> tuple[float, ...]:
    """max over t ∈ [0, 1] of max(|u_k(t)|, |w_k(t)|), for k = 0 … MAX_TERMS."""
    return tuple(
        max(_max_abs_on_unit_interval(u), _max_abs_on_unit_interval(w))
        for u, w in zip(u_polynomials(), w_polynomials())
    )


def terms_needed(order: float) -> int:
    """Highest k to keep so that the first omitted term is below the truncation target at ``order``."""
    bounds = term_bounds()
    for k in range(1, MAX_TERMS + 1):
        if bounds[k] / order**k < TRUNCATION_TOLERANCE:
            return k - 1
    raise ValueError(f"order {order} is too small for the Debye expansion (need order ≥ {MIN_ORDER})")


@lru_cache(maxsize=None)
def combined_coefficients(num_terms: int) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """Coefficient tables a[j][k] = [t^j] u_k and b[j][k] = [t^j] w_k for k ≤ num_terms, as floats.

    Σ_k u_k(t) ν^{−k} = Σ_j t^j Σ_k a[j][k] ν^{−k}: the inner sums depend on the order only, so for a
    fixed order the whole series is one Horner evaluation in t.
    """

    def table(polys: tuple[Poly, ...]) -> tuple[tuple[float, ...], ...]:
        degree = max(len(polys[k]) for k in range(num_terms + 1))
        return tuple(
            tuple(float(polys[k][j]) if j < len(polys[k]) else 0.0 for k in range(num_terms + 1))
            for j in range(degree)
        )

    return table(u_polynomials()), table(w_polynomials())
