"""Values derived from parameters (DoRA's row norms), reused on the no-grad path only while every way
the parameters could have changed says they did not.

The rules (docs/kernels.md, "Values derived from parameters"):

1. **The training path never reads a cached value.** With grad mode on, :meth:`InferenceCache.get`
   computes afresh and stores nothing (so does ``torch.compile``, which must trace the computation,
   and a multi-process run, see below). A training forward, a gradient-checkpoint recomputation, a
   micro-batch of an accumulated step: each computes its own value.
2. **A cached value is returned only when every update path would have been seen.** Version counters
   alone are no key: ``torch.optim.AdamW(fused=True)`` (transformers.Trainer's default,
   ``adamw_torch_fused``), fused SGD/Adam and writes through ``p.data`` change a parameter without
   moving its counter. Each path and what sees it:

   ============================================  ===============================================
   update path                                   seen by
   ============================================  ===============================================
   any ``torch.optim`` step: fused, foreach or   the optimizer-step hook: every step of every
   for-loop AdamW, SGD, Adam, ... (Trainer's     torch optimizer moves :func:`generation`
   default ``adamw_torch_fused`` included)       (``register_optimizer_step_post_hook``); and the
                                                 snapshot compare below
   ``p.data.copy_``, ``p.data[...] = ...``, a    the snapshot compare: the small adapter tensors
   non-torch optimizer, anything that writes     (``watched``: LoRA's A and B) are compared with
   values without moving the counter             ``torch.equal`` to exact copies taken when the
                                                 value was computed (r × in + out × r elements,
                                                 never the frozen weight)
   ``with torch.no_grad(): p.copy_(...)``,       the version counters of every source tensor
   ``p.mul_``, ``load_state_dict`` (it copies
   under no_grad)
   ``p.data = t``, ``.to()``, ``.half()``,       the identity of every source: the object (weakly
   ``load_state_dict(assign=True)``, a module    referenced), its storage address, shape, strides,
   swapped in                                    dtype and device
   ``fa.load_adapter`` into a patched model,     :func:`invalidate` (called by ``fa.load_adapter``
   ``fa.merge`` / ``fa.unmerge``, a module's     and the modules' merge/unmerge), besides the
   own merge/unmerge                             counters they move
   FSDP2's resharding and refills, DDP's         no cache at all in a multi-process run: FSDP2
   broadcast                                     refills gathered parameters in place without a
                                                 version bump (measured: a DoRA run trained 3 %
                                                 off); every forward recomputes
   gradient-checkpoint recomputation             rule 1 (grad mode is on while it recomputes)
   ============================================  ===============================================

   Not seen: a write into a *frozen* source (``frozen``: the base weight) through ``p.data`` or any
   other path that moves neither its version counter nor its identity. Comparing the base weight
   would cost a pass over it — what recomputing costs — so it is never compared; after such a write
   call :func:`invalidate` (``fastadapt.ops.invalidate_caches``). Our own paths that change a base
   weight (merge, unmerge, load) invalidate explicitly.

Casts of A and B to the activation dtype are *not* cached: comparing A and B costs what casting them
costs (both read r × (in + out) elements; bench/NOTES.md, "Caches"), so there is nothing to save.

Not values derived from parameters, so not kept here: ``lora_linear``'s memo of validated arguments
(keyed on every property it checks — types, shapes, dtypes, devices, scaling, dropout, autocast,
switches — all re-read on every call, never a value), ``modules.base``'s verdict on whether a
Linear subclass's forward is the linear map (a property of its code), and the shared-input group's
hand-over of sibling outputs within one forward (keyed on the input object, the adapters' version
counters and :func:`generation`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..distributed import is_initialized

_generation = 0


def generation() -> int:
    """A counter that moves on every ``torch.optim`` step and every :func:`invalidate`: a value
    computed at another generation is recomputed."""
    return _generation


def invalidate() -> None:
    """Forget every cached value (they are recomputed on next use). Called by fastadapt's merge,
    unmerge and adapter loading; call it after writing a frozen base weight through ``p.data``."""
    global _generation
    _generation += 1


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    invalidate()


# Every torch optimizer (a subclass's step too) runs the global post hooks after its step.
register_optimizer_step_post_hook(_after_optimizer_step)


def usable() -> bool:
    """Whether a cached value may be read here: not on the training path (grad mode on), not while
    ``torch.compile`` traces, not in a multi-process run (FSDP2 refills parameters in place without
    moving their version counters)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or is_initialized())


def _source(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor that owns ``t``'s version counter (a view's base: a Conv1D's ``weight.t()`` is made
    afresh on every call) and ``t``'s layout."""
    base = t._base if t._base is not None else t
    return base, (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


@dataclass
class _Entry:
    refs: tuple[weakref.ref, ...]
    layouts: tuple[tuple, ...]
    versions: tuple[int, ...]
    generation: int
    snapshots: tuple[torch.Tensor, ...]
    value: torch.Tensor


class InferenceCache:
    """Values computed from tensors, returned on the no-grad path while provably unchanged (see the
    module docstring). One entry per set of source objects and ``extra``: a changed value replaces
    its entry. Holds the sources weakly; the snapshots of ``watched`` tensors are exact copies."""

    #: more entries than this: the ones whose sources were freed are dropped (normally a source's
    #: weakref callback drops its entries when it is freed)
    PRUNE_AT = 1024

    def __init__(self) -> None:
        self._entries: dict[tuple, _Entry] = {}

    def get(self, compute: Callable[[], torch.Tensor], *, frozen: tuple[torch.Tensor, ...] = (),
            watched: tuple[torch.Tensor, ...] = (), extra: tuple = ()) -> torch.Tensor:
        """``compute()``, or the value it gave for the same ``frozen`` and ``watched`` tensors and
        ``extra`` when none of them can have changed since. ``frozen``: tensors keyed by identity,
        version and :func:`generation` only (the base weight: never compared); ``watched``: small
        tensors also compared with exact copies (the adapter weights)."""
        if not usable():
            return compute()
        tensors = (*frozen, *watched)
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter: nothing to key on
            return compute()
        bases, layouts = zip(*(_source(t) for t in tensors)) if tensors else ((), ())
        key = (tuple(id(b) for b in bases), extra, torch.is_inference_mode_enabled())
        entry = self._entries.get(key)
        if (entry is not None and entry.generation == _generation and entry.versions == versions
                and entry.layouts == layouts and all(r() is b for r, b in zip(entry.refs, bases))
                and all(torch.equal(t, s) for t, s in zip(watched, entry.snapshots))):
            return entry.value
        value = compute()
        if len(self._entries) >= self.PRUNE_AT:
            for dead in [k for k, e in self._entries.items() if any(r() is None for r in e.refs)]:
                del self._entries[dead]

        def forget(_ref, entries=self._entries, key=key) -> None:  # a source was freed: so are its copies
            entries.pop(key, None)

        self._entries[key] = _Entry(
            refs=tuple(weakref.ref(b, forget) for b in bases), layouts=layouts, versions=versions,
            generation=_generation, snapshots=tuple(t.detach().clone() for t in watched), value=value)
        return value
