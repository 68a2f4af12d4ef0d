r"""ProxyAnchor (Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dml.losses.base import LossStats, ProxyLoss, accuracy, check_nonnegative, check_positive

__all__ = ["ProxyAnchorLoss", "proxy_anchor_loss"]


def _log1p_sum_exp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Per column c: $\log(1 + \sum_{i: \text{mask}_{ic}} e^{z_{ic}})$ as a logsumexp over ``[0, z...]``."""
    masked = torch.where(mask, z, torch.full_like(z, -torch.inf))
    return torch.logsumexp(torch.cat([torch.zeros_like(z[:1]), masked], dim=0), dim=0)


def proxy_anchor_loss(cos_sim: torch.Tensor, labels: torch.Tensor, alpha: float = 32.0,
                      delta: float = 0.1) -> torch.Tensor:
    r"""The ProxyAnchor loss of a batch from its cosine similarities to the proxies.

    With $s_{ic}$ the cosine similarity of image $i$ and proxy $c$, $P^+$ the classes present in the
    batch and $C$ the number of classes,

    $$
    L = \frac{1}{|P^+|}\sum_{c \in P^+} \log\Big(1 + \sum_{i:\,y_i = c} e^{-\alpha(s_{ic} - \delta)}\Big)
      + \frac{1}{C}\sum_{c} \log\Big(1 + \sum_{i:\,y_i \ne c} e^{\alpha(s_{ic} + \delta)}\Big),
    $$

    each $\log(1 + \sum e^{z})$ evaluated as a logsumexp over $[0, z_1, \dots]$ (no overflow).
    A class without negatives in the batch contributes 0 to the second sum.

    Args:
        cos_sim: ``[B, C]`` cosine similarities.
        labels: ``[B]`` integer labels in ``[0, C)``.
        alpha: scale $\alpha > 0$.
        delta: margin $\delta$.

    Returns:
        The loss, a 0-dim tensor in the dtype of ``cos_sim``.

    Raises:
        ValueError: if ``cos_sim`` is not 2-D or ``labels`` is not of shape ``[B]``.

    References:
        S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.
    """
    if cos_sim.dim() != 2 or labels.shape != cos_sim.shape[:1]:
        raise ValueError(f"cos_sim must be [B, C] and labels [B], got {tuple(cos_sim.shape)} and {tuple(labels.shape)}")
    num_classes = cos_sim.shape[1]
    positive = labels.unsqueeze(1) == torch.arange(num_classes, device=cos_sim.device)
    pos_terms = _log1p_sum_exp(-alpha * (cos_sim - delta), positive)  # 0 for classes absent from the batch
    neg_terms = _log1p_sum_exp(alpha * (cos_sim + delta), ~positive)
    num_present = positive.any(dim=0).sum()  # ≥ 1 for a non-empty batch; a tensor, no host sync
    return pos_terms.sum() / num_present + neg_terms.sum() / num_classes


class ProxyAnchorLoss(ProxyLoss):
    r"""ProxyAnchor: each proxy is an anchor pulling its class's images and pushing the others away.

    Scores are cosine similarities $s(x, p_c)$ of embeddings and proxies, and the loss is
    `proxy_anchor_loss` (see there for the formula) with scale $\alpha$ and margin $\delta$.
    Proxies are initialised with ``kaiming_normal_(mode='fan_out')`` as in the authors' code.

    Args:
        num_classes: number of classes $C$.
        embed_dim: embedding dimension $D$.
        alpha: scale $\alpha$ (default 32).
        delta: margin $\delta$ (default 0.1).
        proxy_lr_mult: learning-rate multiplier of the proxies (default 100, as in the paper).

    Raises:
        ValueError: if ``num_classes`` or ``embed_dim`` < 1, ``alpha`` is not a finite number > 0, or
            ``proxy_lr_mult`` is not a finite number ≥ 0.

    References:
        S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.
    """

    name = "proxy_anchor"

    def __init__(
        self, num_classes: int, embed_dim: int, *, alpha: float = 32.0, delta: float = 0.1, proxy_lr_mult: float = 100.0
    ) -> None:
        super().__init__(num_classes, embed_dim)
        self.alpha = check_positive("alpha", alpha)
        self.delta = float(delta)
        self.proxy_lr_mult = check_nonnegative("proxy_lr_mult", proxy_lr_mult)
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embed_dim))
        torch.nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        proxies = self._param(self.proxies, embeddings)
        return F.normalize(embeddings, dim=-1) @ F.normalize(proxies, dim=-1).T

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        cos_sim = self._logits(embeddings)
        loss = proxy_anchor_loss(cos_sim, labels, self.alpha, self.delta)
        return loss, LossStats(loss=loss.detach(), accuracy=accuracy(cos_sim, labels))

    def _lr_groups(self):
        return [("proxies", [self.proxies], self.proxy_lr_mult)]
