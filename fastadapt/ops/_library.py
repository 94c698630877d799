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


def with_eager_autograd(op: torch.library.CustomOpDef, *, backward: Callable, setup_context: Callable) -> Callable:
    """:func:`register_autograd` for ``op``, and a callable that runs it: in plain eager code a
    ``torch.autograd.Function`` over the op's own Python implementation, ``setup_context`` and
    ``backward`` — the same numbers and the same saved tensors without the custom-op machinery's
    per-call cost (its autograd wrapper rebuilds the schema's argument list once per argument: tens of
    µs a call on a CPU core, a few % of a CPU training step of the embedded model: bench/NOTES.md);
    without gradients the implementation itself. Compiled code, fake or meta tensors, tensor
    subclasses (DTensor), torch function or dispatch modes and functorch transforms call ``op``."""
    register_autograd(op, backward=backward, setup_context=setup_context)
    impl = op._init_fn

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    # named after the op, so that a grad_fn reads ``<op>_eagerBackward``
    Eager = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if not _plain_eager(args):
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Eager.apply(*args)
        return impl(*args)

    return call


def eager_or_registered(op: torch.library.CustomOpDef) -> Callable:
    """A callable that runs ``op`` (a backward op: no autograd of its own): its Python implementation
    in plain eager code without gradients (a backward pass, the custom-op wrapper's per-call cost
    spared), the registered op otherwise — compiled code, fakes, subclasses, modes, and a backward
    that records a graph (``create_graph=True``: the op then refuses a second backward, as it did)."""
    impl = op._init_fn

    def call(*args):
        if not torch.is_grad_enabled() and _plain_eager(args):
            return impl(*args)
        return op(*args)

    return call


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool:
    """Plain eager execution on plain tensors: nothing that needs the op's registrations to see it."""
    # is_compiling() first: dynamo folds it to True, so it never traces the calls after it (which
    # would break the graph)
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(type(a) in _PLAIN and not a.is_meta for a in args if isinstance(a, torch.Tensor))


def has_cuda_kernel(name: str) -> bool:
    """Whether the CUDA extension registered its kernel for ``fastadapt::<name>``."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), "CUDA")
    except RuntimeError:  # not declared
        return False
