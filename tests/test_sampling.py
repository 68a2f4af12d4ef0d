"""Statistical tests of the von Mises–Fisher sampler (`VonMisesFisher.rsample` / `sample`) and of its
implicit reparameterisation gradient.

Everything is checked against references computed here, independently of the library:

* A_p(κ) = I_{p/2}(κ)/I_{p/2−1}(κ) and A_p'(κ) with mpmath (`_mp_one_minus_a`, `_mp_a_prime`);
* the exact law of the angle θ = arccos(μᵀx), density ∝ e^{−2κ sin²(θ/2)} sin^{p−2} θ on [0, π]
  (`_AngleLaw`: composite Gauss–Legendre on a window around the mode, log-scaled), cross-checked
  against the p = 3 closed form, the κ = 0 Beta law and mpmath in `test_angle_law_oracle`;
* the CDF of y = 1 − w with mpmath quadrature, differenced in κ for the implicit gradient.

Samples are reduced to θ = atan2(‖x − (μᵀx)μ‖, μᵀx), which keeps full relative precision near μ
(y = 1 − cos θ = 2 sin²(θ/2); no 1 − μᵀx cancellation at κ = 1e6) and does not depend on ‖x‖ (the
unit norm has its own test).

Statistical thresholds. Every test is seeded (deterministic), and none is tuned: means are compared
at 5 standard errors (two-sided p ≈ 5.7e-7) and every goodness-of-fit test (KS, χ², binomial)
rejects at p-value < ALPHA = 5e-7. Default + slow run about 1300 such tests (N_STAT_TESTS = 2000 is a bound), so by
Bonferroni the chance that any one of them fails for a correct sampler is ≲ 1e-3.
"""

from __future__ import annotations

import math
import zlib
from functools import cache

import mpmath
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from vmf_dists import VonMisesFisher
from vmf_dists._sampling import d_one_minus_w_d_kappa

N_STAT_TESTS = 2000
FAMILY_ALPHA = 1e-3
ALPHA = FAMILY_ALPHA / N_STAT_TESTS  # per test, Bonferroni
Z_MAX = 5.0  # two-sided p ≈ 5.7e-7 ≈ ALPHA

DIMS = [2, 3, 4, 16, 128, 512, 2048]
DIMS_SLOW = {2048}
KAPPAS = [0.0, 1e-3, 0.5, 20.0, 300.0, 1e4, 1e6]
LOC_KINDS = ["random", "near_e1", "minus_e1"]
N_GRID = 20_000

# "A few ulp": x = c·t + wμ rounds each coordinate 2–3 times and c carries the rounding of one norm,
# so a correct float64/float32 sample has |‖x‖ − 1| ≲ 4 ulp; we allow 8.
UNIT_NORM_ULPS = 8.0


def _seed(*key) -> int:
    """A reproducible seed from the test parameters (Python's str hash is salted per process)."""
    return zlib.crc32(repr(key).encode())


def _dim_params(dims=DIMS):
    return [pytest.param(p, marks=pytest.mark.slow) if p in DIMS_SLOW else p for p in dims]


# --------------------------------------------------------------------------------------------------
# references


@cache
def _mp_one_minus_a(p: int, kappa: float) -> float:
    """1 − A_p(κ) with mpmath (no cancellation at large κ)."""
    if kappa == 0.0:
        return 1.0
    with mpmath.workdps(40):
        nu = mpmath.mpf(p) / 2 - 1
        k = mpmath.mpf(kappa)
        return float(1 - mpmath.besseli(nu + 1, k) / mpmath.besseli(nu, k))


@cache
def _mp_a_prime(p: int, kappa: float) -> float:
    """A_p'(κ) = 1 − A² − (p−1)A/κ with mpmath (1/p at κ = 0)."""
    if kappa == 0.0:
        return 1.0 / p
    with mpmath.workdps(60):
        nu = mpmath.mpf(p) / 2 - 1
        k = mpmath.mpf(kappa)
        a = mpmath.besseli(nu + 1, k) / mpmath.besseli(nu, k)
        return float(1 - a * a - (p - 1) * a / k)


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


class _AngleLaw:
    """Exact law of θ = arccos(μᵀx), x ~ vMF_p(μ, κ): density ∝ exp(−2κ sin²(θ/2)) sin^{p−2}θ on [0, π].

    The density is unimodal (log-density derivative −κ sin θ + (p−2) cot θ has one zero), smooth
    (no endpoint singularity, even for p = 2), and is integrated in log-scaled form on the window
    where it is within e^{−80} of its maximum, by 8-point Gauss–Legendre on `panels` equal panels;
    the CDF at a point adds a Gauss–Legendre partial panel to the cumulative sum.
    """

    def __init__(self, p: int, kappa: float, panels: int = 2000):
        self.p, self.kappa, self.m = p, float(kappa), p - 2
        k, m = self.kappa, self.m
        if m == 0:
            mode = 0.0
        elif k == 0.0:
            mode = math.pi / 2
        else:
            mode = math.acos(2.0 * k / (m + math.sqrt(m * m + 4.0 * k * k)))
        self._shift = 0.0
        self._shift = float(self._log_density(np.array([mode]))[0])
        cut = -80.0

        def f(t):
            return float(self._log_density(np.array([t]))[0]) - cut

        left_edge, right_edge = (1e-300 if m > 0 else 0.0), math.pi
        if f(left_edge) >= 0 or mode <= left_edge:
            a = left_edge
        else:  # the cut can be at θ ~ e^{−80/(p−2)}: bracket in log θ
            a = math.exp(
                scipy.optimize.brentq(lambda u: f(math.exp(u)), math.log(left_edge), math.log(mode), xtol=1e-6)
            )
        b = right_edge if f(right_edge) >= 0 else scipy.optimize.brentq(f, mode, right_edge, xtol=1e-14)
        self.a, self.b, self.panels = a, b, panels
        self.h = (b - a) / panels
        edges = a + self.h * np.arange(panels)
        mids = edges + 0.5 * self.h
        pts = mids[:, None] + 0.5 * self.h * _GL_NODES[None, :]
        vals = np.exp(self._log_density(pts))
        self._cum = np.concatenate([[0.0], np.cumsum(0.5 * self.h * (vals @ _GL_WEIGHTS))])
        self.total = self._cum[-1]
        self._mean_y = float(np.sum(0.5 * self.h * ((vals * (1.0 - np.cos(pts))) @ _GL_WEIGHTS)) / self.total)

    def _log_density(self, theta: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = -2.0 * self.kappa * np.sin(0.5 * theta) ** 2
            if self.m > 0:
                out = out + self.m * np.log(np.sin(theta))
        return out - self._shift

    def cdf(self, theta) -> np.ndarray:
        theta = np.clip(np.asarray(theta, dtype=np.float64), self.a, self.b)
        k = np.clip(np.floor((theta - self.a) / self.h).astype(np.int64), 0, self.panels - 1)
        left = self.a + self.h * k
        half = 0.5 * (theta - left)
        pts = (left + half)[..., None] + half[..., None] * _GL_NODES
        partial = half * (np.exp(self._log_density(pts)) @ _GL_WEIGHTS)
        return np.clip((self._cum[k] + partial) / self.total, 0.0, 1.0)

    def quantile(self, q: float) -> float:
        return scipy.optimize.brentq(lambda t: float(self.cdf(t)) - q, self.a, self.b, xtol=1e-300, rtol=1e-15)

    @property
    def mean_one_minus_cos(self) -> float:
        return self._mean_y


@cache
def _angle_law(p: int, kappa: float) -> _AngleLaw:
    return _AngleLaw(p, kappa)


_BREAK_QUANTILES = (1e-12, 1e-9, 1e-6, 1e-4, 0.01, 0.05, 0.2, 0.4, 0.5, 0.6, 0.8, 0.95, 0.99, 0.9999,
                    1 - 1e-6, 1 - 1e-9, 1 - 1e-12)


@cache
def _y_breakpoints(p: int, kappa: float) -> tuple:
    """Points that cut [0, 2] into pieces on which the y-density is smooth and of moderate range."""
    law = _angle_law(p, kappa)
    thetas = [law.a, law.b] + [law.quantile(q) for q in _BREAK_QUANTILES]
    return tuple(sorted({2.0 * math.sin(0.5 * t) ** 2 for t in thetas} - {0.0, 2.0}))


class _MpYLaw:
    """The unnormalised y-density h(t) = e^{−κ(t−r)}((t(2−t))/(r(2−r)))^{(p−3)/2} on [0, 2] in mpmath,
    with its integrals over the pieces between `breakpoints` (tanh-sinh handles the integrable endpoint
    singularities of p = 2), so that a tail ∫₀^y h or ∫_y^2 h costs one quadrature on one piece."""

    def __init__(self, p: int, kappa, breakpoints):
        self.e = mpmath.mpf(p - 3) / 2
        self.k = mpmath.mpf(kappa)
        self.ref = mpmath.mpf(breakpoints[len(breakpoints) // 2])
        self.pts = [mpmath.mpf(0)] + [mpmath.mpf(b) for b in breakpoints] + [mpmath.mpf(2)]
        self.pieces = [mpmath.quad(self.h, [a, b]) for a, b in zip(self.pts[:-1], self.pts[1:])]
        self.total = mpmath.fsum(self.pieces)

    def h(self, t):
        if t <= 0 or t >= 2:
            return mpmath.mpf(0)
        out = -self.k * (t - self.ref)
        if self.e != 0:
            out += self.e * (mpmath.log(t / self.ref) + mpmath.log((2 - t) / (2 - self.ref)))
        return mpmath.exp(out)

    def tails(self, y) -> tuple:
        """(P(Y ≤ y), P(Y > y)), each with full relative precision."""
        y = mpmath.mpf(y)
        j = max(i for i in range(len(self.pts) - 1) if self.pts[i] <= y)
        lower = mpmath.fsum(self.pieces[:j]) + mpmath.quad(self.h, [self.pts[j], y])
        upper = mpmath.quad(self.h, [y, self.pts[j + 1]]) + mpmath.fsum(self.pieces[j + 1 :])
        return lower / self.total, upper / self.total

    def density(self, y):
        return self.h(mpmath.mpf(y)) / self.total


def _mp_dy_dkappa(p: int, kappa: float, ys) -> list:
    """dy/dκ = −(∂G/∂κ)/g(y) at each y, G the CDF of y = 1 − μᵀx, ∂G/∂κ by a central difference in κ
    of G (or of 1 − G where that is smaller, so that no digits are lost in the far upper tail)."""
    bps = _y_breakpoints(p, kappa)
    with mpmath.workdps(32):
        h = mpmath.mpf(1e-9) * max(kappa, 1.0)
        centre = _MpYLaw(p, kappa, bps)
        plus, minus = _MpYLaw(p, mpmath.mpf(kappa) + h, bps), _MpYLaw(p, mpmath.mpf(kappa) - h, bps)
        out = []
        for y in ys:
            lo, up = centre.tails(y)
            i = 0 if lo < up else 1
            sign = 1 if i == 0 else -1
            dg = sign * (plus.tails(y)[i] - minus.tails(y)[i]) / (2 * h)
            out.append(float(-dg / centre.density(y)))
        return out


# --------------------------------------------------------------------------------------------------
# helpers


def _loc(p: int, kind: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + 7 * p + seed)
    if kind == "random":
        mu = torch.randn(p, generator=gen, dtype=torch.float64)
    elif kind == "near_e1":  # ‖μ − e₁‖ ≈ 5e-8
        mu = torch.zeros(p, dtype=torch.float64)
        mu[0] = 1.0
        mu = mu + 5e-8 / math.sqrt(p) * torch.randn(p, generator=gen, dtype=torch.float64)
    elif kind == "e1":
        mu = torch.zeros(p, dtype=torch.float64)
        mu[0] = 1.0
    elif kind == "minus_e1":
        mu = torch.zeros(p, dtype=torch.float64)
        mu[0] = -1.0
    else:
        raise ValueError(kind)
    mu = mu / torch.linalg.vector_norm(mu)
    return mu.to(dtype)


def _unit64(mu: torch.Tensor) -> torch.Tensor:
    mu = mu.detach().to(torch.float64)
    return mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True)


def _decompose(x: torch.Tensor, mu: torch.Tensor):
    """(θ, tangent t = x − (μᵀx)μ) in float64; θ = atan2(‖t‖, μᵀx) keeps relative precision near μ."""
    x = x.detach().to(torch.float64)
    mu = _unit64(mu)
    w = (x * mu).sum(-1)
    t = x - w.unsqueeze(-1) * mu
    t = t - (t * mu).sum(-1, keepdim=True) * mu  # second projection: t exactly ⊥ μ to rounding
    theta = torch.atan2(torch.linalg.vector_norm(t, dim=-1), w)
    return theta, t


def _tangent_basis_probe(mu: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Unit vectors ⊥ μ: the projection of e₁ (or e₂ if μ = ±e₁) — the degenerate direction of a
    Householder construction — and a random one."""
    mu = _unit64(mu)
    p = mu.shape[-1]
    gen = torch.Generator().manual_seed(5000 + seed)
    out = []
    for cand in (torch.eye(p, dtype=torch.float64)[0], torch.randn(p, generator=gen, dtype=torch.float64)):
        d = cand - (cand @ mu) * mu
        if float(torch.linalg.vector_norm(d)) < 1e-12:
            d = torch.eye(p, dtype=torch.float64)[1]
            d = d - (d @ mu) * mu
        d = d / torch.linalg.vector_norm(d)
        d = d - (d @ mu) * mu
        out.append(d / torch.linalg.vector_norm(d))
    return out if p > 2 else out[:1]


def _mean_z(values: np.ndarray, expected: float) -> float:
    se = values.std(ddof=1) / math.sqrt(values.size)
    diff = values.mean() - expected
    if se == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return float(diff / se)


def _check_sample(x: torch.Tensor, mu: torch.Tensor, p: int, kappa: float, record=None, tag: str = "") -> list[str]:
    """All distributional checks of samples x [n, p] from vMF(μ, κ); returns the list of failures."""
    n = x.shape[0]
    theta, t = _decompose(x, mu)
    theta_np = theta.numpy()
    y = 2.0 * np.sin(0.5 * theta_np) ** 2  # 1 − w, precise
    failures = []

    # (a) mean of w = 1 − y against A_p(κ): z of w is minus z of y.
    z_w = -_mean_z(y, _mp_one_minus_a(p, kappa))
    if not abs(z_w) < Z_MAX:
        failures.append(
            f"{tag} mean w: z = {z_w:.2f} (mean 1−w = {y.mean():.6e}, 1−A = {_mp_one_minus_a(p, kappa):.6e})"
        )

    # (b) KS of θ against its exact CDF.
    ks = scipy.stats.kstest(_angle_law(p, kappa).cdf(theta_np), "uniform")
    if not ks.pvalue >= ALPHA:
        failures.append(f"{tag} KS of w marginal: D = {ks.statistic:.4g}, p-value = {ks.pvalue:.3g}")

    # (c) the tangent part has mean 0: n‖t̄‖²/σ² ~ χ²_{p−1}, σ² = E‖t‖²/(p−1) per tangent coordinate.
    t_np = t.numpy()
    sigma2 = float((t_np * t_np).sum(-1).mean()) / (p - 1)
    tbar = t_np.mean(0)
    chi2 = n * float(tbar @ tbar) / sigma2 if sigma2 > 0 else math.inf
    chi2_p = float(scipy.stats.chi2.sf(chi2, p - 1))
    if not chi2_p >= ALPHA:
        failures.append(f"{tag} tangent mean: chi2 = {chi2:.4g} on {p - 1} df, p-value = {chi2_p:.3g}")

    # Isotropy of the tangent direction v = t/‖t‖ along fixed directions d ⊥ μ:
    # vᵀd = ±1 equally likely for p = 2, (1 + vᵀd)/2 ~ Beta((p−2)/2, (p−2)/2) for p ≥ 3.
    tn = np.linalg.norm(t_np, axis=-1)
    keep = tn > 0
    v = t_np[keep] / tn[keep, None]
    iso_p = []
    for j, d in enumerate(_tangent_basis_probe(mu, p)):
        c = v @ d.numpy()
        if p == 2:
            pv = scipy.stats.binomtest(int((c > 0).sum()), c.size).pvalue
        else:
            half = 0.5 * (p - 2)
            pv = scipy.stats.kstest(0.5 * (1.0 + np.clip(c, -1, 1)), scipy.stats.beta(half, half).cdf).pvalue
        iso_p.append(pv)
        if not pv >= ALPHA:
            failures.append(f"{tag} tangent direction not isotropic along probe {j}: p-value = {pv:.3g}")

    if record is not None:
        record("z_w", round(z_w, 3))
        record("ks_pvalue", float(ks.pvalue))
        record("chi2_pvalue", chi2_p)
        record("iso_pvalue", float(min(iso_p)))
    return failures


# --------------------------------------------------------------------------------------------------
# the reference itself


@pytest.mark.parametrize("p,kappa", [(3, 0.5), (3, 20.0), (3, 1e6), (2, 0.0), (4, 0.0), (128, 0.0), (2048, 0.0)])
def test_angle_law_oracle_closed_forms(p, kappa):
    """The numerical angle CDF agrees with the p = 3 closed form and with the κ = 0 Beta law."""
    law = _AngleLaw(p, kappa)
    qs = np.array([1e-9, 1e-4, 0.01, 0.3, 0.5, 0.8, 0.999, 1 - 1e-7])
    if p == 3:
        # P(y ≤ s) = (1 − e^{−κs})/(1 − e^{−2κ})
        ys = -np.log1p(qs * np.expm1(-2.0 * kappa)) / kappa
        exact = qs
        got = law.cdf(2.0 * np.arcsin(np.sqrt(ys / 2.0)))
    else:
        # (1 + w)/2 ~ Beta((p−1)/2, (p−1)/2) and y = 1 − w = 2(1 − z)
        beta = scipy.stats.beta(0.5 * (p - 1), 0.5 * (p - 1))
        zs = beta.ppf(qs)
        exact = beta.sf(zs)
        got = law.cdf(2.0 * np.arccos(np.sqrt(zs)))  # cos²(θ/2) = (1 + w)/2 = z
    np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(law.mean_one_minus_cos, _mp_one_minus_a(p, kappa), rtol=1e-9)


@pytest.mark.parametrize("p,kappa", [(2, 0.5), (2, 1e6), (4, 20.0), (16, 300.0), (128, 1e4), (512, 20.0), (2048, 1e6)])
def test_angle_law_oracle_mpmath(p, kappa):
    """The numerical angle CDF agrees with mpmath quadrature of the y-density, and its mean with A_p."""
    law = _angle_law(p, kappa)
    np.testing.assert_allclose(law.mean_one_minus_cos, _mp_one_minus_a(p, kappa), rtol=1e-9)
    with mpmath.workdps(25):
        mp_law = _MpYLaw(p, kappa, _y_breakpoints(p, kappa))
        for q in (1e-6, 0.05, 0.5, 0.95, 1 - 1e-6):
            yq = 2.0 * math.sin(0.5 * law.quantile(q)) ** 2
            lower, upper = mp_law.tails(yq)
            assert float(lower) == pytest.approx(q, rel=1e-8), (q, yq)
            assert float(upper) == pytest.approx(1 - q, rel=1e-8), (q, yq)


@pytest.mark.parametrize("kappa", [0.5, 20.0, 1e4])
def test_finite_difference_reference_on_p3(kappa):
    """The mpmath finite-difference dy/dκ reference reproduces the p = 3 closed form, where
    y(u, κ) = −log1p(u·expm1(−2κ))/κ at fixed u (the CDF value) is explicit."""
    us = [1e-6, 0.05, 0.5, 0.95, 1 - 1e-6]
    with mpmath.workdps(40):
        def y_of(u, k):
            return -mpmath.log1p(mpmath.mpf(u) * mpmath.expm1(-2 * k)) / k
        exact = [float(mpmath.diff(lambda k, u=u: y_of(u, k), mpmath.mpf(kappa))) for u in us]
        ys = [float(y_of(u, mpmath.mpf(kappa))) for u in us]
    np.testing.assert_allclose(_mp_dy_dkappa(3, kappa, ys), exact, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# 1. the full grid: mean of w, KS of the w marginal, tangent mean, isotropy


@pytest.mark.parametrize("loc_kind", LOC_KINDS)
@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("p", _dim_params())
def test_sample_distribution_grid(p, kappa, loc_kind, record_property):
    torch.manual_seed(_seed(p, kappa, loc_kind))
    loc = _loc(p, loc_kind)
    d = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64))
    x = d.sample((N_GRID,))
    assert x.shape == (N_GRID, p) and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    failures = _check_sample(x, loc, p, kappa, record_property, tag=f"p={p} κ={kappa:g} loc={loc_kind}:")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("p,n", [(2, 1_000_000), (3, 1_000_000), (4, 1_000_000), (16, 500_000), (128, 100_000)])
def test_sample_distribution_high_power(p, n, kappa, record_property):
    """Same checks with many more samples (KS detects CDF errors of ~2.5/√n)."""
    torch.manual_seed(_seed(p, kappa, n, "power"))
    loc = _loc(p, "random", seed=1)
    x = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).sample((n,))
    failures = _check_sample(x, loc, p, kappa, record_property, tag=f"p={p} κ={kappa:g} n={n}:")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("p", [2, 3, 16])
@pytest.mark.parametrize("kappa", [0.5, 1e4])
def test_sample_distribution_loc_exactly_e1(p, kappa):
    torch.manual_seed(11 + p)
    loc = _loc(p, "e1")
    x = VonMisesFisher(loc, kappa).sample((N_GRID,))
    failures = _check_sample(x, loc, p, kappa, tag=f"p={p} κ={kappa:g} loc=e1:")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("p", [2, 4, 16, 512])
def test_sample_distribution_kappa_1e8_float64(p, record_property):
    """Beyond the grid: κ = 1e8 (the documented maximum) in float64."""
    torch.manual_seed(_seed(p, "1e8"))
    loc = _loc(p, "random", seed=2)
    x = VonMisesFisher(loc, torch.tensor(1e8, dtype=torch.float64)).sample((N_GRID,))
    failures = _check_sample(x, loc, p, 1e8, record_property, tag=f"p={p} κ=1e8:")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("p,kappa", [(3, 20.0), (16, 300.0)])
def test_non_unit_loc_is_normalised(p, kappa):
    """With validation off, loc is used as loc/‖loc‖ (documented)."""
    torch.manual_seed(_seed(p, kappa, "scaled"))
    loc = _loc(p, "random", seed=3)
    x = VonMisesFisher(3.5 * loc, kappa, validate_args=False).sample((N_GRID,))
    failures = _check_sample(x, loc, p, kappa, tag=f"p={p} κ={kappa:g} loc=3.5μ:")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# unit norm (float64 and float32)


def _norm_error_ulps(x: torch.Tensor) -> np.ndarray:
    """|‖x‖ − 1| in units of eps of x's dtype, the norm accumulated in extended precision."""
    eps = torch.finfo(x.dtype).eps
    xl = x.detach().numpy().astype(np.longdouble)
    return np.abs(np.sqrt((xl * xl).sum(-1)) - 1) / eps


@pytest.mark.parametrize("loc_kind", LOC_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("p", _dim_params())
def test_samples_unit_norm(p, kappa, dtype, loc_kind):
    torch.manual_seed(_seed(p, kappa, str(dtype), loc_kind, "norm"))
    loc = _loc(p, loc_kind, dtype=dtype)
    x = VonMisesFisher(loc, torch.tensor(kappa, dtype=dtype)).sample((4000,))
    assert x.dtype == dtype
    err = _norm_error_ulps(x)
    worst = int(err.argmax())
    assert err.max() <= UNIT_NORM_ULPS, (
        f"|‖x‖ − 1| = {err.max():.1f} ulp (> {UNIT_NORM_ULPS}) for {dtype}, p={p}, κ={kappa:g}, loc={loc_kind}; "
        f"{(err > UNIT_NORM_ULPS).sum()} of {err.size} samples; worst sample {x[worst].tolist()}"
    )


# --------------------------------------------------------------------------------------------------
# 2. float32 at very large κ


@pytest.mark.parametrize("kappa", [1e6, 1e8])
@pytest.mark.parametrize("p", [2, 3, 4, 16, 128, 512])
def test_float32_large_kappa_tangent_not_collapsed(p, kappa):
    torch.manual_seed(_seed(p, kappa, "f32"))
    n = N_GRID
    loc = _loc(p, "random", dtype=torch.float32)
    d = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float32))
    x = d.rsample((n,))
    assert x.dtype == torch.float32 and x.shape == (n, p)
    assert torch.isfinite(x).all()
    theta, t = _decompose(x, loc)
    theta = theta.numpy()
    # sin²θ = ‖t‖²/‖x‖² = y(2−y); E[sin²θ] = 1 − E[w²] = (p−1)A_p(κ)/κ exactly.
    sin2 = np.sin(theta) ** 2
    expected = (p - 1) * (1.0 - _mp_one_minus_a(p, kappa)) / kappa
    assert float(np.median(sin2)) > 0.1 * expected, "tangent component collapsed"
    z = _mean_z(sin2, expected)
    assert abs(z) < Z_MAX, f"E[sin²θ]: mean {sin2.mean():.6e}, expected {expected:.6e}, z = {z:.2f}"
    # the whole law of θ (float32 rounding of x perturbs θ by ~1e-7·√p absolute, far below the KS
    # resolution ~2.5/√n at these n)
    ks = scipy.stats.kstest(_angle_law(p, kappa).cdf(theta), "uniform")
    assert ks.pvalue >= ALPHA, f"KS p-value {ks.pvalue:.3g} (D = {ks.statistic:.4g})"


# --------------------------------------------------------------------------------------------------
# 3. gradients


GRAD_KAPPAS = [0.1, 10.0, 1e3, 1e5]


@pytest.mark.parametrize(
    "p,kappa", [(p, k) for p in (3, 16, 128, 512) for k in GRAD_KAPPAS] + [(3, 0.0), (16, 0.0), (3, 1e-12), (2, 5.0)]
)
def test_kappa_gradient_unbiased(p, kappa, record_property):
    """MC mean of ∂(μᵀx)/∂κ (autograd through rsample) equals A_p'(κ)."""
    torch.manual_seed(_seed(p, kappa, "dk"))
    n = N_GRID if p <= 128 else 10_000
    mu = _loc(p, "random")
    conc = torch.full((n,), kappa, dtype=torch.float64, requires_grad=True)
    x = VonMisesFisher(mu, conc).rsample()
    assert x.shape == (n, p)
    (x @ mu).sum().backward()
    grads = conc.grad.numpy()
    assert np.isfinite(grads).all()
    z = _mean_z(grads, _mp_a_prime(p, kappa))
    record_property("z_dkappa", round(z, 3))
    assert abs(z) < Z_MAX, f"mean dw/dκ = {grads.mean():.6e}, A_p'(κ) = {_mp_a_prime(p, kappa):.6e}, z = {z:.2f}"


@pytest.mark.parametrize("p,kappa", [(16, 10.0), (4, 1e3)])
def test_kappa_gradient_unbiased_float32(p, kappa):
    torch.manual_seed(_seed(p, kappa, "dk32"))
    n = N_GRID
    mu = _loc(p, "random", dtype=torch.float32)
    conc = torch.full((n,), kappa, dtype=torch.float32, requires_grad=True)
    x = VonMisesFisher(mu, conc).rsample()
    assert x.dtype == torch.float32
    (x.double() @ _unit64(mu)).sum().backward()
    assert conc.grad.dtype == torch.float32
    grads = conc.grad.double().numpy()
    z = _mean_z(grads, _mp_a_prime(p, kappa))
    assert abs(z) < Z_MAX, f"mean dw/dκ = {grads.mean():.6e}, A_p'(κ) = {_mp_a_prime(p, kappa):.6e}, z = {z:.2f}"


def test_kappa_gradient_of_scalar_concentration_sums_over_samples():
    """A scalar concentration requiring grad gets the sum of the per-sample gradients."""
    p, kappa, n = 16, 10.0, N_GRID
    mu = _loc(p, "random")
    conc = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    x = VonMisesFisher(mu, conc).rsample((n,))
    (x @ mu).mean().backward()
    se = math.sqrt(_mp_a_prime(p, kappa)) / math.sqrt(n) * 5  # generous: sd(dw/dκ) ≲ 5·sd(w)
    assert abs(float(conc.grad) - _mp_a_prime(p, kappa)) < Z_MAX * se


def test_kappa_gradient_after_sampling_under_inference_mode():
    """The implicit gradient's quadrature nodes are cached per device; a first use under
    torch.inference_mode must not cache inference tensors that a later autograd step cannot save."""
    import vmf_dists._sampling as sampling

    sampling._cached_legendre_tensors.cache_clear()
    mu = _loc(16, "random")
    with torch.inference_mode():
        sampling.d_one_minus_w_d_kappa(
            16, torch.tensor([10.0], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
        )
    conc = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    (VonMisesFisher(mu, conc).rsample((64,)) @ mu).sum().backward()
    kappa = conc.detach().clone().requires_grad_()  # a direct caller differentiating the quadrature itself
    sampling.d_one_minus_w_d_kappa(16, kappa, torch.full((3,), 0.3, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(conc.grad) and torch.isfinite(kappa.grad)


@pytest.mark.parametrize(
    "p,kappa",
    [(2, 1.0), (3, 0.0), (3, 0.1), (3, 10.0), (4, 1.0), (4, 20.0), (4, 1e3), (16, 0.5), (16, 20.0), (16, 1e4),
     (128, 300.0)],
)
def test_loc_gradient_unbiased(p, kappa):
    """MC mean of ∇_loc (aᵀx) equals A_p(κ)(I − μμᵀ)a, per coordinate within 5 s.e."""
    torch.manual_seed(_seed(p, kappa, "dloc"))
    n = N_GRID
    mu = _loc(p, "random")
    a = torch.randn(p, dtype=torch.float64)
    loc = mu.repeat(n, 1).requires_grad_(True)
    x = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).rsample()
    assert x.shape == (n, p)
    (x @ a).sum().backward()
    g = loc.grad.numpy()
    assert np.isfinite(g).all()
    # gradients are tangent to the sphere (loc is used as loc/‖loc‖)
    np.testing.assert_allclose(g @ mu.numpy(), 0.0, atol=1e-10 * (1 + np.abs(g).max()))
    a_p = 1.0 - _mp_one_minus_a(p, kappa)
    expected = (a_p * (a - (a @ mu) * mu)).numpy()
    se = g.std(0, ddof=1) / math.sqrt(n)
    z = (g.mean(0) - expected) / np.maximum(se, 1e-300)
    bad = np.abs(g.mean(0) - expected) > Z_MAX * se + 1e-12
    assert not bad.any(), (
        f"coordinates {np.nonzero(bad)[0].tolist()}: z = {z[bad]}, mean/expected = {g.mean(0)[bad] / expected[bad]}"
    )


@pytest.mark.parametrize("p,kappa", [(3, 10.0), (4, 20.0), (16, 20.0)])
def test_loc_gradient_unbiased_shared_loc(p, kappa):
    """One loc [p] shared by all samples (the matrix-vector path): the gradient of the sample mean of
    aᵀx, over K independent repetitions, averages to A_p(κ)(I − μμᵀ)a within 5 s.e. per coordinate."""
    torch.manual_seed(_seed(p, kappa, "dloc-shared"))
    reps, n = 50, 2000
    mu = _loc(p, "random", seed=4)
    a = torch.randn(p, dtype=torch.float64)
    grads = []
    for _ in range(reps):
        loc = mu.clone().requires_grad_(True)
        x = VonMisesFisher(loc, torch.tensor(kappa, dtype=torch.float64)).rsample((n,))
        (x @ a).mean().backward()
        grads.append(loc.grad.numpy().copy())
    g = np.stack(grads)
    expected = ((1.0 - _mp_one_minus_a(p, kappa)) * (a - (a @ mu) * mu)).numpy()
    se = g.std(0, ddof=1) / math.sqrt(reps)
    bad = np.abs(g.mean(0) - expected) > Z_MAX * se + 1e-12
    z = (g.mean(0) - expected) / np.maximum(se, 1e-300)
    assert not bad.any(), (
        f"coordinates {np.nonzero(bad)[0].tolist()}: z = {z[bad]}, mean/expected = {g.mean(0)[bad] / expected[bad]}"
    )


IMPLICIT_CASES = [
    (2, 0.0), (2, 0.5), (2, 1e4), (2, 1e8), (3, 20.0), (4, 1e-3), (4, 20.0), (16, 0.0), (16, 10.0),
    (4, 1e6), (16, 1e8), (128, 100.0), (128, 1e3), (512, 300.0), (512, 1e5), (2048, 1e6),
]
IMPLICIT_QUANTILES = (1e-6, 0.05, 0.5, 0.95, 0.999, 1 - 1e-6)


@pytest.mark.parametrize("p,kappa", IMPLICIT_CASES)
def test_implicit_gradient_matches_cdf_finite_differences(p, kappa):
    """Per sample: `d_one_minus_w_d_kappa` = −(∂G/∂κ)/g(y) at y = quantiles of y = 1 − w, relative 1e-6."""
    law = _angle_law(p, kappa)
    ys = [2.0 * math.sin(0.5 * law.quantile(q)) ** 2 for q in IMPLICIT_QUANTILES]
    got = d_one_minus_w_d_kappa(
        p, torch.tensor([kappa] * len(ys), dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    )
    ref = _mp_dy_dkappa(p, kappa, ys)
    rows = [(q, y, lib, r, abs(lib - r) / abs(r)) for q, y, lib, r in zip(IMPLICIT_QUANTILES, ys, got.tolist(), ref)]
    bad = [r for r in rows if not r[4] <= 1e-6]
    assert not bad, f"p={p} κ={kappa:g}: (quantile, y, library dy/dκ, reference, rel. error): {bad}"


# --------------------------------------------------------------------------------------------------
# 4. batching and κ = 0


@pytest.mark.parametrize("p", [3, 16])
@pytest.mark.parametrize("broadcast", [False, True], ids=["full", "broadcast"])
def test_batched_parameters(p, broadcast):
    torch.manual_seed(100 + p + broadcast)
    n = N_GRID
    kappas = torch.tensor([[0.0, 1e-3], [0.5, 20.0], [300.0, 1e4]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    if broadcast:  # loc [2, p] and κ [3, 2] broadcast to batch [3, 2]
        loc = torch.randn(2, p, generator=gen, dtype=torch.float64)
        loc = loc / torch.linalg.vector_norm(loc, dim=-1, keepdim=True)
        locs = loc.expand(3, 2, p)
    else:
        loc = torch.randn(3, 2, p, generator=gen, dtype=torch.float64)
        loc = loc / torch.linalg.vector_norm(loc, dim=-1, keepdim=True)
        locs = loc
    d = VonMisesFisher(loc, kappas)
    assert d.batch_shape == (3, 2) and d.event_shape == (p,)
    x = d.sample((n,))
    assert x.shape == (n, 3, 2, p)
    failures = []
    for i in range(3):
        for j in range(2):
            failures += _check_sample(
                x[:, i, j], locs[i, j], p, float(kappas[i, j]), tag=f"batch[{i},{j}] κ={float(kappas[i, j]):g}:"
            )
    assert not failures, "\n".join(failures)


def test_batched_sample_shape_multi_dim():
    d = VonMisesFisher(_loc(5, "random").expand(3, 2, 5), torch.tensor([1.0, 2.0], dtype=torch.float64))
    x = d.rsample((4, 7))
    assert x.shape == (4, 7, 3, 2, 5)
    assert d.sample().shape == (3, 2, 5)


@pytest.mark.parametrize("p", _dim_params([2, 3, 4, 16, 128, 2048]))
def test_kappa_zero_is_uniform(p):
    """κ = 0: E[x] = 0 (n‖x̄‖²p ~ χ²_p) and (1 + w)/2 ~ Beta((p−1)/2, (p−1)/2) (scipy, not our CDF)."""
    torch.manual_seed(200 + p)
    n = N_GRID
    loc = _loc(p, "random")
    x = VonMisesFisher(loc, 0.0).sample((n,)).double()
    xbar = x.mean(0)
    chi2 = n * p * float(xbar @ xbar)
    assert scipy.stats.chi2.sf(chi2, p) >= ALPHA, f"mean of uniform samples: chi2 = {chi2:.4g} on {p} df"
    w = (x @ loc).numpy()
    beta = scipy.stats.beta(0.5 * (p - 1), 0.5 * (p - 1))
    ks = scipy.stats.kstest(0.5 * (1.0 + w), beta.cdf)
    assert ks.pvalue >= ALPHA, f"KS against Beta: p-value {ks.pvalue:.3g}"


def test_sample_has_no_grad_and_rsample_has():
    mu = _loc(8, "random")
    conc = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    d = VonMisesFisher(mu, conc)
    assert not d.sample((3,)).requires_grad
    assert d.rsample((3,)).requires_grad


# --------------------------------------------------------------------------------------------------
# the sampler's form for torch.compile (`_wood_compiled`), run eagerly here; compiled in test_compile.py


@pytest.mark.parametrize("p", [2, 4, 10, 64, 513])
def test_symmetric_beta_parts_follow_the_beta_law(p):
    """Ulrich's uniform-based proposal: z = big/(big + small) ~ Beta((p−1)/2, (p−1)/2) (scipy's CDF)."""
    from vmf_dists._sampling import _symmetric_beta_parts

    gen = torch.Generator().manual_seed(_seed(p, "ulrich"))
    u, v = (torch.rand(N_GRID, generator=gen, dtype=torch.float64) for _ in range(2))
    big, small = _symmetric_beta_parts(p, u, v)
    z = (big / (big + small)).numpy()
    ks = scipy.stats.kstest(z, scipy.stats.beta(0.5 * (p - 1), 0.5 * (p - 1)).cdf)
    assert ks.pvalue >= ALPHA, f"KS against Beta: p-value {ks.pvalue:.3g}"


@pytest.mark.parametrize("p", [2, 4, 10, 513])
def test_symmetric_beta_parts_keep_relative_precision(p):
    """The smaller part 1 ∓ t keeps its relative precision where t → ±1 (u → 0, v → 0, ½ or 1): against
    mpmath at 700 digits, within 8 ulp of each part."""
    from vmf_dists._sampling import _symmetric_beta_parts

    us = [1e-300, 1e-30, 1e-8, 0.3, 0.999999]
    vs = [0.0, 1e-12, 1e-6, 0.25 - 1e-9, 0.5 - 1e-10, 0.5, 0.5 + 1e-7, 0.75, 0.9, 1.0 - 1e-13]
    u = torch.tensor([a for a in us for _ in vs], dtype=torch.float64)
    v = torch.tensor([b for _ in us for b in vs], dtype=torch.float64)
    big, small = _symmetric_beta_parts(p, u, v)
    mpmath.mp.dps = 700  # 1 − t down to ~1e-600 (u = 1e-300)
    for i in range(u.numel()):
        power = mpmath.mpf(0) if p == 2 else mpmath.mpf(float(u[i])) ** (mpmath.mpf(2) / (p - 2))
        vi = mpmath.mpf(float(v[i]))
        f = 2 * vi if vi < 0.5 else 2 * vi - 1  # the law-preserving substitute for cos 2πv that the code uses
        t = mpmath.sqrt(1 - power) * mpmath.sin(mpmath.pi * (1 - f) / 2) * (1 if vi < 0.5 else -1)
        for value, exact in ((big[i], 1 + t), (small[i], 1 - t)):
            error = abs(mpmath.mpf(float(value)) - exact)
            assert error <= 8 * 2.0**-52 * exact, (float(u[i]), float(v[i]), float(value), float(exact))


@pytest.mark.parametrize("p,kappa", [(2, 5.0), (4, 0.0), (4, 30.0), (16, 1.0), (16, 1e4), (128, 300.0)])
@pytest.mark.parametrize("n", [100, N_GRID])
def test_compiled_form_of_the_sampler_follows_the_exact_law(p, kappa, n, monkeypatch):
    """`_wood_compiled` as torch.compile runs it (uniform-based proposals, a fixed-size second round for the
    pending rows, no host synchronisation), executed eagerly: the law of θ is exact (KS), with the wide
    (n = 100) and the narrow (N_GRID) first round."""
    from vmf_dists import _sampling

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(_seed(p, kappa, n, "compiled"))
    y = torch.cat([_sampling._wood_compiled(p, torch.full((n,), kappa, dtype=torch.float64))
                   for _ in range(max(1, 2000 // n))]).numpy()
    theta = 2.0 * np.arcsin(np.sqrt(0.5 * y))
    ks = scipy.stats.kstest(_angle_law(p, kappa).cdf(theta), "uniform")
    assert ks.pvalue >= ALPHA, f"KS of w marginal: D = {ks.statistic:.4g}, p-value = {ks.pvalue:.3g}"


@pytest.mark.parametrize("p,kappa", [(2, 5.0), (16, 1.0), (128, 300.0)])
def test_compiled_form_second_round_follows_the_exact_law(p, kappa, monkeypatch):
    """Every sample through the second round of `_wood_compiled` (the first round made to reject everything,
    the capacity every row): the topk selection and scatter return exact samples (KS of θ)."""
    from vmf_dists import _sampling

    round_of = _sampling._wood_round

    def first_rejects(dim, k, proposals):  # the first round returns no sample: y = 2 (w = −1), not accepted
        y, accepted = round_of(dim, k, proposals)
        if proposals == _sampling.COMPILED_SECOND_PROPOSALS:
            return y, accepted
        return torch.full_like(y, 2.0), torch.zeros_like(accepted)

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(_sampling, "_wood_round", first_rejects)
    monkeypatch.setattr(_sampling, "_second_stage_capacity", lambda n, proposals: n)
    torch.manual_seed(_seed(p, kappa, "second round"))
    y = _sampling._wood_compiled(p, torch.full((N_GRID,), kappa, dtype=torch.float64)).numpy()
    theta = 2.0 * np.arcsin(np.sqrt(0.5 * y))
    ks = scipy.stats.kstest(_angle_law(p, kappa).cdf(theta), "uniform")
    assert ks.pvalue >= ALPHA, f"KS of w marginal: D = {ks.statistic:.4g}, p-value = {ks.pvalue:.3g}"


@pytest.mark.parametrize("n", [5, 50])
def test_compiled_form_of_the_sampler_raises_when_a_sample_is_unfinished(n, monkeypatch):
    """If no proposal is accepted (forced here), the compiled form raises instead of returning a sample: at
    n = 5 every pending row fits the second round (which then fails), at n = 50 they do not fit."""
    from vmf_dists import _sampling

    def never(dim, kappa, big, small):
        y, accepted = accept(dim, kappa, big, small)
        return y, torch.zeros_like(accepted)

    accept = _sampling._wood_accept
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(_sampling, "_wood_accept", never)
    assert (n <= _sampling._second_stage_capacity(n, 8)) == (n == 5)
    with pytest.raises(RuntimeError, match="rejection sampler"):
        _sampling._wood_compiled(10, torch.full((n,), 3.0, dtype=torch.float64))
