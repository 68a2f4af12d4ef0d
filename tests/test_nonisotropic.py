"""NonIsotropicVMF (nivMF), the Monte-Carlo helpers (`vmf_dists.monte_carlo`) and the Monte-Carlo /
tempered expected-likelihood kernels, tested independently of the implementation.

References: numerical quadrature on S¹ and S² (checked on vMFs first, and on an independent
re-implementation of the nivMF density written here), importance sampling with an angular-central-
Gaussian-type proposal whose density is written here, mpmath closed forms (tests/conftest.py), and the
vMF closed forms. The library's samplers are used only to draw points; no number produced by
``vmf_dists`` is used as a reference (the one exception, by design of the acceptance test, is the
isotropic case compared with `VonMisesFisher.log_prob`, itself validated against mpmath elsewhere).

Density under test (design.md §3): with θ = Kμ, K = diag(k),
    log p(x) = log C_p(‖θ‖) + θᵀKx/‖Kx‖ + Σ_d log k_d − p log‖Kx‖.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from mpmath import mp
from pyro import poutine
from pyro.distributions import constraints
from torch.autograd import gradcheck
from torch.distributions import kl_divergence as torch_kl

from tests.conftest import (
    WORK_DPS,
    mp_entropy,
    mp_exact,
    mp_kl_vmf_vmf,
    mp_log_c,
    mp_mean_length,
    mp_mean_length_deriv,
    mp_unit,
    mpf,
    unit_vectors,
)
from vmf_dists import (
    HypersphericalUniform,
    NonIsotropicVMF,
    VonMisesFisher,
    log_expected_likelihood,
    monte_carlo,
    pairwise_log_expected_likelihood,
)

Z_MAX = 5.0  # statistical tolerance: 5 standard errors


# ==================================================================================================
# independent references


def _log_c3(kappa: torch.Tensor) -> torch.Tensor:
    """log C_3(κ) = log κ − log(4π sinh κ), differentiable (κ > 0), float64."""
    return torch.log(kappa) - math.log(2 * math.pi) - kappa - torch.log1p(-torch.exp(-2 * kappa))


def _log_c2(kappa: torch.Tensor) -> torch.Tensor:
    """log C_2(κ) = −log 2π − log I₀(κ), differentiable, float64."""
    return -math.log(2 * math.pi) - torch.log(torch.special.i0e(kappa)) - kappa


def ref_log_prob(loc: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The nivMF log density written out here (p = 2, 3; torch float64, differentiable in loc and k)."""
    p = x.shape[-1]
    log_c = {2: _log_c2, 3: _log_c3}[p]
    mu = loc / torch.linalg.vector_norm(loc, dim=-1, keepdim=True)
    theta = k * mu
    tn = torch.linalg.vector_norm(theta, dim=-1)
    kx = k * x
    kxn = torch.linalg.vector_norm(kx, dim=-1)
    return log_c(tn) + (theta * kx).sum(-1) / kxn + torch.log(k).sum(-1) - p * torch.log(kxn)


def mp_nivmf_log_prob(loc, k, x) -> tuple[mp.mpf, mp.mpf]:
    """mpmath value of log p(x) from the exact float entries (loc normalised in mpmath), and the sum
    of magnitudes of its terms (the scale for a relative error)."""
    p = len(x)
    with mp.workdps(WORK_DPS):
        mu = mp_unit(loc)
        ks, xs = mp_exact(k), mp_exact(x)
        theta = [a * b for a, b in zip(ks, mu)]
        tn = mp.sqrt(mp.fsum(t * t for t in theta))
        kx = [a * b for a, b in zip(ks, xs)]
        kxn = mp.sqrt(mp.fsum(t * t for t in kx))
        log_c = mp_log_c(p, tn)
        cos_term = mp.fsum(a * b for a, b in zip(theta, kx)) / kxn
        log_det = mp.fsum(mp.log(a) for a in ks)
        value = log_c + cos_term + log_det - p * mp.log(kxn)
        scale = abs(log_c + tn) + abs(tn - cos_term) + abs(log_det) + p * abs(mp.log(kxn))
        return value, scale


def _log_sphere_area(p: int) -> float:
    return math.log(2.0) + p / 2 * math.log(math.pi) - math.lgamma(p / 2)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _rand_loc(p: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return unit_vectors((), p, seed, dtype)


# --------------------------------------------------------------------------------------------------
# quadrature grids


def circle_grid(n: int = 1 << 18):
    """Trapezoid on S¹ (geometric convergence for periodic analytic integrands)."""
    t = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.stack([torch.cos(t), torch.sin(t)], -1), torch.full((n,), 2 * math.pi / n, dtype=torch.float64)


def _graded_edges(a: float, b: float, h0: float, n_geo: int) -> np.ndarray:
    """Panel edges on [a, b], geometrically refined toward both ends (smallest panel h0)."""
    g = np.geomspace(h0, (b - a) / 2, n_geo)
    return np.unique(np.concatenate([a + np.concatenate([[0.0], g]), b - g, [b]]))


def sphere_grid(pole: int = 2, n_geo: int = 25, nodes: int = 12, n_phi: int = 512, h0: float = 1e-6):
    """Product rule on S²: composite Gauss–Legendre in polar angle θ (panels graded geometrically
    toward θ = 0, π/2, π, so that densities piled up at the poles or along the equator are resolved),
    trapezoid in φ. The polar axis is coordinate ``pole``. Returns (x [N, 3], weights [N])."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    quarter = _graded_edges(0.0, math.pi / 2, h0, n_geo)
    edges = np.unique(np.concatenate([quarter, math.pi - quarter]))
    half = (edges[1:] - edges[:-1])[:, None] / 2
    theta = torch.tensor(((edges[:-1, None] + edges[1:, None]) / 2 + half * t).ravel())
    w_theta = torch.tensor((half * w).ravel())
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    st, ct = torch.sin(theta)[:, None], torch.cos(theta)[:, None]
    x = torch.stack([st * torch.cos(phi), st * torch.sin(phi), ct.expand(-1, n_phi)], -1).reshape(-1, 3)
    weights = (w_theta * torch.sin(theta))[:, None].expand(-1, n_phi).reshape(-1) * (2 * math.pi / n_phi)
    perm = [i for i in range(3) if i != pole] + [pole]  # grid coordinate j ↦ ambient coordinate perm[j]
    return x[:, np.argsort(perm)].contiguous(), weights.contiguous()


def nivmf_pole(k) -> int:
    """Where the nivMF density on S² has its sharp features: near ±e_argmin(k) (mass piles up along the
    least concentrated axis), or along the great circle ⟂ e_argmax(k) when the two smallest k are alike."""
    ks = sorted(k)
    return int(np.argmax(k)) if ks[1] < 3 * ks[0] else int(np.argmin(k))


S2_CASES = [
    ((1.0, 50.0, 5.0), 1),
    ((1.0, 50.0, 5.0), 2),
    ((0.3, 30.0, 200.0), 3),
    ((0.3, 30.0, 200.0), 4),
    ((200.0, 0.3, 30.0), 5),
    ((0.5, 0.5, 100.0), 6),
    ((0.5, 0.7, 100.0), 7),
    ((0.1, 1000.0, 20.0), 8),
]
S2_IDS = [f"k{'-'.join(f'{v:g}' for v in k)}-s{s}" for k, s in S2_CASES]


# ==================================================================================================
# 1. normalisation


@pytest.mark.parametrize("kappa", [1.0, 100.0, 400.0])
def test_sphere_quadrature_is_exact_for_vmf(kappa):
    """The S² grid first: it integrates vMFs (library density, validated elsewhere) to 1."""
    mu = _rand_loc(3, 77)
    for pole in range(3):
        x, w = sphere_grid(pole)
        total = (VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64)).log_prob(x).exp() * w).sum().item()
        assert abs(total - 1.0) <= 1e-6, (pole, total)  # the tolerance asked of the nivMF


@pytest.mark.parametrize("k,seed", S2_CASES, ids=S2_IDS)
def test_sphere_quadrature_resolves_reference_nivmf_density(k, seed):
    """…and the independent re-implementation of the nivMF density integrates to 1 on it."""
    mu, kt = _rand_loc(3, seed), torch.tensor(k, dtype=torch.float64)
    x, w = sphere_grid(nivmf_pole(k))
    total = (ref_log_prob(mu, kt, x).exp() * w).sum().item()
    assert abs(total - 1.0) <= 1e-6, total


@pytest.mark.parametrize(
    "k,seed",
    [((1.0, 50.0), 1), ((50.0, 1.0), 2), ((0.3, 200.0), 3), ((40.0, 0.5), 4), ((1e-3, 10.0), 5), ((7.0, 7.5), 6)],
)
def test_density_integrates_to_one_on_circle(k, seed, record_property):
    x, w = circle_grid()
    d = NonIsotropicVMF(_rand_loc(2, seed), torch.tensor(k, dtype=torch.float64))
    total = (d.log_prob(x).exp() * w).sum().item()
    record_property("mass_error", total - 1.0)
    # the reference implementation on the same grid (checks the grid, not the library)
    ref_total = (ref_log_prob(d.loc, d.concentration, x).exp() * w).sum().item()
    assert abs(ref_total - 1.0) <= 1e-8, ref_total
    assert abs(total - 1.0) <= 1e-8, total


@pytest.mark.parametrize("k,seed", S2_CASES, ids=S2_IDS)
def test_density_integrates_to_one_on_sphere(k, seed, record_property):
    mu = _rand_loc(3, seed)
    d = NonIsotropicVMF(mu, torch.tensor(k, dtype=torch.float64))
    x, w = sphere_grid(nivmf_pole(k))
    total = (d.log_prob(x).exp() * w).sum().item()
    record_property("mass_error", total - 1.0)
    assert abs(total - 1.0) <= 1e-6, total  # the acceptance bound is 1e-4; the grid resolves ~1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_density_integrates_to_one_on_sphere_float32_params(dtype):
    k = (0.3, 30.0, 200.0)
    d = NonIsotropicVMF(_rand_loc(3, 3, dtype), torch.tensor(k, dtype=dtype))
    x, w = sphere_grid(nivmf_pole(k))
    total = (d.log_prob(x.to(dtype)).double().exp() * w).sum().item()
    assert abs(total - 1.0) <= (1e-6 if dtype == torch.float64 else 1e-4), total


def _aniso_k(p: int, scale: float, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.exp(
        math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(p, generator=g, dtype=torch.float64)
    )


# (p, scale, lo, hi): k_d = scale · log-uniform[lo, hi]
IS_CASES_VMF = [(16, 3.0, 1.0, 2.0), (16, 20.0, 1.0, 2.0), (64, 5.0, 1.0, 1.5), (64, 30.0, 1.0, 1.5)]
IS_CASES_STRETCHED = [
    (16, 10.0, 0.1, 10.0), (16, 100.0, 0.01, 10.0), (64, 2.0, 0.1, 10.0), (64, 10.0, 0.2, 5.0), (64, 50.0, 0.05, 20.0)
]


@pytest.mark.parametrize("p,scale,lo,hi", IS_CASES_VMF)
def test_normalisation_high_dim_importance_sampling_vmf_proposal(p, scale, lo, hi, record_property):
    """E_q[p(x)/q(x)] = 1 with q a vMF (mildly anisotropic k, where a vMF proposal has finite variance).
    The proposal is fitted to an independent batch of nivMF samples and widened (any q is unbiased)."""
    torch.manual_seed(1000 + p + int(scale))
    mu = _rand_loc(p, p + 7)
    d = NonIsotropicVMF(mu, _aniso_k(p, scale, lo, hi, p))
    fit = VonMisesFisher.fit(d.sample((4000,)))
    q = VonMisesFisher(fit.loc, fit.concentration * 0.8)
    n = 100_000
    x = q.sample((n,))
    ratio = (d.log_prob(x) - q.log_prob(x)).exp()
    mean, se = ratio.mean().item(), ratio.std().item() / math.sqrt(n)
    record_property("mass_error", mean - 1.0)
    record_property("se", se)
    assert se < 0.02, f"proposal too poor to test anything: se = {se}"
    assert abs(mean - 1.0) <= Z_MAX * se, f"mass {mean} ± {se}"


@pytest.mark.parametrize("p,scale,lo,hi", IS_CASES_STRETCHED)
def test_normalisation_high_dim_importance_sampling_stretched_proposal(p, scale, lo, hi, record_property):
    """Strong anisotropy: proposal x = K⁻¹y/‖K⁻¹y‖ with y ~ vMF(θ̂, 0.8‖θ‖). Its density is written
    here from the textbook Jacobian of the angular central Gaussian map,
    q(x) = vMF(Kx/‖Kx‖; θ̂, 0.8‖θ‖) · Π k_d / ‖Kx‖^p, and E_q[p/q] = 1."""
    torch.manual_seed(2000 + p + int(scale))
    mu = _rand_loc(p, p + 11)
    k = _aniso_k(p, scale, lo, hi, p + 1)
    d = NonIsotropicVMF(mu, k)
    theta = k * mu
    tn = torch.linalg.vector_norm(theta)
    base = VonMisesFisher(theta / tn, 0.8 * tn)
    n = 50_000
    z = base.sample((n,)) / k
    x = _unit(z)
    kx = k * x
    kxn = torch.linalg.vector_norm(kx, dim=-1)
    log_q = base.log_prob(kx / kxn[:, None]) + torch.log(k).sum() - p * torch.log(kxn)
    ratio = (d.log_prob(x) - log_q).exp()
    mean, se = ratio.mean().item(), ratio.std().item() / math.sqrt(n)
    record_property("mass_error", mean - 1.0)
    record_property("se", se)
    assert se < 0.02, f"proposal too poor to test anything: se = {se}"
    assert abs(mean - 1.0) <= Z_MAX * se, f"mass {mean} ± {se}"


@pytest.mark.parametrize("p", [16, 64])
def test_normalisation_high_dim_importance_sampling_uniform_proposal(p, record_property):
    """Uniform proposal, weak concentrations: E_U[p(x)]·|S^{p−1}| = 1."""
    torch.manual_seed(3000 + p)
    d = NonIsotropicVMF(
        _rand_loc(p, p + 13),
        _aniso_k(p, 1.0 if p <= 16 else 0.5, 0.5 if p <= 16 else 0.9, 1.5 if p <= 16 else 1.1, p + 2),
    )
    u = HypersphericalUniform(p, dtype=torch.float64)
    n = 100_000
    ratio = (d.log_prob(u.sample((n,))) + _log_sphere_area(p)).exp()
    mean, se = ratio.mean().item(), ratio.std().item() / math.sqrt(n)
    record_property("mass_error", mean - 1.0)
    assert se < 0.02, se
    assert abs(mean - 1.0) <= Z_MAX * se, f"mass {mean} ± {se}"


# ==================================================================================================
# log_prob against mpmath, and the isotropic case


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("p", [2, 3, 5, 16, 64])
def test_log_prob_matches_mpmath(p, dtype):
    rows = []
    for i, (scale, lo, hi) in enumerate(
        [(1.0, 0.5, 2.0), (10.0, 0.1, 10.0), (300.0, 0.3, 3.0), (1e-3, 1.0, 5.0), (3e4, 0.5, 2.0)]
    ):
        loc = _rand_loc(p, 100 * p + i, dtype)
        k = _aniso_k(p, scale, lo, hi, 100 * p + i).to(dtype)
        d = NonIsotropicVMF(loc, k)
        xs = torch.cat([d.sample((3,)), unit_vectors((2,), p, 500 + i, dtype)])  # near the mode and anywhere
        got = d.log_prob(xs)
        assert got.dtype == dtype and got.shape == (5,)
        for j in range(5):
            ref, scale_ = mp_nivmf_log_prob(loc, k, xs[j])
            err = abs(float(got[j]) - float(ref))
            tol = (1e-12 if dtype == torch.float64 else 1e-5) * float(scale_)
            rows.append((i, j, err <= tol, float(got[j]), float(ref), float(scale_)))
    bad = [r for r in rows if not r[2]]
    assert not bad, bad


@pytest.mark.parametrize("p", [2, 3, 16, 64, 512])
def test_isotropic_concentration_equals_vmf(p):
    """k = c·1 gives exactly vMF(μ, c) (relative 1e-10, float64)."""
    torch.manual_seed(p)
    loc = _rand_loc(p, 40 + p)
    for c in (1e-6, 0.5, 10.0, 1e3, 1e5):
        vmf = VonMisesFisher(loc, torch.tensor(c, dtype=torch.float64))
        niv = NonIsotropicVMF(loc, torch.full((p,), c, dtype=torch.float64))
        x = torch.cat([vmf.sample((20,)), unit_vectors((20,), p, 9 + p)])
        got, ref = niv.log_prob(x), vmf.log_prob(x)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=lambda m, c=c: f"c = {c}: {m}")


def test_isotropic_concentration_equals_vmf_batched():
    p = 5
    loc = unit_vectors((4,), p, 3)
    c = torch.tensor([0.1, 2.0, 40.0, 900.0], dtype=torch.float64)
    niv = NonIsotropicVMF(loc, c[:, None].expand(4, p))
    vmf = VonMisesFisher(loc, c)
    x = unit_vectors((7, 4), p, 4)
    torch.testing.assert_close(niv.log_prob(x), vmf.log_prob(x), rtol=1e-10, atol=1e-12)


def test_log_prob_matches_reference_density_and_depends_on_the_scale_of_k():
    """The stretch map depends on k only up to scale, but θ = Kμ does not: (μ, k) and (μ, 2k) differ."""
    loc = _rand_loc(3, 5)
    k = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    x = unit_vectors((10,), 3, 6)
    a = NonIsotropicVMF(loc, k).log_prob(x)
    b = NonIsotropicVMF(loc, 2 * k).log_prob(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, ref_log_prob(loc, k, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, ref_log_prob(loc, 2 * k, x), rtol=1e-12, atol=1e-12)


# ==================================================================================================
# 3. samples against the density (moments by quadrature on S²)


@pytest.mark.parametrize(
    "k,seed", [((1.0, 50.0, 5.0), 21), ((0.3, 30.0, 200.0), 22), ((2.0, 0.5, 8.0), 23), ((0.5, 0.7, 100.0), 24)]
)
def test_sample_moments_match_quadrature(k, seed):
    torch.manual_seed(seed)
    mu, kt = _rand_loc(3, seed), torch.tensor(k, dtype=torch.float64)
    x_grid, w = sphere_grid(nivmf_pole(k))
    dens = ref_log_prob(mu, kt, x_grid).exp() * w
    assert abs(dens.sum().item() - 1.0) < 1e-6
    m1 = (dens[:, None] * x_grid).sum(0)
    m2 = (dens[:, None, None] * x_grid[:, :, None] * x_grid[:, None, :]).sum(0)
    n = 200_000
    x = NonIsotropicVMF(mu, kt).sample((n,))
    assert x.shape == (n, 3)
    assert bool(constraints.sphere.check(x).all())
    f = torch.cat([x, (x[:, :, None] * x[:, None, :]).reshape(n, 9)], 1)
    ref = torch.cat([m1, m2.reshape(9)])
    mean, se = f.mean(0), f.std(0) / math.sqrt(n)
    bad = (mean - ref).abs() > Z_MAX * se + 1e-12
    assert not bool(bad.any()), f"entries {bad.nonzero().ravel().tolist()}: z = {((mean - ref) / se)[bad].tolist()}"


@pytest.mark.parametrize("k,seed", [((1.0, 50.0), 31), ((0.3, 200.0), 32)])
def test_sample_law_on_circle_matches_quadrature_cdf(k, seed):
    """p = 2: Kolmogorov–Smirnov on the angle against the CDF of the quadrature density."""
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(seed)
    mu, kt = _rand_loc(2, seed), torch.tensor(k, dtype=torch.float64)
    n_grid = 1 << 16
    t = (torch.arange(n_grid, dtype=torch.float64) + 0.5) * (2 * math.pi / n_grid) - math.pi
    x_grid = torch.stack([torch.cos(t), torch.sin(t)], -1)
    dens = (ref_log_prob(mu, kt, x_grid).exp() * (2 * math.pi / n_grid)).numpy()
    cdf_vals = np.concatenate([[0.0], np.cumsum(dens)])
    edges = np.concatenate([t.numpy() - math.pi / n_grid, [math.pi]])
    x = NonIsotropicVMF(mu, kt).sample((20_000,))
    ang = torch.atan2(x[:, 1], x[:, 0]).numpy()
    res = scipy_stats.kstest(ang, lambda a: np.interp(a, edges, cdf_vals))
    assert res.pvalue > 1e-4, res


def test_samples_of_isotropic_nivmf_have_vmf_moments():
    """k = c·1, p = 16: E[μᵀx] = A_p(c) and E[(μᵀx)²] = 1 − (p−1)A/c (mpmath)."""
    p, c, n = 16, 12.0, 100_000
    torch.manual_seed(5)
    mu = _rand_loc(p, 5)
    x = NonIsotropicVMF(mu, torch.full((p,), c, dtype=torch.float64)).sample((n,))
    w = x @ mu
    a = float(mp_mean_length(p, c))
    second = 1 - (p - 1) * a / c
    for vals, ref in ((w, a), (w * w, second)):
        se = vals.std().item() / math.sqrt(n)
        assert abs(vals.mean().item() - ref) <= Z_MAX * se


# ==================================================================================================
# 4. gradients


@pytest.mark.parametrize("p", [2, 3, 6])
def test_gradcheck_log_prob_in_loc_and_concentration(p):
    torch.manual_seed(p)
    loc = unit_vectors((2,), p, 60 + p).requires_grad_(True)
    k = _aniso_k(p, 3.0, 0.2, 5.0, p).expand(2, p).clone().requires_grad_(True)
    x = NonIsotropicVMF(loc.detach(), k.detach()).sample((3,))

    def f(loc_, k_):
        return NonIsotropicVMF(loc_, k_, validate_args=False).log_prob(x)

    assert gradcheck(f, (loc, k), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_log_prob_in_value():
    p = 4
    loc, k = _rand_loc(p, 3), torch.tensor([0.5, 3.0, 20.0, 1.5], dtype=torch.float64)
    x = NonIsotropicVMF(loc, k).sample((3,)).requires_grad_(True)
    assert gradcheck(lambda v: NonIsotropicVMF(loc, k, validate_args=False).log_prob(v), (x,), eps=1e-6, atol=1e-7)


def test_log_prob_gradients_match_reference_density():
    """Autograd of the library density equals autograd of the reference density (p = 3)."""
    loc = unit_vectors((4,), 3, 8).requires_grad_(True)
    k = torch.tensor(
        [[0.3, 30.0, 200.0], [1.0, 50.0, 5.0], [2.0, 2.0, 2.0], [1e-2, 1.0, 7.0]],
        dtype=torch.float64, requires_grad=True,
    )
    x = unit_vectors((5, 4), 3, 9)
    g_lib = torch.autograd.grad(NonIsotropicVMF(loc, k).log_prob(x).sum(), (loc, k))
    g_ref = torch.autograd.grad(ref_log_prob(loc, k, x).sum(), (loc, k))
    # loc enters as loc/‖loc‖: compare tangent parts (the reference has tangent gradients by construction)
    mu = loc.detach()
    tangent = g_lib[0] - (g_lib[0] * mu).sum(-1, keepdim=True) * mu
    torch.testing.assert_close(tangent, g_ref[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_lib[1], g_ref[1], rtol=1e-9, atol=1e-10)


def _test_fn(x, a, b):
    return x @ a + (x @ b) ** 2


@pytest.mark.parametrize("k,seed", [((2.0, 15.0, 6.0), 41), ((0.5, 8.0, 30.0), 42), ((4.0, 4.0, 4.0), 43)])
def test_rsample_gradients_unbiased_against_quadrature(k, seed):
    """MC mean of ∇_{loc, k} g(x) for g(x) = aᵀx + (bᵀx)² (autograd through rsample, one parameter
    copy per sample) equals ∇ of ∫ g p dx by quadrature on S² (reference density, torch autograd),
    per coordinate within 5 s.e. Loc gradients are compared on the tangent space."""
    torch.manual_seed(seed)
    mu = _rand_loc(3, seed)
    a = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    b = torch.tensor([0.3, 0.9, -0.8], dtype=torch.float64)
    kt = torch.tensor(k, dtype=torch.float64)
    proj = torch.eye(3, dtype=torch.float64) - torch.outer(mu, mu)

    # quadrature reference
    loc_q, k_q = mu.clone().requires_grad_(True), kt.clone().requires_grad_(True)
    x_grid, w = sphere_grid(nivmf_pole(k), n_geo=20, nodes=10, n_phi=256)
    value = (ref_log_prob(loc_q, k_q, x_grid).exp() * w * _test_fn(x_grid, a, b)).sum()
    g_loc_ref, g_k_ref = torch.autograd.grad(value, (loc_q, k_q))
    g_loc_ref = proj @ g_loc_ref

    # Monte Carlo
    n = 40_000
    loc = mu.expand(n, 3).clone().requires_grad_(True)
    conc = kt.expand(n, 3).clone().requires_grad_(True)
    x = NonIsotropicVMF(loc, conc).rsample()
    assert x.shape == (n, 3) and x.requires_grad
    _test_fn(x, a, b).sum().backward()
    g_loc, g_k = loc.grad @ proj, conc.grad
    assert bool(torch.isfinite(g_loc).all() and torch.isfinite(g_k).all())
    for name, g, ref in (("loc", g_loc, g_loc_ref), ("concentration", g_k, g_k_ref)):
        mean, se = g.mean(0), g.std(0) / math.sqrt(n)
        bad = (mean - ref).abs() > Z_MAX * se + 1e-9
        assert not bool(bad.any()), f"{name}: mean {mean.tolist()}, quadrature {ref.tolist()}, se {se.tolist()}"


def test_rsample_gradients_shared_parameters_sum_over_samples():
    """Unbatched parameters: gradient of the sample mean, over repetitions, matches the quadrature value."""
    torch.manual_seed(44)
    k = (1.0, 6.0, 20.0)
    mu, kt = _rand_loc(3, 44), torch.tensor(k, dtype=torch.float64)
    a = torch.tensor([1.0, 0.5, -0.3], dtype=torch.float64)
    b = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    k_q = kt.clone().requires_grad_(True)
    x_grid, w = sphere_grid(nivmf_pole(k), n_geo=20, nodes=10, n_phi=256)
    (g_ref,) = torch.autograd.grad((ref_log_prob(mu, k_q, x_grid).exp() * w * _test_fn(x_grid, a, b)).sum(), (k_q,))
    grads = []
    for _ in range(40):
        conc = kt.clone().requires_grad_(True)
        x = NonIsotropicVMF(mu, conc).rsample((1000,))
        _test_fn(x, a, b).mean().backward()
        grads.append(conc.grad.clone())
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(grads))
    assert bool(((mean - g_ref).abs() <= Z_MAX * se + 1e-9).all()), (mean, g_ref, se)


@pytest.mark.parametrize(
    "p,k", [(3, (0.1, 1000.0, 20.0)), (3, (1e-3, 1.0, 1e3)), (3, (0.02, 1.0, 300.0)), (16, None), (64, None)]
)
def test_rsample_gradients_finite_for_strong_anisotropy(p, k):
    torch.manual_seed(p)
    kt = torch.tensor(k, dtype=torch.float64) if k is not None else _aniso_k(p, 30.0, 0.01, 100.0, p)
    loc = _rand_loc(p, 70 + p).requires_grad_(True)
    conc = kt.clone().requires_grad_(True)
    x = NonIsotropicVMF(loc, conc).rsample((2000,))
    assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(
        torch.linalg.vector_norm(x, dim=-1), torch.ones(2000, dtype=torch.float64), rtol=0, atol=1e-12
    )
    (x @ torch.linspace(-1, 1, p, dtype=torch.float64)).sum().backward()
    assert bool(torch.isfinite(loc.grad).all() and torch.isfinite(conc.grad).all())
    assert loc.grad.abs().sum() > 0 and conc.grad.abs().sum() > 0


def test_sample_is_detached_and_rsample_differentiable():
    loc = _rand_loc(3, 1).requires_grad_(True)
    k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    d = NonIsotropicVMF(loc, k)
    assert d.has_rsample
    assert not d.sample((4,)).requires_grad
    assert d.rsample((4,)).requires_grad


# ==================================================================================================
# 5. Monte-Carlo kernels and estimators


def _mp_log_el_tempered(p, mu_p, k_p, mu_q, k_q, temperature=1.0) -> float:
    """log E_{x~vMF(μp,κp)}[exp(log vMF(x; μq, κq)/T)] = log C(κq)/T + log C(κp) − log C(‖κpμp + (κq/T)μq‖)."""
    with mp.workdps(WORK_DPS):
        t = mpf(temperature)
        s = [mpf(k_p) * a + mpf(k_q) / t * b for a, b in zip(mu_p, mu_q)]
        r = mp.sqrt(mp.fsum(v * v for v in s))
        return float(mp_log_c(p, k_q) / t + mp_log_c(p, k_p) - mp_log_c(p, r))


def _mp_relative_variance(p, mu_p, k_p, mu_q, k_q, temperature=1.0) -> float:
    """Var(w)/E[w]² for w = q(x)^{1/T}, x ~ p (both from the MGF, mpmath)."""
    log_m1 = _mp_log_el_tempered(p, mu_p, k_p, mu_q, k_q, temperature)
    log_m2 = _mp_log_el_tempered(p, mu_p, k_p, mu_q, k_q, temperature / 2)  # q^{2/T}
    # q^{2/T} = exp(2 log q / T): _mp_log_el_tempered(T/2) gives log C(κq)·2/T + … as required
    return math.expm1(log_m2 - 2 * log_m1)


def _mp_kurtosis(p, mu_p, k_p, mu_q, k_q) -> float:
    """E[(w − E w)⁴]/Var(w)² for w = q(x), x ~ p; moments E[w^k] from the MGF (q^k is q at T = 1/k)."""
    with mp.workdps(WORK_DPS):
        log_m1 = mpf(_mp_log_el_tempered(p, mu_p, k_p, mu_q, k_q))
        m2, m3, m4 = (
            mp.exp(mpf(_mp_log_el_tempered(p, mu_p, k_p, mu_q, k_q, 1.0 / k)) - k * log_m1) for k in (2, 3, 4)
        )
        return float((m4 - 4 * m3 + 6 * m2 - 3) / (m2 - 1) ** 2)


def _iso_pair(p, k_p, k_q, cos, seed, dtype=torch.float64):
    """vMF p and isotropic nivMF q = vMF(μq, κq) with μpᵀμq = cos (exact inputs for mpmath)."""
    g = torch.Generator().manual_seed(seed)
    mu_p = _unit(torch.randn(p, generator=g, dtype=torch.float64))
    v = torch.randn(p, generator=g, dtype=torch.float64)
    v = _unit(v - (v @ mu_p) * mu_p)
    mu_q = _unit(cos * mu_p + math.sqrt(1 - cos * cos) * v)
    return mu_p.to(dtype), mu_q.to(dtype)


def _mp_vecs(mu_p, mu_q):
    return mp_unit(mu_p), mp_unit(mu_q)


@pytest.mark.parametrize("p,k_p,k_q,cos", [(3, 5.0, 8.0, 0.8), (16, 30.0, 15.0, 0.9)])
def test_mc_kernel_isotropic_converges_to_closed_form(p, k_p, k_q, cos):
    """q = nivMF(μq, κq·1): MC log EL → closed form; RMS error shrinks with S; at large S the estimates
    match the delta method (bias −(r−1)/(2S), sd √((r−1)/S), r = E[q²]/E[q]²)."""
    torch.manual_seed(51 + p)
    mu_p, mu_q = _iso_pair(p, k_p, k_q, cos, seed=p)
    mp_p, mp_q = _mp_vecs(mu_p, mu_q)
    truth = _mp_log_el_tempered(p, mp_p, k_p, mp_q, k_q)
    rv = _mp_relative_variance(p, mp_p, k_p, mp_q, k_q)
    assert 0.05 < rv < 5.0, rv  # the test has teeth and the delta method is sensible at large S
    reps = 300
    pdist = VonMisesFisher(mu_p.expand(reps, p), torch.full((reps,), k_p, dtype=torch.float64))
    q = NonIsotropicVMF(mu_q, torch.full((p,), k_q, dtype=torch.float64))
    rms = {}
    for s in (4, 64, 2048):
        est = log_expected_likelihood(pdist, q, num_samples=s)
        assert est.shape == (reps,) and est.dtype == torch.float64
        err = est - truth
        rms[s] = err.square().mean().sqrt().item()
    assert rms[2048] < rms[64] < rms[4], rms
    s = 2048
    sd_delta = math.sqrt(rv / s)
    bias_delta = -rv / (2 * s)
    mean_err = err.mean().item()
    assert abs(mean_err - bias_delta) <= Z_MAX * sd_delta / math.sqrt(reps), (mean_err, bias_delta, sd_delta)
    assert 0.75 < err.std().item() / sd_delta < 1.3, (err.std().item(), sd_delta)
    assert abs(err.std().item() / sd_delta - 1) < 0.3
    assert rms[2048] / abs(truth) < 0.05


def test_mc_kernel_jensen_bias_is_negative():
    p, k_p, k_q, cos = 3, 10.0, 20.0, 0.6
    torch.manual_seed(61)
    mu_p, mu_q = _iso_pair(p, k_p, k_q, cos, seed=61)
    mp_p, mp_q = _mp_vecs(mu_p, mu_q)
    truth = _mp_log_el_tempered(p, mp_p, k_p, mp_q, k_q)
    reps = 4000
    pdist = VonMisesFisher(mu_p.expand(reps, p), torch.full((reps,), k_p, dtype=torch.float64))
    q = NonIsotropicVMF(mu_q, torch.full((p,), k_q, dtype=torch.float64))
    err = log_expected_likelihood(pdist, q, num_samples=4) - truth
    z = err.mean().item() / (err.std().item() / math.sqrt(reps))
    assert z < -4.0, f"mean error {err.mean().item()}, z = {z} (log-mean-exp must be biased low)"


def test_mc_kernel_requires_num_samples_for_nivmf():
    p = 3
    pdist = VonMisesFisher(_rand_loc(p, 1), torch.tensor(3.0, dtype=torch.float64))
    q = NonIsotropicVMF(_rand_loc(p, 2), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    with pytest.raises((ValueError, TypeError)):
        log_expected_likelihood(pdist, q)
    with pytest.raises((ValueError, TypeError)):
        pairwise_log_expected_likelihood(pdist.expand((2,)), q.expand((3,)))


def _pair_batches(p=5, b=3, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pdist = VonMisesFisher(unit_vectors((b,), p, seed + 1), 2.0 + 20 * torch.rand(b, generator=g, dtype=torch.float64))
    q = NonIsotropicVMF(unit_vectors((c,), p, seed + 2), 0.5 + 10 * torch.rand(c, p, generator=g, dtype=torch.float64))
    return pdist, q


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_pairwise_mc_kernel_equals_single_pairs_with_same_seed(temperature):
    """Seeded identically, pairwise(p[B], q[C])[:, c] = log_expected_likelihood(p[B], q_c): the same
    samples of p are used for every proxy."""
    pdist, q = _pair_batches()
    s = 64
    torch.manual_seed(123)
    pw = pairwise_log_expected_likelihood(pdist, q, num_samples=s, temperature=temperature)
    assert pw.shape == (3, 4) and pw.dtype == torch.float64
    for c in range(4):
        qc = NonIsotropicVMF(q.loc[c], q.concentration[c])
        torch.manual_seed(123)
        single = log_expected_likelihood(pdist, qc, num_samples=s, temperature=temperature)
        assert single.shape == (3,)
        torch.testing.assert_close(pw[:, c], single, rtol=1e-10, atol=1e-10)


def test_pairwise_mc_kernel_matches_single_pairs_statistically():
    """Independent seeds, large S: pairwise entries and single-pair estimates agree to within a few
    standard deviations of the estimator (estimated from replicates of the single-pair estimate)."""
    pdist, q = _pair_batches(seed=5)
    s, reps = 512, 30
    torch.manual_seed(7)
    pw = pairwise_log_expected_likelihood(pdist, q, num_samples=s)
    for b in range(3):
        pb = VonMisesFisher(pdist.loc[b].expand(reps, 5), pdist.concentration[b].expand(reps))
        for c in range(4):
            qc = NonIsotropicVMF(q.loc[c], q.concentration[c])
            est = log_expected_likelihood(pb, qc, num_samples=s)
            sd = est.std().item()
            assert abs(pw[b, c].item() - est.mean().item()) <= Z_MAX * sd * math.sqrt(1 + 1 / reps), (b, c)


def test_pairwise_mc_kernel_isotropic_matches_closed_form():
    p, b, c = 4, 3, 5
    torch.manual_seed(8)
    mu_p, mu_q = unit_vectors((b,), p, 81), unit_vectors((c,), p, 82)
    kp = torch.tensor([5.0, 12.0, 30.0], dtype=torch.float64)
    kq = torch.tensor([3.0, 8.0, 20.0, 6.0, 15.0], dtype=torch.float64)
    pdist = VonMisesFisher(mu_p, kp)
    q = NonIsotropicVMF(mu_q, kq[:, None].expand(c, p))
    s = 20_000
    pw = pairwise_log_expected_likelihood(pdist, q, num_samples=s)
    assert pw.shape == (b, c)
    for i in range(b):
        for j in range(c):
            mp_p, mp_q = mp_unit(mu_p[i]), mp_unit(mu_q[j])
            truth = _mp_log_el_tempered(p, mp_p, float(kp[i]), mp_q, float(kq[j]))
            rv = _mp_relative_variance(p, mp_p, float(kp[i]), mp_q, float(kq[j]))
            sd = math.sqrt(rv / s)
            assert abs(pw[i, j].item() - truth + rv / (2 * s)) <= Z_MAX * sd, (i, j, pw[i, j].item(), truth, sd)


@pytest.mark.parametrize("temperature", [0.7, 2.0, 8.0])
def test_mc_kernel_temperature_isotropic_matches_closed_form(temperature):
    """log E_p[exp(log q(x)/T)] with q = nivMF(μq, κq·1) vs its closed form (mpmath)."""
    p, k_p, k_q, cos = 3, 8.0, 12.0, 0.5
    torch.manual_seed(91)
    mu_p, mu_q = _iso_pair(p, k_p, k_q, cos, seed=91)
    mp_p, mp_q = _mp_vecs(mu_p, mu_q)
    truth = _mp_log_el_tempered(p, mp_p, k_p, mp_q, k_q, temperature)
    truth_t1 = _mp_log_el_tempered(p, mp_p, k_p, mp_q, k_q, 1.0)
    rv = _mp_relative_variance(p, mp_p, k_p, mp_q, k_q, temperature)
    s, reps = 4096, 50
    pdist = VonMisesFisher(mu_p.expand(reps, p), torch.full((reps,), k_p, dtype=torch.float64))
    q = NonIsotropicVMF(mu_q, torch.full((p,), k_q, dtype=torch.float64))
    est = log_expected_likelihood(pdist, q, num_samples=s, temperature=temperature)
    err = est - truth
    sd = math.sqrt(rv / s)
    assert abs(err.mean().item() + rv / (2 * s)) <= Z_MAX * sd / math.sqrt(reps), (err.mean().item(), sd)
    assert abs(truth - truth_t1) > 20 * sd / math.sqrt(reps), "the temperature would go unnoticed"


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 10.0])
@pytest.mark.parametrize("p", [2, 3, 16, 128])
def test_closed_form_kernel_with_temperature_for_vmf_pairs(p, temperature):
    """Two vMFs: the tempered expected likelihood is the closed form (no sampling), single and pairwise."""
    mu_p, mu_q = unit_vectors((3,), p, 200 + p), unit_vectors((4,), p, 300 + p)
    kp = torch.tensor([0.5, 20.0, 700.0], dtype=torch.float64)
    kq = torch.tensor([3.0, 60.0, 1e-2, 250.0], dtype=torch.float64)
    pdist, qdist = VonMisesFisher(mu_p, kp), VonMisesFisher(mu_q, kq)
    pw = pairwise_log_expected_likelihood(pdist, qdist, temperature=temperature)
    single = log_expected_likelihood(pdist, VonMisesFisher(mu_q[:3], kq[:3]), temperature=temperature)
    assert pw.shape == (3, 4) and single.shape == (3,)
    for i in range(3):
        mp_p = mp_unit(mu_p[i])
        for j in range(4):
            truth = _mp_log_el_tempered(p, mp_p, float(kp[i]), mp_unit(mu_q[j]), float(kq[j]), temperature)
            scale = 1.0 + abs(truth) + float(kp[i]) + float(kq[j]) / temperature
            assert abs(pw[i, j].item() - truth) <= 1e-11 * scale, (i, j, pw[i, j].item(), truth)
            if i == j:
                assert abs(single[i].item() - truth) <= 1e-11 * scale, (i, single[i].item(), truth)


def test_temperature_one_is_the_default():
    pdist, q = _pair_batches(seed=3)
    torch.manual_seed(1)
    a = pairwise_log_expected_likelihood(pdist, q, num_samples=32)
    torch.manual_seed(1)
    b = pairwise_log_expected_likelihood(pdist, q, num_samples=32, temperature=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mc_kernel_is_differentiable_and_gradient_converges():
    """∂/∂κq of the MC log EL with q = nivMF(μq, c·1) (sum over the k_d) and ∂/∂κp match the derivatives
    of the closed form (mpmath), over replicates (the O(1/S) bias is far below the tolerance)."""
    p, k_p, k_q, cos = 3, 10.0, 15.0, 0.7
    torch.manual_seed(92)
    mu_p, mu_q = _iso_pair(p, k_p, k_q, cos, seed=92)
    mp_p, mp_q = _mp_vecs(mu_p, mu_q)
    with mp.workdps(WORK_DPS):
        c = mp_dot_(mp_p, mp_q)
        r = mp.sqrt(mpf(k_p) ** 2 + mpf(k_q) ** 2 + 2 * mpf(k_p) * mpf(k_q) * c)
        a_r = mp_mean_length(p, r)
        d_kq = float(-mp_mean_length(p, k_q) + a_r * (mpf(k_q) + mpf(k_p) * c) / r)
        d_kp = float(-mp_mean_length(p, k_p) + a_r * (mpf(k_p) + mpf(k_q) * c) / r)
    reps, s = 200, 1024
    kp = torch.full((reps,), k_p, dtype=torch.float64, requires_grad=True)
    kq = torch.full((reps, p), k_q, dtype=torch.float64, requires_grad=True)
    est = log_expected_likelihood(
        VonMisesFisher(mu_p.expand(reps, p), kp), NonIsotropicVMF(mu_q.expand(reps, p), kq), num_samples=s
    )
    est.sum().backward()
    for name, g, ref in (("kappa_p", kp.grad, d_kp), ("k_q", kq.grad.sum(-1), d_kq)):
        assert bool(torch.isfinite(g).all())
        se = g.std().item() / math.sqrt(reps)
        assert abs(g.mean().item() - ref) <= Z_MAX * se + 1e-3 * abs(ref), (name, g.mean().item(), ref, se)


def mp_dot_(a, b):
    with mp.workdps(WORK_DPS):
        return mp.fsum(x * y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# monte_carlo module


def test_monte_carlo_estimate_is_a_named_tuple():
    est = monte_carlo.MonteCarloEstimate(torch.tensor(1.0), torch.tensor(0.1))
    value, se = est
    assert est.value is value and est.standard_error is se
    assert isinstance(est, tuple)


# The heavy-tailed middle case (kurtosis of q(x) ≈ 2400) needs 500k samples for its standard error to be
# checked with teeth: the sample sd of n draws has relative s.e. √((kurtosis − 1)/(4n)) (delta method).
@pytest.mark.parametrize(
    "p,k1,k2,cos,n", [(3, 10.0, 5.0, 0.3, 20_000), (16, 50.0, 80.0, 0.95, 500_000), (64, 5.0, 1.0, -0.5, 20_000)]
)
def test_mc_expected_likelihood_matches_closed_form_for_vmf_pairs(p, k1, k2, cos, n):
    torch.manual_seed(int(k1) + p)
    mu_p, mu_q = _iso_pair(p, k1, k2, cos, seed=p + 1)
    mp_p, mp_q = _mp_vecs(mu_p, mu_q)
    truth = math.exp(_mp_log_el_tempered(p, mp_p, k1, mp_q, k2))
    est = monte_carlo.expected_likelihood(
        VonMisesFisher(mu_p, torch.tensor(k1, dtype=torch.float64)),
        VonMisesFisher(mu_q, torch.tensor(k2, dtype=torch.float64)),
        num_samples=n,
    )
    assert isinstance(est, monte_carlo.MonteCarloEstimate)
    assert est.value.shape == () and est.standard_error.shape == ()
    assert abs(est.value.item() - truth) <= Z_MAX * est.standard_error.item(), (est, truth)
    # the reported standard error is the true one (from the MGF) to within the sampling noise of a sample sd
    sd_true = truth * math.sqrt(_mp_relative_variance(p, mp_p, k1, mp_q, k2) / n)
    tolerance = Z_MAX * math.sqrt((_mp_kurtosis(p, mp_p, k1, mp_q, k2) - 1) / (4 * n))
    assert tolerance < 0.2, tolerance  # the check has teeth
    assert abs(est.standard_error.item() / sd_true - 1) <= tolerance, (est.standard_error.item(), sd_true, tolerance)


@pytest.mark.parametrize("p,k1,k2,cos", [(3, 10.0, 5.0, 0.3), (16, 50.0, 80.0, 0.95), (64, 5.0, 20.0, -0.5)])
def test_mc_kl_divergence_of_vmfs_matches_closed_form(p, k1, k2, cos):
    torch.manual_seed(int(k2) + p)
    mu_p, mu_q = _iso_pair(p, k1, k2, cos, seed=p + 2)
    d1 = VonMisesFisher(mu_p, torch.tensor(k1, dtype=torch.float64))
    d2 = VonMisesFisher(mu_q, torch.tensor(k2, dtype=torch.float64))
    est = monte_carlo.kl_divergence(d1, d2, num_samples=20_000)
    truth = float(mp_kl_vmf_vmf(p, mp_unit(mu_p), k1, mp_unit(mu_q), k2))
    assert abs(est.value.item() - truth) <= Z_MAX * est.standard_error.item(), (est, truth)
    closed = torch_kl(d1, d2).item()
    assert abs(est.value.item() - closed) <= Z_MAX * est.standard_error.item()


@pytest.mark.parametrize("p,kappa", [(3, 0.5), (3, 40.0), (16, 100.0), (128, 300.0)])
def test_mc_entropy_of_vmf_matches_closed_form(p, kappa):
    torch.manual_seed(p + int(kappa))
    d = VonMisesFisher(_rand_loc(p, p), torch.tensor(kappa, dtype=torch.float64))
    n = 20_000
    est = monte_carlo.entropy(d, num_samples=n)
    truth = float(mp_entropy(p, kappa))
    assert abs(est.value.item() - truth) <= Z_MAX * est.standard_error.item(), (est, truth)
    assert abs(est.value.item() - d.entropy().item()) <= Z_MAX * est.standard_error.item()
    # Var[log f(x)] = κ² Var[μᵀx] = κ² A_p'(κ)
    sd_true = kappa * math.sqrt(float(mp_mean_length_deriv(p, kappa))) / math.sqrt(n)
    assert 0.9 < est.standard_error.item() / sd_true < 1.1, (est.standard_error.item(), sd_true)


@pytest.mark.parametrize("k,seed", [((1.0, 50.0, 5.0), 101), ((0.3, 30.0, 200.0), 102)])
def test_mc_entropy_of_nivmf_matches_quadrature(k, seed):
    torch.manual_seed(seed)
    mu, kt = _rand_loc(3, seed), torch.tensor(k, dtype=torch.float64)
    x, w = sphere_grid(nivmf_pole(k))
    lp = ref_log_prob(mu, kt, x)
    truth = -(lp.exp() * lp * w).sum().item()
    est = monte_carlo.entropy(NonIsotropicVMF(mu, kt), num_samples=50_000)
    assert est.value.shape == ()
    assert abs(est.value.item() - truth) <= Z_MAX * est.standard_error.item(), (est, truth)


def test_mc_entropy_of_isotropic_nivmf_equals_vmf_entropy():
    p, c = 16, 25.0
    torch.manual_seed(11)
    est = monte_carlo.entropy(
        NonIsotropicVMF(_rand_loc(p, 11), torch.full((p,), c, dtype=torch.float64)), num_samples=20_000
    )
    assert abs(est.value.item() - float(mp_entropy(p, c))) <= Z_MAX * est.standard_error.item()


def test_mc_kl_nivmf_batched_and_against_itself():
    p = 4
    torch.manual_seed(12)
    loc = unit_vectors((2,), p, 12)
    k = torch.tensor([[0.5, 3.0, 9.0, 1.0], [2.0, 2.0, 30.0, 0.2]], dtype=torch.float64)
    d = NonIsotropicVMF(loc, k)
    self_kl = monte_carlo.kl_divergence(d, d, num_samples=100)
    assert self_kl.value.shape == (2,) and self_kl.standard_error.shape == (2,)
    torch.testing.assert_close(self_kl.value, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    # KL(isotropic nivMF ‖ vMF with the same parameters) = 0 sample by sample
    iso = NonIsotropicVMF(loc, torch.full((2, p), 7.0, dtype=torch.float64))
    vmf = VonMisesFisher(loc, torch.full((2,), 7.0, dtype=torch.float64))
    est = monte_carlo.kl_divergence(iso, vmf, num_samples=100)
    assert est.value.abs().max().item() < 1e-9
    # KL(nivMF ‖ vMF) ≥ 0 and ≈ quadrature on S² in a p = 3 case
    d3 = NonIsotropicVMF(_rand_loc(3, 13), torch.tensor([1.0, 10.0, 4.0], dtype=torch.float64))
    v3 = VonMisesFisher(_rand_loc(3, 14), torch.tensor(6.0, dtype=torch.float64))
    x, w = sphere_grid(nivmf_pole((1.0, 10.0, 4.0)))
    lp = ref_log_prob(d3.loc, d3.concentration, x)
    truth = ((lp - v3.log_prob(x)) * lp.exp() * w).sum().item()
    est = monte_carlo.kl_divergence(d3, v3, num_samples=20_000)
    assert truth > 0
    assert abs(est.value.item() - truth) <= Z_MAX * est.standard_error.item(), (est, truth)


def test_monte_carlo_dimension_mismatch_raises():
    a = VonMisesFisher(_rand_loc(3, 1), torch.tensor(1.0, dtype=torch.float64))
    b = NonIsotropicVMF(_rand_loc(4, 1), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        monte_carlo.kl_divergence(a, b, num_samples=10)
    with pytest.raises(ValueError):
        monte_carlo.expected_likelihood(a, b, num_samples=10)


# ==================================================================================================
# 6. bad input


def test_bad_concentration_raises_value_error():
    loc = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for bad in (
        [1.0, 0.0, 2.0], [1.0, -1.0, 2.0], [-1e-30, 1.0, 1.0], [1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0]
    ):
        with pytest.raises(ValueError):
            NonIsotropicVMF(loc, torch.tensor(bad, dtype=torch.float64), validate_args=True)
    with pytest.raises(ValueError):  # one bad row of a batch
        NonIsotropicVMF(loc, torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 3.0]], dtype=torch.float64), validate_args=True)


def test_wrong_length_concentration_raises_value_error():
    loc = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for shape in ((2,), (4,), (3, 1), (3, 2), ()):
        with pytest.raises(ValueError):
            NonIsotropicVMF(loc, torch.ones(shape, dtype=torch.float64), validate_args=False)
    with pytest.raises(ValueError):  # batch shapes that do not broadcast
        NonIsotropicVMF(loc.expand(2, 3), torch.ones(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError):  # p = 1
        NonIsotropicVMF(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))


def test_non_unit_loc_and_off_sphere_value_raise_with_validation():
    k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with pytest.raises(ValueError):
        NonIsotropicVMF(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), k, validate_args=True)
    with pytest.raises(ValueError):
        NonIsotropicVMF(torch.tensor([0.0, 0.6, 0.9], dtype=torch.float64), k, validate_args=True)
    d = NonIsotropicVMF(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), k, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.0, 0.6, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.1]], dtype=torch.float64))


def test_validation_off_uses_normalised_loc():
    k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    d = NonIsotropicVMF(torch.tensor([0.0, 0.6, 0.9], dtype=torch.float64), k, validate_args=False)
    ref = NonIsotropicVMF(_unit(torch.tensor([0.0, 0.6, 0.9], dtype=torch.float64)), k)
    x = unit_vectors((5,), 3, 1)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)


def test_no_closed_form_properties_raise_not_implemented():
    d = NonIsotropicVMF(_rand_loc(3, 1), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    for name in ("mean", "mode", "variance"):
        with pytest.raises(NotImplementedError):
            getattr(d, name)
    with pytest.raises(NotImplementedError):
        d.entropy()


# ==================================================================================================
# 7. shapes, dtypes, expand, Pyro


def test_support_flags_and_dim():
    d = NonIsotropicVMF(_rand_loc(5, 1), torch.ones(5, dtype=torch.float64))
    assert d.support is constraints.sphere
    assert d.has_rsample is True
    assert d.event_shape == (5,) and d.batch_shape == ()
    assert isinstance(d.dim, int) and d.dim == 5


def test_batch_broadcasting_loc_3x1_with_concentration_4():
    p = 5
    loc = unit_vectors((3, 1), p, 2)
    k = 0.5 + torch.rand(4, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    d = NonIsotropicVMF(loc, k)
    assert d.batch_shape == (3, 4) and d.event_shape == (p,)
    x = d.rsample((2,))
    assert x.shape == (2, 3, 4, p)
    lp = d.log_prob(x)
    assert lp.shape == (2, 3, 4)
    for i in range(3):
        for j in range(4):
            single = NonIsotropicVMF(loc[i, 0], k[j])
            torch.testing.assert_close(lp[:, i, j], single.log_prob(x[:, i, j]), rtol=1e-12, atol=1e-12)
    # a value broadcast against the batch
    v = unit_vectors((6, 1, 1), p, 3)
    assert d.log_prob(v).shape == (6, 3, 4)


@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)], ids=lambda s: "s" + "x".join(map(str, s)))
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=lambda s: "b" + "x".join(map(str, s)))
def test_sample_shapes(sample_shape, batch_shape):
    p = 4
    torch.manual_seed(0)
    d = NonIsotropicVMF(unit_vectors(batch_shape, p, 1), torch.full(batch_shape + (p,), 2.0, dtype=torch.float64))
    for method in (d.sample, d.rsample):
        x = method(torch.Size(sample_shape))
        assert x.shape == torch.Size(sample_shape) + torch.Size(batch_shape) + (p,)
        assert bool(constraints.sphere.check(x).all())
        assert d.log_prob(x).shape == torch.Size(sample_shape) + torch.Size(batch_shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dtype_preserved(dtype):
    p = 6
    torch.manual_seed(0)
    loc = unit_vectors((2,), p, 1, dtype)
    k = torch.tensor([0.5, 1.0, 3.0, 10.0, 50.0, 200.0], dtype=dtype)
    d = NonIsotropicVMF(loc, k)
    assert d.loc.dtype == dtype and d.concentration.dtype == dtype
    x = d.rsample((3,))
    assert x.dtype == dtype and d.sample().dtype == dtype
    lp = d.log_prob(x)
    assert lp.dtype == dtype and bool(torch.isfinite(lp).all())
    assert d.expand((4, 2)).rsample().dtype == dtype


def test_float32_log_prob_matches_float64():
    p = 8
    loc32 = unit_vectors((), p, 3, torch.float32)
    k32 = _aniso_k(p, 20.0, 0.1, 10.0, 3).float()
    x32 = unit_vectors((10,), p, 4, torch.float32)
    got = NonIsotropicVMF(loc32, k32).log_prob(x32)
    ref = NonIsotropicVMF(_unit(loc32.double()), k32.double()).log_prob(_unit(x32.double()))
    scale = ref.abs() + 1.0 + (k32.double() * loc32.double()).norm()
    assert bool(((got.double() - ref).abs() <= 1e-5 * scale).all())


def test_expand_keeps_class_and_values():
    p = 3
    torch.manual_seed(0)
    d = NonIsotropicVMF(_rand_loc(p, 1), torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64))
    e = d.expand((4, 2))
    assert type(e) is NonIsotropicVMF
    assert e.batch_shape == (4, 2) and e.event_shape == (p,)
    assert e.loc.shape == (4, 2, p) and e.concentration.shape == (4, 2, p)
    x = unit_vectors((4, 2), p, 5)
    torch.testing.assert_close(e.log_prob(x), d.log_prob(x), rtol=1e-14, atol=1e-14)
    assert e.rsample((3,)).shape == (3, 4, 2, p)
    assert e._validate_args == d._validate_args
    with pytest.raises((ValueError, RuntimeError)):
        NonIsotropicVMF(unit_vectors((3,), p, 1), torch.ones(3, p, dtype=torch.float64)).expand((4,))


def test_pyro_sample_inside_plates():
    pyro.set_rng_seed(0)
    p = 3
    loc = _rand_loc(p, 2)
    k = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64)

    def model():
        with pyro.plate("outer", 2, dim=-2):
            with pyro.plate("inner", 4, dim=-1):
                return pyro.sample("z", NonIsotropicVMF(loc, k))

    trace = poutine.trace(model).get_trace()
    node = trace.nodes["z"]
    assert type(node["fn"]) is NonIsotropicVMF
    assert node["fn"].batch_shape == (2, 4)
    assert node["value"].shape == (2, 4, p)
    assert bool(constraints.sphere.check(node["value"]).all())
    trace.compute_log_prob()
    assert node["log_prob"].shape == (2, 4)
    torch.testing.assert_close(
        trace.log_prob_sum(), NonIsotropicVMF(loc, k).log_prob(node["value"]).sum(), rtol=1e-12, atol=0
    )


def test_pyro_svi_with_nivmf_guide_step():
    """Trace_ELBO with a reparameterised nivMF guide: a step runs and gives finite gradients."""
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    p = 3
    data = unit_vectors((10,), p, 9)

    def model():
        z = pyro.sample(
            "z",
            VonMisesFisher(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)),
        )
        with pyro.plate("data", 10):
            pyro.sample("x", VonMisesFisher(z, torch.tensor(5.0, dtype=torch.float64)), obs=data)

    def guide():
        loc = pyro.param("loc", torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64), constraint=constraints.sphere)
        k = pyro.param("k", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), constraint=constraints.positive)
        pyro.sample("z", NonIsotropicVMF(loc, k))

    svi = SVI(model, guide, Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(3):
        loss = svi.step()
        assert math.isfinite(loss)
    k = pyro.param("k")
    assert bool(torch.isfinite(k).all() and (k > 0).all())
    pyro.clear_param_store()


# --------------------------------------------------------------------------------------------------
# a learnable (tensor) temperature


def _tempered_pairs(dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    p = 6
    mu_p = torch.nn.functional.normalize(torch.randn(3, p, generator=g, dtype=dtype), dim=-1)
    mu_q = torch.nn.functional.normalize(torch.randn(4, p, generator=g, dtype=dtype), dim=-1)
    kp = torch.rand(3, generator=g, dtype=dtype) * 20 + 1
    kq = torch.rand(4, generator=g, dtype=dtype) * 20 + 1
    kvec = torch.rand(4, p, generator=g, dtype=dtype) * 20 + 1
    return VonMisesFisher(mu_p, kp), VonMisesFisher(mu_q, kq), NonIsotropicVMF(mu_q, kvec)


@pytest.mark.parametrize("kind", ["closed", "mc"])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_tensor_temperature_equals_float_temperature(kind, t):
    images, vmf_proxies, nivmf_proxies = _tempered_pairs()
    q = vmf_proxies if kind == "closed" else nivmf_proxies
    torch.manual_seed(0)
    with_float = pairwise_log_expected_likelihood(images, q, num_samples=4, temperature=t)
    torch.manual_seed(0)
    with_tensor = pairwise_log_expected_likelihood(
        images, q, num_samples=4, temperature=torch.tensor(t, dtype=torch.float64)
    )
    torch.testing.assert_close(with_tensor, with_float, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["closed", "mc"])
def test_tensor_temperature_gradcheck(kind):
    images, vmf_proxies, nivmf_proxies = _tempered_pairs()
    q = vmf_proxies if kind == "closed" else nivmf_proxies

    def f(temperature):
        torch.manual_seed(1)  # the same samples at every evaluation: a deterministic function of T
        return pairwise_log_expected_likelihood(images, q, num_samples=3, temperature=temperature)

    assert gradcheck(f, (torch.tensor(0.7, dtype=torch.float64, requires_grad=True),))


def test_tensor_temperature_rejects_bad_values():
    images, vmf_proxies, _ = _tempered_pairs()
    with pytest.raises(ValueError, match="temperature must be positive"):
        pairwise_log_expected_likelihood(images, vmf_proxies, temperature=torch.tensor(-1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="0-dim"):
        pairwise_log_expected_likelihood(images, vmf_proxies, temperature=torch.ones(2, dtype=torch.float64))
