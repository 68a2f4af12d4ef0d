"""Tests of dml.losses: every loss against a plain re-computation (values and gradients), the
registry, parameter groups, input checks, training on toy data, and reduced precision.

The references below are written from the formulas with Python loops over images and classes and
the public `vmf_dists` API; they never call the losses' internals.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Distribution, kl_divergence

from dml.losses import LOSSES, LossStats, ProxyLoss, build_loss, loss_options, proxy_anchor_loss
from vmf_dists import (
    NonIsotropicVMF,
    VonMisesFisher,
    log_expected_likelihood,
    log_probability_product_kernel,
    vmf_log_normalizer,
)

B, C, D = 6, 4, 5
LABELS = [0, 1, 2, 0, 1, 2]  # class 3 has no image in the batch (ProxyAnchor's P+ is a strict subset)
ALL = sorted(LOSSES)

#: options that move every loss away from its defaults where the default would hide a term
OPTIONS = {
    "proxy_anchor": {"alpha": 16.0, "delta": 0.2},
    "proxy_nca": {},
    "norm_softmax": {},
    "l2": {"temperature": 3.0},
    "cosine": {"temperature": 0.2},
    "el_vmf": {"temperature": 0.5, "proxy_concentration": 3.0},
    "ppk_vmf": {"temperature": 0.5, "rho": 0.7, "proxy_concentration": 3.0},
    "kl_vmf": {"temperature": 2.0, "proxy_concentration": 3.0},
    "el_nivmf": {"temperature": 0.7, "num_samples": 3, "proxy_concentration": 2.0, "guidance_weight": 0.5},
    "el_nivmf_paper": {"temperature": 0.2, "proxy_concentration": 1.5, "guidance_weight": 0.5},
}


def make_loss(name: str, dtype=torch.float64, **options) -> ProxyLoss:
    """The loss with its parameters moved off their (symmetric) initial values, reproducibly."""
    torch.manual_seed(0)
    loss = build_loss(name, num_classes=C, embed_dim=D, **{**OPTIONS[name], **options}).to(dtype)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return loss


def make_embeddings(dtype=torch.float64, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=generator, dtype=torch.float64).mul(scale).to(dtype)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def cross_entropy_rows(rows, labels) -> torch.Tensor:
    total = 0.0
    for row, y in zip(rows, labels):
        r = torch.stack(row)
        total = total + torch.logsumexp(r, 0) - r[y]
    return total / len(rows)


def reference_proxy_anchor(s, labels, alpha, delta) -> torch.Tensor:
    """s[i][c]: cosine similarities (nested lists of scalars); a loop over proxies."""
    present = sorted(set(labels))
    pos = 0.0
    for c in present:
        inner = sum(torch.exp(-alpha * (s[i][c] - delta)) for i in range(len(labels)) if labels[i] == c)
        pos = pos + torch.log(1 + inner)
    neg = 0.0
    for c in range(len(s[0])):
        terms = [torch.exp(alpha * (s[i][c] + delta)) for i in range(len(labels)) if labels[i] != c]
        neg = neg + torch.log(1 + sum(terms)) if terms else neg
    return pos / len(present) + neg / len(s[0])


def direction_cosines(emb, proxies):
    return [[unit(emb[i]) @ unit(proxies[c]) for c in range(proxies.shape[0])] for i in range(emb.shape[0])]


# --------------------------------------------------------------------------------------------------
# references, one per loss: (loss, embeddings, labels) -> scalar


def ref_proxy_anchor(loss, emb, labels):
    opts = OPTIONS["proxy_anchor"]
    return reference_proxy_anchor(direction_cosines(emb, loss.proxies), labels, opts["alpha"], opts["delta"])


def ref_proxy_nca(loss, emb, labels):
    rows = [[-((unit(emb[i]) - unit(loss.proxies[c])) ** 2).sum() * 9.0 for c in range(C)] for i in range(B)]
    return cross_entropy_rows(rows, labels)


def ref_norm_softmax(loss, emb, labels):
    rows = [[unit(emb[i]) @ unit(loss.proxies[c]) / 0.05 for c in range(C)] for i in range(B)]
    return cross_entropy_rows(rows, labels)


def ref_l2(loss, emb, labels):
    t = loss.log_temperature.exp()
    rows = [[-((emb[i] - loss.proxies[c]) ** 2).sum() / t for c in range(C)] for i in range(B)]
    return cross_entropy_rows(rows, labels)


def ref_cosine(loss, emb, labels):
    t = loss.log_temperature.exp()
    rows = [[unit(emb[i]) @ unit(loss.proxies[c]) / t for c in range(C)] for i in range(B)]
    return cross_entropy_rows(rows, labels)


def image_vmf(emb, i) -> VonMisesFisher:
    return VonMisesFisher(unit(emb[i]), emb[i].norm())


def proxy_vmf(loss, c) -> VonMisesFisher:
    return VonMisesFisher(unit(loss.proxies[c]), loss.log_concentration[c].exp())


def ref_el_vmf(loss, emb, labels):
    t = loss.log_temperature.exp()
    rows = [
        [log_expected_likelihood(image_vmf(emb, i), proxy_vmf(loss, c), temperature=t) for c in range(C)]
        for i in range(B)
    ]
    return cross_entropy_rows(rows, labels)


def ref_ppk_vmf(loss, emb, labels):
    t, rho = loss.log_temperature.exp(), OPTIONS["ppk_vmf"]["rho"]
    rows = [
        [log_probability_product_kernel(image_vmf(emb, i), proxy_vmf(loss, c), rho) / t for c in range(C)]
        for i in range(B)
    ]
    return cross_entropy_rows(rows, labels)


def ref_kl_vmf(loss, emb, labels):
    t = loss.log_temperature.exp()
    rows = [[-kl_divergence(image_vmf(emb, i), proxy_vmf(loss, c)) / t for c in range(C)] for i in range(B)]
    return cross_entropy_rows(rows, labels)


class FixedSamples(VonMisesFisher):
    """A vMF whose rsample returns given samples (so a per-pair estimate sees the loss's samples)."""

    def __init__(self, loc, concentration, samples):
        super().__init__(loc, concentration, validate_args=False)
        self._samples = samples

    def rsample(self, sample_shape=()):
        assert tuple(sample_shape) == (self._samples.shape[0],)
        return self._samples


def el_nivmf_reference_logits(loss, emb, num_samples):
    """Per pair `log_expected_likelihood(vMF_i, nivMF_c, num_samples=S)`, on the samples the loss draws
    after the same seed: one batched rsample of the images, as the pairwise kernel does."""
    mu = emb / emb.norm(dim=1, keepdim=True)
    kappa = emb.norm(dim=1)
    x = VonMisesFisher(mu, kappa, validate_args=False).rsample((num_samples,))  # [S, B, p]
    t = loss.log_temperature.exp()
    rows = []
    for i in range(B):
        image = FixedSamples(mu[i], kappa[i], x[:, i])
        rows.append(
            [
                log_expected_likelihood(
                    image,
                    NonIsotropicVMF(unit(loss.proxies[c]), loss.log_concentration[c].exp()),
                    num_samples=num_samples,
                    temperature=t,
                )
                for c in range(C)
            ]
        )
    return rows


def ref_el_nivmf(loss, emb, labels):
    opts = OPTIONS["el_nivmf"]
    rows = el_nivmf_reference_logits(loss, emb, opts["num_samples"])
    guidance = reference_proxy_anchor(direction_cosines(emb, loss.proxies), labels, 32.0, 0.1)
    return cross_entropy_rows(rows, labels) + opts["guidance_weight"] * guidance


def paper_fit(kappa):
    return 868.0 - 0.0002662 * kappa - 0.0009685 * kappa**2  # D != 128: the fit made at p = 512


def el_nivmf_paper_reference_logits(loss, emb, paper_normalizer=False):
    """The closed form, literally: per image, per class, with scalar log-normalisers."""
    t = loss.log_temperature.exp()
    rows = []
    for i in range(B):
        kappa = emb[i].norm()
        mu = emb[i] / kappa
        row = []
        for c in range(C):
            k = torch.clamp(loss.raw_concentration[c], min=0.1)
            theta = k * unit(loss.proxies[c])
            theta_norm = theta.norm()
            log_c_theta = paper_fit(theta_norm) if paper_normalizer else vmf_log_normalizer(D, theta_norm)
            b = log_c_theta + torch.log(k).sum() - torch.log(theta_norm)
            r = (kappa * mu + theta / t).norm()
            row.append(b / t + vmf_log_normalizer(D, kappa) - vmf_log_normalizer(D, r))
        rows.append(row)
    return rows


def ref_el_nivmf_paper(loss, emb, labels, paper_normalizer=False, weight=None):
    weight = OPTIONS["el_nivmf_paper"]["guidance_weight"] if weight is None else weight
    rows = el_nivmf_paper_reference_logits(loss, emb, paper_normalizer)
    guidance = reference_proxy_anchor(direction_cosines(emb, loss.proxies), labels, 32.0, 0.1)
    return cross_entropy_rows(rows, labels) + weight * guidance


REFERENCES = {
    "proxy_anchor": ref_proxy_anchor,
    "proxy_nca": ref_proxy_nca,
    "norm_softmax": ref_norm_softmax,
    "l2": ref_l2,
    "cosine": ref_cosine,
    "el_vmf": ref_el_vmf,
    "ppk_vmf": ref_ppk_vmf,
    "kl_vmf": ref_kl_vmf,
    "el_nivmf": ref_el_nivmf,
    "el_nivmf_paper": ref_el_nivmf_paper,
}


def value_and_grads(fn, emb, params, seed=None):
    emb = emb.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    value = fn(emb)
    grads = torch.autograd.grad(value, [emb, *params], allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [emb, *params])]


def assert_matches_reference(loss, reference, emb, labels, *, seed=None, rtol=1e-8, atol=1e-10):
    params = list(loss.parameters())
    names = ["embeddings"] + [n for n, _ in loss.named_parameters()]
    value, grads = value_and_grads(lambda e: loss(e, torch.tensor(labels)), emb, params, seed)
    ref_value, ref_grads = value_and_grads(lambda e: reference(loss, e, labels), emb, params, seed)
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=atol)
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"gradient of {name}: {m}")
        assert r.abs().sum() > 0, f"the reference gradient of {name} is zero: the check is empty"


# --------------------------------------------------------------------------------------------------
# values and gradients


def test_registry_is_complete():
    assert set(REFERENCES) == set(LOSSES) == set(OPTIONS)
    for name, cls in LOSSES.items():
        assert cls.name == name and issubclass(cls, ProxyLoss)


@pytest.mark.parametrize("name", ALL)
def test_value_and_gradient_match_reference(name):
    loss = make_loss(name)
    assert_matches_reference(loss, REFERENCES[name], make_embeddings(), LABELS, seed=3)


def test_proxy_anchor_functional_matches_loop():
    generator = torch.Generator().manual_seed(5)
    cos_sim = (torch.rand(B, C, generator=generator, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    s = [[cos_sim[i, c] for c in range(C)] for i in range(B)]
    for alpha, delta in [(32.0, 0.1), (4.0, -0.3)]:
        value = proxy_anchor_loss(cos_sim, torch.tensor(LABELS), alpha, delta)
        ref = reference_proxy_anchor(s, LABELS, alpha, delta)
        torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(value, cos_sim)
        (r,) = torch.autograd.grad(ref, cos_sim)
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_proxy_anchor_is_stable_at_large_alpha():
    cos_sim = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    value = proxy_anchor_loss(cos_sim, torch.tensor([1, 0]), alpha=1e4, delta=0.1)
    assert torch.isfinite(value) and value > 1e3  # all images at the wrong proxy: ≈ 2 · 1.1 α


def test_el_nivmf_logits_are_the_per_pair_expected_likelihood():
    loss = make_loss("el_nivmf")
    emb = make_embeddings()
    torch.manual_seed(11)
    logits = loss.logits(emb)
    torch.manual_seed(11)
    rows = el_nivmf_reference_logits(loss, emb, OPTIONS["el_nivmf"]["num_samples"])
    torch.testing.assert_close(logits, torch.stack([torch.stack(r) for r in rows]).detach(), rtol=1e-9, atol=1e-10)


def test_el_nivmf_guidance_adds_weight_times_proxy_anchor():
    emb, labels = make_embeddings(), torch.tensor(LABELS)
    without = make_loss("el_nivmf", guidance_weight=0.0)
    weight = 1.7
    with_guidance = make_loss("el_nivmf", guidance_weight=weight)
    torch.manual_seed(4)
    a = without(emb, labels)
    torch.manual_seed(4)
    b = with_guidance(emb, labels)
    directions = torch.nn.functional.normalize(with_guidance.proxies, dim=-1)
    cos_sim = torch.nn.functional.normalize(emb, dim=-1) @ directions.T
    torch.testing.assert_close(b - a, weight * proxy_anchor_loss(cos_sim, labels), rtol=1e-10, atol=1e-10)


def test_el_nivmf_isotropic_proxies_are_vmf_proxies_under_the_same_estimate():
    """The ablation: one concentration per class; the logits are the log-mean-exp of the tempered vMF
    log-density over the loss's own samples, the oracle being `VonMisesFisher.log_prob`."""
    loss = make_loss("el_nivmf", isotropic_proxies=True)
    assert loss.log_concentration.shape == (C,)
    emb, S = make_embeddings(), OPTIONS["el_nivmf"]["num_samples"]
    torch.manual_seed(11)
    logits = loss.logits(emb)
    torch.manual_seed(11)
    mu, kappa = emb / emb.norm(dim=1, keepdim=True), emb.norm(dim=1)
    x = VonMisesFisher(mu, kappa, validate_args=False).rsample((S,))  # [S, B, p], as the loss draws them
    t = loss.log_temperature.exp()
    expected = torch.empty(B, C, dtype=torch.float64)
    for c in range(C):
        proxy = VonMisesFisher(unit(loss.proxies[c]), loss.log_concentration[c].exp())
        expected[:, c] = torch.logsumexp(proxy.log_prob(x) / t, dim=0) - math.log(S)
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-9, atol=1e-10)
    labels = torch.tensor(LABELS)
    loss(emb, labels).backward()
    assert loss.log_concentration.grad.shape == (C,) and loss.log_concentration.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="isotropic_proxies"):
        build_loss("el_nivmf", num_classes=C, embed_dim=D, isotropic_proxies="yes")


def test_el_nivmf_samples_are_fresh_each_call():
    loss, emb = make_loss("el_nivmf"), make_embeddings()
    assert not torch.equal(loss.logits(emb), loss.logits(emb))


@pytest.mark.parametrize("paper_normalizer", [False, True])
def test_el_nivmf_paper_matches_loop_at_the_papers_temperature(paper_normalizer):
    loss = make_loss("el_nivmf_paper", temperature=0.003, proxy_concentration=10.0, paper_normalizer=paper_normalizer)
    with torch.no_grad():
        loss.raw_concentration[1, 2] = 0.05  # below the floor 0.1: clamped, no gradient
    emb = make_embeddings(scale=5.0)
    logits = loss.logits(emb)
    rows = el_nivmf_paper_reference_logits(loss, emb, paper_normalizer)
    ref = torch.stack([torch.stack(r) for r in rows]).detach()
    assert ref.abs().max() > 1e3  # the regime where float32 logits would lose the decimals
    torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-9)
    assert_matches_reference(
        loss,
        lambda lo, e, y: ref_el_nivmf_paper(lo, e, y, paper_normalizer=paper_normalizer),
        emb,
        LABELS,
        rtol=1e-7,
        atol=1e-9,
    )
    params = list(loss.parameters())
    _, grads = value_and_grads(lambda e: loss(e, torch.tensor(LABELS)), emb, params)
    assert grads[1 + [n for n, _ in loss.named_parameters()].index("raw_concentration")][1, 2] == 0


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_el_nivmf_paper_closed_form_matches_monte_carlo(temperature):
    """log E_{x~vMF(μ_i,κ_i)} exp((b_c + θ_cᵀx)/T) from 200k samples; tolerance 5 standard errors
    of the log-mean (delta method: sd(w) / (mean(w) √n))."""
    loss = make_loss("el_nivmf_paper")
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(temperature))  # exactly T (make_loss perturbs it)
    emb = make_embeddings(scale=1.5)
    logits = loss.logits(emb).detach()
    t = torch.tensor(temperature, dtype=torch.float64)
    torch.manual_seed(2024)
    n = 200_000
    with torch.no_grad():
        for i in (0, 3):
            x = VonMisesFisher(unit(emb[i]), emb[i].norm()).sample((n,))
            for c in range(C):
                k = torch.clamp(loss.raw_concentration[c], min=0.1)
                theta = k * unit(loss.proxies[c])
                b = vmf_log_normalizer(D, theta.norm()) + torch.log(k).sum() - torch.log(theta.norm())
                z = (b + x @ theta) / t
                m = z.max()
                w = torch.exp(z - m)
                estimate = m + torch.log(w.mean())
                standard_error = w.std() / (w.mean() * math.sqrt(n))
                assert standard_error < 0.05, "Monte-Carlo check too weak"
                assert abs(logits[i, c] - estimate) < 5 * standard_error + 1e-12, (i, c, logits[i, c], estimate)


# --------------------------------------------------------------------------------------------------
# registry, groups, checks


@pytest.mark.parametrize("name", ALL)
def test_param_groups_cover_every_parameter_once(name):
    loss = build_loss(name, num_classes=C, embed_dim=D)
    lr = 0.01
    groups = loss.param_groups(lr)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in loss.parameters())
    assert len(ids) == len(set(ids))
    assert len({g["name"] for g in groups}) == len(groups)
    defaults = loss_options(name)
    multipliers = {"proxies": "proxy_lr_mult", "concentrations": "concentration_lr_mult",
                   "temperature": "temperature_lr_mult"}
    for g in groups:
        assert math.isclose(g["lr"], lr * defaults[multipliers[g["name"]]])
    torch.optim.Adam(groups)  # valid optimiser input


def test_param_groups_use_the_multiplier_options():
    loss = build_loss("el_nivmf", num_classes=C, embed_dim=D, proxy_lr_mult=3.0, concentration_lr_mult=0.0,
                      temperature_lr_mult=7.0)
    groups = {g["name"]: g["lr"] for g in loss.param_groups(2.0)}
    assert groups == {"proxies": 6.0, "concentrations": 0.0, "temperature": 14.0}


def test_build_loss_errors():
    with pytest.raises(ValueError, match=r"'nope'.*el_nivmf"):
        build_loss("nope", num_classes=C, embed_dim=D)
    with pytest.raises(ValueError, match=r"'bogus'.*num_samples"):
        build_loss("el_nivmf", num_classes=C, embed_dim=D, bogus=1)
    with pytest.raises(ValueError, match="temperature"):
        build_loss("el_vmf", num_classes=C, embed_dim=D, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        build_loss("el_nivmf", num_classes=C, embed_dim=D, num_samples=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("cosine", num_classes=0, embed_dim=D)
    with pytest.raises(ValueError, match="embed_dim"):
        build_loss("kl_vmf", num_classes=C, embed_dim=1)
    with pytest.raises(ValueError, match="unknown loss"):
        loss_options("nope")


@pytest.mark.parametrize("name", ["proxy_anchor", "el_nivmf"])
def test_input_checks(name):
    loss = build_loss(name, num_classes=C, embed_dim=D)
    emb, labels = torch.randn(B, D), torch.tensor(LABELS)
    with pytest.raises(ValueError, match="embeddings"):
        loss(torch.randn(B, D + 1), labels)
    with pytest.raises(ValueError, match="embeddings"):
        loss(torch.randn(B), labels)
    with pytest.raises(ValueError, match="labels"):
        loss(emb, labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        loss(emb, labels.float())
    previous = Distribution._validate_args
    try:
        Distribution.set_default_validate_args(True)
        with pytest.raises(ValueError, match="labels"):
            loss(emb, torch.tensor([0, 1, 2, 3, 4, 0]))
        with pytest.raises(ValueError, match="labels"):
            loss(emb, torch.tensor([0, 1, 2, 3, -1, 0]))
    finally:
        Distribution.set_default_validate_args(previous)


@pytest.mark.parametrize("name", ALL)
def test_stats_and_logits(name):
    loss = make_loss(name)
    value = loss(make_embeddings().requires_grad_(True), torch.tensor(LABELS))
    stats = loss.stats
    assert isinstance(stats, LossStats)
    torch.testing.assert_close(stats.loss, value.detach())
    for field in ("loss", "temperature", "mean_image_kappa", "mean_proxy_kappa", "accuracy"):
        v = getattr(stats, field)
        assert v is None or (isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0)
    assert 0 <= stats.accuracy <= 1
    vmf_losses = {"el_vmf", "ppk_vmf", "kl_vmf", "el_nivmf", "el_nivmf_paper"}
    assert (stats.mean_image_kappa is not None) == (name in vmf_losses)
    assert loss.logits(make_embeddings()).shape == (B, C)


# --------------------------------------------------------------------------------------------------
# training and precision


def toy_data(num_per_class=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.eye(C, D)
    labels = torch.arange(C).repeat_interleave(num_per_class)
    x = means[labels] + 0.5 * torch.randn(len(labels), D, generator=generator)
    return x, labels


@pytest.mark.parametrize("name", ALL)
def test_loss_decreases_with_adam(name):
    torch.manual_seed(0)
    x, labels = toy_data()
    model = torch.nn.Linear(D, D)
    loss = build_loss(name, num_classes=C, embed_dim=D)
    base_lr = 1e-5 if name == "el_nivmf_paper" else 1e-3  # the paper's multipliers are for base lr 1e-5
    optimizer = torch.optim.Adam([{"params": model.parameters(), "lr": 0.02}, *loss.param_groups(base_lr)])

    def evaluate():
        torch.manual_seed(123)  # the same Monte-Carlo noise before and after
        with torch.no_grad():
            return loss(model(x), labels)

    before = evaluate()
    for _ in range(30):
        optimizer.zero_grad()
        loss(model(x), labels).backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("name", ALL)
def test_float32_and_bfloat16_autocast(name):
    torch.manual_seed(0)
    loss = build_loss(name, num_classes=C, embed_dim=D)
    x, labels = toy_data(2)
    model = torch.nn.Linear(D, D)
    value = loss(model(x), labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(x)
        assert emb.dtype == torch.bfloat16
        value = loss(emb, labels)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    for n, p in [*loss.named_parameters(), *model.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
