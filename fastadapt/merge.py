"""Fold adapters into the base weights and back; parameter summary."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .methods import adapter_modules, get_method, require_state


def merge(model: nn.Module, *, keep_original: bool = False) -> nn.Module:
    """Fold every adapter into its base weight — LoRA: ``W += scaling · B A``; DoRA:
    ``W ← g ⊙ (W + scaling · B A)`` — computed in fp32 and rounded once. All modules are checked
    before any is written: a NaN/Inf result raises ``FloatingPointError`` naming the module and
    leaves the model unchanged. Merging an already
    merged model is a no-op with a warning. ``keep_original=True`` keeps a copy of each unmerged
    weight so that ``unmerge`` is exact (costs the memory of the adapted weights).
    A sharded (FSDP2) model is refused with guidance; merge in one process after loading the adapter."""
    model = distributed.unwrap(model)
    state = require_state(model)
    distributed.check_not_sharded(model, "fa.merge")
    _check_mergeable(state)
    todo = [(name, m) for name, m in adapter_modules(model) if not m.merged]
    if not todo:
        warnings.warn("model is already merged; merge() did nothing", UserWarning, stacklevel=2)
        return model
    for name, module in todo:
        if not module.merge_is_finite():
            raise FloatingPointError(
                f"merging the adapter into {name!r} gives NaN/Inf weights (adapter or base weight "
                "holds non-finite values, or the sum overflows the weight dtype); nothing was merged"
            )
    for _, module in tqdm(todo, desc="merge", unit="module", disable=None, leave=False):
        module.merge(keep_original=keep_original, check=False)  # checked above, all modules first
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take the adapters back out of the base weights. Exact after ``merge(keep_original=True)``;
    otherwise computed in fp32 (LoRA: ``W - scaling · B A``, within one rounding of the weight dtype;
    DoRA: ``W / g - scaling · B A`` with the merge's norms, within about two)."""
    model = distributed.unwrap(model)
    state = require_state(model)
    distributed.check_not_sharded(model, "fa.unmerge")
    _check_mergeable(state)
    merged = [m for _, m in adapter_modules(model) if m.merged]
    if not merged:
        raise RuntimeError("model is not merged: call fa.merge(model) before fa.unmerge(model)")
    for module in merged:
        module.unmerge()
    return model


def is_merged(model: nn.Module) -> bool:
    return all(m.merged for _, m in adapter_modules(model))


def _check_mergeable(state) -> None:
    reason = get_method(state.method).merge_error
    if reason is not None:
        raise ValueError(f"cannot merge a {state.method!r} adapter: {reason}")


@dataclass
class Summary:
    """Trainable and total parameter counts, and one row per adapter module."""

    trainable: int
    total: int
    rows: list[tuple[str, str, int]]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        width = max([len("module")] + [len(r[0]) for r in self.rows])
        lines = [f"{'module':<{width}}  {'adapter':<28}  {'trainable':>12}"]
        lines += [f"{name:<{width}}  {desc:<28}  {n:>12,}" for name, desc, n in self.rows]
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> Summary:
    """Trainable/total parameters and a per-module table (``print(fa.summary(model))``)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    if getattr(model, "fastadapt_state", None) is not None:
        for name, m in adapter_modules(model):
            desc = m.describe() if hasattr(m, "describe") else f"lora r={m.r} {m.in_features}->{m.out_features}"
            rows.append((name, desc, sum(p.numel() for p in m.parameters() if p.requires_grad)))
    return Summary(trainable=trainable, total=total, rows=rows)
