"""VonMisesFisher and HypersphericalUniform: generic table checks, accuracy against mpmath / scipy,
normalisation by quadrature, maximum likelihood fit, and input validation.

Every reference number is computed inside the test by mpmath (50 digits, see ``tests/conftest.py``),
scipy, or numerical quadrature; nothing produced by ``vmf_dists`` is used as a reference.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from mpmath import mp
from pyro.distributions import constraints
from torch.distributions import kl_divergence

from tests.conftest import (
    RTOL,
    WORK_DPS,
    mp_a_over_kappa,
    mp_dot,
    mp_entropy,
    mp_exact,
    mp_log_c,
    mp_log_sphere_area,
    mp_mean_length,
    mp_mean_length_deriv,
    mp_unit,
    mpf,
    rel_err,
    unit_vectors,
)
from vmf_dists import HypersphericalUniform, VonMisesFisher, inverse_mean_resultant_length

EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps}


def _mp_log_prob(p, mu_mp, kappa, x) -> tuple[mp.mpf, mp.mpf]:
    r"""Reference log f(x) and the magnitude of its summands, for x given by its exact float entries.

    On the sphere log C + κμᵀx = [log C + κ] − κ‖x − μ‖²/2; for a float x that is a few ulps off the
    sphere we use the second (distance) form, whose value does not move by κ·ulp under a radial
    perturbation of x. The second value, |log C + κ| + κ‖x − μ‖²/2, bounds |log f| and sets the scale
    of the relative error (it equals |log f| away from zero crossings).
    """
    with mp.workdps(WORK_DPS):
        k = mpf(kappa)
        xs = mp_exact(x)
        d2 = mp.fsum((a - b) ** 2 for a, b in zip(xs, mu_mp))
        mode_value = mp_log_c(p, kappa) + k
        return mode_value - k * d2 / 2, abs(mode_value) + k * d2 / 2


# ==================================================================================================
# A. generic checks driven by the example table (conftest.EXAMPLES)


def test_support_event_and_flags(example):
    d = example.make()
    assert d.support is constraints.sphere
    assert d.has_rsample is True
    assert d.event_shape == torch.Size([example.dim])
    assert d.batch_shape == torch.Size(example.batch_shape)
    if example.kind == "vmf":
        assert d.arg_constraints["loc"] is constraints.sphere
        assert isinstance(d.dim, int) and d.dim == example.dim


@pytest.mark.parametrize("sample_shape", [(), (4,), (2, 3)], ids=lambda s: "s" + "x".join(map(str, s)))
def test_sample_and_rsample_shapes_and_support(example, sample_shape, seeded):
    d = example.make()
    expected = torch.Size(sample_shape) + d.batch_shape + d.event_shape
    for method in (d.sample, d.rsample):
        x = method(torch.Size(sample_shape))
        assert x.shape == expected
        assert x.dtype == example.dtype
        assert x.device.type == "cpu"
        assert torch.isfinite(x).all()
        assert bool(constraints.sphere.check(x).all()), "samples must lie on the unit sphere"
        assert bool(d.support.check(x).all())


def test_sample_is_detached_and_rsample_differentiable(example, seeded):
    if example.kind == "uniform":
        d = example.make()
        assert not d.sample((3,)).requires_grad
        assert not d.rsample((3,)).requires_grad  # nothing to differentiate
        return
    leaf_loc, leaf_kappa = example.loc().requires_grad_(), example.concentration().requires_grad_()
    d = VonMisesFisher(leaf_loc, leaf_kappa)
    assert not d.sample((3,)).requires_grad
    x = d.rsample((3,))
    assert x.requires_grad
    weights = unit_vectors((), example.dim, 99, example.dtype)
    loc_grad, kappa_grad = torch.autograd.grad((x * weights).sum(), [leaf_loc, leaf_kappa])
    assert loc_grad.shape == leaf_loc.shape and kappa_grad.shape == leaf_kappa.shape
    assert torch.isfinite(loc_grad).all() and torch.isfinite(kappa_grad).all()
    assert loc_grad.dtype == example.dtype and kappa_grad.dtype == example.dtype


def test_log_prob_shape_dtype_finite(example, seeded):
    d = example.make()
    x = d.sample((5,))
    lp = d.log_prob(x)
    assert lp.shape == torch.Size([5]) + d.batch_shape
    assert lp.dtype == example.dtype
    assert torch.isfinite(lp).all()
    # a single point broadcasts against the batch
    point = unit_vectors((), example.dim, 7, example.dtype)
    lp1 = d.log_prob(point)
    assert lp1.shape == d.batch_shape and lp1.dtype == example.dtype
    # extra leading sample dims of size 1 broadcast too
    lp2 = d.log_prob(x[:1].unsqueeze(0))
    assert lp2.shape == torch.Size([1, 1]) + d.batch_shape
    torch.testing.assert_close(lp2[0], lp[:1], rtol=0, atol=0)


def test_log_prob_matches_mpmath(example, seeded):
    d = example.make()
    rtol = RTOL[example.dtype]
    p = example.dim
    xs = torch.cat([d.sample((2,)), d.mode.unsqueeze(0) if example.kind == "vmf" else d.sample((1,))])
    lp = d.log_prob(xs).reshape(3, -1)
    xs = xs.reshape(3, -1, p)
    for i in range(example.numel):
        mu, kappa = example.mp_params(i)
        for s in range(3):
            got = lp[s, i].item()
            if example.kind == "uniform":
                assert rel_err(got, -mp_log_sphere_area(p)) <= rtol
                continue
            ref, scale = _mp_log_prob(p, mu, kappa, xs[s, i])
            assert abs(got - float(ref)) <= rtol * float(scale), (i, s, got, float(ref))


def test_entropy_mean_variance_mode_match_mpmath(example):
    d = example.make()
    p, dtype, rtol = example.dim, example.dtype, RTOL[example.dtype]
    h, mean, var, mode = d.entropy(), d.mean, d.variance, d.mode
    assert h.shape == d.batch_shape
    assert mean.shape == var.shape == mode.shape == d.batch_shape + d.event_shape
    for t in (h, mean, var, mode):
        assert t.dtype == dtype and t.device.type == "cpu"
    h, mean, var = h.reshape(-1), mean.reshape(-1, p), var.reshape(-1, p)
    if example.kind == "uniform":
        assert torch.isnan(mode).all()
        for i in range(example.numel):
            assert rel_err(h[i].item(), mp_log_sphere_area(p)) <= rtol
            assert (mean[i] == 0).all()
            assert rel_err(var[i, 0].item(), mp.mpf(1) / p) <= rtol
        return
    torch.testing.assert_close(mode, example.loc(), rtol=4 * EPS[dtype], atol=0)
    for i in range(example.numel):
        mu, kappa = example.mp_params(i)
        with mp.workdps(WORK_DPS):
            # entropy: relative to the magnitudes of its two terms (= |H| away from its zero crossing)
            h_ref = mp_entropy(p, kappa)
            h_scale = abs(mp_log_c(p, kappa)) + mpf(kappa) * mp_mean_length(p, kappa)
            assert abs(h[i].item() - float(h_ref)) <= rtol * float(h_scale), (i, h[i].item(), float(h_ref))
            a = mp_mean_length(p, kappa)
            if a == 0:
                assert (mean[i] == 0).all()
            else:
                err = max(abs(mean[i, j].item() - float(a * mu[j])) for j in range(p))
                assert err <= rtol * float(a), (i, err, float(a))
            rho, a_prime = mp_a_over_kappa(p, kappa), mp_mean_length_deriv(p, kappa)
            for j in range(p):
                ref = rho * (1 - mu[j] ** 2) + a_prime * mu[j] ** 2
                # allowance for the rounding of μ to `dtype` (δμ_j² ≈ 2 ulp · μ_j²), times the ρ it multiplies
                allowance = 4 * EPS[dtype] * float(rho * mu[j] ** 2)
                assert abs(var[i, j].item() - float(ref)) <= rtol * float(ref) + allowance, (i, j)


def test_expand_keeps_class_and_values(example, seeded):
    d = example.make(validate_args=True)
    new_batch = torch.Size([4]) + d.batch_shape
    e = d.expand(new_batch)
    assert type(e) is type(d)
    assert e.batch_shape == new_batch and e.event_shape == d.event_shape
    assert e._validate_args == d._validate_args
    if example.kind == "vmf":
        assert torch.equal(e.loc, d.loc.expand(new_batch + d.event_shape))
        assert torch.equal(e.concentration, d.concentration.expand(new_batch))
    else:
        assert e.dim == d.dim and e.dtype == d.dtype and e.device == d.device
    x = d.sample((2,))
    assert torch.equal(e.log_prob(x.unsqueeze(1)), d.log_prob(x).unsqueeze(1).expand((2,) + new_batch))
    assert torch.equal(e.entropy(), d.entropy().expand(new_batch))
    assert torch.equal(e.mean, d.mean.expand(new_batch + d.event_shape))
    assert torch.equal(e.variance, d.variance.expand(new_batch + d.event_shape))
    assert e.sample((3,)).shape == torch.Size([3]) + new_batch + d.event_shape
    assert e.rsample().shape == new_batch + d.event_shape
    # expanding an expanded distribution, and expanding to the same batch shape
    assert e.expand(torch.Size([2]) + new_batch).batch_shape == torch.Size([2]) + new_batch
    assert torch.equal(d.expand(d.batch_shape).entropy(), d.entropy())


@pytest.mark.parametrize("kind", ["vmf", "uniform"])
def test_expand_to_incompatible_batch_shape_raises(kind):
    """torch semantics: expand only broadcasts (like Tensor.expand); a non-broadcastable shape is an error.

    BUG (HypersphericalUniform): HypersphericalUniform(3, (3,)).expand((5,)) silently returns a
    distribution with batch shape (5,) (and (2, 3) → (5, 3) likewise); VonMisesFisher raises.
    """
    for batch, bad in (((3,), (5,)), ((2, 3), (5, 3)), ((3,), (3, 2))):
        if kind == "vmf":
            d = VonMisesFisher(unit_vectors(batch, 4, 0), torch.ones(batch, dtype=torch.float64))
        else:
            d = HypersphericalUniform(4, batch)
        with pytest.raises((ValueError, RuntimeError)):
            d.expand(bad)


def test_validate_args(example, seeded):
    d_on = example.make(validate_args=True)
    d_off = example.make(validate_args=False)
    x = d_on.sample((2,))
    d_on.log_prob(x)  # valid values pass
    off_sphere = 2.0 * x
    with pytest.raises(ValueError):
        d_on.log_prob(off_sphere)
    with pytest.raises(ValueError):  # wrong event size
        d_on.log_prob(torch.ones(example.dim + 1, dtype=example.dtype))
    out = d_off.log_prob(off_sphere)  # no check without validation
    assert out.shape == torch.Size([2]) + d_off.batch_shape
    # validation is inherited through expand
    assert d_on.expand((2,) + tuple(d_on.batch_shape))._validate_args is True
    assert d_off.expand((2,) + tuple(d_off.batch_shape))._validate_args is False


def test_kl_with_itself_is_zero_and_to_uniform_nonnegative(example):
    d = example.make()
    kl = kl_divergence(d, d)
    assert kl.shape == d.batch_shape and kl.dtype == example.dtype
    assert (kl.abs() <= 1e-300).all(), kl
    u = HypersphericalUniform(example.dim, dtype=example.dtype)
    for value in (kl_divergence(d, u), kl_divergence(u, d)):
        assert value.shape == d.batch_shape and value.dtype == example.dtype
        assert (value >= 0).all() and torch.isfinite(value).all()


def test_log_prob_gradient_is_finite(vmf_example, seeded):
    ex = vmf_example
    loc, kappa = ex.loc().requires_grad_(), ex.concentration().requires_grad_()
    d = VonMisesFisher(loc, kappa)
    x = d.sample((3,))
    g_loc, g_kappa = torch.autograd.grad(d.log_prob(x).sum() + d.entropy().sum(), [loc, kappa])
    assert torch.isfinite(g_loc).all() and torch.isfinite(g_kappa).all()


@pytest.mark.parametrize("p,kappas", [(2, (0.3, 7.0)), (3, (1e-3, 50.0)), (5, (2.0, 900.0)), (16, (0.8, 40.0))])
def test_gradcheck_log_prob_entropy_mean_variance(p, kappas, seeded):
    from torch.autograd import gradcheck

    loc = unit_vectors((2,), p, 12).requires_grad_()
    kappa = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
    x = VonMisesFisher(loc.detach(), kappa.detach()).sample((3,))

    def make(m, k):
        return VonMisesFisher(m, k, validate_args=False)

    kw = dict(eps=1e-6, atol=1e-7, rtol=1e-5)
    assert gradcheck(lambda m, k: make(m, k).log_prob(x), (loc, kappa), **kw)
    assert gradcheck(lambda m, k: make(m, k).entropy(), (loc, kappa), **kw)
    assert gradcheck(lambda m, k: make(m, k).mean, (loc, kappa), **kw)
    assert gradcheck(lambda m, k: make(m, k).variance, (loc, kappa), **kw)


def test_gradients_at_kappa_zero():
    """At κ = 0: d log f(x)/dκ = μᵀx − A_p(0) = μᵀx, dH/dκ = −κA'(κ) = 0, d mean/dκ = A'(0)μ = μ/p."""
    for p in (2, 3, 64):
        loc = unit_vectors((), p, 13)
        kappa = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        x = unit_vectors((), p, 14)
        d = VonMisesFisher(loc, kappa)
        (g_lp,) = torch.autograd.grad(d.log_prob(x), kappa)
        (g_h,) = torch.autograd.grad(VonMisesFisher(loc, kappa).entropy(), kappa)
        (g_m,) = torch.autograd.grad(VonMisesFisher(loc, kappa).mean @ loc, kappa)
        assert rel_err(g_lp.item(), mp_dot(mp_unit(loc), mp_unit(x))) <= 1e-13
        assert g_h.item() == 0.0
        assert rel_err(g_m.item(), mp.mpf(1) / p) <= 1e-13


# ==================================================================================================
# B. construction, broadcasting, dtype


def test_batch_broadcasting_loc_3x1_with_kappa_4(seeded):
    p = 5
    loc = unit_vectors((3, 1), p, 1)
    kappa = torch.tensor([0.0, 0.5, 10.0, 1e3], dtype=torch.float64)
    d = VonMisesFisher(loc, kappa)
    assert d.batch_shape == (3, 4) and d.event_shape == (p,)
    assert d.loc.shape == (3, 4, p) and d.concentration.shape == (3, 4)
    x = d.sample((2,))
    assert x.shape == (2, 3, 4, p)
    lp = d.log_prob(x)
    h = d.entropy()
    for i in range(3):
        for j in range(4):
            single = VonMisesFisher(loc[i, 0], kappa[j])
            torch.testing.assert_close(lp[:, i, j], single.log_prob(x[:, i, j]), rtol=0, atol=0)
            torch.testing.assert_close(h[i, j], single.entropy(), rtol=0, atol=0)
            torch.testing.assert_close(d.variance[i, j], single.variance, rtol=0, atol=0)


def test_python_number_concentration_and_zero_dim_tensor():
    loc = unit_vectors((3,), 4, 2)
    a = VonMisesFisher(loc, 2.5)
    b = VonMisesFisher(loc, torch.tensor(2.5, dtype=torch.float64))
    assert a.batch_shape == b.batch_shape == (3,)
    assert a.concentration.dtype == torch.float64
    torch.testing.assert_close(a.entropy(), b.entropy(), rtol=0, atol=0)


def test_python_float_concentration_is_not_rounded_to_float32():
    """BUG: a Python float κ is converted with torch.as_tensor (default dtype float32) *before* being
    cast to loc's float64, so VonMisesFisher(loc64, 0.01).concentration == 0.009999999776482582."""
    loc = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    d = VonMisesFisher(loc, 0.01)
    assert d.concentration.item() == 0.01
    got = d.log_prob(loc).item()
    ref = float(mp_log_c(3, 0.01) + mp.mpf(0.01))
    assert rel_err(got, ref) <= 1e-13


def test_python_float_concentration_keeps_loc_dtype(default_dtype_float64):
    """torch.distributions convention: Python scalars adopt the tensor parameters' dtype.
    BUG: with torch's default dtype float64, a float32 loc and a Python κ give a float64 distribution."""
    loc = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float32)
    d = VonMisesFisher(loc, 3.0)
    assert d.loc.dtype == torch.float32
    assert d.sample().dtype == torch.float32
    assert d.log_prob(loc).dtype == torch.float32


def test_mixed_dtypes_promote():
    loc = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float32)
    d = VonMisesFisher(loc, torch.tensor(2.0, dtype=torch.float64))
    assert d.loc.dtype == d.concentration.dtype == torch.float64
    assert d.sample().dtype == torch.float64 and d.entropy().dtype == torch.float64


def test_uniform_defaults_and_repr():
    u = HypersphericalUniform(4)
    assert u.dtype == torch.get_default_dtype() and u.device.type == "cpu"
    assert u.batch_shape == () and u.event_shape == (4,)
    assert "HypersphericalUniform" in repr(u) and "VonMisesFisher" in repr(VonMisesFisher(unit_vectors((), 3, 0), 1.0))
    # κ = 0 vMF is the uniform distribution
    x = u.sample((5,)).to(torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    v = VonMisesFisher(unit_vectors((), 4, 3), torch.tensor(0.0, dtype=torch.float64))
    ref = float(-mp_log_sphere_area(4))
    for value in v.log_prob(x).tolist():
        assert rel_err(value, ref) <= 1e-13
    for value in HypersphericalUniform(4, dtype=torch.float64).log_prob(x).tolist():
        assert rel_err(value, ref) <= 1e-15


# ==================================================================================================
# C. accuracy against mpmath and scipy (dedicated grids)

GRID_DIMS = (2, 3, 5, 64, 512)
GRID_KAPPAS = (0.0, 1e-8, 1e-3, 0.5, 3.0, 50.0, 1e3, 1e5, 1e8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("p", GRID_DIMS)
def test_log_prob_grid_matches_mpmath(p, dtype, seeded):
    kappas = torch.tensor(GRID_KAPPAS, dtype=torch.float64).to(dtype)
    loc = unit_vectors((len(GRID_KAPPAS),), p, 10 + p, dtype)
    d = VonMisesFisher(loc, kappas)
    points = [loc, -loc, unit_vectors((len(GRID_KAPPAS),), p, 20 + p, dtype), d.sample()]
    worst = 0.0
    for x in points:
        lp = d.log_prob(x)
        for i in range(len(GRID_KAPPAS)):
            ref, scale = _mp_log_prob(p, mp_unit(loc[i]), kappas[i].item(), x[i])
            err = abs(lp[i].item() - float(ref)) / float(scale)
            worst = max(worst, err)
            assert err <= RTOL[dtype], (i, kappas[i].item(), lp[i].item(), float(ref))


PRECISION_F64 = 4e-15  # |Δ log f| / max(1, |log f|): the precision issue's bar (scipy's own tests ask 1e-14)
_S98, _S02, _S8, _S2 = math.sqrt(0.98), math.sqrt(0.02), math.sqrt(0.8), math.sqrt(0.2)
#: scipy's TestVonMises_Fisher.test_logpdf_accuracy cases (x, μ, κ); references from our mpmath oracle.
SCIPY_LOGPDF_CASES = [
    ([1.0, 0, 0], [1.0, 0, 0], 1e-4), ([1.0, 0, 0], [0, 0, 1.0], 1e-4), ([1.0, 0, 0], [1.0, 0, 0], 100.0),
    ([1.0, 0, 0], [0, 0, 1.0], 100.0), ([1.0, 0, 0], [_S98, _S02, 0], 2000.0), ([1.0, 0, 0], [1.0, 0, 0], 2000.0),
    ([1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], 2000.0), ([1.0, 0, 0, 0, 0], [_S98, _S02, 0, 0, 0], 2000.0),
    ([1.0, 0, 0, 0, 0], [_S8, _S2, 0, 0, 0], 2000.0),
]


@pytest.mark.parametrize(("x", "mu", "kappa"), SCIPY_LOGPDF_CASES)
def test_log_prob_float64_precision_on_scipy_cases(x, mu, kappa):
    x, mu = torch.tensor(x, dtype=torch.float64), torch.tensor(mu, dtype=torch.float64)
    lp = VonMisesFisher(mu / mu.norm(), torch.tensor(kappa, dtype=torch.float64)).log_prob(x).item()
    ref, _ = _mp_log_prob(len(x), mp_unit(mu), kappa, x)
    assert abs(lp - float(ref)) <= PRECISION_F64 * max(1.0, abs(float(ref))), (lp, float(ref))


def test_log_prob_float64_precision_on_the_circle():
    """p = 2 (scipy compares with its von Mises there): κ = 20, μ = (0, 1), angles around the circle."""
    mu = torch.tensor([0.0, 1.0], dtype=torch.float64)
    d = VonMisesFisher(mu, torch.tensor(20.0, dtype=torch.float64))
    angles = torch.linspace(-3.1, 3.1, 25, dtype=torch.float64)
    x = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    lp = d.log_prob(x)
    for i in range(len(angles)):
        ref, _ = _mp_log_prob(2, mp_unit(mu), 20.0, x[i])
        assert abs(lp[i].item() - float(ref)) <= PRECISION_F64 * max(1.0, abs(float(ref))), angles[i].item()


@pytest.mark.parametrize("p", GRID_DIMS)
def test_log_prob_grid_float64_precision(p, seeded):
    """The grid of test_log_prob_grid_matches_mpmath, at the precision bar relative to max(1, |log f|)."""
    kappas = torch.tensor(GRID_KAPPAS, dtype=torch.float64)
    loc = unit_vectors((len(GRID_KAPPAS),), p, 10 + p)
    d = VonMisesFisher(loc, kappas)
    for x in [loc, -loc, unit_vectors((len(GRID_KAPPAS),), p, 20 + p), d.sample()]:
        lp = d.log_prob(x)
        for i, k in enumerate(GRID_KAPPAS):
            ref, _ = _mp_log_prob(p, mp_unit(loc[i]), k, x[i])
            assert abs(lp[i].item() - float(ref)) <= PRECISION_F64 * max(1.0, abs(float(ref))), (
                k, lp[i].item(), float(ref)
            )


@pytest.mark.parametrize("p", [3, 128, 512])
def test_float32_log_prob_at_mode_up_to_kappa_1e8(p):
    kappas = torch.tensor([0.0, 1e-3, 1.0, 1e2, 1e4, 1e6, 1e7, 1e8], dtype=torch.float32)
    axis = torch.zeros(p, dtype=torch.float32)
    axis[-1] = 1.0
    for loc in (axis, unit_vectors((), p, 5, torch.float32)):
        d = VonMisesFisher(loc.expand(len(kappas), p), kappas)
        lp = d.log_prob(loc)
        assert lp.dtype == torch.float32
        for i, k in enumerate(kappas.tolist()):
            ref, _ = _mp_log_prob(p, mp_unit(loc), k, loc)
            assert rel_err(lp[i].item(), ref) <= 1e-6, (p, k, lp[i].item(), float(ref))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("p", GRID_DIMS)
def test_entropy_and_mean_grid_match_mpmath(p, dtype):
    kappas = torch.tensor(GRID_KAPPAS, dtype=torch.float64).to(dtype)
    loc = unit_vectors((len(GRID_KAPPAS),), p, 30 + p, dtype)
    d = VonMisesFisher(loc, kappas)
    h, mean = d.entropy(), d.mean
    for i in range(len(GRID_KAPPAS)):
        k = kappas[i].item()
        assert rel_err(h[i].item(), mp_entropy(p, k)) <= RTOL[dtype], (k, h[i].item(), float(mp_entropy(p, k)))
        a, mu = mp_mean_length(p, k), mp_unit(loc[i])
        got_norm = torch.linalg.vector_norm(mean[i].to(torch.float64)).item()
        assert rel_err(got_norm, a) <= RTOL[dtype] + 4 * EPS[dtype] * (a != 0)
        if a != 0:
            mu64 = torch.tensor([float(m) for m in mu], dtype=torch.float64)
            cos = (mean[i].to(torch.float64) @ mu64).item() / got_norm
            assert cos >= 1 - 4 * EPS[dtype]


@pytest.mark.parametrize("p", GRID_DIMS)
def test_variance_grid_matches_mpmath(p):
    kappas = torch.tensor(GRID_KAPPAS, dtype=torch.float64)
    loc = unit_vectors((len(GRID_KAPPAS),), p, 40 + p)
    var = VonMisesFisher(loc, kappas).variance
    for i, k in enumerate(GRID_KAPPAS):
        mu = mp_unit(loc[i])
        rho, a_prime = mp_a_over_kappa(p, k), mp_mean_length_deriv(p, k)
        for j in range(p):
            ref = rho * (1 - mu[j] ** 2) + a_prime * mu[j] ** 2  # both terms ≥ 0: no cancellation
            allowance = 4 * EPS[torch.float64] * float(rho * mu[j] ** 2)  # rounding of μ_j to float64
            assert abs(var[i, j].item() - float(ref)) <= 1e-12 * float(ref) + allowance, (k, j)


@pytest.mark.parametrize("p", [2, 3, 64])
def test_variance_along_axis_aligned_mean_direction(p):
    """Var(x_0) for μ = e_0 is exactly A_p'(κ) (no input rounding: μ is exact).

    BUG: variance = ρ + (A' − ρ)μ_i² cancels for μ_i² = 1 at large κ (ρ = A/κ ≈ 1/κ ≫ A' ≈ (p−1)/(2κ²)):
    relative error ≈ ε·2κ/(p−1), e.g. 4e-13 at p = 2, κ = 1e4 and ~3e-8 at κ = 1e8. Evaluating
    ρ(1 − μ_i²) + A'μ_i² instead has no cancellation.
    """
    kappas = [1e2, 1e4, 1e6, 1e8]
    loc = torch.zeros(len(kappas), p, dtype=torch.float64)
    loc[:, 0] = 1.0
    var = VonMisesFisher(loc, torch.tensor(kappas, dtype=torch.float64)).variance
    errors = {k: rel_err(var[i, 0].item(), mp_mean_length_deriv(p, k)) for i, k in enumerate(kappas)}
    for i, k in enumerate(kappas):
        assert rel_err(var[i, 1].item(), mp_a_over_kappa(p, k)) <= 1e-12
    assert max(errors.values()) <= 1e-12, errors


def test_variance_gradient_along_axis_aligned_mean_direction():
    """d Var(x_0)/dκ for μ = e_0 is A_p''(κ) (mpmath: numerical derivative at 80 digits).

    BUG (same root as above): the derivative of ρ + (A' − ρ)μ_0² cancels too, and the autograd
    derivative of the naive A' = 1 − A² − (p−1)A/κ cancels by ≈ κ²: relative error 1.5e-9 at p = 3,
    κ = 1e4 and 3e-8 at κ = 1e5.
    """
    bad = {}
    for p in (3, 64):
        kappas = [0.5, 30.0, 1e3, 1e4, 1e5]
        k = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
        loc = torch.zeros(len(kappas), p, dtype=torch.float64)
        loc[:, 0] = 1.0
        (grad,) = torch.autograd.grad(VonMisesFisher(loc, k).variance[:, 0].sum(), k)
        for i, kk in enumerate(kappas):
            with mp.workdps(80):
                half = mp.mpf(p) / 2

                def a_prime(t, half=half, p=p):
                    a = mp.besseli(half, t) / mp.besseli(half - 1, t)
                    return 1 - a * a - (p - 1) * a / t

                ref = mp.diff(a_prime, mpf(kk))
            err = rel_err(grad[i].item(), ref)
            if err > 1e-10:
                bad[(p, kk)] = f"{err:.1e}"
    assert not bad, bad


def test_variance_at_kappa_zero_is_one_over_p():
    for p in (2, 3, 64):
        var = VonMisesFisher(unit_vectors((), p, 1), torch.tensor(0.0, dtype=torch.float64)).variance
        torch.testing.assert_close(var, torch.full((p,), 1.0 / p, dtype=torch.float64), rtol=1e-15, atol=0)


def test_scipy_logpdf_and_entropy_agree_where_scipy_is_finite():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    compared = 0
    for p in GRID_DIMS:
        for k in (1e-6, 1e-2, 0.5, 3.0, 50.0, 1e3, 1e5):
            mu = rng.standard_normal(p)
            mu /= np.linalg.norm(mu)
            x = rng.standard_normal((3, p))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            x = np.concatenate([x, mu[None]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    frozen = scipy_stats.vonmises_fisher(mu, k)
                    s_lp, s_h = frozen.logpdf(x), float(frozen.entropy())
                except Exception:  # scipy fails at high p (ive underflow)
                    continue
            d = VonMisesFisher(torch.tensor(mu), torch.tensor(k, dtype=torch.float64))
            ours_lp = d.log_prob(torch.tensor(x)).numpy()
            ours_h = d.entropy().item()
            mu_mp = mp_unit(torch.tensor(mu))
            if math.isfinite(s_h):
                ref_h = mp_entropy(p, k)
                tol = 1e-12 + 2 * rel_err(s_h, ref_h)  # scipy's own error (e.g. 6e-12 at κ = 1e5)
                assert rel_err(ours_h, s_h) <= tol, (p, k)
                compared += 1
            for j in range(len(x)):
                if not math.isfinite(s_lp[j]):
                    continue
                ref, _ = _mp_log_prob(p, mu_mp, k, torch.tensor(x[j]))
                tol = 1e-12 + 2 * rel_err(float(s_lp[j]), ref)
                assert rel_err(float(ours_lp[j]), s_lp[j]) <= tol, (p, k, j)
                compared += 1
    assert compared > 100


# ==================================================================================================
# D. normalisation by quadrature on S¹ and S²

QUAD_KAPPAS = [0.0, 1e-3, 1.0, 30.0, 500.0]


@pytest.mark.parametrize("kappa", QUAD_KAPPAS)
def test_density_integrates_to_one_on_circle(kappa):
    # trapezoidal rule on a periodic analytic integrand converges geometrically
    n = 4096
    theta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    x = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    d = VonMisesFisher(unit_vectors((), 2, 11), torch.tensor(kappa, dtype=torch.float64))
    total = torch.exp(d.log_prob(x)).sum().item() * (2 * math.pi / n)
    assert abs(total - 1.0) <= 1e-8, total


@pytest.mark.parametrize("kappa", QUAD_KAPPAS)
def test_density_integrates_to_one_on_sphere(kappa):
    """∫∫ f(θ, φ) sin θ dθ dφ with μ tilted away from the pole: composite Gauss–Legendre in θ, trapezoid in φ."""
    mu = torch.tensor([0.3, -0.5, 0.6], dtype=torch.float64)
    mu = mu / mu.norm()
    d = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64))
    nodes, weights = np.polynomial.legendre.leggauss(16)
    panels = 96
    edges = np.linspace(0.0, math.pi, panels + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    theta = torch.tensor(((edges[:-1, None] + edges[1:, None]) / 2 + half * nodes).ravel())
    w_theta = torch.tensor((half * weights).ravel())
    n_phi = 1024
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    st, ct = torch.sin(theta)[:, None], torch.cos(theta)[:, None]
    x = torch.stack([st * torch.cos(phi), st * torch.sin(phi), ct.expand(-1, n_phi)], -1)
    f = torch.exp(d.log_prob(x))  # [θ, φ]
    total = ((f.sum(-1) * (2 * math.pi / n_phi)) * torch.sin(theta) * w_theta).sum().item()
    assert abs(total - 1.0) <= 1e-8, total


# ==================================================================================================
# E. maximum likelihood fit

FIT_CASES = [(3, 2.0), (3, 50.0), (64, 20.0), (64, 500.0), (512, 200.0), (512, 2000.0)]


@pytest.mark.parametrize("p,kappa", FIT_CASES)
def test_fit_recovers_parameters(p, kappa, seeded):
    mu = unit_vectors((), p, p)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64)).sample((50_000,))
    fitted = VonMisesFisher.fit(x)
    assert isinstance(fitted, VonMisesFisher) and fitted.batch_shape == () and fitted.event_shape == (p,)
    assert abs(fitted.concentration.item() / kappa - 1) < 0.03
    assert (fitted.loc @ mu).item() > 0.999
    # κ̂ = A_p⁻¹(r̄) with r̄ = ‖Σx‖/n computed here
    total = x.sum(0)
    r_bar = torch.linalg.vector_norm(total) / x.shape[0]
    expected = inverse_mean_resultant_length(p, r_bar)
    torch.testing.assert_close(fitted.concentration, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(fitted.loc, total / total.norm(), rtol=0, atol=1e-15)
    # and r̄ = A_p(κ̂) to high precision (mpmath)
    assert rel_err(r_bar.item(), mp_mean_length(p, fitted.concentration.item())) <= 1e-12


def test_fit_batched_and_dtype(seeded):
    p = 4
    mu = unit_vectors((2, 3), p, 3, torch.float32)
    kappa = torch.tensor([[1.0, 10.0, 100.0], [5.0, 50.0, 500.0]])
    x = VonMisesFisher(mu, kappa).sample((20_000,))
    fitted = VonMisesFisher.fit(x)
    assert fitted.batch_shape == (2, 3) and fitted.loc.dtype == torch.float32
    assert ((fitted.concentration / kappa - 1).abs() < 0.05).all()
    assert ((fitted.loc * mu).sum(-1) > 0.99).all()
    for i in range(2):
        for j in range(3):
            single = VonMisesFisher.fit(x[:, i, j])
            torch.testing.assert_close(single.concentration, fitted.concentration[i, j], rtol=1e-6, atol=0)


def test_weighted_fit_equals_fit_on_repeated_data(seeded):
    p, n = 5, 60
    mu = unit_vectors((2,), p, 8)
    x = VonMisesFisher(mu, torch.tensor([3.0, 40.0], dtype=torch.float64)).sample((n,))
    g = torch.Generator().manual_seed(1)
    weights = torch.randint(0, 4, (n, 2), generator=g).to(torch.float64)
    fitted = VonMisesFisher.fit(x, weights)
    for b in range(2):
        repeated = x[:, b].repeat_interleave(weights[:, b].long(), dim=0)
        ref = VonMisesFisher.fit(repeated)
        torch.testing.assert_close(fitted.loc[b], ref.loc, rtol=0, atol=1e-13)
        torch.testing.assert_close(fitted.concentration[b], ref.concentration, rtol=1e-11, atol=0)
    # fractional weights: scale invariance
    scaled = VonMisesFisher.fit(x, weights * 0.37)
    torch.testing.assert_close(scaled.concentration, fitted.concentration, rtol=1e-11, atol=0)


def test_fit_degenerate_inputs():
    e = torch.eye(3, dtype=torch.float64)
    antipodal = VonMisesFisher.fit(torch.stack([e[1], -e[1]]))
    assert antipodal.concentration.item() == 0.0
    assert bool(constraints.sphere.check(antipodal.loc))
    identical = VonMisesFisher.fit(e[2].expand(10, 3))
    assert torch.isfinite(identical.concentration) and identical.concentration.item() > 1e6
    torch.testing.assert_close(identical.loc, e[2], rtol=0, atol=0)


def test_fit_agrees_with_scipy_at_p3_and_scipy_fails_at_high_p(seeded, record_property):
    scipy_stats = pytest.importorskip("scipy.stats")
    for kappa in (5.0, 500.0):
        mu = unit_vectors((), 3, 4)
        x = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64)).sample((50_000,))
        ours = VonMisesFisher.fit(x)
        s_mu, s_kappa = scipy_stats.vonmises_fisher.fit(x.numpy())
        assert rel_err(ours.concentration.item(), s_kappa) <= 1e-8
        np.testing.assert_allclose(ours.loc.numpy(), s_mu, rtol=0, atol=1e-12)
    # p = 512: record what scipy does (it has failed with κ = 1e-8 and NaN warnings in scipy 1.17)
    p, kappa = 512, 200.0
    x = VonMisesFisher(unit_vectors((), p, 6), torch.tensor(kappa, dtype=torch.float64)).sample((50_000,))
    ours = VonMisesFisher.fit(x).concentration.item()
    assert abs(ours / kappa - 1) < 0.03
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s_kappa = float(scipy_stats.vonmises_fisher.fit(x.numpy())[1])
        except Exception as error:  # noqa: BLE001 - recorded, not asserted
            s_kappa = f"raised {type(error).__name__}"
    record_property("scipy_fit_kappa_p512_true200", s_kappa)
    record_property("ours_fit_kappa_p512_true200", ours)
    print(f"p=512, κ=200: ours κ̂={ours:.4f}, scipy κ̂={s_kappa}")


# ==================================================================================================
# F. bad input → ValueError


def test_bad_input_raises_value_error():
    loc = torch.tensor([0.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        VonMisesFisher(torch.tensor([0.0, 0.0, 2.0]), 1.0, validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher(loc, -1.0, validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher(loc, torch.tensor([1.0, -1e-30]), validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher(loc, float("nan"), validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher(loc, 1.0, validate_args=True).log_prob(torch.tensor([0.0, 0.6, 0.9]))
    with pytest.raises(ValueError):  # p = 1
        VonMisesFisher(torch.tensor([1.0]), 1.0)
    with pytest.raises(ValueError):  # p = 1 with a batch
        VonMisesFisher(torch.ones(4, 1), 1.0, validate_args=False)
    with pytest.raises(ValueError):  # 0-dim loc
        VonMisesFisher(torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError):  # integer loc
        VonMisesFisher(torch.tensor([0, 0, 1]), 1.0)
    with pytest.raises(ValueError):  # non-broadcasting shapes
        VonMisesFisher(loc.expand(3, 3), torch.ones(4))
    with pytest.raises(ValueError):
        VonMisesFisher(loc.expand(2, 3, 3), torch.ones(2, 2))
    for dim in (1, 0, -3, 3.0, True, "3"):
        with pytest.raises(ValueError):
            HypersphericalUniform(dim)
    with pytest.raises(ValueError):
        HypersphericalUniform(3, validate_args=True).log_prob(torch.tensor([0.0, 0.0, 1.5]))


def test_fit_bad_input_raises_value_error():
    x = unit_vectors((10,), 3, 0)
    with pytest.raises(ValueError):
        VonMisesFisher.fit(x[0])  # no sample dimension
    with pytest.raises(ValueError):
        VonMisesFisher.fit(2.0 * x, validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher.fit(x, torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError):
        VonMisesFisher.fit(x, -torch.ones(10, dtype=torch.float64), validate_args=True)
    with pytest.raises(ValueError):
        VonMisesFisher.fit(x, torch.zeros(10, dtype=torch.float64), validate_args=True)


def test_validation_off_does_not_check_parameters():
    d = VonMisesFisher(torch.tensor([0.0, 0.0, 2.0]), 1.0, validate_args=False)
    # loc is used as loc/‖loc‖
    ref = VonMisesFisher(torch.tensor([0.0, 0.0, 1.0]), 1.0)
    x = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.mode, ref.mode)


# ==================================================================================================
# G. slow: larger grids


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("p", [1024, 4096])
def test_log_prob_entropy_high_dim_match_mpmath(p, dtype, seeded):
    kappas = torch.tensor([0.0, 1e-3, 1.0, 100.0, 1e4, 1e6], dtype=torch.float64).to(dtype)
    loc = unit_vectors((len(kappas),), p, 50, dtype)
    d = VonMisesFisher(loc, kappas)
    h = d.entropy()
    for x in (loc, d.sample()):
        lp = d.log_prob(x)
        for i in range(len(kappas)):
            ref, scale = _mp_log_prob(p, mp_unit(loc[i]), kappas[i].item(), x[i])
            assert abs(lp[i].item() - float(ref)) <= RTOL[dtype] * float(scale), (p, kappas[i].item())
    for i, k in enumerate(kappas.tolist()):
        assert rel_err(h[i].item(), mp_entropy(p, k)) <= RTOL[dtype], (p, k)


@pytest.mark.slow
@pytest.mark.parametrize("p,kappa", [(3, 1.0), (3, 1e4), (64, 100.0), (64, 1e5), (512, 50.0), (512, 5e3), (512, 1e5)])
def test_fit_recovers_kappa_more_cases(p, kappa, seeded):
    mu = unit_vectors((), p, p + 1)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64)).sample((50_000,))
    fitted = VonMisesFisher.fit(x)
    assert abs(fitted.concentration.item() / kappa - 1) < 0.03
    r_bar = (torch.linalg.vector_norm(x.sum(0)) / x.shape[0]).item()
    assert rel_err(r_bar, mp_mean_length(p, fitted.concentration.item())) <= 1e-12


@pytest.mark.slow
def test_density_integrates_to_one_on_sphere_very_concentrated():
    kappa = 1e4
    mu = torch.tensor([0.3, -0.5, 0.6], dtype=torch.float64)
    mu = mu / mu.norm()
    d = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64))
    # integrate in coordinates whose pole is e_z; restrict θ to the window where the mass lies
    theta0 = math.acos(mu[2].item())
    nodes, weights = np.polynomial.legendre.leggauss(20)
    edges = np.linspace(theta0 - 0.2, theta0 + 0.2, 201)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    theta = torch.tensor(((edges[:-1, None] + edges[1:, None]) / 2 + half * nodes).ravel())
    w_theta = torch.tensor((half * weights).ravel())
    n_phi = 4096
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    total = 0.0
    for chunk in torch.split(torch.arange(len(theta)), 500):
        st, ct = torch.sin(theta[chunk])[:, None], torch.cos(theta[chunk])[:, None]
        x = torch.stack([st * torch.cos(phi), st * torch.sin(phi), ct.expand(-1, n_phi)], -1)
        f = torch.exp(d.log_prob(x))
        total += ((f.sum(-1) * (2 * math.pi / n_phi)) * st[:, 0] * w_theta[chunk]).sum().item()
    assert abs(total - 1.0) <= 1e-8, total
