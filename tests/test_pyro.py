"""Pyro integration: plates (which call ``expand``), ``to_event``, ``mask``, traces, SVI with a
hand-written vMF guide (Trace_ELBO and TraceMeanField_ELBO, the latter through the registered KL),
AutoDelta on a sphere site, and the documented failure of AutoNormal on a sphere site."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.kl import kl_divergence as pyro_kl
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from tests.conftest import unit_vectors
from vmf_dists import HypersphericalUniform, VonMisesFisher


@pytest.fixture(autouse=True)
def clean_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def _axis(p, i=0, dtype=torch.float64):
    e = torch.zeros(p, dtype=dtype)
    e[i] = 1.0
    return e


# ==================================================================================================
# plates, to_event, mask, traces


@pytest.mark.parametrize("make", [
    lambda: VonMisesFisher(_axis(3), torch.tensor(5.0, dtype=torch.float64)),
    lambda: HypersphericalUniform(3, dtype=torch.float64),
], ids=["vmf", "uniform"])
def test_plate_expands_and_keeps_class(make):
    base = make()

    def model():
        with pyro.plate("outer", 2, dim=-2):
            with pyro.plate("inner", 4, dim=-1):
                return pyro.sample("z", make())

    trace = poutine.trace(model).get_trace()
    node = trace.nodes["z"]
    fn = node["fn"]
    assert type(fn) is type(base)
    assert fn.batch_shape == (2, 4) and fn.event_shape == (3,)
    assert node["value"].shape == (2, 4, 3)
    assert bool(constraints.sphere.check(node["value"]).all())
    trace.compute_log_prob()
    assert node["log_prob"].shape == (2, 4)
    torch.testing.assert_close(trace.log_prob_sum(), base.log_prob(node["value"]).sum(), rtol=1e-14, atol=0)


def test_plate_broadcasts_batched_parameters():
    loc = unit_vectors((3,), 4, 1)
    kappa = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)

    def model():
        with pyro.plate("rows", 2, dim=-2):
            with pyro.plate("cols", 3, dim=-1):
                return pyro.sample("z", VonMisesFisher(loc, kappa))

    trace = poutine.trace(model).get_trace()
    fn = trace.nodes["z"]["fn"]
    assert isinstance(fn, VonMisesFisher) and fn.batch_shape == (2, 3)
    assert torch.equal(fn.concentration, kappa.expand(2, 3))
    value = trace.nodes["z"]["value"]
    expected = VonMisesFisher(loc, kappa).log_prob(value).sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-14, atol=0)


def test_to_event_and_mask():
    loc = unit_vectors((3,), 5, 2)
    d = VonMisesFisher(loc, torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64))
    x = d.sample((7,))
    independent = d.to_event(1)
    assert independent.batch_shape == () and independent.event_shape == (3, 5)
    torch.testing.assert_close(independent.log_prob(x), d.log_prob(x).sum(-1), rtol=1e-14, atol=0)
    assert independent.sample((2,)).shape == (2, 3, 5)
    mask = torch.tensor([True, False, True])
    masked = d.mask(mask)
    lp = masked.log_prob(x)
    assert lp.shape == (7, 3)
    assert (lp[:, 1] == 0).all()
    torch.testing.assert_close(lp[:, [0, 2]], d.log_prob(x)[:, [0, 2]], rtol=0, atol=0)
    assert (d.mask(False).log_prob(x) == 0).all()
    u = HypersphericalUniform(5, (3,), dtype=torch.float64)
    assert u.to_event(1).log_prob(x).shape == (7,)


def test_trace_log_prob_sum_with_observations():
    data = unit_vectors((10,), 3, 3)
    prior_loc = _axis(3, 2)

    def model():
        z = pyro.sample("z", VonMisesFisher(prior_loc, torch.tensor(2.0, dtype=torch.float64)))
        with pyro.plate("data", 10):
            pyro.sample(
                "x", VonMisesFisher(z, torch.tensor(8.0, dtype=torch.float64)).mask(torch.arange(10) < 7), obs=data
            )
        pyro.sample("u", HypersphericalUniform(3, dtype=torch.float64).to_event(0))
        return z

    trace = poutine.trace(model).get_trace()
    z, u = trace.nodes["z"]["value"], trace.nodes["u"]["value"]
    expected = (
        VonMisesFisher(prior_loc, torch.tensor(2.0, dtype=torch.float64)).log_prob(z)
        + VonMisesFisher(z, torch.tensor(8.0, dtype=torch.float64)).log_prob(data[:7]).sum()
        + HypersphericalUniform(3, dtype=torch.float64).log_prob(u)
    )
    torch.testing.assert_close(trace.log_prob_sum(), expected, rtol=1e-13, atol=0)


def test_pyro_kl_divergence_dispatch():
    d1 = VonMisesFisher(unit_vectors((2,), 3, 4), torch.tensor([1.0, 3.0], dtype=torch.float64))
    d2 = VonMisesFisher(unit_vectors((2,), 3, 5), torch.tensor([2.0, 0.5], dtype=torch.float64))
    u = HypersphericalUniform(3, (2,), dtype=torch.float64)
    expected = torch.distributions.kl_divergence(d1, d2)
    torch.testing.assert_close(pyro_kl(d1, d2), expected, rtol=0, atol=0)
    # Independent / expanded / masked versions (what plates, to_event and mask produce)
    torch.testing.assert_close(pyro_kl(d1.to_event(1), d2.to_event(1)), expected.sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        pyro_kl(d1.expand((4, 2)), u.expand((4, 2))), torch.distributions.kl_divergence(d1, u).expand(4, 2),
        rtol=0, atol=0,
    )
    mask = torch.tensor([True, False])
    masked = pyro_kl(d1.mask(mask), d2.mask(mask))
    torch.testing.assert_close(masked, torch.stack([expected[0], torch.zeros((), dtype=torch.float64)]), rtol=0, atol=0)


# ==================================================================================================
# SVI


TRUE_DIRECTION = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)


def _data(n=200, kappa=20.0, dtype=torch.float64):
    pyro.set_rng_seed(1)
    return VonMisesFisher(TRUE_DIRECTION.to(dtype), torch.tensor(kappa, dtype=dtype)).sample((n,))


def _model(data):
    dtype = data.dtype
    z = pyro.sample("z", VonMisesFisher(_axis(3, 0, dtype), torch.tensor(1.0, dtype=dtype)))
    with pyro.plate("data", len(data)):
        pyro.sample("x", VonMisesFisher(z, torch.tensor(20.0, dtype=dtype)), obs=data)


def _guide(data):
    dtype = data.dtype
    loc = pyro.param("loc", _axis(3, 1, dtype), constraint=constraints.sphere)
    kappa = pyro.param("kappa", torch.tensor(10.0, dtype=dtype), constraint=constraints.positive)
    pyro.sample("z", VonMisesFisher(loc, kappa))


@pytest.mark.parametrize(
    "elbo,dtype",
    [(Trace_ELBO, torch.float64), (TraceMeanField_ELBO, torch.float64),
     (Trace_ELBO, torch.float32), (TraceMeanField_ELBO, torch.float32)],
    ids=["Trace_ELBO-f64", "TraceMeanField_ELBO-f64", "Trace_ELBO-f32", "TraceMeanField_ELBO-f32"],
)
def test_svi_recovers_mean_direction(elbo, dtype):
    data = _data(dtype=dtype)
    pyro.set_rng_seed(2)
    svi = SVI(_model, _guide, pyro.optim.Adam({"lr": 0.1}), elbo())
    losses = [svi.step(data) for _ in range(80)]
    loc = pyro.param("loc").detach()
    assert loc.dtype == dtype
    assert bool(constraints.sphere.check(loc))
    assert (loc.double() @ TRUE_DIRECTION).item() > 0.99
    assert pyro.param("kappa").item() > 10.0  # the posterior is concentrated; κ grows
    assert sum(losses[-10:]) < sum(losses[:10])


@pytest.mark.parametrize("prior", ["vmf", "uniform"])
def test_trace_mean_field_elbo_uses_registered_kl(prior):
    """With no likelihood, the TraceMeanField ELBO loss is exactly KL(guide ‖ prior) (no sampling)."""
    p = 5
    prior_dist = (
        VonMisesFisher(_axis(p), torch.tensor(3.0, dtype=torch.float64))
        if prior == "vmf"
        else HypersphericalUniform(p, dtype=torch.float64)
    )
    guide_loc, guide_kappa = unit_vectors((4,), p, 6), torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=torch.float64)

    def model():
        with pyro.plate("n", 4):
            pyro.sample("z", prior_dist)

    def guide():
        with pyro.plate("n", 4):
            pyro.sample("z", VonMisesFisher(guide_loc, guide_kappa))

    loss = TraceMeanField_ELBO().loss(model, guide)
    expected = torch.distributions.kl_divergence(VonMisesFisher(guide_loc, guide_kappa), prior_dist).sum().item()
    assert loss == pytest.approx(expected, rel=1e-12)


def test_autodelta_on_sphere_site():
    data = _data()
    guide = AutoDelta(_model)
    svi = SVI(_model, guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(60):
        svi.step(data)
    z = guide.median(data)["z"].detach()
    assert bool(constraints.sphere.check(z))
    assert (z @ TRUE_DIRECTION).item() > 0.99


def test_autonormal_on_sphere_site_fails():
    """Documented limitation (Pyro's, not ours): AutoNormal needs a bijection to R^n, and there is
    none for constraints.sphere; Pyro raises ValueError suggesting ProjectedNormalReparam."""
    data = _data(20)
    guide = AutoNormal(_model)
    svi = SVI(_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    with pytest.raises((ValueError, NotImplementedError), match="(?i)spher"):
        svi.step(data)


def test_predictive_vectorized_over_samples():
    """Predictive(parallel=True) wraps the model in an extra plate, i.e. expands every site."""
    data = _data(20)

    def model(data):
        z = pyro.sample("z", VonMisesFisher(_axis(3), torch.tensor(1.0, dtype=torch.float64)))
        with pyro.plate("data", len(data)):
            pyro.sample("x", VonMisesFisher(z.unsqueeze(-2), torch.tensor(20.0, dtype=torch.float64)), obs=data)

    _guide(data)  # initialise the params
    out = Predictive(model, guide=_guide, num_samples=7, parallel=True, return_sites=["z", "x"])(data)
    assert out["z"].shape == (7, 1, 3) and out["x"].shape == (7, 20, 3)
    assert bool(constraints.sphere.check(out["z"]).all()) and bool(constraints.sphere.check(out["x"]).all())
    prior = Predictive(model, num_samples=5, parallel=True)(data)
    assert prior["z"].shape == (5, 1, 3)
