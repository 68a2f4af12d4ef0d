r"""ProxyNCA++ (Teh, DeVries, Taylor, "ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood Component
Analysis", ECCV 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dml.losses.base import LossStats, ProxyLoss, check_nonnegative, check_positive

__all__ = ["ProxyNCALoss"]


class ProxyNCALoss(ProxyLoss):
    r"""ProxyNCA++: softmax over negative squared distances of normalised embeddings and proxies.

    With $\mu_i = e_i/\|e_i\|$ and $\hat p_c = p_c/\|p_c\|$,

    $$
    \ell_{ic} = -\frac{\|\mu_i - \hat p_c\|^2}{T} = -\frac{2 - 2\mu_i^\top\hat p_c}{T}, \qquad
    L = \frac1B\sum_i -\log\frac{e^{\ell_{i y_i}}}{\sum_c e^{\ell_{ic}}},
    $$

    with the fixed temperature $T = 1/9$ of the paper ("temperature scaling"); the proxies learn
    faster than the network ("fast-moving proxies", ``proxy_lr_mult``). Proxies start as
    $\mathcal N(0, 1/64)$ entries, as in the authors' code.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $D$.
        temperature: fixed $T > 0$ (default 1/9).
        proxy_lr_mult: learning-rate multiplier of the proxies (default 100).

    Raises:
        ValueError: if ``num_classes`` or ``embed_dim`` < 1, ``temperature`` is not a finite number > 0,
            or ``proxy_lr_mult`` is not a finite number ≥ 0.

    References:
        E. W. Teh, T. DeVries, G. W. Taylor, "ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood
        Component Analysis", ECCV 2020.
    """

    name = "proxy_nca"

    def __init__(
        self, num_classes: int, embed_dim: int, *, temperature: float = 1.0 / 9.0, proxy_lr_mult: float = 100.0
    ) -> None:
        super().__init__(num_classes, embed_dim)
        self.proxy_lr_mult = check_nonnegative("proxy_lr_mult", proxy_lr_mult)
        self.proxies = torch.nn.Parameter(torch.randn(num_classes, embed_dim) / 8.0)
        self.temperature = check_positive("temperature", temperature)

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        proxies = F.normalize(self._param(self.proxies, embeddings), dim=-1)
        cos = F.normalize(embeddings, dim=-1) @ proxies.T
        sq_dist = (2.0 - 2.0 * cos).clamp(min=0.0)
        return -sq_dist / self.temperature

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        logits = self._logits(embeddings)
        temperature = torch.full((), self.temperature, dtype=logits.dtype, device=logits.device)
        return self._softmax_cross_entropy(logits, labels, temperature=temperature)

    def _lr_groups(self):
        return [("proxies", [self.proxies], self.proxy_lr_mult)]
