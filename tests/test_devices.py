"""Device-agnostic behaviour: on CUDA (when present) results match the CPU and stay on the device.

These run on the GPU machine through benchmarks/gpu.sh; without CUDA they are skipped, and CPU is
the fallback everywhere else in the suite.
"""

from __future__ import annotations

import math

import pytest
import torch

from vmf_dists import (
    HypersphericalUniform,
    VonMisesFisher,
    log_expected_likelihood,
    mean_resultant_length,
    pairwise_log_expected_likelihood,
    vmf_log_normalizer,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [2, 3, 64, 512, 4096])
def test_special_functions_match_cpu(dim, dtype):
    kappa = torch.tensor([0.0, 1e-6, 0.3, 7.0, 150.0, 3e4, 1e8], dtype=dtype)
    for fn in (vmf_log_normalizer, mean_resultant_length):
        on_gpu = fn(dim, kappa.cuda())
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == dtype
        torch.testing.assert_close(on_gpu.cpu(), fn(dim, kappa), rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


@cuda
@pytest.mark.parametrize("dim", [3, 16, 128, 512])
@pytest.mark.parametrize("kappa", [0.0, 20.0, 1e4])
def test_vmf_sampling_on_cuda(dim, kappa):
    torch.manual_seed(0)
    loc = torch.nn.functional.normalize(torch.randn(dim, device="cuda"), dim=0)
    conc = torch.tensor(kappa, device="cuda", requires_grad=True)
    n = 200_000
    x = VonMisesFisher(loc, conc).rsample((n,))
    assert x.device.type == "cuda" and x.dtype == torch.float32
    assert (x.norm(dim=-1) - 1).abs().max().item() < 1e-5
    w = (x.double() @ loc.double())
    target = mean_resultant_length(dim, torch.tensor(kappa, dtype=torch.float64)).item()
    z = (w.mean().item() - target) / (w.std().item() / math.sqrt(n))
    assert abs(z) < 5
    w.float().sum().backward()
    assert conc.grad.device.type == "cuda" and torch.isfinite(conc.grad)


@cuda
def test_distribution_methods_and_kernels_on_cuda():
    loc = torch.nn.functional.normalize(torch.randn(8, 128, device="cuda"), dim=-1)
    d = VonMisesFisher(loc, torch.linspace(0, 500, 8, device="cuda"))
    q = VonMisesFisher(loc.flip(0), torch.linspace(1, 50, 8, device="cuda"))
    for value in (d.log_prob(d.sample()), d.entropy(), d.mean, d.variance,
                  torch.distributions.kl_divergence(d, q), log_expected_likelihood(d, q),
                  pairwise_log_expected_likelihood(d, q)):
        assert value.device.type == "cuda" and torch.isfinite(value).all()
    u = HypersphericalUniform(128, (8,), device="cuda")
    assert u.sample().device.type == "cuda"
    assert torch.distributions.kl_divergence(d, u).device.type == "cuda"


def test_masked_rounds_path_used_on_accelerators_is_exact(monkeypatch):
    """The accelerator path of the rejection sampler (masked blocks instead of compaction), forced on the CPU."""
    import vmf_dists._sampling as sampling

    monkeypatch.setattr(sampling, "_compacts_rows", lambda device: False)
    torch.manual_seed(3)
    n = 200_000
    for dim, kappa in [(2, 0.5), (16, 300.0), (128, 1e4), (512, 20.0)]:
        loc = torch.nn.functional.normalize(torch.randn(dim, dtype=torch.float64), dim=0)
        x = VonMisesFisher(loc, kappa).sample((n,))
        w = x @ loc
        target = mean_resultant_length(dim, torch.tensor(kappa, dtype=torch.float64)).item()
        z = (w.mean().item() - target) / (w.std().item() / math.sqrt(n))
        assert abs(z) < 5, (dim, kappa, z)
        assert (x.norm(dim=-1) - 1).abs().max().item() < 1e-14
