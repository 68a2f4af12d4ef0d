"""Second derivatives are right or refused — never silently incomplete.

References are central second differences of the (float64) function values, which are exact to ~1e-14;
with step h the difference has truncation O(h²) and rounding O(ε/h²), so ~1e-6 relative agreement is the
resolution of the check, not a tuned tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import hessian

from vmf_dists import (
    VonMisesFisher,
    bessel_iv_ratio,
    inverse_mean_resultant_length,
    log_bessel_iv,
    mean_resultant_length,
    vmf_log_normalizer,
)

MU = torch.tensor([0.6, 0.0, 0.8, 0.0], dtype=torch.float64)
OTHER = VonMisesFisher(torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))

FUNCTIONS = {
    "log_bessel_iv": lambda t: log_bessel_iv(3.5, t),
    "bessel_iv_ratio": lambda t: bessel_iv_ratio(0.0, t),
    "vmf_log_normalizer": lambda t: vmf_log_normalizer(64, t),
    "mean_resultant_length": lambda t: mean_resultant_length(4, t),
    "entropy": lambda t: VonMisesFisher(MU, t).entropy(),
    "kl_to_vmf": lambda t: torch.distributions.kl_divergence(VonMisesFisher(MU, t), OTHER),
    "kl_from_vmf": lambda t: torch.distributions.kl_divergence(OTHER, VonMisesFisher(MU, t)),
    "mean": lambda t: VonMisesFisher(MU, t).mean[0],
}


def second_difference(fn, x: float) -> float:
    h = 1e-3 * max(1.0, x)
    f = lambda z: fn(torch.tensor(z, dtype=torch.float64)).item()  # noqa: E731
    return (f(x + h) - 2.0 * f(x) + f(x - h)) / h**2


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("x", [0.7, 3.0, 30.0, 400.0])
def test_hessian_matches_second_differences(name, x):
    fn = FUNCTIONS[name]
    got = hessian(fn, torch.tensor(x, dtype=torch.float64)).item()
    ref = second_difference(fn, x)
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-9)


@pytest.mark.parametrize("r", [0.05, 0.3, 0.9])
def test_hessian_of_inverse_mean_resultant_length(r):
    fn = lambda t: inverse_mean_resultant_length(4, t)  # noqa: E731
    h = 1e-4
    f = lambda z: fn(torch.tensor(z, dtype=torch.float64)).item()  # noqa: E731
    ref = (f(r + h) - 2.0 * f(r) + f(r - h)) / h**2
    assert hessian(fn, torch.tensor(r, dtype=torch.float64)).item() == pytest.approx(ref, rel=1e-5)


def test_third_derivative_of_log_normalizer_and_refusal_of_the_fourth():
    """d³/dκ³ log C_p = −A_p'' is implemented (extrapolated differences), also with create_graph=True (as
    torch.func's nested transforms need); taking a fourth order from it raises."""
    dim, x = 8, 3.0
    kappa = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(vmf_log_normalizer(dim, kappa), kappa, create_graph=True)
    (second,) = torch.autograd.grad(first, kappa, create_graph=True)
    (third,) = torch.autograd.grad(second, kappa, create_graph=True)
    assert third.item() == pytest.approx(-second_difference(lambda t: mean_resultant_length(dim, t), x), rel=2e-5)
    with pytest.raises(RuntimeError, match="higher than implemented"):
        torch.autograd.grad(third, kappa)


def test_hessian_of_variance_is_refused():
    """The variance contains A_p'; its second derivative would need the third derivative of A_p (not implemented)."""
    with pytest.raises(RuntimeError, match="higher than implemented"):
        hessian(lambda t: VonMisesFisher(MU, t).variance[0], torch.tensor(3.0, dtype=torch.float64))


@pytest.mark.parametrize("p", [3, 4])
def test_second_derivative_through_samples_in_kappa_raises(p):
    """The first derivative in κ through samples works with create_graph=True; the second raises
    (it would need d²y/dκ², not implemented) instead of silently missing that term."""
    kappa = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    mu = torch.nn.functional.normalize(torch.arange(1.0, p + 1, dtype=torch.float64), dim=0)
    x = VonMisesFisher(mu, kappa).rsample((3,))
    (first,) = torch.autograd.grad(x.sum(), kappa, create_graph=True)
    (plain,) = torch.autograd.grad(x.sum(), kappa, retain_graph=True)
    assert first.item() == pytest.approx(plain.item(), rel=1e-12)
    with pytest.raises(RuntimeError, match="higher than implemented"):
        torch.autograd.grad(first, kappa)


def test_second_derivatives_through_samples_in_loc_are_exact():
    """Double backward in loc through rsample equals the autograd Hessian of the same map written with
    plain operations at the same noise (the sample map's backward rebuilds it)."""
    torch.manual_seed(3)
    p = 5
    loc = torch.nn.functional.normalize(torch.randn(2, p, dtype=torch.float64), dim=-1).requires_grad_()
    kappa = torch.tensor([3.0, 40.0], dtype=torch.float64)
    a = torch.randn(2, p, dtype=torch.float64)

    def loss(m):
        torch.manual_seed(11)
        x = VonMisesFisher(m, kappa, validate_args=False).rsample()
        return ((x * a).sum(-1) ** 2).sum()

    (g,) = torch.autograd.grad(loss(loc), loc, create_graph=True)
    (h,) = torch.autograd.grad((g * a).sum(), loc)
    eps = 1e-6  # central difference of the gradient along a, at the same noise (loss reseeds)
    m_plus = (loc.detach() + eps * a).requires_grad_()
    m_minus = (loc.detach() - eps * a).requires_grad_()
    (g_plus,) = torch.autograd.grad(loss(m_plus), m_plus)
    (g_minus,) = torch.autograd.grad(loss(m_minus), m_minus)
    torch.testing.assert_close(h, (g_plus - g_minus) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_mixed_second_derivative_through_samples_matches_differences():
    """d/dκ of ∂L/∂loc through rsample (p = 3: the inverse CDF, so a fixed seed is a fixed CDF value and
    central differences in κ at the same noise are a reference) — kept, not silently dropped."""
    torch.manual_seed(0)
    p = 3
    loc = torch.nn.functional.normalize(torch.randn(2, p, dtype=torch.float64), dim=-1).requires_grad_()
    a = torch.randn(2, p, dtype=torch.float64)

    def loc_gradient(kappa, create_graph):
        torch.manual_seed(11)
        x = VonMisesFisher(loc, kappa, validate_args=False).rsample()
        return torch.autograd.grad(((x * a).sum(-1) ** 2).sum(), loc, create_graph=create_graph)[0]

    kappa = torch.tensor([3.0, 40.0], dtype=torch.float64, requires_grad=True)
    (mixed,) = torch.autograd.grad((loc_gradient(kappa, True) * a).sum(), kappa)
    eps = 1e-6
    reference = torch.stack([
        ((loc_gradient(kappa.detach() + eps * e, False) - loc_gradient(kappa.detach() - eps * e, False)) * a).sum()
        / (2 * eps)
        for e in torch.eye(2, dtype=torch.float64)
    ])
    assert mixed.abs().min() > 1e-4  # both entries matter
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", [2, 3, 5, 20])
def test_log_prob_second_derivatives_match_gradgradcheck(p):
    """Every second derivative of log_prob in (loc, κ, x), with a loc that is not unit-norm (it is used as
    loc/‖loc‖, whose own curvature the loc-Hessian must include)."""
    torch.manual_seed(p)
    loc = torch.nn.functional.normalize(torch.randn(3, p, dtype=torch.float64), dim=-1)
    kappa = torch.rand(3, dtype=torch.float64) * 10.0
    value = VonMisesFisher(loc, kappa).sample()
    inputs = ((1.3 * loc).requires_grad_(), kappa.requires_grad_(), value.requires_grad_())
    assert torch.autograd.gradgradcheck(
        lambda m, k, x: VonMisesFisher(m, k, validate_args=False).log_prob(x), inputs
    )
