"""torch.func (grad, vmap, jacrev, jvp) over the special functions, log_prob, entropy and the KLs.

Each transform is compared with plain autograd (or a Python loop for vmap) on the same inputs, in
float64; the functions are elementwise in their tensor argument, so jacrev is diagonal and jvp with a
tangent of ones is the elementwise derivative.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import kl_divergence
from torch.func import grad, jacrev, jvp, vmap

from vmf_dists import (
    HypersphericalUniform,
    VonMisesFisher,
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    mean_resultant_length,
    vmf_log_normalizer,
)

F64 = torch.float64
XS = torch.tensor([1e-3, 0.7, 3.0, 30.0, 400.0], dtype=F64)

SPECIAL = {
    "log_bessel_iv": lambda t: log_bessel_iv(2.5, t),
    "log_bessel_iv_order0": lambda t: log_bessel_iv(0.0, t),
    "bessel_iv_ratio": lambda t: bessel_iv_ratio(7.0, t),
    "vmf_log_normalizer": lambda t: vmf_log_normalizer(10, t),
    "mean_resultant_length": lambda t: mean_resultant_length(64, t),
    "inverse_mean_resultant_length": lambda t: inverse_mean_resultant_length(5, t / 500.0),
}


def _autograd_derivative(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_special_functions_under_grad_vmap_jacrev_jvp(name):
    fn = SPECIAL[name]
    expected = _autograd_derivative(fn, XS)
    torch.testing.assert_close(grad(lambda t: fn(t).sum())(XS), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(torch.diagonal(jacrev(fn)(XS)), expected, rtol=1e-13, atol=0)
    value, tangent = jvp(fn, (XS,), (torch.ones_like(XS),))
    torch.testing.assert_close(value, fn(XS), rtol=0, atol=0)
    torch.testing.assert_close(tangent, expected, rtol=1e-13, atol=0)
    batched = vmap(fn)(XS.unsqueeze(-1))
    torch.testing.assert_close(batched.squeeze(-1), torch.stack([fn(x) for x in XS]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vmf_log_normalizer", "log_bessel_iv", "mean_resultant_length"])
def test_second_derivatives_under_nested_transforms(name):
    """jacrev(grad(f)) and jvp of grad(f) agree with autograd's double backward."""
    fn = SPECIAL[name]
    x = XS.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    torch.testing.assert_close(torch.diagonal(jacrev(grad(lambda t: fn(t).sum()))(XS)), second, rtol=1e-12, atol=0)
    _, tangent = jvp(grad(lambda t: fn(t).sum()), (XS,), (torch.ones_like(XS),))
    torch.testing.assert_close(tangent, second, rtol=1e-12, atol=0)


def _unit(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1)


MU = _unit((3, 6), 1)
X = _unit((3, 6), 2)
KAPPA = torch.tensor([0.5, 12.0, 300.0], dtype=F64)
OTHER = VonMisesFisher(_unit((6,), 3), torch.tensor(4.0, dtype=F64))

DISTRIBUTION = {
    "log_prob": lambda k: VonMisesFisher(MU, k).log_prob(X),
    "entropy": lambda k: VonMisesFisher(MU, k).entropy(),
    "mean": lambda k: VonMisesFisher(MU, k).mean.sum(-1),
    "kl_vmf_uniform": lambda k: kl_divergence(VonMisesFisher(MU, k), HypersphericalUniform(6, dtype=F64)),
    "kl_uniform_vmf": lambda k: kl_divergence(HypersphericalUniform(6, dtype=F64), VonMisesFisher(MU, k)),
    "kl_vmf_vmf": lambda k: kl_divergence(VonMisesFisher(MU, k), OTHER),
    "kl_vmf_vmf_reverse": lambda k: kl_divergence(OTHER, VonMisesFisher(MU, k)),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTION))
def test_distribution_methods_under_grad_vmap_jacrev_jvp(name):
    fn = DISTRIBUTION[name]
    expected = _autograd_derivative(fn, KAPPA)
    torch.testing.assert_close(grad(lambda k: fn(k).sum())(KAPPA), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.diagonal(jacrev(fn)(KAPPA)), expected, rtol=1e-12, atol=0)
    _, tangent = jvp(fn, (KAPPA,), (torch.ones_like(KAPPA),))
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=0)
    # vmap over several concentration vectors at once
    kappas = torch.stack([KAPPA, 2.0 * KAPPA, 0.1 * KAPPA])
    torch.testing.assert_close(vmap(fn)(kappas), torch.stack([fn(k) for k in kappas]), rtol=1e-14, atol=0)


def test_log_prob_gradients_in_loc_and_value_under_grad_and_jvp():
    def log_prob(mu, x):
        return VonMisesFisher(mu, KAPPA, validate_args=False).log_prob(x).sum()

    mu, x = MU.clone().requires_grad_(True), X.clone().requires_grad_(True)
    g_mu, g_x = torch.autograd.grad(log_prob(mu, x), (mu, x))
    f_mu, f_x = grad(log_prob, argnums=(0, 1))(MU, X)
    torch.testing.assert_close(f_mu, g_mu, rtol=1e-13, atol=0)
    torch.testing.assert_close(f_x, g_x, rtol=1e-13, atol=0)
    direction = _unit((3, 6), 9)
    _, tangent = jvp(lambda m: log_prob(m, X), (MU,), (direction,))
    torch.testing.assert_close(tangent, (g_mu * direction).sum(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dim", [3, 5])
def test_sampling_inside_a_transform_raises_a_clear_error(dim):
    """rsample cannot run under torch.func (eager implicit gradient, host-side rejection loop): it says so."""
    loc = _unit((dim,), 4)
    with pytest.raises(NotImplementedError, match="outside the transform"):
        grad(lambda k: VonMisesFisher(loc, k).rsample()[0])(torch.tensor(3.0, dtype=F64))
    with pytest.raises(NotImplementedError, match="torch.func"):
        vmap(lambda k: VonMisesFisher(loc, k).sample(), randomness="different")(KAPPA)
