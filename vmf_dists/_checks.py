"""Argument and sample checks shared by the distributions, KL divergences, kernels and estimators.

Messages are one line that names the argument and the constraint and summarises the offending entries
(how many, the first one and where), never a print-out of the whole tensor.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, biject_to, constraints, transform_to
from torch.distributions.transforms import ExpTransform

__all__ = [
    "broadcast_shapes",
    "check_same_sphere",
    "check_unit_and_nonnegative",
    "check_sample_on_sphere",
    "check_unit_vectors",
    "check_values",
    "finite_nonnegative",
]


def broadcast_shapes(*shapes: tuple[int, ...] | torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` for shapes of Python ints, in plain Python.

    torch's own goes through ``torch._refs`` (about 9 µs a call, as much as several small tensor
    operations; a VAE step broadcasts three times). Raises RuntimeError, as torch's does, if the shapes
    do not broadcast.
    """
    result = list(shapes[0])
    for shape in shapes[1:]:
        if len(shape) > len(result):
            result[:0] = [1] * (len(shape) - len(result))
        offset = len(result) - len(shape)
        for i, size in enumerate(shape):
            current = result[offset + i]
            if size != current and size != 1:
                if current != 1:
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                result[offset + i] = size
    return torch.Size(result)


def check_same_sphere(p: Distribution, q: Distribution) -> int:
    """The common ambient dimension of two distributions on spheres; ValueError if they differ."""
    if p.event_shape != q.event_shape or len(p.event_shape) != 1:
        raise ValueError(
            f"distributions on spheres of different dimensions: event shapes {tuple(p.event_shape)} and "
            f"{tuple(q.event_shape)}"
        )
    return p.event_shape[0]


def _summary(values: torch.Tensor, invalid: torch.Tensor) -> str:
    """'3 of 64 entries, the first -1.5 at index (2, 0)' for the True entries of ``invalid``."""
    count = int(invalid.sum())
    index = tuple(int(i) for i in torch.nonzero(invalid)[0].tolist())
    first = values[index].item() if values.shape == invalid.shape else None
    what = f"the first {first:g} at index {index}" if first is not None else f"the first at index {index}"
    return f"{count} of {invalid.numel()} entries, {what}"


def check_values(value: torch.Tensor, name: str, *, positive: bool = False) -> None:
    """ValueError unless every entry is finite and ≥ 0 (> 0 with ``positive``)."""
    valid = torch.isfinite(value) & ((value > 0) if positive else (value >= 0))
    if not bool(valid.all()):
        constraint = "finite and positive" if positive else "finite and non-negative"
        raise ValueError(f"{name} must be {constraint}; {_summary(value, ~valid)}")


def _unit_norm_error(value: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(|‖v‖ − 1| over the last dimension, the tolerance): 10·ε·√p at ``value``'s own precision (Pyro's)."""
    eps = torch.finfo(value.dtype).eps
    error = (torch.linalg.vector_norm(value, dim=-1) - 1.0).abs()
    return error, 10.0 * eps * math.sqrt(value.shape[-1])


def check_unit_vectors(value: torch.Tensor, name: str) -> None:
    """ValueError unless every vector along the last dimension has unit norm (at its own precision)."""
    error, tolerance = _unit_norm_error(value)
    invalid = ~(error < tolerance)  # also catches NaN
    if bool(invalid.any()):
        index = tuple(int(i) for i in torch.nonzero(invalid)[0].tolist())
        norm = torch.linalg.vector_norm(value[index], dim=-1).item()
        raise ValueError(
            f"{name} must be unit vectors along its last dimension (|‖v‖ − 1| < {tolerance:.1e} in "
            f"{value.dtype}); {int(invalid.sum())} of {invalid.numel()} vectors are not, the first with "
            f"norm {norm:.9g} at index {index}"
        )


def _unit_tolerance(value: torch.Tensor) -> float:
    return 10.0 * torch.finfo(value.dtype).eps * math.sqrt(value.shape[-1])


def check_unit_and_nonnegative(loc: torch.Tensor, concentration: torch.Tensor) -> None:
    """`check_unit_vectors` on ``loc`` and `check_values` on ``concentration`` with one host read.

    The fast path reads min/max of ‖loc‖ and of κ (five tensor operations); only if they are out of
    range (or NaN) are the detailed checks run, for their messages.
    """
    if loc.numel() == 0 or concentration.numel() == 0:
        return
    loc, concentration = loc.detach(), concentration.detach()  # no autograd bookkeeping for a check
    extremes = [*torch.aminmax(torch.linalg.vector_norm(loc, dim=-1)), *torch.aminmax(concentration)]
    if loc.dtype == concentration.dtype:
        low_norm, high_norm, low_kappa, high_kappa = torch.stack(extremes).tolist()
    else:
        low_norm, high_norm, low_kappa, high_kappa = (t.item() for t in extremes)
    tolerance = _unit_tolerance(loc)
    if not (abs(low_norm - 1.0) < tolerance and abs(high_norm - 1.0) < tolerance):
        check_unit_vectors(loc, "loc")
    if not (low_kappa >= 0.0 and high_kappa < math.inf):
        check_values(concentration, "concentration")


def check_sample_on_sphere(d: Distribution, value: torch.Tensor) -> None:
    """torch's ``_validate_sample`` for a distribution on the sphere, with a one-line message."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"value must be a tensor, got {type(value).__name__}")
    event_shape, expected = d.event_shape, d.batch_shape + d.event_shape
    if value.dim() < len(event_shape) or value.shape[value.dim() - len(event_shape):] != event_shape:
        raise ValueError(f"value must have shape [..., {', '.join(map(str, event_shape))}], got {tuple(value.shape)}")
    for i, j in zip(reversed(value.shape), reversed(expected)):
        if i != 1 and j != 1 and i != j:
            raise ValueError(
                f"value of shape {tuple(value.shape)} does not broadcast with batch_shape + event_shape = "
                f"{tuple(expected)}"
            )
    if value.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(torch.linalg.vector_norm(value.detach(), dim=-1))).tolist()
    tolerance = _unit_tolerance(value)
    if not (abs(low - 1.0) < tolerance and abs(high - 1.0) < tolerance):
        check_unit_vectors(value, "value")


class _FiniteNonnegative(constraints.Constraint):
    """Finite values ≥ 0: the concentration of a vMF (κ = 0 is the uniform distribution).

    ``biject_to`` / ``transform_to`` map ℝ onto it by ``exp`` (as for torch's ``nonnegative``), so
    ``pyro.param(..., constraint=...)`` returns a finite concentration.
    """

    is_discrete = False
    event_dim = 0
    lower_bound = 0.0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return (value >= 0) & torch.isfinite(value)

    def __repr__(self) -> str:
        return "FiniteNonnegative()"


finite_nonnegative = _FiniteNonnegative()
biject_to.register(_FiniteNonnegative)(lambda constraint: ExpTransform())
transform_to.register(_FiniteNonnegative)(lambda constraint: ExpTransform())
