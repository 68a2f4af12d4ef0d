"""`apply`: `torch.autograd.Function.apply` without its per-call overhead where that is safe.

``Function.apply`` binds its arguments to the signature of ``forward`` with ``inspect`` on every call
(for ``setup_context``-style Functions, which ``torch.func`` needs): about 20 µs, as much as ten small
tensor operations, and our Functions run on tensors of a few elements in VAEs and Pyro models. With all
arguments passed positionally that binding does nothing, so outside ``torch.func`` transforms and
``torch.compile`` (which both need the Python path) we call the C++ entry point directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["Refuse", "RefuseWithoutJvp", "apply", "untraced", "without_jvp"]

_C_APPLY = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")


def apply(
    function: type[torch.autograd.Function], *args: Any, compiled: type[torch.autograd.Function] | None = None
) -> Any:
    """``function.apply(*args)`` (all arguments positional), skipping the Python wrapper when it is not needed.

    Under torch.compile ``compiled`` (the `without_jvp` variant of ``function``) is applied instead:
    Dynamo cannot trace Functions that define ``jvp`` (torch.func.jvp still gets the rule in eager mode).
    """
    if torch.compiler.is_compiling():
        return (compiled or function).apply(*args)
    if _C_APPLY is None or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
        return function.apply(*args)
    return _C_APPLY.__get__(None, function)(*args)


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Build cached constants outside a ``torch.jit.trace`` (tensors made during the trace and reused by a
    later operation of it break the tracer), and outside inference mode (so later autograd can save them)."""
    state = torch._C._get_tracing_state()
    # Only touch the tracer state when tracing: setting it at all (even to None) is refused inside
    # compiled code (a table first needed while Dynamo traces is built then, see _bessel_table).
    if state is not None:
        torch._C._set_tracing_state(None)  # type: ignore[attr-defined]  # exists at run time, missing from torch's stubs
    try:
        with torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)  # type: ignore[attr-defined]  # (as above)


def without_jvp(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same Function without its ``jvp`` rule, for torch.compile (see `apply`)."""
    return type(function.__name__ + "WithoutJvp", (function,), {"jvp": torch.autograd.Function.jvp})


class Refuse(torch.autograd.Function):
    """The identity on ``value``, joined to ``x`` in the graph so that differentiating it in ``x`` raises.

    It marks the highest implemented derivative: ``Refuse.apply(x, f'(x), what)`` behaves as f'(x) and
    can itself be differentiated in everything ``value`` depends on, but a derivative in ``x`` (one order
    higher than implemented) raises instead of silently being zero.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, value: torch.Tensor, what: str) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.what = inputs[2]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        if ctx.needs_input_grad[0]:
            raise RuntimeError(f"derivatives of order higher than implemented for {ctx.what}")
        return None, grad, None

    @staticmethod
    def jvp(ctx: Any, x_tangent: torch.Tensor | None, value_tangent: torch.Tensor, _: Any) -> torch.Tensor:
        if x_tangent is not None:
            raise RuntimeError(f"derivatives of order higher than implemented for {ctx.what}")
        return value_tangent


RefuseWithoutJvp = without_jvp(Refuse)
