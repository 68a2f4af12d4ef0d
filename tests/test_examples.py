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


def test_hyperspherical_vae_and_gaussian_vae_learn_beyond_baselines():
    """examples/hyperspherical_vae.py at CI settings: four short SVI runs (S-VAE and N-VAE, d = 3 and 10)."""
    import math

    import torch

    iw_samples = 100
    result = load_example("hyperspherical_vae").run(epochs=30, latent_dims=(3, 10), eval_particles=10,
                                                    iw_samples=iw_samples)
    baseline = result["independent_pixels_per_image"]
    for latent in ("vmf", "normal"):
        for d in (3, 10):
            r = result[(latent, d)]
            for key in ("elbo", "log_likelihood", "kl", "elbo_untrained", "train_elbo"):
                assert math.isfinite(r[key]), (latent, d, key)
            # An untrained decoder has logits ~ 0, i.e. ELBO ~ -64 log 2 = -44.4; independent pixels reach
            # -24.3, and a trained VAE approaches or passes them: 10 nats is half of that gap.
            assert r["elbo"] > r["elbo_untrained"] + 10.0, (latent, d)
            # Pyro's Trace_ELBO and the direct estimator E_q[log p(x, z) - log q(z | x)] estimate the same
            # number: they agree within 4 combined Monte-Carlo standard errors (this checks the model/guide
            # wiring: the prior's log_prob, the plate, the vMF's log_prob).
            direct = r["per_image"]["elbo"]
            se_direct = float(r["per_image"]["elbo_var"].sum().div(iw_samples).sqrt()) / direct.numel()
            assert abs(r["elbo"] - float(direct.mean())) < 4 * math.hypot(r["elbo_mc_se"], se_direct), (latent, d)
            assert r["kl"] >= 0.0
    # At d = 3 both VAEs use their latent code: their test ELBO beats the best model without one
    # (independent Bernoulli pixels) by more than 3 standard errors of the paired per-image difference.
    # (At d = 10 and 30 epochs the S-VAE is only leaving posterior collapse, so it is not held to this.)
    for key in (("vmf", 3), ("normal", 3), ("normal", 10)):
        gain = result[key]["per_image"]["elbo"] - baseline
        assert float(gain.mean()) > 3 * float(gain.std()) / math.sqrt(gain.numel()), key
        assert result[key]["kl"] > 0.5, key  # a collapsed posterior has KL = 0
    assert torch.isfinite(baseline).all()


def test_nonisotropic_proxies_fit_and_beat_isotropic_vmf():
    import math

    result = load_example("nonisotropic_proxies").run(steps=300, n_train=200, n_test=1000)
    anisotropic = range(3)  # the fourth class is the isotropic control (k = 25 * ones)
    for c in range(4):
        # the maximum-likelihood estimate is asymptotically normal: within 4 standard errors
        for k_fit, k_true, se in zip(result["k_fit"][c], result["k_true"][c], result["log_k_se"][c]):
            assert abs(math.log(k_fit) - math.log(k_true)) < 4 * se, (c, k_fit, k_true, se)
        # angle ~ Rayleigh with that root-mean-square: P(angle > 3 rms) = exp(-9)
        assert result["angle_deg"][c] < 3 * result["angle_se_deg"][c], c
        # the fitted proxy is close to the truth: expected KL(true || fit) ~ (2p - 1)/(2n) = 0.0125 nats
        assert result["heldout"]["true"][c] - result["heldout"]["nivmf"][c] < 4 * 5 / (2 * 200), c
    for c in anisotropic:
        order_fit = sorted(range(3), key=lambda d: result["k_fit"][c][d])
        assert order_fit == sorted(range(3), key=lambda d: result["k_true"][c][d]), c
        # the nivMF beats the isotropic vMF fit on held-out points (paired difference, > 5 standard errors)
        assert result["heldout_gain"][c] > 5 * result["heldout_gain_se"][c], c
    # on isotropic data the nivMF contains the truth and loses only what its 2 extra parameters overfit
    assert abs(result["heldout_gain"][3]) < 0.1
    # classification by the proxies: nivMF better than the isotropic fits by more than 5 binomial s.e.
    acc = result["accuracy"]
    assert acc["nivmf"] - acc["vmf"] > 5 * math.sqrt(acc["vmf"] * (1 - acc["vmf"]) / 4000)


def test_nonisotropic_proxies_picture(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "proxies.png"
    load_example("nonisotropic_proxies").run(steps=50, n_train=100, n_test=100, plot_path=out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
