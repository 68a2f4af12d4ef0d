"""torch.compile: the closed-form methods trace into one graph (no graph breaks), and compiled results
equal eager ones.

Graph breaks are counted with ``torch._dynamo.explain`` (Dynamo only, no code generation: about a
second per function). rsample is exact by rejection for p ≠ 3: its acceptance checks read the tensor on
the host, and the docs name those breaks; p = 3 (inverse CDF) has none. One real inductor compile of a
training objective runs under ``-m slow``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import kl_divergence

from vmf_dists import (
    HypersphericalUniform,
    VonMisesFisher,
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    log_bhattacharyya_coefficient,
    log_expected_likelihood,
    log_probability_product_kernel,
    mean_resultant_length,
    pairwise_log_expected_likelihood,
    pairwise_log_probability_product_kernel,
    vmf_log_normalizer,
)

dynamo = pytest.importorskip("torch._dynamo")
if not hasattr(torch.library, "custom_op"):
    pytest.skip("graph-break-free compilation needs torch >= 2.4 (custom operators)", allow_module_level=True)

F64 = torch.float64


@pytest.fixture(autouse=True)
def keep_default_validation():
    """Dynamo switches torch.distributions' default validation off, process-wide, the first time it
    compiles; restore it so that later tests in this worker see the usual default."""
    before = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(before)


def _unit(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)


MU, MU2, X = _unit((8, 5), 1), _unit((8, 5), 2), _unit((8, 5), 3)
K = torch.tensor([0.0, 0.3, 2.0, 9.0, 40.0, 300.0, 5e3, 1e6], dtype=F64)
K2 = torch.flip(K, (0,)).clone()

CLOSED_FORM = {
    "log_prob": (lambda mu, k, x: VonMisesFisher(mu, k).log_prob(x), (MU, K, X)),
    "entropy": (lambda mu, k: VonMisesFisher(mu, k).entropy(), (MU, K)),
    "mean": (lambda mu, k: VonMisesFisher(mu, k).mean, (MU, K)),
    "variance": (lambda mu, k: VonMisesFisher(mu, k).variance, (MU, K)),
    "kl_vmf_vmf": (
        lambda mu, k, m2, k2: kl_divergence(VonMisesFisher(mu, k), VonMisesFisher(m2, k2)), (MU, K, MU2, K2)),
    "kl_vmf_uniform": (
        lambda mu, k: kl_divergence(VonMisesFisher(mu, k), HypersphericalUniform(5, dtype=F64)), (MU, K)),
    "kl_uniform_vmf": (
        lambda mu, k: kl_divergence(HypersphericalUniform(5, dtype=F64), VonMisesFisher(mu, k)), (MU, K)),
    "log_expected_likelihood": (
        lambda mu, k, m2, k2: log_expected_likelihood(VonMisesFisher(mu, k), VonMisesFisher(m2, k2)), (MU, K, MU2, K2)),
    "log_probability_product_kernel": (
        lambda mu, k, m2, k2: log_probability_product_kernel(VonMisesFisher(mu, k), VonMisesFisher(m2, k2), 0.7),
        (MU, K, MU2, K2)),
    "log_bhattacharyya_coefficient": (
        lambda mu, k, m2, k2: log_bhattacharyya_coefficient(VonMisesFisher(mu, k), VonMisesFisher(m2, k2)),
        (MU, K, MU2, K2)),
    "pairwise_log_expected_likelihood": (
        lambda mu, k, m2, k2: pairwise_log_expected_likelihood(VonMisesFisher(mu, k), VonMisesFisher(m2, k2)),
        (MU, K, MU2, K2)),
    "pairwise_log_probability_product_kernel": (
        lambda mu, k, m2, k2: pairwise_log_probability_product_kernel(
            VonMisesFisher(mu, k), VonMisesFisher(m2, k2), 0.5),
        (MU, K, MU2, K2)),
    "log_bessel_iv": (lambda k: log_bessel_iv(2.5, k), (K,)),
    "bessel_iv_ratio": (lambda k: bessel_iv_ratio(0.0, k), (K,)),
    "vmf_log_normalizer": (lambda k: vmf_log_normalizer(5, k), (K,)),
    "mean_resultant_length": (lambda k: mean_resultant_length(5, k), (K,)),
    "inverse_mean_resultant_length": (lambda k: inverse_mean_resultant_length(5, k / 2e6), (K,)),
}


def _breaks(fn, args) -> int:
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_closed_forms_trace_without_graph_breaks(name):
    fn, args = CLOSED_FORM[name]
    assert _breaks(fn, args) == 0


@pytest.mark.parametrize("name", ["log_prob", "kl_vmf_uniform", "kl_vmf_vmf", "pairwise_log_expected_likelihood"])
def test_fullgraph_compile_matches_eager_with_gradients(name):
    """fullgraph=True (eager backend: Dynamo + AOTAutograd, no code generation) on inputs that require
    gradients: values and gradients equal the eager ones."""
    fn, args = CLOSED_FORM[name]
    dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    eager_leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    out, ref = compiled(*leaves), fn(*eager_leaves)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), eager_leaves, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_rsample_graph_breaks_are_the_documented_ones():
    """p = 3 (exact inverse CDF): one graph. p ≠ 3 (rejection): breaks only at the acceptance checks."""
    mu3 = _unit((8, 3), 4)
    assert _breaks(lambda mu, k: VonMisesFisher(mu, k).rsample(), (mu3, K)) == 0
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = dynamo.explain(lambda mu, k: VonMisesFisher(mu, k).rsample())(MU, K)
    assert explanation.graph_break_count >= 1
    reasons = {str(b.reason).split("\n")[0] for b in explanation.break_reasons}
    assert all("item()" in r for r in reasons), reasons


def test_compiled_code_builds_the_table_of_an_order_it_has_not_seen():
    """The Bessel table of a new order is built inside the compiled graph's first call (the custom
    operator's eager body); that used to crash on the tracer state (caught by the slow inductor test)."""
    from vmf_dists import _bessel_table

    dim = 777  # an order no other test uses
    _bessel_table._TABLES.pop((dim / 2.0 - 1.0, torch.device("cpu")), None)
    dynamo.reset()
    compiled = torch.compile(lambda k: vmf_log_normalizer(dim, k), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(K), vmf_log_normalizer(dim, K), rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compile_of_a_training_objective():
    """A real compile (inductor) of log_prob + KL to the uniform, forward and backward, at p = 16."""
    torch.manual_seed(0)
    mu = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1).requires_grad_()
    k = (torch.rand(32) * 30).requires_grad_()
    x = torch.nn.functional.normalize(torch.randn(32, 16), dim=-1)

    def objective(mu, k, x):
        q = VonMisesFisher(mu, k)
        return q.log_prob(x).sum() + kl_divergence(q, HypersphericalUniform(16)).sum()

    dynamo.reset()
    out = torch.compile(objective, fullgraph=True)(mu, k, x)
    g_mu, g_k = torch.autograd.grad(out, (mu, k))
    ref = objective(mu, k, x)
    r_mu, r_k = torch.autograd.grad(ref, (mu, k))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_mu, r_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_k, r_k, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("p", [3, 10])
def test_inductor_compile_of_a_vae_step_matches_eager(p):
    """A real compile (inductor, the default backend) of a VAE step — rsample, log_prob and KL to the uniform,
    forward and backward — equals the eager step on the same random numbers (inductor's ``fallback_random``
    draws them with the eager generators). At p = 10 the rejection sampler's first-accepted-proposal
    reduction used to produce C++ that did not build, and the gradient quadrature's cached nodes made
    Dynamo warn about tracing through a cache."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    loc = torch.randn(16, p).requires_grad_()
    kappa = (torch.rand(16) * 50 + 1).requires_grad_()

    def step(loc, kappa):
        q = VonMisesFisher(loc / loc.norm(dim=-1, keepdim=True), kappa)
        z = q.rsample()
        return z, q.log_prob(z).sum() + kl_divergence(q, HypersphericalUniform(p)).sum()

    dynamo.reset()
    with inductor_config.patch(fallback_random=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        z, loss = torch.compile(step)(loc, kappa)
        grads = torch.autograd.grad(loss, (loc, kappa))
    assert not [str(w.message) for w in caught if "cache" in str(w.message) or "vmf_dists" in w.filename]
    torch.manual_seed(1)
    ref_z, ref_loss = step(loc, kappa)
    ref_grads = torch.autograd.grad(ref_loss, (loc, kappa))
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
