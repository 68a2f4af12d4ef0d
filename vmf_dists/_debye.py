r"""Polynomials of the uniform (Debye) asymptotic expansion of $I_\nu$, in a form valid down to ν = 0.

DLMF 10.41.3 and 10.41.10 (Olver 1954): with $r = \sqrt{\nu^2 + x^2}$ and $t = \nu / r$,

$$
I_\nu(x) \sim \frac{e^{r}\,(x / (\nu + r))^{\nu}}{\sqrt{2\pi r}} \sum_k \frac{u_k(t)}{\nu^k},
$$

uniformly in $x \ge 0$. The $u_k$ follow from the recurrence (DLMF 10.41.9)

$$
u_{k+1}(t) = \tfrac12 t^2(1-t^2) u_k'(t) + \tfrac18 \int_0^t (1-5s^2) u_k(s)\,ds, \qquad u_0 = 1,
$$

and $v_k = u_k + t(t^2-1)(\tfrac12 u_{k-1} + t u'_{k-1})$ (DLMF 10.41.11). The Bessel ratio needs only
$w_k = (v_k - u_k)/(1-t^2) = -t(\tfrac12 u_{k-1} + t u'_{k-1})$ (see `vmf_dists._bessel`).

Both $u_k$ and $w_k$ are polynomials whose lowest power is $t^k$, so
$u_k(t)/\nu^k = \sum_{d=0}^{2k} [t^{k+d}]u_k \cdot t^d / r^k$: the expansion is a series in $1/r$ whose
coefficients are polynomials in $t \in [0, 1]$. This is why it holds for *every* order, ν = 0
included (where it is Hankel's large-argument expansion), as soon as $r$ is large:
$|u_k(t)/\nu^k| \le B_k / r^k$ with $B_k = \max_{t\in[0,1]} |u_k(t)/t^k|$, and with `MAX_TERMS` terms
the first omitted one is below `TRUNCATION_TOLERANCE` for $r \ge$ `DEBYE_RADIUS`.

All coefficients are generated here in exact rational arithmetic, so nothing is transcribed from a
table by hand.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

Poly = tuple[Fraction, ...]  # coefficients in ascending powers of t

#: Number of expansion terms kept (k = 1 … MAX_TERMS).
MAX_TERMS = 20
#: Truncation target for the first omitted term, relative to the leading term 1.
TRUNCATION_TOLERANCE = 1e-17
#: The expansion is used where r = √(ν² + x²) ≥ DEBYE_RADIUS; below it the power series takes over.
DEBYE_RADIUS = 24.0


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
    return tuple((a[i] if i < len(a) else Fraction(0)) + (b[i] if i < len(b) else Fraction(0)) for i in range(n))


def _integral(c: Poly) -> Poly:
    return (Fraction(0),) + tuple(c[i] / (i + 1) for i in range(len(c)))


def _scale(c: Poly, s: Fraction) -> Poly:
    return tuple(s * x for x in c)


@cache
def u_polynomials() -> tuple[Poly, ...]:
    """u_0 … u_{MAX_TERMS+1} as exact rational coefficient tuples (one more than kept, for the bound)."""
    half_t2_one_minus_t2 = (Fraction(0), Fraction(0), Fraction(1, 2), Fraction(0), Fraction(-1, 2))
    one_minus_5t2 = (Fraction(1), Fraction(0), Fraction(-5))
    polys: list[Poly] = [(Fraction(1),)]
    for _ in range(MAX_TERMS + 1):
        u = polys[-1]
        a = _multiply(half_t2_one_minus_t2, _derivative(u))
        b = _scale(_integral(_multiply(one_minus_5t2, u)), Fraction(1, 8))
        polys.append(_add(a, b))
    return tuple(polys)


@cache
def w_polynomials() -> tuple[Poly, ...]:
    """w_k = (v_k − u_k)/(1−t²) = −t(½u_{k−1} + t u'_{k−1}) for k = 0 … MAX_TERMS+1; w_0 = 0."""
    us = u_polynomials()
    polys: list[Poly] = [(Fraction(0),)]
    for k in range(1, MAX_TERMS + 2):
        u = us[k - 1]
        inner = _add(_scale(u, Fraction(1, 2)), _multiply((Fraction(0), Fraction(1)), _derivative(u)))
        polys.append(_scale(_multiply((Fraction(0), Fraction(1)), inner), Fraction(-1)))
    return tuple(polys)


def _max_abs_over_t_power(c: Poly, k: int, samples: int = 4001) -> float:
    """max over t ∈ [0, 1] of |c(t) / t^k| (c has no powers below t^k)."""
    coeffs = [float(x) for x in c[k:]]
    best = 0.0
    for i in range(samples):
        t = i / (samples - 1)
        value = 0.0
        for a in reversed(coeffs):
            value = value * t + a
        best = max(best, abs(value))
    return best


@cache
def radial_bounds() -> tuple[float, ...]:
    """B_k = max over t ∈ [0, 1] of max(|u_k(t)|, |w_k(t)|) / t^k, for k = 0 … MAX_TERMS+1."""
    return tuple(
        max(_max_abs_over_t_power(u, k), _max_abs_over_t_power(w, k))
        for k, (u, w) in enumerate(zip(u_polynomials(), w_polynomials()))
    )


def terms_needed(radius: float) -> int:
    """The number of terms K such that the first omitted term is below the target for all r ≥ ``radius``.

    Raises:
        ValueError: if ``radius`` is below `DEBYE_RADIUS` (the expansion would not reach float64 precision).
    """
    if radius < DEBYE_RADIUS:
        raise ValueError(f"the Debye expansion needs r ≥ {DEBYE_RADIUS}, got {radius}")
    bounds = radial_bounds()
    for k in range(1, MAX_TERMS + 2):
        if bounds[k] / radius**k < TRUNCATION_TOLERANCE:
            return k - 1
    raise AssertionError("DEBYE_RADIUS is inconsistent with MAX_TERMS")  # checked by the tests


@cache
def expansion_coefficients(num_terms: int) -> tuple[tuple[tuple[float, float, float, float], ...], ...]:
    r"""Float coefficients $e[k-1][d] = ([t^{k+d}]u_k,\ (k+d)[t^{k+d}]u_k,\ [t^{k+d}]w_k,\ (k+d)[t^{k+d}]w_k)$.

    For k = 1 … num_terms and d = 0 … 2k (w_k has degree 3k − 1, so its last entry is 0), such that

    $$
    U - 1 = \sum_{k\ge1} r^{-k} \sum_d e_{k,d,0}\, t^d, \quad t\,U'(t) = \sum_k r^{-k}\sum_d e_{k,d,1}\, t^d,
    $$

    and likewise W and $tW'(t)$ from the last two entries.
    """
    us, ws = u_polynomials(), w_polynomials()
    out = []
    for k in range(1, num_terms + 1):
        row = []
        for d in range(2 * k + 1):
            j = k + d
            u = us[k][j] if j < len(us[k]) else Fraction(0)
            w = ws[k][j] if j < len(ws[k]) else Fraction(0)
            row.append((float(u), float(j * u), float(w), float(j * w)))
        out.append(tuple(row))
    return tuple(out)


def radial_table(order: float, num_terms: int) -> list[tuple[float, float, float, float]]:
    r"""Coefficients $b_j$, j = 1 … 3K, of the expansion at a fixed order as a series in $\tau = 1/r$.

    $b_j = \sum_{k+d=j} e_{k,d}\,\nu^d$, so that $U - 1 = \sum_j b_{j,0}\tau^j$ (likewise the other three
    columns). Finite at ν = 0; used for small orders (ν < `DEBYE_RADIUS`, where $\nu^d$ stays moderate).
    """
    table = [[0.0, 0.0, 0.0, 0.0] for _ in range(3 * num_terms)]
    for k, row in enumerate(expansion_coefficients(num_terms), start=1):
        for d, coeffs in enumerate(row):
            weight = order**d
            for c in range(4):
                table[k + d - 1][c] += coeffs[c] * weight
    return [(u, tdu, w, tdw) for u, tdu, w, tdw in table]


def order_table(order: float, num_terms: int) -> list[tuple[float, float, float, float]]:
    r"""Coefficients $c_j$, j = 1 … 3K, of the expansion at a fixed order as a polynomial in $t = \nu/r$.

    $c_j = \sum_{k+d=j} e_{k,d}\,\nu^{-k}$ (the classical form $\sum_k u_k(t)\nu^{-k}$); used for
    orders ν ≥ `DEBYE_RADIUS`, where $\nu^{-k}$ cannot overflow.
    """
    table = [[0.0, 0.0, 0.0, 0.0] for _ in range(3 * num_terms)]
    for k, row in enumerate(expansion_coefficients(num_terms), start=1):
        weight = math.pow(order, -k)
        for d, coeffs in enumerate(row):
            for c in range(4):
                table[k + d - 1][c] += coeffs[c] * weight
    return [(u, tdu, w, tdw) for u, tdu, w, tdw in table]
