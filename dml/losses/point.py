r"""The point-embedding baselines of Kirchhof et al. (ECCV 2022): Euclidean and cosine proxy softmax losses.

Both are softmax cross-entropies over proxies with a learnable temperature (learnt in log space), the
deterministic counterparts of the vMF losses in `dml.losses.vmf` and `dml.losses.el_nivmf`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dml.losses.base import LossStats, ProxyLoss, check_nonnegative, check_positive, log_parameter, unit_rows

__all__ = ["CosineProxyLoss", "L2ProxyLoss"]


class _LearnableTemperature(ProxyLoss):
    """A proxy softmax loss with proxies [C, D] and a temperature learnt as log T."""

    def __init__(self, num_classes, embed_dim, *, temperature, proxy_lr_mult, temperature_lr_mult) -> None:
        super().__init__(num_classes, embed_dim)
        self.proxy_lr_mult = check_nonnegative("proxy_lr_mult", proxy_lr_mult)
        self.temperature_lr_mult = check_nonnegative("temperature_lr_mult", temperature_lr_mult)
        self.log_temperature = log_parameter("temperature", temperature)

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature $T = \\exp(\\log T)$."""
        return self.log_temperature.exp()

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        return self._softmax_cross_entropy(self._logits(embeddings), labels, temperature=self.temperature)

    def _lr_groups(self):
        return [
            ("proxies", [self.proxies], self.proxy_lr_mult),
            ("temperature", [self.log_temperature], self.temperature_lr_mult),
        ]


class L2ProxyLoss(_LearnableTemperature):
    r"""Euclidean proxy softmax on unnormalised embeddings and proxies (the paper's "L2" baseline).

    $$
    \ell_{ic} = -\frac{\|e_i - p_c\|^2}{T}, \qquad L = \frac1B\sum_i -\log\frac{e^{\ell_{iy_i}}}{\sum_c e^{\ell_{ic}}},
    $$

    with $\|e_i - p_c\|^2 = \|e_i\|^2 + \|p_c\|^2 - 2e_i^\top p_c$ from one matrix product (clamped at 0),
    and $T$ learnt as $\log T$. Proxies start as random directions of norm ``proxy_norm``.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $D$.
        temperature: initial $T > 0$ (default 1).
        proxy_norm: initial proxy norm (default 1).
        proxy_lr_mult: learning-rate multiplier of the proxies (default 100).
        temperature_lr_mult: learning-rate multiplier of $\log T$ (default 10; 0 keeps $T$ fixed).

    Raises:
        ValueError: if ``num_classes`` or ``embed_dim`` < 1, ``temperature`` or ``proxy_norm`` is not a
            finite number > 0, or a multiplier is not a finite number ≥ 0.

    References:
        M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
        Deep Metric Learning", ECCV 2022.
    """

    name = "l2"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        temperature: float = 1.0,
        proxy_norm: float = 1.0,
        proxy_lr_mult: float = 100.0,
        temperature_lr_mult: float = 10.0,
    ) -> None:
        super().__init__(
            num_classes,
            embed_dim,
            temperature=temperature,
            proxy_lr_mult=proxy_lr_mult,
            temperature_lr_mult=temperature_lr_mult,
        )
        self.proxies = torch.nn.Parameter(unit_rows(num_classes, embed_dim) * check_positive("proxy_norm", proxy_norm))

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        proxies = self._param(self.proxies, embeddings)
        sq_dist = (
            embeddings.square().sum(-1, keepdim=True) + proxies.square().sum(-1) - 2.0 * (embeddings @ proxies.T)
        ).clamp(min=0.0)
        return -sq_dist / self._param(self.temperature, embeddings)


class CosineProxyLoss(_LearnableTemperature):
    r"""Cosine proxy softmax with a learnable temperature (the paper's "cosine" baseline).

    $$
    \ell_{ic} = \frac{\cos(e_i, p_c)}{T}, \qquad L = \frac1B\sum_i -\log\frac{e^{\ell_{iy_i}}}{\sum_c e^{\ell_{ic}}},
    $$

    with $T$ learnt as $\log T$, initially $1/256$ as in the paper.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $D$.
        temperature: initial $T > 0$ (default 1/256).
        proxy_lr_mult: learning-rate multiplier of the proxies (default 100).
        temperature_lr_mult: learning-rate multiplier of $\log T$ (default 10; 0 keeps $T$ fixed).

    Raises:
        ValueError: if ``num_classes`` or ``embed_dim`` < 1, ``temperature`` is not a finite number > 0,
            or a multiplier is not a finite number ≥ 0.

    References:
        M. Kirchhof, K. Roth, Z. Akata, E. Kasneci, "A Non-isotropic Probabilistic Take on Proxy-based
        Deep Metric Learning", ECCV 2022.
    """

    name = "cosine"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        *,
        temperature: float = 1.0 / 256.0,
        proxy_lr_mult: float = 100.0,
        temperature_lr_mult: float = 10.0,
    ) -> None:
        super().__init__(
            num_classes,
            embed_dim,
            temperature=temperature,
            proxy_lr_mult=proxy_lr_mult,
            temperature_lr_mult=temperature_lr_mult,
        )
        self.proxies = torch.nn.Parameter(unit_rows(num_classes, embed_dim))

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        proxies = F.normalize(self._param(self.proxies, embeddings), dim=-1)
        return (F.normalize(embeddings, dim=-1) @ proxies.T) / self._param(self.temperature, embeddings)
