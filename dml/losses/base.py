r"""The common interface of the proxy losses: `ProxyLoss` and its logging record `LossStats`.

Every loss takes ``embeddings`` of shape ``[B, D]`` (float32 or float64; half precision and
bfloat16 are upcast to float32, and autocast is switched off inside the loss) and integer
``labels`` of shape ``[B]`` in ``[0, num_classes)``, returns a scalar and leaves a `LossStats`
in ``loss.stats``. Its learnable parameters are handed to the optimiser through
`ProxyLoss.param_groups`, one group per kind of parameter with its own learning-rate multiplier, so
that no parameter silently needs an optimiser of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.distributions import Distribution

__all__ = ["LossStats", "ProxyLoss"]


@dataclass
class LossStats:
    """What a loss reports about its last forward pass, for logging.

    All fields are detached tensors on the device of the computation; nothing is moved to the host
    (call ``.item()`` only where a synchronisation is acceptable, e.g. every N steps).

    Attributes:
        loss: the loss value.
        temperature: the temperature $T$ of the softmax, where the loss has one.
        mean_image_kappa: mean embedding norm $\\|e_i\\|$, the image concentration (vMF losses).
        mean_proxy_kappa: mean proxy concentration (vMF and nivMF losses).
        accuracy: fraction of the batch whose own-class score is the largest (where scores exist).
    """

    loss: torch.Tensor
    temperature: torch.Tensor | None = None
    mean_image_kappa: torch.Tensor | None = None
    mean_proxy_kappa: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None


def check_positive(name: str, value: float) -> float:
    """Check a positive option value.

    Args:
        name: the option's name, for the message.
        value: the value (an int or float; bools are rejected).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: naming the option, unless ``value`` is a finite number > 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """Check a non-negative option value.

    Args:
        name: the option's name, for the message.
        value: the value (an int or float; bools are rejected).

    Returns:
        ``float(value)``.

    Raises:
        ValueError: naming the option, unless ``value`` is a finite number ≥ 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def log_parameter(name: str, value: float, shape: tuple[int, ...] = ()) -> torch.nn.Parameter:
    r"""A parameter holding ``log(value)`` (filled to ``shape``), for a positive quantity learnt in log space.

    Args:
        name: the option's name, for the message.
        value: the initial positive value.
        shape: the parameter's shape (default: a scalar).

    Returns:
        A float32 `torch.nn.Parameter` of shape ``shape`` filled with $\log$ ``value``.

    Raises:
        ValueError: unless ``value`` is a finite number > 0.
    """
    return torch.nn.Parameter(torch.full(shape, math.log(check_positive(name, value))))


def unit_rows(num_rows: int, dim: int) -> torch.Tensor:
    """Random unit vectors, uniform on the sphere (normalised Gaussians): the initial proxy directions.

    Args:
        num_rows: number of vectors $C$.
        dim: their dimension $D$.

    Returns:
        A float32 tensor of shape ``[num_rows, dim]`` with unit rows (drawn from torch's global RNG).
    """
    return F.normalize(torch.randn(num_rows, dim), dim=-1)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Detached fraction of rows whose largest score is at their label.

    Args:
        scores: ``[B, C]`` class scores.
        labels: ``[B]`` integer labels.

    Returns:
        A float32 0-dim tensor in $[0, 1]$ on the scores' device (no host synchronisation).
    """
    return (scores.detach().argmax(dim=-1) == labels).to(torch.float32).mean()


class ProxyLoss(torch.nn.Module):
    r"""Base class of the proxy losses: one call signature, input checks, precision, optimiser groups.

    Subclasses define ``name``, the keyword options of their constructor, and
    ``_loss`` (the computation, on checked inputs of the working dtype) and ``_lr_groups``.

    Args:
        num_classes: number of classes $C \ge 1$.
        embed_dim: embedding dimension $D \ge$ ``min_embed_dim``.
        min_embed_dim: the smallest ``embed_dim`` the subclass accepts (2 for the vMF losses).

    Raises:
        ValueError: if ``num_classes`` or ``embed_dim`` is not an integer in range.

    Attributes:
        name: the registry name (`dml.losses.LOSSES`).
        initial_norm_per_dim: where the embedding norm is a vMF concentration, the trainer starts it at
            this many times the dimension $D$ (a fixed output scale of the head, see
            `dml.models.EmbeddingModel.calibrate_head`); 0 leaves the head as initialised. At
            $\kappa = 2.5D$ the mean resultant length is $A_D(\kappa) \approx 0.82$: samples of the
            image vMF lie near its mean direction, so the sampled similarities carry signal.
        num_classes: number of classes $C$ (one proxy each).
        embed_dim: embedding dimension $D$.
        stats: the `LossStats` of the last forward pass (``None`` before the first).
    """

    name: ClassVar[str]
    initial_norm_per_dim: ClassVar[float] = 0.0

    def __init__(self, num_classes: int, embed_dim: int, *, min_embed_dim: int = 1) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < min_embed_dim:
            raise ValueError(f"embed_dim must be an integer >= {min_embed_dim}, got {embed_dim!r}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.stats: LossStats | None = None

    # --- the call -----------------------------------------------------------------------------

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a batch (a scalar in the working dtype); sets ``self.stats``.

        Args:
            embeddings: ``[B, D]`` floating tensor.
            labels: ``[B]`` integer tensor with values in ``[0, num_classes)``.

        Returns:
            A 0-dim tensor, float32 for float32 / half / bfloat16 input (also under autocast), float64
            for float64 input or a float64 loss module.

        Raises:
            ValueError: on wrong shapes or dtypes, labels on another device than the embeddings, or
                (while torch.distributions' argument validation is on) labels out of range.
        """
        self._check_labels(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            x = self._working_precision(embeddings)
            loss, stats = self._loss(x, labels.long())
        self.stats = stats
        return loss

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        r"""The ``[B, C]`` class scores of the loss (the largest is the predicted class).

        For the softmax losses these are the logits whose cross-entropy is trained; for ProxyAnchor,
        the cosine similarities. Monte-Carlo losses draw fresh samples on each call.

        Args:
            embeddings: ``[B, D]`` floating tensor.

        Returns:
            Tensor of shape ``[B, C]`` in the working dtype (float32, or float64 for float64 input or
            a float64 loss module).

        Raises:
            ValueError: if ``embeddings`` is not a floating tensor of shape ``[B, D]`` with $B \ge 1$.
        """
        self._check_embeddings(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._logits(self._working_precision(embeddings))

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser parameter groups: ``[{'params': [...], 'lr': lr * mult, 'name': ...}, ...]``.

        Every parameter of the loss appears in exactly one group; a multiplier of 0 freezes a group
        (e.g. a fixed temperature).

        Args:
            lr: the base learning rate.

        Returns:
            One dict per non-empty group, with keys ``params``, ``lr`` (``lr`` times the group's
            multiplier) and ``name`` (e.g. ``"proxies"``, ``"concentrations"``, ``"temperature"``).

        Raises:
            RuntimeError: if a subclass's groups miss or repeat a parameter (a bug in the subclass).
        """
        groups: list[dict[str, Any]] = [
            {"params": list(params), "lr": lr * mult, "name": name}
            for name, params, mult in self._lr_groups() if params
        ]
        listed = [id(p) for g in groups for p in g["params"]]
        if len(listed) != len(set(listed)) or set(listed) != {id(p) for p in self.parameters()}:
            raise RuntimeError(f"{type(self).__name__}.param_groups does not cover each parameter exactly once")
        return groups

    # --- for subclasses -------------------------------------------------------------------------

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        raise NotImplementedError

    def _logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _lr_groups(self) -> list[tuple[str, list[torch.nn.Parameter], float]]:
        raise NotImplementedError

    def _param(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A parameter (or buffer) in the working dtype of ``like`` (differentiable cast)."""
        return tensor.to(like.dtype)

    def _softmax_cross_entropy(
        self, logits: torch.Tensor, labels: torch.Tensor, **stats: torch.Tensor | None
    ) -> tuple[torch.Tensor, LossStats]:
        """Mean cross-entropy of ``logits`` ``[B, C]`` and the stats (detached) with the accuracy."""
        loss = F.cross_entropy(logits, labels)
        detached = {k: (v.detach() if v is not None else None) for k, v in stats.items()}
        return loss, LossStats(loss=loss.detach(), accuracy=accuracy(logits, labels), **detached)

    # --- checks and precision -------------------------------------------------------------------

    def _working_precision(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings in float32 (from half / bfloat16), or the promoted dtype of them and the loss."""
        if embeddings.dtype not in (torch.float32, torch.float64):
            embeddings = embeddings.to(torch.float32)
        own = next(iter(self.parameters()), None)
        if own is not None and own.is_floating_point():
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, own.dtype))
        return embeddings

    def _check_embeddings(self, embeddings: torch.Tensor) -> None:
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
            raise ValueError("embeddings must be a floating-point tensor of shape [B, D]")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim or embeddings.shape[0] < 1:
            raise ValueError(
                f"embeddings must have shape [B, {self.embed_dim}] with B >= 1, got {tuple(embeddings.shape)}"
            )

    def _check_labels(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        self._check_embeddings(embeddings)
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dtype == torch.bool
            or labels.is_floating_point()
            or labels.is_complex()
        ):
            raise ValueError("labels must be an integer tensor of shape [B]")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must have shape [{embeddings.shape[0]}], got {tuple(labels.shape)}")
        if labels.device != embeddings.device:
            raise ValueError(f"labels are on {labels.device}, embeddings on {embeddings.device}")
        # The range check synchronises with the device; it follows torch.distributions' switch.
        if Distribution._validate_args and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got values outside")

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr(loss)``."""
        return f"num_classes={self.num_classes}, embed_dim={self.embed_dim}"
