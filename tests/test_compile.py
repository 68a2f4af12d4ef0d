"""torch.compile: the closed-form methods trace into one graph (no graph breaks), and compiled results
equal eager ones.

Graph breaks are counted with ``torch._dynamo.explain`` (Dynamo only, no code generation: about a
second per function); there are none, rsample included (its compiled form has no host check). Real
inductor compiles — a training objective, a VAE step, and the exactness of compiled samples and their
gradients — run under ``-m slow``.
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


def test_rsample_traces_without_graph_breaks():
    """p = 3 (exact inverse CDF) and p ≠ 3 (rejection, in its compiled form: no host check) are one graph each,
    with and without a gradient in the parameters."""
    mu3 = _unit((8, 3), 4)
    assert _breaks(lambda mu, k: VonMisesFisher(mu, k).rsample(), (mu3, K)) == 0
    assert _breaks(lambda mu, k: VonMisesFisher(mu, k).rsample((5,)), (MU, K)) == 0
    leaves = (MU.clone().requires_grad_(), K.clone().requires_grad_())
    assert _breaks(lambda mu, k: VonMisesFisher(mu, k).rsample(), leaves) == 0


def test_compiled_code_builds_the_table_of_an_order_it_has_not_seen():
    """The Bessel table of a new order is built while Dynamo traces (`_bessel_table._coefficient_values` is a
    constant result, called for real at trace time) and enters the graph as a constant; the compiled
    evaluation (Horner's rule) equals the eager one (a sum of powers) to rounding."""
    from vmf_dists import _bessel_table

    dim = 777  # an order no other test uses
    _bessel_table._TABLES.pop((dim / 2.0 - 1.0, torch.device("cpu")), None)
    dynamo.reset()
    compiled = torch.compile(lambda k: vmf_log_normalizer(dim, k), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(K), vmf_log_normalizer(dim, K), rtol=1e-14, atol=0)


def test_constant_result_marker_is_what_torch_sets():
    """`_bessel_table` marks `_coefficient_values` as a constant result without importing Dynamo at import time, by
    the attribute torch.compiler.assume_constant_result sets; this fails if torch changes how it marks one."""
    from vmf_dists import _bessel_table

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    added = set(vars(marked)) - set(vars(lambda: None))
    assert added == {"_dynamo_marked_constant"} and marked._dynamo_marked_constant is True
    assert _bessel_table._coefficient_values._dynamo_marked_constant is True


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


def _vae_step(loc, kappa):
    """One VAE step's sample and loss: rsample, log_prob of it and KL to the uniform."""
    q = VonMisesFisher(loc / loc.norm(dim=-1, keepdim=True), kappa)
    z = q.rsample()
    return z, q.log_prob(z).sum() + kl_divergence(q, HypersphericalUniform(loc.shape[-1])).sum()


@pytest.mark.slow
def test_inductor_compile_of_a_vae_step_matches_eager():
    """A real compile (inductor, the default backend) of a VAE step at p = 3 — rsample (the exact inverse CDF),
    log_prob and KL to the uniform, forward and backward — equals the eager step on the same random numbers
    (inductor's ``fallback_random`` draws them with the eager generators), and Dynamo does not warn about
    vmf_dists code (the gradient quadrature's cached nodes used to make it warn about tracing a cache)."""
    import torch._inductor.config as inductor_config

    p = 3
    torch.manual_seed(0)
    loc = torch.randn(16, p).requires_grad_()
    kappa = (torch.rand(16) * 50 + 1).requires_grad_()

    dynamo.reset()
    with inductor_config.patch(fallback_random=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        z, loss = torch.compile(_vae_step)(loc, kappa)
        grads = torch.autograd.grad(loss, (loc, kappa))
    assert not [str(w.message) for w in caught if "cache" in str(w.message) or "vmf_dists" in w.filename]
    torch.manual_seed(1)
    ref_z, ref_loss = _vae_step(loc, kappa)
    ref_grads = torch.autograd.grad(ref_loss, (loc, kappa))
    torch.testing.assert_close(z, ref_z)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("p,kappa", [(2, 5.0), (3, 0.0), (3, 1e-9), (10, 30.0), (64, 300.0)])
def test_inductor_compiled_rsample_is_exact_with_unbiased_gradients(p, kappa):
    """rsample compiled by inductor in one graph (for p ≠ 3 its own form: uniform-based proposals, no host
    check): the samples pass the distributional checks of tests/test_sampling.py (law of θ, tangent mean and
    isotropy), and the κ-gradient of E[μᵀx] is A_p'(κ) (within 5 standard errors), in float64. At p = 3 and
    κ ≈ 0 inductor's expm1 (exp(x) − 1) used to make every sample μ."""
    from tests.test_sampling import N_GRID, Z_MAX, _check_sample, _loc, _mean_z, _mp_a_prime

    mu = _loc(p, "random")
    conc = torch.full((N_GRID,), kappa, dtype=torch.float64, requires_grad=True)

    def draw(mu, conc):
        return VonMisesFisher(mu, conc).rsample()

    dynamo.reset()
    compiled = torch.compile(draw)
    torch.manual_seed(p)
    x = compiled(mu, conc)
    (x @ mu).sum().backward()
    assert _breaks(draw, (mu, conc)) == 0
    failures = _check_sample(x.detach(), mu, p, kappa)
    assert not failures, failures
    grads = conc.grad.numpy()
    z = _mean_z(grads, _mp_a_prime(p, kappa))
    assert abs(z) < Z_MAX, f"mean dw/dκ = {grads.mean():.6e}, A_p'(κ) = {_mp_a_prime(p, kappa):.6e}, z = {z:.2f}"


@pytest.mark.slow
def test_graph_with_two_bessel_orders_and_a_new_one():
    """Several orders in one graph, one of them built during the trace, compiled by inductor (tables returned
    as tensors under one constant name clashed there, not with the eager backends): equal to eager within
    rounding."""
    from vmf_dists import _bessel_table

    _bessel_table._TABLES.pop((998 / 2.0 - 1.0, torch.device("cpu")), None)

    def fn(k):
        return vmf_log_normalizer(5, k) + vmf_log_normalizer(64, k) + vmf_log_normalizer(998, k)

    dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(K), fn(K), rtol=1e-14, atol=0)


@pytest.mark.slow
def test_inductor_compiled_vae_step_with_changing_batch_size():
    """The compiled step at p = 10 called with three batch sizes (the second recompiles with a dynamic batch,
    the third reuses it: the sampler's first-round width and second-round size are then symbolic): unit
    samples, finite losses and gradients."""
    p = 10

    dynamo.reset()
    compiled = torch.compile(_vae_step)
    torch.manual_seed(0)
    for batch in (16, 11, 13):
        loc = torch.randn(batch, p).requires_grad_()
        kappa = (torch.rand(batch) * 50 + 1).requires_grad_()
        z, loss = compiled(loc, kappa)
        loss.backward()
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(batch))
        assert torch.isfinite(loss) and torch.isfinite(loc.grad).all() and torch.isfinite(kappa.grad).all()
