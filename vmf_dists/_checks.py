"""Argument checks shared by the KL divergences, kernels and Monte-Carlo estimators."""

from __future__ import annotations

from torch.distributions import Distribution


def check_same_sphere(p: Distribution, q: Distribution) -> int:
    """The common ambient dimension of two distributions on spheres; ValueError if they differ."""
    if p.event_shape != q.event_shape or len(p.event_shape) != 1:
        raise ValueError(
            f"distributions on spheres of different dimensions: event shapes {tuple(p.event_shape)} and "
            f"{tuple(q.event_shape)}"
        )
    return p.event_shape[0]
