r"""Proxy-based metric-learning losses, one module per loss, one call signature.

Every loss is a `ProxyLoss`: ``loss = build_loss(name, num_classes=C, embed_dim=D, **options)``, then
``loss(embeddings, labels)`` returns a scalar and sets ``loss.stats`` (a `LossStats`), and
``loss.param_groups(lr)`` gives the optimiser groups of its parameters (proxies, concentrations,
temperature) with their learning-rate multipliers.

| name | class | scores |
|---|---|---|
| ``proxy_anchor`` | `ProxyAnchorLoss` | cosine, ProxyAnchor (Kim et al. 2020) |
| ``proxy_nca`` | `ProxyNCALoss` | −squared distance of unit vectors / T, softmax (Teh et al. 2020) |
| ``norm_softmax`` | `NormSoftmaxLoss` | cosine / T, softmax (Zhai & Wu 2019) |
| ``l2`` | `L2ProxyLoss` | −squared Euclidean distance / T, softmax, learnable T |
| ``cosine`` | `CosineProxyLoss` | cosine / T, softmax, learnable T |
| ``el_vmf`` | `ELVMFLoss` | tempered expected likelihood, vMF images × vMF proxies |
| ``ppk_vmf`` | `PPKVMFLoss` | log probability product kernel / T, vMF × vMF |
| ``kl_vmf`` | `KLVMFLoss` | −KL(image ‖ proxy) / T, vMF × vMF |
| ``el_nivmf`` | `ELNivMFLoss` | tempered expected likelihood, vMF images × nivMF proxies (Monte Carlo) + ProxyAnchor |
| ``el_nivmf_paper`` | `ELNivMFPaperLoss` | the paper's released objective, in closed form |
"""

from __future__ import annotations

import inspect
from typing import Any

from dml.losses.base import LossStats, ProxyLoss
from dml.losses.el_nivmf import ELNivMFLoss
from dml.losses.el_nivmf_paper import ELNivMFPaperLoss, paper_log_normalizer
from dml.losses.norm_softmax import NormSoftmaxLoss
from dml.losses.point import CosineProxyLoss, L2ProxyLoss
from dml.losses.proxy_anchor import ProxyAnchorLoss, proxy_anchor_loss
from dml.losses.proxy_nca import ProxyNCALoss
from dml.losses.vmf import ELVMFLoss, KLVMFLoss, PPKVMFLoss

__all__ = [
    "LOSSES",
    "CosineProxyLoss",
    "ELNivMFLoss",
    "ELNivMFPaperLoss",
    "ELVMFLoss",
    "KLVMFLoss",
    "L2ProxyLoss",
    "LossStats",
    "NormSoftmaxLoss",
    "PPKVMFLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "build_loss",
    "loss_options",
    "paper_log_normalizer",
    "proxy_anchor_loss",
]

#: Registry name → loss class.
LOSSES: dict[str, type[ProxyLoss]] = {
    cls.name: cls
    for cls in (
        ProxyAnchorLoss,
        ProxyNCALoss,
        NormSoftmaxLoss,
        L2ProxyLoss,
        CosineProxyLoss,
        ELVMFLoss,
        PPKVMFLoss,
        KLVMFLoss,
        ELNivMFLoss,
        ELNivMFPaperLoss,
    )
}


def loss_options(name: str) -> dict[str, object]:
    """The keyword options of loss ``name`` and their defaults.

    Args:
        name: registry name (a key of `LOSSES`).

    Returns:
        ``{option: default}`` for every keyword-only argument of the loss's constructor, in signature order.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).

    Example:
        >>> from dml.losses import loss_options
        >>> loss_options("proxy_nca")
        {'temperature': 0.1111111111111111, 'proxy_lr_mult': 100.0}
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    parameters = inspect.signature(LOSSES[name].__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_loss(name: str, *, num_classes: int, embed_dim: int, **options: Any) -> ProxyLoss:
    """Construct the loss registered as ``name`` (see `LOSSES`).

    Args:
        name: registry name, e.g. ``"el_nivmf"``.
        num_classes: number of classes (one proxy each).
        embed_dim: embedding dimension.
        **options: the loss's keyword options (see `loss_options`).

    Returns:
        The loss module (float32, on the CPU; move it with ``.to(device)``).

    Raises:
        ValueError: for an unknown name or option (the message lists the valid ones), or an invalid value.

    Example:
        >>> import torch
        >>> from dml.losses import build_loss
        >>> loss = build_loss("el_vmf", num_classes=10, embed_dim=16, temperature=0.5)
        >>> value = loss(torch.randn(8, 16), torch.randint(0, 10, (8,)))
        >>> value.shape, loss.logits(torch.randn(8, 16)).shape
        (torch.Size([]), torch.Size([8, 10]))
    """
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return LOSSES[name](num_classes, embed_dim, **options)
