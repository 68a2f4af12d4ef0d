"""The examples that the docs show are run here, so the docs cannot drift from working code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyro_svi_recovers_direction_and_exact_posterior():
    result = load_example("pyro_svi").run()
    assert result["cosine"] > 0.99
    # The guide family contains the exact posterior vMF(Σx/‖Σx‖, κ_obs‖Σx‖): SVI must find it.
    assert float(result["exact_loc"] @ result["q_loc"]) > 0.9999
    assert result["q_concentration"] == pytest.approx(result["exact_concentration"], rel=0.1)


def test_autoguide_list_recipe_from_the_pyro_page():
    """The recipe of docs/pyro.md: AutoNormal for the Euclidean sites, a vMF guide for the sphere site."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoGuideList, AutoNormal
    from pyro.optim import ClippedAdam

    from vmf_dists import HypersphericalUniform, VonMisesFisher

    pyro.set_rng_seed(1)
    pyro.clear_param_store()
    true_mu = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, -2.0]), dim=0)
    data = VonMisesFisher(true_mu, 30.0).sample((300,))

    def model(data):
        mu = pyro.sample("mu", HypersphericalUniform(3))
        log_kappa = pyro.sample("log_kappa", dist.Normal(2.0, 2.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", VonMisesFisher(mu, log_kappa.exp()), obs=data)

    def sphere_guide(data):
        loc = pyro.param("mu_loc", torch.tensor([0.0, 0.0, 1.0]), constraint=dist.constraints.sphere)
        kappa = pyro.param("mu_kappa", torch.tensor(10.0), constraint=dist.constraints.positive)
        pyro.sample("mu", VonMisesFisher(loc, kappa))

    guide = AutoGuideList(model)
    guide.append(AutoNormal(poutine.block(model, hide=["mu"])))
    guide.append(sphere_guide)
    svi = SVI(model, guide, ClippedAdam({"lr": 0.05}), loss=Trace_ELBO())
    for _ in range(400):
        loss = svi.step(data)
    assert torch.isfinite(torch.tensor(loss))
    assert float(pyro.param("mu_loc").detach() @ true_mu) > 0.99
    median = guide.median(data)
    assert abs(float(median["log_kappa"]) - torch.log(torch.tensor(30.0)).item()) < 0.3


def test_mixture_of_vmf_recovers_known_components_and_clusters_digits():
    result = load_example("mixture_of_vmf").run(n_per_cluster=400, restarts=3)
    s = result["synthetic"]
    assert min(s["cosines"]) > 0.99
    # 400 points per component on S^15: the MLE of kappa has a relative s.e. of about 1/sqrt(400 * 15 / 2) ~ 2%
    for true, fit in zip(s["kappa_true"], s["kappa_fit"]):
        assert fit == pytest.approx(true, rel=0.1)
    assert all(w == pytest.approx(1 / 3, abs=0.01) for w in s["weights"])
    # digits: clusters that agree with the labels far beyond chance (NMI of random clusters ~ 0.01)
    assert result["digits_nmi_vmf_mixture"] > 0.6
