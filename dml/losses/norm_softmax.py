r"""NormSoftmax (Zhai, Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dml.losses.base import LossStats, ProxyLoss, check_nonnegative, check_positive

__all__ = ["NormSoftmaxLoss"]


class NormSoftmaxLoss(ProxyLoss):
    r"""Normalised softmax: cross-entropy over temperature-scaled cosine similarities to class weights.

    $$
    \ell_{ic} = \frac{\cos(e_i, w_c)}{T}, \qquad L = \frac1B\sum_i -\log\frac{e^{\ell_{iy_i}}}{\sum_c e^{\ell_{ic}}},
    $$

    with a fixed temperature $T = 0.05$. Class weights start as $\mathcal N(0, 1/D)$ entries (only
    their directions matter).

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $D$.
        temperature: fixed $T > 0$ (default 0.05).
        proxy_lr_mult: learning-rate multiplier of the class weights (default 100).

    Raises:
        ValueError: if ``num_classes`` or ``embed_dim`` < 1, ``temperature`` is not a finite number > 0,
            or ``proxy_lr_mult`` is not a finite number ≥ 0.

    References:
        A. Zhai, H.-Y. Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019.
    """

    name = "norm_softmax"

    def __init__(
        self, num_classes: int, embed_dim: int, *, temperature: float = 0.05, proxy_lr_mult: float = 100.0
    ) -> None:
        super().__init__(num_classes, embed_dim)
        self.proxy_lr_mult = check_nonnegative("proxy_lr_mult", proxy_lr_mult)
        self.proxies = torch.nn.Parameter(torch.randn(num_classes, embed_dim) / math.sqrt(embed_dim))
        self.temperature = check_positive("temperature", temperature)

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        proxies = F.normalize(self._param(self.proxies, embeddings), dim=-1)
        return (F.normalize(embeddings, dim=-1) @ proxies.T) / self.temperature

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        logits = self._logits(embeddings)
        temperature = torch.full((), self.temperature, dtype=logits.dtype, device=logits.device)
        return self._softmax_cross_entropy(logits, labels, temperature=temperature)

    def _lr_groups(self):
        return [("proxies", [self.proxies], self.proxy_lr_mult)]
