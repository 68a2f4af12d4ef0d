"""KL divergences (registered with torch.distributions) and the expected-likelihood / probability
product kernels, against mpmath closed forms computed here, Monte Carlo, and gradcheck.

References are computed from mpmath Bessel functions (tests/conftest.py); Monte Carlo estimates use
the library's samplers only to draw points (the sampler itself is tested in test_sampling.py).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from mpmath import mp
from torch.autograd import gradcheck
from torch.distributions import kl_divergence

from tests.conftest import (
    RTOL,
    WORK_DPS,
    mp_dot,
    mp_kl_uniform_vmf,
    mp_kl_vmf_uniform,
    mp_kl_vmf_vmf,
    mp_log_c,
    mp_log_ppk,
    mp_log_sphere_area,
    mp_mean_length,
    mp_mean_length_deriv,
    mp_unit,
    mpf,
    rel_err,
    unit_vectors,
)
from vmf_dists import (
    HypersphericalUniform,
    VonMisesFisher,
    log_bhattacharyya_coefficient,
    log_expected_likelihood,
    log_probability_product_kernel,
    pairwise_log_expected_likelihood,
    pairwise_log_probability_product_kernel,
)

DIMS = (2, 3, 5, 64, 512)
DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["f64", "f32"]


def _vmf(loc, kappa, dtype=None, validate_args=None):
    dtype = dtype or loc.dtype
    return VonMisesFisher(
        loc.to(dtype), torch.as_tensor(kappa, dtype=torch.float64).to(dtype), validate_args=validate_args
    )


def _mp_terms_scale(p, k1, k2):
    """Sum of magnitudes of the terms of the closed forms (their absolute condition)."""
    with mp.workdps(WORK_DPS):
        return abs(mp_log_c(p, k1)) + abs(mp_log_c(p, k2)) + mpf(k1) + mpf(k2)


# ==================================================================================================
# KL(vMF ‖ vMF)

KL_K1 = (20.0, 1e3, 1e6)  # weakly concentrated pairs: see the small-concentration test
KL_K2 = (0.0, 0.7, 20.0, 1e3, 1e6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", DIMS)
def test_kl_vmf_vmf_matches_mpmath(p, dtype):
    pairs = list(itertools.product(KL_K1, KL_K2))
    n = len(pairs)
    mu1 = unit_vectors((n,), p, 100 + p, dtype)
    mu2 = unit_vectors((n,), p, 200 + p, dtype)
    mu2[::3] = mu1[::3]  # some pairs share the mean direction
    k1 = torch.tensor([a for a, _ in pairs], dtype=torch.float64).to(dtype)
    k2 = torch.tensor([b for _, b in pairs], dtype=torch.float64).to(dtype)
    kl = kl_divergence(VonMisesFisher(mu1, k1), VonMisesFisher(mu2, k2))
    assert kl.shape == (n,) and kl.dtype == dtype
    worst = 0.0
    for i in range(n):
        a, b = k1[i].item(), k2[i].item()
        ref = mp_kl_vmf_vmf(p, mp_unit(mu1[i]), a, mp_unit(mu2[i]), b)
        assert ref > 0
        err = rel_err(kl[i].item(), ref)
        worst = max(worst, err)
        assert err <= RTOL[dtype], (p, a, b, kl[i].item(), float(ref))


@pytest.mark.parametrize("p", DIMS)
def test_kl_vmf_vmf_small_concentrations_relative_precision(p):
    """KL between two weakly concentrated vMFs is O(κ²/p) and well conditioned in its inputs, so it
    should keep relative precision like KL(vMF ‖ Uniform) does.

    BUG: the closed form C̃(κ₁) − C̃(κ₂) + (κ₂ − κ₁)(1 − A) + … cancels terms of size κ and log C_p:
    KL(vMF(μ, 1e-4) ‖ vMF(ν, 0)) at p = 512 has relative error 3.7e-3 (mpmath 9.765625e-12), although
    it is mathematically KL(vMF(μ, 1e-4) ‖ Uniform), which the library gets to 1e-15.
    """
    kappas = (0.0, 1e-4, 1e-2, 0.7)
    pairs = [(a, b) for a, b in itertools.product(kappas, kappas) if (a, b) != (0.0, 0.0)]
    n = len(pairs)
    mu1, mu2 = unit_vectors((n,), p, 300 + p), unit_vectors((n,), p, 400 + p)
    k1 = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    k2 = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    kl = kl_divergence(VonMisesFisher(mu1, k1), VonMisesFisher(mu2, k2))
    errors = {}
    for i, (a, b) in enumerate(pairs):
        ref = mp_kl_vmf_vmf(p, mp_unit(mu1[i]), a, mp_unit(mu2[i]), b)
        errors[(a, b)] = rel_err(kl[i].item(), ref)
    bad = {key: f"{e:.2e}" for key, e in errors.items() if e > 1e-10}
    assert not bad, bad


def test_kl_vmf_to_kappa_zero_vmf_equals_kl_to_uniform():
    """KL(vMF(μ, κ) ‖ vMF(ν, 0)) and KL(vMF(μ, κ) ‖ Uniform) are the same number (see the bug above)."""
    for p in (3, 64, 512):
        kappas = torch.tensor([1e-6, 1e-4, 1e-2, 0.3, 5.0, 300.0], dtype=torch.float64)
        mu = unit_vectors((len(kappas),), p, 7)
        d = VonMisesFisher(mu, kappas)
        to_zero = kl_divergence(d, VonMisesFisher(unit_vectors((), p, 8), torch.tensor(0.0, dtype=torch.float64)))
        to_uniform = kl_divergence(d, HypersphericalUniform(p, dtype=torch.float64))
        torch.testing.assert_close(to_zero, to_uniform, rtol=1e-10, atol=0)


def test_kl_vmf_vmf_broadcasts_batch_shapes():
    p = 4
    d1 = VonMisesFisher(unit_vectors((3,), p, 1), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    d2 = VonMisesFisher(unit_vectors((2, 1), p, 2), torch.tensor([[4.0], [5.0]], dtype=torch.float64))
    kl = kl_divergence(d1, d2)
    assert kl.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            ref = mp_kl_vmf_vmf(
                p, mp_unit(d1.loc[j]), d1.concentration[j].item(), mp_unit(d2.loc[i, 0]), d2.concentration[i, 0].item()
            )
            assert rel_err(kl[i, j].item(), ref) <= 1e-12


def test_kl_of_distribution_with_itself_is_zero():
    for p in (2, 64):
        for dtype in DTYPES:
            d = VonMisesFisher(unit_vectors((5,), p, 3, dtype), torch.tensor([0.0, 1e-5, 1.0, 1e3, 1e7], dtype=dtype))
            assert (kl_divergence(d, d) == 0).all()
            u = HypersphericalUniform(p, (5,), dtype=dtype)
            assert (kl_divergence(u, u) == 0).all() and kl_divergence(u, u).dtype == dtype


# ==================================================================================================
# KL with the uniform distribution


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", DIMS)
def test_kl_vmf_uniform_small_kappa_relative_precision(p, dtype):
    """KL(vMF ‖ U) ≈ κ²/(2p) as κ → 0: relative precision 1e-10 (f64) for κ = 1e-6 … 1e-2."""
    kappas = torch.logspace(-6, -2, 9, dtype=torch.float64).to(dtype)
    d = VonMisesFisher(unit_vectors((len(kappas),), p, 5, dtype), kappas)
    kl = kl_divergence(d, HypersphericalUniform(p, dtype=dtype))
    assert kl.dtype == dtype and kl.shape == kappas.shape
    tol = 1e-10 if dtype == torch.float64 else RTOL[dtype]
    for i, k in enumerate(kappas.tolist()):
        ref = mp_kl_vmf_uniform(p, k)
        assert rel_err(kl[i].item(), ref) <= tol, (k, kl[i].item(), float(ref))
        assert rel_err(kl[i].item(), k * k / (2 * p)) <= 1e-3  # the leading term, as a sanity check


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", DIMS)
def test_kl_with_uniform_grid_matches_mpmath(p, dtype):
    switch = math.sqrt(32 * p)  # where the implementation changes formula (κ² = 32p); probe both sides
    values = [0.0, 1e-8, 1e-3, 0.1, 1.0, switch * (1 - 1e-6), switch * (1 + 1e-6), 50.0, 1e3, 1e5, 1e8]
    kappas = torch.tensor(values, dtype=torch.float64).to(dtype)
    d = VonMisesFisher(unit_vectors((len(values),), p, 6, dtype), kappas)
    u = HypersphericalUniform(p, dtype=dtype)
    kl_vu, kl_uv = kl_divergence(d, u), kl_divergence(u, d)
    assert kl_vu.dtype == kl_uv.dtype == dtype
    for i, k in enumerate(kappas.tolist()):
        if k == 0:
            assert kl_vu[i].item() == 0 and kl_uv[i].item() == 0
            continue
        assert rel_err(kl_vu[i].item(), mp_kl_vmf_uniform(p, k)) <= RTOL[dtype], ("vMF‖U", k)
        assert rel_err(kl_uv[i].item(), mp_kl_uniform_vmf(p, k)) <= RTOL[dtype], ("U‖vMF", k)


def test_kl_with_uniform_broadcasts_and_checks_dimensions():
    d = VonMisesFisher(unit_vectors((3,), 4, 1), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    u = HypersphericalUniform(4, (2, 1), dtype=torch.float64)
    assert kl_divergence(d, u).shape == (2, 3)
    assert kl_divergence(u, d).shape == (2, 3)
    assert kl_divergence(u, HypersphericalUniform(4, (3,), dtype=torch.float64)).shape == (2, 3)
    with pytest.raises(ValueError):
        kl_divergence(d, VonMisesFisher(unit_vectors((), 3, 1), 1.0))
    with pytest.raises(ValueError):
        kl_divergence(d, HypersphericalUniform(5))
    with pytest.raises(ValueError):
        kl_divergence(HypersphericalUniform(5), d)
    with pytest.raises(ValueError):
        kl_divergence(HypersphericalUniform(5), HypersphericalUniform(4))


# ==================================================================================================
# KL against Monte Carlo


def _mc_kl(p_dist, q_dist, n=20_000):
    x = p_dist.sample((n,))
    diff = (p_dist.log_prob(x) - q_dist.log_prob(x)).to(torch.float64)
    return diff.mean(0), diff.std(0) / math.sqrt(n)


MC_CASES = [
    (3, 2.0, 5.0, 0.3),
    (3, 30.0, 10.0, 0.9),
    (5, 0.5, 0.0, 0.0),
    (64, 40.0, 60.0, 0.8),
    (64, 10.0, 0.5, -0.5),
]


@pytest.mark.parametrize("p,k1,k2,cos", MC_CASES)
def test_kl_vmf_vmf_matches_monte_carlo(p, k1, k2, cos, seeded):
    mu1 = torch.zeros(p, dtype=torch.float64)
    mu1[0] = 1.0
    mu2 = torch.zeros(p, dtype=torch.float64)
    mu2[0], mu2[1] = cos, math.sqrt(1 - cos * cos)
    d1, d2 = _vmf(mu1, k1), _vmf(mu2, k2)
    mean, se = _mc_kl(d1, d2)
    kl = kl_divergence(d1, d2)
    assert abs(kl.item() - mean.item()) <= 5 * se.item() + 1e-12, (kl.item(), mean.item(), se.item())


@pytest.mark.parametrize("p,kappa", [(3, 0.5), (3, 20.0), (64, 5.0), (64, 300.0)])
def test_kl_with_uniform_matches_monte_carlo(p, kappa, seeded):
    d = _vmf(unit_vectors((), p, 3), kappa)
    u = HypersphericalUniform(p, dtype=torch.float64)
    for a, b in ((d, u), (u, d)):
        mean, se = _mc_kl(a, b)
        kl = kl_divergence(a, b).item()
        assert abs(kl - mean.item()) <= 5 * se.item() + 1e-12, (type(a).__name__, kl, mean.item(), se.item())


# ==================================================================================================
# KL gradients


def _gradcheck(fn, *inputs):
    return gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("p,k1,k2", [(3, 0.5, 4.0), (5, 30.0, 2.0), (16, 3.0, 200.0)])
def test_kl_gradcheck(p, k1, k2):
    mu1 = unit_vectors((2,), p, 1).requires_grad_()
    mu2 = unit_vectors((2,), p, 2).requires_grad_()
    ka = torch.tensor([k1, k2], dtype=torch.float64, requires_grad=True)
    kb = torch.tensor([k2, k1], dtype=torch.float64, requires_grad=True)
    u = HypersphericalUniform(p, dtype=torch.float64)

    def vmf(m, k):
        return VonMisesFisher(m, k, validate_args=False)

    assert _gradcheck(lambda m1, a, m2, b: kl_divergence(vmf(m1, a), vmf(m2, b)), mu1, ka, mu2, kb)
    assert _gradcheck(lambda m, a: kl_divergence(vmf(m, a), u), mu1, ka)
    assert _gradcheck(lambda m, a: kl_divergence(u, vmf(m, a)), mu1, ka)


@pytest.mark.parametrize("p", [64, 512])
def test_kl_and_kernel_gradcheck_in_kappa_high_dim(p):
    mu1, mu2 = unit_vectors((2,), p, 1), unit_vectors((2,), p, 2)
    ka = torch.tensor([0.5, 300.0], dtype=torch.float64, requires_grad=True)
    kb = torch.tensor([40.0, 2.0], dtype=torch.float64, requires_grad=True)
    u = HypersphericalUniform(p, dtype=torch.float64)
    # the values carry terms of size |log C_p| ~ 1e3 at p = 512: a larger step keeps the finite
    # differences above their rounding noise (the functions are smooth; truncation error ~ eps²)
    kw = dict(eps=1e-3, atol=1e-8, rtol=1e-5)
    assert gradcheck(lambda a, b: kl_divergence(VonMisesFisher(mu1, a), VonMisesFisher(mu2, b)), (ka, kb), **kw)
    assert gradcheck(
        lambda a: kl_divergence(VonMisesFisher(mu1, a), u) + kl_divergence(u, VonMisesFisher(mu1, a)), (ka,), **kw
    )
    assert gradcheck(
        lambda a, b: log_probability_product_kernel(VonMisesFisher(mu1, a), VonMisesFisher(mu2, b), 0.5), (ka, kb), **kw
    )


def test_kl_gradients_in_kappa_match_mpmath():
    """dKL/dκ from autograd against analytic derivatives evaluated with mpmath:
    d KL(vMF₁‖vMF₂)/dκ₁ = A'(κ₁)(κ₁ − κ₂c), d/dκ₂ = A(κ₂) − A(κ₁)c,
    d KL(vMF‖U)/dκ = κA'(κ), d KL(U‖vMF)/dκ = A(κ) (both branches of KL(vMF‖U), and κ = 0)."""
    for p in (3, 64, 512):
        switch = math.sqrt(32 * p)
        kappas = [0.0, 1e-5, 0.3, switch * (1 - 1e-3), switch * (1 + 1e-3), 200.0, 1e5]
        k = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
        mu = unit_vectors((len(kappas),), p, 9)
        u = HypersphericalUniform(p, dtype=torch.float64)
        (g_vu,) = torch.autograd.grad(kl_divergence(VonMisesFisher(mu, k), u).sum(), k)
        (g_uv,) = torch.autograd.grad(kl_divergence(u, VonMisesFisher(mu, k)).sum(), k)
        for i, kk in enumerate(kappas):
            with mp.workdps(WORK_DPS):
                ref_vu = mpf(kk) * mp_mean_length_deriv(p, kk)
                ref_uv = mp_mean_length(p, kk)
            assert abs(g_vu[i].item() - float(ref_vu)) <= 1e-12 * abs(float(ref_vu)) + 1e-300, (p, kk, "vMF‖U")
            assert abs(g_uv[i].item() - float(ref_uv)) <= 1e-12 * abs(float(ref_uv)) + 1e-300, (p, kk, "U‖vMF")
        # vMF ‖ vMF
        k1 = torch.tensor([0.5, 20.0, 3e3], dtype=torch.float64, requires_grad=True)
        k2 = torch.tensor([4.0, 2.0, 1e3], dtype=torch.float64, requires_grad=True)
        m1, m2 = unit_vectors((3,), p, 10), unit_vectors((3,), p, 11)
        g1, g2 = torch.autograd.grad(kl_divergence(VonMisesFisher(m1, k1), VonMisesFisher(m2, k2)).sum(), [k1, k2])
        for i in range(3):
            a, b = k1[i].item(), k2[i].item()
            with mp.workdps(WORK_DPS):
                c = mp_dot(mp_unit(m1[i]), mp_unit(m2[i]))
                ref1 = mp_mean_length_deriv(p, a) * (mpf(a) - mpf(b) * c)
                ref2 = mp_mean_length(p, b) - mp_mean_length(p, a) * c
            assert rel_err(g1[i].item(), ref1) <= 1e-10, (p, a, b)
            assert rel_err(g2[i].item(), ref2) <= 1e-10, (p, a, b)


# ==================================================================================================
# kernels: closed form against mpmath

KERNEL_KAPPAS = (0.0, 0.7, 20.0, 1e3, 1e5)
RHOS = (0.3, 0.5, 1.0, 2.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("p", DIMS)
def test_log_ppk_matches_mpmath(p, dtype):
    pairs = list(itertools.product(KERNEL_KAPPAS, KERNEL_KAPPAS))
    n = len(pairs)
    mu1 = unit_vectors((n,), p, 500 + p, dtype)
    mu2 = unit_vectors((n,), p, 600 + p, dtype)
    mu2[::4] = mu1[::4]
    mu2[1::4] = -mu1[1::4]  # antipodal pairs: ‖κ₁μ₁ + κ₂μ₂‖ = |κ₁ − κ₂|
    k1 = torch.tensor([a for a, _ in pairs], dtype=torch.float64).to(dtype)
    k2 = torch.tensor([b for _, b in pairs], dtype=torch.float64).to(dtype)
    d1, d2 = VonMisesFisher(mu1, k1), VonMisesFisher(mu2, k2)
    for rho in RHOS if p < 512 else (0.5, 1.0):  # mpmath Bessels at p = 512 cost ~50 ms each
        out = log_probability_product_kernel(d1, d2, rho)
        assert out.shape == (n,) and out.dtype == dtype
        if rho == 1.0:
            torch.testing.assert_close(out, log_expected_likelihood(d1, d2), rtol=0, atol=0)
        if rho == 0.5:
            torch.testing.assert_close(out, log_bhattacharyya_coefficient(d1, d2), rtol=0, atol=0)
        for i in range(n):
            a, b = k1[i].item(), k2[i].item()
            ref = mp_log_ppk(p, mp_unit(mu1[i]), a, mp_unit(mu2[i]), b, rho)
            # relative to |value|, but at least 1% of the size of the closed form's terms; small values
            # (weakly concentrated pairs) are checked strictly in the Bhattacharyya test below
            scale = max(abs(float(ref)), 1e-2 * float(_mp_terms_scale(p, a, b)))
            assert abs(out[i].item() - float(ref)) <= RTOL[dtype] * scale, (rho, a, b, out[i].item(), float(ref))


@pytest.mark.parametrize("p", [3, 64, 512])
def test_log_bhattacharyya_small_values_relative_precision(p):
    """log BC is ≈ 0 for weakly concentrated pairs, where its relative condition number is O(1).

    BUG: ρ[C̃(κ₁) + C̃(κ₂)] − C̃(r) cancels terms of size |log C_p(0)|: at p = 512, κ₁ = 1e-4, κ₂ = 0 the
    library returns −2.3847e-12 for mpmath's −2.4414e-12 (relative error 2.4e-2); at p = 64 the error
    is 1e-3; at p = 512, κ₁ = κ₂ = 0.7 it is 3e-10.
    """
    kappas = (0.0, 1e-4, 1e-2, 0.7)
    pairs = [(a, b) for a, b in itertools.product(kappas, kappas) if a != b or a > 0.5]
    n = len(pairs)
    mu1, mu2 = unit_vectors((n,), p, 700 + p), unit_vectors((n,), p, 800 + p)
    d1 = VonMisesFisher(mu1, torch.tensor([a for a, _ in pairs], dtype=torch.float64))
    d2 = VonMisesFisher(mu2, torch.tensor([b for _, b in pairs], dtype=torch.float64))
    out = log_bhattacharyya_coefficient(d1, d2)
    bad = {}
    for i, (a, b) in enumerate(pairs):
        ref = mp_log_ppk(p, mp_unit(mu1[i]), a, mp_unit(mu2[i]), b, 0.5)
        err = rel_err(out[i].item(), ref)
        if err > 1e-10:
            bad[(a, b)] = f"{err:.2e}"
    assert not bad, bad


def test_kernels_are_symmetric_and_bhattacharyya_bounded(seeded):
    for p in (2, 3, 64):
        n = 40
        g = torch.Generator().manual_seed(p)
        k1 = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 8 - 3)
        k2 = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 8 - 3)
        k1[:5] = 0.0
        mu1, mu2 = unit_vectors((n,), p, 1), unit_vectors((n,), p, 2)
        mu2[10:20] = mu1[10:20]
        d1, d2 = VonMisesFisher(mu1, k1), VonMisesFisher(mu2, k2)
        for rho in RHOS:
            torch.testing.assert_close(
                log_probability_product_kernel(d1, d2, rho), log_probability_product_kernel(d2, d1, rho),
                rtol=1e-14, atol=1e-300,
            )
        assert (log_bhattacharyya_coefficient(d1, d2) <= 0).all()
        assert (log_bhattacharyya_coefficient(d1, d1) == 0).all()
        assert (log_bhattacharyya_coefficient(d2, d2) == 0).all()
        u = HypersphericalUniform(p, dtype=torch.float64)
        assert (log_bhattacharyya_coefficient(u, u) == 0).all()
        assert (log_bhattacharyya_coefficient(d1, u) <= 0).all()


def test_uniform_arguments_behave_as_kappa_zero():
    for p in (2, 3, 64):
        mu = unit_vectors((4,), p, 3)
        d = VonMisesFisher(mu, torch.tensor([0.0, 0.5, 30.0, 1e4], dtype=torch.float64))
        u = HypersphericalUniform(p, (4,), dtype=torch.float64)
        zero = VonMisesFisher(unit_vectors((4,), p, 4), torch.zeros(4, dtype=torch.float64))
        for rho in RHOS:
            torch.testing.assert_close(
                log_probability_product_kernel(d, u, rho), log_probability_product_kernel(d, zero, rho),
                rtol=1e-14, atol=1e-15,
            )
            torch.testing.assert_close(
                log_probability_product_kernel(u, d, rho), log_probability_product_kernel(zero, d, rho),
                rtol=1e-14, atol=1e-15,
            )
        # ∫ p · (1/|S|) = 1/|S|
        el = log_expected_likelihood(d, u)
        for value in el.tolist():
            assert rel_err(value, -mp_log_sphere_area(p)) <= 1e-13
        el_uu = log_expected_likelihood(u, u)
        assert rel_err(el_uu.item() if el_uu.dim() == 0 else el_uu[0].item(), -mp_log_sphere_area(p)) <= 1e-13


def test_kernel_dtype_shape_and_errors():
    p = 3
    d32 = VonMisesFisher(unit_vectors((3,), p, 1, torch.float32), torch.tensor([1.0, 2.0, 3.0]))
    d64 = VonMisesFisher(unit_vectors((2, 1), p, 2), torch.tensor([[1.0], [2.0]], dtype=torch.float64))
    assert log_expected_likelihood(d32, d32).dtype == torch.float32
    assert log_expected_likelihood(d32, d64).shape == (2, 3)
    assert log_expected_likelihood(d32, HypersphericalUniform(p, dtype=torch.float32)).dtype == torch.float32
    with pytest.raises(ValueError):
        log_expected_likelihood(d32, HypersphericalUniform(p + 1))
    for rho in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            log_probability_product_kernel(d32, d32, rho)
    with pytest.raises(ValueError):
        pairwise_log_expected_likelihood(d64, d32)  # batch [2, 1] is not one-dimensional
    normal3 = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3), 1.0), 1)
    with pytest.raises(NotImplementedError):
        log_expected_likelihood(d32, normal3)
    with pytest.raises(NotImplementedError):
        log_expected_likelihood(normal3, d32)


def test_kernel_with_scalar_event_distribution_raises_clean_error():
    """BUG: a distribution with event_shape () makes _check_pair's error message index
    event_shape[0], so the user gets IndexError: tuple index out of range instead of the documented
    ValueError (different dimensions) / NotImplementedError (unsupported type)."""
    d = VonMisesFisher(unit_vectors((), 3, 1), 1.0)
    with pytest.raises((ValueError, NotImplementedError)):
        log_expected_likelihood(d, torch.distributions.Normal(torch.zeros(()), 1.0))
    with pytest.raises((ValueError, NotImplementedError)):
        pairwise_log_expected_likelihood(torch.distributions.Normal(torch.zeros(2), 1.0), d.expand((2,)))


# ==================================================================================================
# kernels: Monte Carlo


KERNEL_MC_CASES = [
    (3, 2.0, 5.0, 0.3), (3, 20.0, 15.0, 0.95), (5, 0.5, 0.0, 0.0), (64, 30.0, 40.0, 0.7), (64, 5.0, 1.0, -0.4)
]


@pytest.mark.parametrize("p,k1,k2,cos", KERNEL_MC_CASES)
def test_kernels_match_monte_carlo(p, k1, k2, cos, seeded):
    mu1 = torch.zeros(p, dtype=torch.float64)
    mu1[0] = 1.0
    mu2 = torch.zeros(p, dtype=torch.float64)
    mu2[0], mu2[1] = cos, math.sqrt(1 - cos * cos)
    d1, d2 = _vmf(mu1, k1), _vmf(mu2, k2)
    n = 40_000
    x = d1.sample((n,))
    log_q, log_p = d2.log_prob(x), d1.log_prob(x)
    # EL = E_p[q(x)]; BC = E_p[sqrt(q(x)/p(x))]; log of the MC mean with a delta-method standard error
    for values, closed in (
        (torch.exp(log_q), log_expected_likelihood(d1, d2)),
        (torch.exp(0.5 * (log_q - log_p)), log_bhattacharyya_coefficient(d1, d2)),
    ):
        m = values.mean()
        se_log = (values.std() / math.sqrt(n) / m).item()
        assert abs(closed.item() - math.log(m.item())) <= 5 * se_log + 1e-12, (
            closed.item(), math.log(m.item()), se_log
        )


# ==================================================================================================
# pairwise kernels


@pytest.mark.parametrize("rho", [1.0, 0.5, 2.0])
def test_pairwise_equals_matrix_of_single_pairs_float64(rho):
    for p in (3, 64):
        B, C = 5, 4
        mu_b, mu_c = unit_vectors((B,), p, 1), unit_vectors((C,), p, 2)
        mu_c[0] = mu_b[0]
        mu_c[1] = -mu_b[1]
        k_b = torch.tensor([0.0, 0.3, 5.0, 80.0, 1e3], dtype=torch.float64)
        k_c = torch.tensor([0.0, 2.0, 40.0, 700.0], dtype=torch.float64)
        P, Q = VonMisesFisher(mu_b, k_b), VonMisesFisher(mu_c, k_c)
        out = pairwise_log_probability_product_kernel(P, Q, rho)
        assert out.shape == (B, C) and out.dtype == torch.float64
        if rho == 1.0:
            torch.testing.assert_close(out, pairwise_log_expected_likelihood(P, Q), rtol=0, atol=0)
        single = log_probability_product_kernel(
            VonMisesFisher(mu_b[:, None], k_b[:, None]), VonMisesFisher(mu_c[None], k_c[None]), rho
        )
        torch.testing.assert_close(out, single, rtol=1e-12, atol=1e-14)
        # with uniform arguments
        U = HypersphericalUniform(p, (C,), dtype=torch.float64)
        torch.testing.assert_close(
            pairwise_log_probability_product_kernel(P, U, rho),
            log_probability_product_kernel(
                VonMisesFisher(mu_b[:, None], k_b[:, None]), HypersphericalUniform(p, (1, C), dtype=torch.float64), rho
            ),
            rtol=1e-12,
            atol=1e-14,
        )


def test_pairwise_float32_keeps_float32_precision_for_close_directions():
    """BUG: the pairwise kernel forms ‖μ_b − μ_c‖² = 2 − 2μ_bᵀμ_c from a float32 matrix product, which
    loses all relative precision for nearby directions; multiplied by ≈ κ/4 it costs 2e-5 (κ ≈ 1e4,
    p = 3) to 2e-4 (κ ≈ 1e6, p = 64) relative error, while the single-pair kernel keeps ~1e-7."""
    bad = {}
    for p in (3, 64):
        B = 3
        mu_b = unit_vectors((B,), p, 21)
        mu_c = mu_b + 1e-3 * unit_vectors((B,), p, 22)
        mu_c = mu_c / mu_c.norm(dim=-1, keepdim=True)
        mu_c[0] = mu_b[0]  # identical direction
        mu_b, mu_c = mu_b.float(), mu_c.float()
        k_b = torch.tensor([1e4, 1e5, 1e6])
        k_c = torch.tensor([2e4, 3e5, 5e5])
        P, Q = VonMisesFisher(mu_b, k_b), VonMisesFisher(mu_c, k_c)
        out = pairwise_log_expected_likelihood(P, Q)
        single = log_expected_likelihood(
            VonMisesFisher(mu_b[:, None], k_b[:, None]), VonMisesFisher(mu_c[None], k_c[None])
        )
        for i in range(B):
            for j in range(B):
                ref = mp_log_ppk(p, mp_unit(mu_b[i]), k_b[i].item(), mp_unit(mu_c[j]), k_c[j].item(), 1.0)
                assert rel_err(single[i, j].item(), ref) <= 1e-5  # the single-pair kernel is fine
                err = rel_err(out[i, j].item(), ref)
                if err > 1e-5:
                    bad[(p, i, j)] = f"{err:.1e}"
    assert not bad, bad


# ==================================================================================================
# kernel gradients


@pytest.mark.parametrize("p", [3, 16])
def test_kernel_gradcheck(p):
    mu1 = unit_vectors((2,), p, 1).requires_grad_()
    mu2 = unit_vectors((2,), p, 2).requires_grad_()
    k1 = torch.tensor([0.6, 30.0], dtype=torch.float64, requires_grad=True)
    k2 = torch.tensor([4.0, 2.0], dtype=torch.float64, requires_grad=True)

    def vmf(m, k):
        return VonMisesFisher(m, k, validate_args=False)

    for rho in (1.0, 0.5, 2.0):
        assert _gradcheck(
            lambda a, b, c, d, rho=rho: log_probability_product_kernel(vmf(a, b), vmf(c, d), rho), mu1, k1, mu2, k2
        )
    mu3 = unit_vectors((3,), p, 3).requires_grad_()
    k3 = torch.tensor([0.1, 5.0, 50.0], dtype=torch.float64, requires_grad=True)
    assert _gradcheck(lambda a, b, c, d: pairwise_log_expected_likelihood(vmf(a, b), vmf(c, d)), mu1, k1, mu3, k3)
    u = HypersphericalUniform(p, dtype=torch.float64)
    assert _gradcheck(lambda a, b: log_expected_likelihood(vmf(a, b), u), mu1, k1)


def test_kernel_gradient_in_kappa_matches_mpmath():
    """d log PPK_ρ/dκ₁ = −ρA(κ₁) + ρA(r)(κ₁ + κ₂c)/‖κ₁μ₁ + κ₂μ₂‖ with r = ρ‖κ₁μ₁ + κ₂μ₂‖."""
    p = 5
    mu1, mu2 = unit_vectors((3,), p, 31), unit_vectors((3,), p, 32)
    k1 = torch.tensor([0.4, 12.0, 900.0], dtype=torch.float64, requires_grad=True)
    k2 = torch.tensor([3.0, 0.0, 500.0], dtype=torch.float64)
    for rho in (1.0, 0.5):
        (g,) = torch.autograd.grad(
            log_probability_product_kernel(VonMisesFisher(mu1, k1), VonMisesFisher(mu2, k2), rho).sum(), k1
        )
        for i in range(3):
            a, b = k1[i].item(), k2[i].item()
            with mp.workdps(WORK_DPS):
                m1, m2 = mp_unit(mu1[i]), mp_unit(mu2[i])
                c = mp_dot(m1, m2)
                norm = mp.sqrt(mp.fsum((a * x + b * y) ** 2 for x, y in zip(m1, m2)))
                r = rho * norm
                ref = -rho * mp_mean_length(p, a) + rho * mp_mean_length(p, r) * (a + b * c) / norm
            size = rho * mp_mean_length(p, a) + abs(ref)  # the two terms cancel exactly when κ₂ = 0, ρ = 1
            assert abs(g[i].item() - float(ref)) <= 1e-10 * float(size), (rho, a, b, g[i].item(), float(ref))


# ==================================================================================================
# slow: more Monte Carlo and full gradchecks


@pytest.mark.slow
@pytest.mark.parametrize(
    "p,k1,k2,cos,kernels",
    [(2, 3.0, 1.0, 0.5, True), (3, 200.0, 150.0, 0.999, True), (16, 8.0, 8.0, -1.0, True),
     (512, 30.0, 20.0, 0.5, True), (512, 20.0, 0.0, 0.0, True),
     # E_p[q(x)] is dominated by rare x here (heavy tail): Monte Carlo is useless for the kernels, fine for KL
     (512, 400.0, 600.0, 0.9, False)],
)
def test_kl_and_kernels_monte_carlo_large(p, k1, k2, cos, kernels, seeded):
    n = 200_000 if p < 512 else 60_000
    mu1 = torch.zeros(p, dtype=torch.float64)
    mu1[0] = 1.0
    mu2 = torch.zeros(p, dtype=torch.float64)
    mu2[0], mu2[1] = cos, math.sqrt(max(0.0, 1 - cos * cos))
    d1, d2 = _vmf(mu1, k1), _vmf(mu2, k2)
    mean, se = _mc_kl(d1, d2, n=n)
    assert abs(kl_divergence(d1, d2).item() - mean.item()) <= 5 * se.item() + 1e-12
    if not kernels:
        return
    x = d1.sample((n,))
    log_q, log_p = d2.log_prob(x), d1.log_prob(x)
    for log_values, closed in (
        (log_q, log_expected_likelihood(d1, d2)), (0.5 * (log_q - log_p), log_bhattacharyya_coefficient(d1, d2))
    ):
        shift = log_values.max()
        values = torch.exp(log_values - shift)
        m = values.mean()
        se_log = (values.std() / math.sqrt(len(values)) / m).item()
        assert abs(closed.item() - (math.log(m.item()) + shift.item())) <= 5 * se_log + 1e-12


@pytest.mark.slow
def test_kl_and_kernel_gradcheck_in_loc_p64():
    p = 64
    mu1 = unit_vectors((2,), p, 1).requires_grad_()
    mu2 = unit_vectors((2,), p, 2).requires_grad_()
    ka = torch.tensor([3.0, 40.0], dtype=torch.float64, requires_grad=True)
    kb = torch.tensor([200.0, 1.5], dtype=torch.float64, requires_grad=True)

    def vmf(m, k):
        return VonMisesFisher(m, k, validate_args=False)

    assert _gradcheck(lambda m1, a, m2, b: kl_divergence(vmf(m1, a), vmf(m2, b)), mu1, ka, mu2, kb)
    assert _gradcheck(lambda m1, a, m2, b: log_expected_likelihood(vmf(m1, a), vmf(m2, b)), mu1, ka, mu2, kb)
    assert _gradcheck(
        lambda m1, a, m2, b: pairwise_log_probability_product_kernel(vmf(m1, a), vmf(m2, b), 0.5), mu1, ka, mu2, kb
    )


# ==================================================================================================
# property-based: random parameters


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    p=st.sampled_from([2, 3, 4, 7, 33, 128]),
    log_k1=st.floats(-4, 6),
    log_k2=st.floats(-4, 6),
    seed=st.integers(0, 10_000),
    rho=st.sampled_from([0.25, 0.5, 1.0, 3.0]),
)
def test_random_pairs_kl_and_ppk_against_mpmath(p, log_k1, log_k2, seed, rho):
    k1, k2 = 10.0**log_k1, 10.0**log_k2
    mu1, mu2 = unit_vectors((), p, seed), unit_vectors((), p, seed + 1)
    d1, d2 = _vmf(mu1, k1), _vmf(mu2, k2)
    kl = kl_divergence(d1, d2).item()
    m1, m2 = mp_unit(mu1), mp_unit(mu2)
    ref = mp_kl_vmf_vmf(p, m1, k1, m2, k2)
    # relative, but not finer than the closed form's terms allow (small KLs: see the strict test above)
    assert abs(kl - float(ref)) <= 1e-12 * max(abs(float(ref)), 1e-2 * float(_mp_terms_scale(p, k1, k2)))
    assert kl >= -1e-15
    ppk = log_probability_product_kernel(d1, d2, rho).item()
    ref = mp_log_ppk(p, m1, k1, m2, k2, rho)
    assert abs(ppk - float(ref)) <= 1e-12 * max(abs(float(ref)), 1e-2 * float(_mp_terms_scale(p, k1, k2)))
    assert log_bhattacharyya_coefficient(d1, d2).item() <= 0
