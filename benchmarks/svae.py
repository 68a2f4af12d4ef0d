"""An anchor, not a library: a faithful port of s-vae-pytorch's von Mises–Fisher distribution.

s-vae-pytorch (Davidson et al., "Hyperspherical Variational Auto-Encoders", UAI 2018; MIT licence) is
the vMF most PyTorch VAEs use, and the reference code of Kirchhof et al. (ECCV 2022) samples with it.
This port keeps its algorithm and its defects so that benchmarks compare against what users run:

* ``w`` by Wood's rejection sampler with b blended into the large-κ approximation (m−1)/(4κ) for every
  κ > 10 (wrong unless κ ≫ p: at p = 512, κ = 20 its samples have E[μᵀx] = −0.73 instead of +0.039),
  ``proposals`` Beta candidates per pending sample per round, a host-synchronising while loop;
  for p = 3 the exact inverse CDF;
* the direction by a Householder reflection taking e₁ to μ; gradients flow through the accepted
  proposal's formula (no correction term: the κ-gradient is biased);
* log C_p(κ) from ``scipy.special.ive`` on the host (a round trip per call; it underflows at high order),
  the KL to the uniform as −H(vMF) + log|S^{p−1}|.

Used by ``benchmarks/sampling.py`` and ``benchmarks/small_batch.py`` only.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import torch


class _Ive(torch.autograd.Function):
    """e^{−κ} I_v(κ) by scipy on the host, with s-vae's backward I'_v e^{−κ} − I_v e^{−κ}."""

    @staticmethod
    def forward(ctx, v: float, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.v = v
        z_host = z.detach().cpu().numpy()
        if np.isclose(v, 0):
            out = scipy.special.i0e(z_host)
        elif np.isclose(v, 1):
            out = scipy.special.i1e(z_host)
        else:
            out = scipy.special.ive(v, z_host)
        return torch.as_tensor(out, dtype=z.dtype, device=z.device)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        v = ctx.v
        return None, grad * (ive(v - 1, z) - ive(v, z) * (v + z) / z)


def ive(v: float, z: torch.Tensor) -> torch.Tensor:
    return _Ive.apply(v, z)


class SvaeVonMisesFisher:
    """s-vae-pytorch's ``VonMisesFisher(loc, scale)``: ``loc`` [..., p], ``scale`` [..., 1] (κ, keepdim)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, proposals: int = 1):
        self.loc, self.scale, self.proposals = loc, scale, proposals
        self.m = loc.shape[-1]
        self.e1 = torch.zeros(self.m, dtype=loc.dtype, device=loc.device)
        self.e1[0] = 1.0

    def rsample(self, shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(shape)
        w = self._sample_w3(shape) if self.m == 3 else self._sample_w_rejection(shape)
        v = torch.randn(shape + self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)[..., 1:]
        v = v / v.norm(dim=-1, keepdim=True)
        w_ = torch.sqrt(torch.clamp(1 - w**2, 1e-10))
        x = torch.cat((w, w_ * v), -1)
        return self._householder_rotation(x)

    def _sample_w3(self, shape: torch.Size) -> torch.Tensor:
        u = torch.rand(shape + self.scale.shape, dtype=self.loc.dtype, device=self.loc.device)
        return 1 + torch.stack([torch.log(u), torch.log(1 - u) - 2 * self.scale], dim=0).logsumexp(0) / self.scale

    def _sample_w_rejection(self, shape: torch.Size) -> torch.Tensor:
        m, scale = self.m, self.scale
        c = torch.sqrt(4 * scale**2 + (m - 1) ** 2)
        b_true = (-2 * scale + c) / (m - 1)
        b_app = (m - 1) / (4 * scale)  # the large-κ approximation, wrong unless κ ≫ p
        s = torch.clamp(scale - 10, 0.0, 1.0)
        b = b_app * s + b_true * (1 - s)
        a = (m - 1 + 2 * scale + c) / 4
        d = (4 * a * b) / (1 + b) - (m - 1) * math.log(m - 1)
        return self._while_loop(b, a, d, shape)

    def _while_loop(self, b, a, d, shape: torch.Size, eps: float = 1e-20) -> torch.Tensor:
        b, a, d = (e.expand(shape + e.shape).reshape(-1, 1) for e in (b, a, d))
        w = torch.zeros_like(b)
        pending = torch.ones_like(b, dtype=torch.bool)
        half = torch.tensor((self.m - 1) / 2, dtype=torch.float64)
        beta = torch.distributions.Beta(half, half)
        while bool(pending.any()):  # one host sync per round, as in the original
            e = beta.sample((b.shape[0], self.proposals)).to(device=b.device, dtype=b.dtype)
            u = torch.empty_like(e).uniform_(eps, 1 - eps)
            w_prop = (1 - (1 + b) * e) / (1 - (1 - b) * e)
            t = (2 * a * b) / (1 - (1 - b) * e)
            accept = ((self.m - 1.0) * t.log() - t + d) > torch.log(u)
            any_accept = accept.any(dim=-1, keepdim=True)
            first = torch.argmax(accept.to(torch.uint8), dim=-1, keepdim=True)
            take = pending & any_accept
            w = torch.where(take, w_prop.gather(1, first), w)
            pending = pending & ~any_accept
        return w.reshape(shape + self.scale.shape)

    def _householder_rotation(self, x: torch.Tensor) -> torch.Tensor:
        u = self.e1 - self.loc
        u = u / (u.norm(dim=-1, keepdim=True) + 1e-5)
        return x - 2 * (x * u).sum(-1, keepdim=True) * u

    def _log_normalization(self) -> torch.Tensor:
        m, scale = self.m, self.scale
        out = -(
            (m / 2 - 1) * torch.log(scale) - (m / 2) * math.log(2 * math.pi)
            - (scale + torch.log(ive(m / 2 - 1, scale)))
        )
        return out.squeeze(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * (self.loc * x).sum(-1, keepdim=True)).squeeze(-1) - self._log_normalization()

    def entropy(self) -> torch.Tensor:
        m, scale = self.m, self.scale
        out = -scale * ive(m / 2, scale) / ive(m / 2 - 1, scale)
        return out.squeeze(-1) + self._log_normalization()

    def kl_to_uniform(self) -> torch.Tensor:
        """KL(vMF ‖ uniform) = −H(vMF) + log|S^{p−1}| (s-vae's registered KL)."""
        log_area = math.log(2.0) + 0.5 * self.m * math.log(math.pi) - math.lgamma(0.5 * self.m)
        return -self.entropy() + log_area
