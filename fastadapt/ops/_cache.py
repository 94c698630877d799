"""Values computed from tensors (low-precision copies of adapter weights, DoRA's row norms), reused
while those tensors are unchanged."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..distributed import is_initialized


def cache_trusted() -> bool:
    """Whether version counters say when a parameter changed. Not in multi-process runs: FSDP2 refills
    the gathered parameters in place without moving their version counters, so a cached value would
    go stale silently (measured: a DoRA run trained 3 % off)."""
    return not is_initialized()


class VersionedCache:
    """Values computed from tensors, valid while those tensors are unchanged: the same objects (a
    view counts as its base plus its geometry, so a Conv1D's ``weight.t()`` made afresh each call
    still hits) at the same version counters (an optimizer step, a merge or a load moves them).
    Holds weak references only; the caller skips it where version counters cannot be trusted."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[list, tuple[int, ...], torch.Tensor]] = {}

    @staticmethod
    def _ident(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        base = t._base
        if base is None:
            return t, (id(t), t.data_ptr(), t.dtype)
        return base, (id(base), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple, compute: Callable[[], torch.Tensor]):
        if len(tensors) == 1 and tensors[0]._base is None:  # the decode path, per weight per token
            t = tensors[0]
            try:
                version = t._version
            except RuntimeError:
                return compute()
            key = ((id(t), t.data_ptr(), t.dtype), extra, torch.is_inference_mode_enabled())
            entry = self._entries.get(key)
            if entry is not None and entry[1][0] == version and entry[0][0]() is t:
                return entry[2]
        try:
            versions = [t._version for t in tensors]
        except RuntimeError:  # inference tensors keep no version counter: nothing to key on
            return compute()
        idents = [self._ident(t) for t in tensors]
        key = (*[i for _, i in idents], extra, torch.is_inference_mode_enabled())
        entry = self._entries.get(key)
        if entry is not None and entry[1] == versions:
            for ref, (base, _) in zip(entry[0], idents):
                if ref() is not base:
                    break
            else:
                return entry[2]
        value = compute()
        if len(self._entries) > 4096:  # entries of freed tensors: drop them all
            self._entries = {k: e for k, e in self._entries.items() if all(r() is not None for r in e[0])}
        self._entries[key] = ([weakref.ref(b) for b, _ in idents], versions, value)
        return value
