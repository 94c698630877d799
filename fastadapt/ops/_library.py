"""How every fused op is registered with ``torch.library``: one namespace, one helper per kind.

- :func:`custom_op`: an op implemented in Python (Triton launchers), with its fake impl.
- :func:`native_op`: an op implemented in ``csrc/`` (``TORCH_LIBRARY_IMPL(fastadapt, CUDA, m)``):
  its schema and fake impl are declared here, beside the Python op that calls it, so
  ``torch.compile`` traces it whether or not the extension is built.
- :func:`register_autograd`: the backward of either kind.

Fake impls give ``torch.compile(fullgraph=True)`` shapes without running a kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "fastadapt"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


#: tags of an op that draws from torch's generator (a dropout mask, a kernel's seed): the compiler
#: then replays the generator's state when it recomputes the op (activation checkpointing under
#: ``torch.compile``) instead of drawing a fresh, different mask for the backward.
SEEDED = (torch.Tag.nondeterministic_seeded,)


def custom_op(name: str, *, fake: Callable, tags: tuple[torch.Tag, ...] = ()) -> Callable:
    """Decorator: register ``fn`` (typed, functional: no argument is mutated) as ``fastadapt::<name>``.
    ``tags``: :data:`SEEDED` for an op that draws random numbers."""

    def wrap(fn: Callable):
        op = torch.library.custom_op(qualname(name), fn, mutates_args=(), tags=tags)
        op.register_fake(fake)
        return op

    return wrap


def native_op(name: str, schema: str, *, fake: Callable):
    """Declare ``fastadapt::<name><schema>``, implemented for CUDA in ``csrc/``; returns the op."""
    _LIB.define(name + schema)
    torch.library.register_fake(qualname(name), fake, lib=_LIB)
    return getattr(torch.ops.fastadapt, name)


def register_autograd(op, *, backward: Callable, setup_context: Callable) -> None:
    """Backward of ``op`` (a :func:`custom_op` or a :func:`native_op`)."""
    if isinstance(op, torch.library.CustomOpDef):
        op.register_autograd(backward, setup_context=setup_context)
    else:
        torch.library.register_autograd(op.default, backward, setup_context=setup_context, lib=_LIB)


def has_cuda_kernel(name: str) -> bool:
    """Whether the CUDA extension registered its kernel for ``fastadapt::<name>``."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), "CUDA")
    except RuntimeError:  # not declared
        return False
