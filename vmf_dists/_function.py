"""`apply`: `torch.autograd.Function.apply` without its per-call overhead where that is safe.

``Function.apply`` binds its arguments to the signature of ``forward`` with ``inspect`` on every call
(for ``setup_context``-style Functions, which ``torch.func`` needs): about 20 µs, as much as ten small
tensor operations, and our Functions run on tensors of a few elements in VAEs and Pyro models. With all
arguments passed positionally that binding does nothing, so outside ``torch.func`` transforms and
``torch.compile`` (which both need the Python path) we call the C++ entry point directly.
"""

from __future__ import annotations

import torch

__all__ = ["apply"]

_C_APPLY = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")


def apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` (all arguments positional), skipping the Python wrapper when it is not needed."""
    if _C_APPLY is None or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return function.apply(*args)
    return _C_APPLY.__get__(None, function)(*args)
