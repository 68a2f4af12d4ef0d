"""Conventions of torch.distributions and Pyro, and edge cases that once failed.

* the concentration constraint: ``biject_to``/``transform_to`` map ℝ to finite κ ≥ 0, so ``pyro.param``
  with it works (it used to return inf), and SVI runs with it;
* ``infer_shapes`` (Pyro's protocol) for all three classes; ``torch.jit.trace`` of mean, variance,
  log_prob and entropy;
* mixed dtypes (float32 loc, float64 κ and the reverse), each checked at its own precision;
* one-line constraint errors that summarise the offending entries instead of printing the tensor;
* tiny and huge float32 concentrations of the non-isotropic vMF, empty batches, an r within 1e-10 of 1
  for the inverse of A_p, κ far above 1e8 in the sampler, fitting zero samples, mismatched batch
  shapes in a KL and between a Bessel order and its argument.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch.distributions import biject_to, kl_divergence, transform_to

from vmf_dists import (
    HypersphericalUniform,
    NonIsotropicVMF,
    VonMisesFisher,
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    mean_resultant_length,
)

F64, F32 = torch.float64, torch.float32


def _unit(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).to(dtype)


# --------------------------------------------------------------------------------------------------
# the concentration constraint


def test_concentration_constraint_bijects_the_real_line_to_finite_nonnegative_values():
    constraint = VonMisesFisher.arg_constraints["concentration"]
    unconstrained = torch.linspace(-50.0, 50.0, 201, dtype=F64)
    for registry in (biject_to, transform_to):
        values = registry(constraint)(unconstrained)
        assert bool(torch.isfinite(values).all()) and bool((values >= 0).all())
        assert bool(constraint.check(values).all())
        torch.testing.assert_close(registry(constraint).inv(values), unconstrained, rtol=1e-12, atol=1e-12)
    assert not bool(constraint.check(torch.tensor([math.inf, -1.0, math.nan])).any())


def test_pyro_param_with_the_concentration_constraint_and_svi():
    """A vMF guide whose κ is a constrained pyro.param: the param is finite, SVI steps keep it so and
    move the guide towards the data."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    constraint = VonMisesFisher.arg_constraints["concentration"]
    data = VonMisesFisher(torch.tensor([0.0, 0.0, 1.0], dtype=F64), torch.tensor(20.0, dtype=F64)).sample((200,))

    def model():
        mu = pyro.sample("mu", HypersphericalUniform(3, dtype=F64))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", VonMisesFisher(mu, torch.tensor(20.0, dtype=F64)), obs=data)

    def guide():
        loc = pyro.param("loc", torch.tensor([1.0, 0.0, 0.0], dtype=F64), constraint=dist.constraints.sphere)
        kappa = pyro.param("kappa", torch.tensor(5.0, dtype=F64), constraint=constraint)
        pyro.sample("mu", VonMisesFisher(loc, kappa))

    guide()
    assert torch.isfinite(pyro.param("kappa")).item() and pyro.param("kappa").item() == pytest.approx(5.0)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step() for _ in range(150)]
    assert all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(pyro.param("kappa").item()) and pyro.param("kappa").item() > 0
    assert pyro.param("loc")[2].item() > 0.9  # moved from e₁ towards the data's direction e₃
    pyro.clear_param_store()


# --------------------------------------------------------------------------------------------------
# infer_shapes, jit.trace


def test_infer_shapes_matches_the_constructed_distributions():
    cases = [
        (VonMisesFisher, dict(loc=(4, 1, 5), concentration=(3,)),
         lambda: VonMisesFisher(_unit((4, 1, 5), 0), torch.ones(3, dtype=F64))),
        (VonMisesFisher, dict(loc=(2, 5)), lambda: VonMisesFisher(_unit((2, 5), 0), 1.0)),
        (NonIsotropicVMF, dict(loc=(2, 1, 5), concentration=(3, 5)),
         lambda: NonIsotropicVMF(_unit((2, 1, 5), 0), torch.ones(3, 5, dtype=F64))),
        (HypersphericalUniform, dict(dim=5, batch_shape=(2, 3)), lambda: HypersphericalUniform(5, (2, 3))),
    ]
    for cls, shapes, make in cases:
        d = make()
        assert cls.infer_shapes(**shapes) == (d.batch_shape, d.event_shape), cls.__name__


@pytest.mark.parametrize("method", ["mean", "variance", "log_prob", "entropy"])
def test_jit_trace(method):
    """torch.jit.trace of the moments and densities (dim used to become a tensor and was rejected)."""
    def fn(mu, k):
        d = VonMisesFisher(mu, k)
        return d.log_prob(mu) if method == "log_prob" else d.entropy() if method == "entropy" else getattr(d, method)

    mu, k = _unit((4, 5), 1), torch.tensor([0.5, 3.0, 40.0, 800.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fn, (mu, k), check_trace=False)
    mu2, k2 = _unit((4, 5), 2), torch.tensor([2.0, 0.1, 90.0, 5.0], dtype=F64)
    torch.testing.assert_close(traced(mu2, k2), fn(mu2, k2), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# dtypes and messages


@pytest.mark.parametrize(("loc_dtype", "kappa_dtype"), [(F32, F64), (F64, F32)])
def test_mixed_dtypes_are_checked_each_at_its_own_precision(loc_dtype, kappa_dtype):
    """A float32 unit loc is off the sphere by ~1e-8 in float64 terms; with a float64 κ it used to be
    rejected (checked after promotion, at float64's tolerance)."""
    loc = torch.nn.functional.normalize(
        torch.randn(64, 512, generator=torch.Generator().manual_seed(0), dtype=loc_dtype), dim=-1
    )
    kappa = torch.linspace(0.0, 100.0, 64, dtype=kappa_dtype)
    d = VonMisesFisher(loc, kappa, validate_args=True)
    assert d.loc.dtype == d.concentration.dtype == F64
    assert d.log_prob(d.sample()).dtype == F64


def test_constraint_errors_summarise_instead_of_printing_the_tensor():
    loc = torch.nn.functional.normalize(torch.randn(8, 512, dtype=F64), dim=-1)
    loc[3] *= 1.5
    with pytest.raises(ValueError) as excinfo:
        VonMisesFisher(loc, 1.0, validate_args=True)
    message = str(excinfo.value)
    assert "loc" in message and "1 of 8 vectors" in message and "(3,)" in message
    assert len(message) < 300 and "\n" not in message
    with pytest.raises(
        ValueError, match=r"concentration must be finite and non-negative; 2 of 3 entries, the first -1 at index \(1,\)"
    ):
        VonMisesFisher(_unit((3, 4), 0), torch.tensor([1.0, -1.0, math.nan], dtype=F64), validate_args=True)
    d = VonMisesFisher(_unit((3, 512), 0), torch.ones(3, dtype=F64), validate_args=True)
    with pytest.raises(ValueError) as excinfo:
        d.log_prob(2.0 * _unit((3, 512), 1))
    assert "value" in str(excinfo.value) and len(str(excinfo.value)) < 300
    for other in (
        NonIsotropicVMF(_unit((3, 512), 0), torch.ones(3, 512, dtype=F64)), HypersphericalUniform(512, (3,), dtype=F64)
    ):
        with pytest.raises(ValueError) as excinfo:
            other.log_prob(2.0 * _unit((3, 512), 1))
        assert len(str(excinfo.value)) < 300


# --------------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("k", [1e-30, 1e-38, 1e-45, 1e30])
def test_nonisotropic_extreme_float32_concentrations(k):
    """Tiny concentrations are (nearly) the uniform distribution; the samples used to be NaN."""
    mu = _unit((5,), 3, F32)
    d = NonIsotropicVMF(mu, torch.full((5,), k), validate_args=True)
    x = d.sample((100,))
    assert x.dtype == F32 and bool(torch.isfinite(x).all())
    torch.testing.assert_close(torch.linalg.vector_norm(x, dim=-1), torch.ones(100), rtol=0, atol=4e-7)
    lp = d.log_prob(x)
    assert bool(torch.isfinite(lp).all())
    if k < 1:  # κ ~ 0: the uniform density on S⁴, −log(8π²/3)
        torch.testing.assert_close(lp, torch.full((100,), -math.log(8 * math.pi**2 / 3)), rtol=1e-6, atol=0)


def test_empty_batches():
    for d in (NonIsotropicVMF(torch.zeros(0, 5), torch.ones(0, 5)), VonMisesFisher(torch.zeros(0, 5), torch.ones(0))):
        x = d.sample((2,))
        assert x.shape == (2, 0, 5) and d.log_prob(x).shape == (2, 0)
    assert VonMisesFisher(torch.zeros(0, 5), torch.ones(0)).entropy().shape == (0,)


def test_inverse_mean_resultant_length_close_to_one_from_a_python_number():
    """r = 1 − 1e-10 as a Python float is solved from its exact value (it used to be rounded to 1 in
    float32 and return NaN): A_p(κ̂) = r in float64."""
    kappa = inverse_mean_resultant_length(8, 0.9999999999)
    assert kappa.dtype == torch.get_default_dtype() and math.isfinite(kappa.item())
    r = mean_resultant_length(8, torch.tensor(kappa.item(), dtype=F64)).item()
    assert r == pytest.approx(0.9999999999, abs=1e-6 * 1e-10 * 1e7)  # κ rounded to float32: r to ~1e-16 relative


@pytest.mark.parametrize("p", [2, 3, 10, 512])
@pytest.mark.parametrize("kappa", [1e10, 1e20, 1e154, 1e300, 1.7e308])
def test_sampler_far_above_kappa_1e8(p, kappa):
    """Exact samples past κ = 1e8 (they used to stall after 64 rounds past κ ~ 1e154): unit norm, and
    1 − μᵀx ≈ (p − 1)/(2κ) on average (at most ~1e-300, i.e. x = μ to every digit, beyond)."""
    mu = _unit((p,), 4)
    x = VonMisesFisher(mu, torch.tensor(kappa, dtype=F64)).sample((500,))
    assert bool(torch.isfinite(x).all())
    tolerance = 10.0 * torch.finfo(F64).eps * math.sqrt(p)  # the sphere constraint's
    torch.testing.assert_close(torch.linalg.vector_norm(x, dim=-1), torch.ones(500, dtype=F64), rtol=0, atol=tolerance)
    assert float((x - mu).norm(dim=-1).max()) <= 10.0 * math.sqrt(p / kappa) + 1e-15


def test_fit_without_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one sample"):
        VonMisesFisher.fit(torch.zeros(0, 5))


def test_batch_shape_mismatches_are_value_errors():
    p = VonMisesFisher(_unit((3, 4), 0), torch.ones(3, dtype=F64))
    q = VonMisesFisher(_unit((2, 4), 1), torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="batch shapes"):
        kl_divergence(p, q)
    with pytest.raises(ValueError, match="batch shapes"):
        kl_divergence(p, HypersphericalUniform(4, (2,), dtype=F64))
    for fn in (log_bessel_iv, bessel_iv_ratio):
        with pytest.raises(ValueError, match="does not broadcast"):
            fn(torch.tensor([1.0, 2.0, 3.0], dtype=F64), torch.ones(2, dtype=F64))


@pytest.mark.parametrize("p", [3, 5])
def test_distributions_built_and_used_under_inference_mode(p):
    """Evaluation code (e.g. a Lightning validate/predict step) runs under torch.inference_mode with
    validation on: inference tensors have no version counter, so nothing may read one."""
    with torch.inference_mode():  # the parameters are inference tensors too (a network's outputs)
        loc = torch.nn.functional.normalize(torch.randn(4, p), dim=-1)
        kappa = torch.rand(4) * 10.0
        d = VonMisesFisher(loc, kappa, validate_args=True)
        x = d.sample((2,))
        assert torch.isfinite(d.log_prob(x)).all() and torch.isfinite(d.log_prob(d.rsample())).all()
        assert torch.isfinite(d.entropy()).all()
        assert torch.isfinite(kl_divergence(d, HypersphericalUniform(p))).all()
        assert torch.isfinite(kl_divergence(d, VonMisesFisher(loc.flip(0), kappa))).all()


def test_distributions_pickle_after_sampling():
    """A distribution that has sampled and evaluated (and cached its Bessel parts) still pickles."""
    import pickle

    d = VonMisesFisher(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1), torch.rand(3).requires_grad_())
    d.log_prob(d.rsample())
    copy = pickle.loads(pickle.dumps(d))
    torch.testing.assert_close(copy.entropy(), d.entropy())
