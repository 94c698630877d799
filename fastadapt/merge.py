"""Fold adapters into the base weights and back; parameter summary."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .methods import adapter_modules, get_method, require_state
from .methods.targets import parent_and_attr
from .modules.quantized import dequantized_linear, merge_refusal, quantized_kind


def merge(model: nn.Module, *, keep_original: bool = False, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base weight — LoRA: ``W += scaling · B A``; DoRA:
    ``W ← g ⊙ (W + scaling · B A)`` — computed in fp32 and rounded once. All modules are checked
    before any is written: a NaN/Inf result raises ``FloatingPointError`` naming the module and
    leaves the model unchanged. Merging an already
    merged model is a no-op with a warning. ``keep_original=True`` keeps a copy of each unmerged
    weight so that ``unmerge`` is exact (costs the memory of the adapted weights).
    A sharded (FSDP2) model is refused with guidance; merge in one process after loading the adapter.

    Quantized bases (bitsandbytes 4-bit or 8-bit) are refused by name: merging into their storage
    would round the adapter away. ``dequantize=True`` first replaces each adapted quantized base by a
    full-precision ``nn.Linear`` holding its dequantized weight (:func:`dequantize_bases`), then
    merges exactly as into any full-precision layer (the model grows by those layers' size)."""
    model = distributed.unwrap(model)
    state = require_state(model)
    distributed.check_not_sharded(model, "fa.merge")
    _check_mergeable(state)
    todo = [(name, m) for name, m in adapter_modules(model) if not m.merged]
    if not todo:
        warnings.warn("model is already merged; merge() did nothing", UserWarning, stacklevel=2)
        return model
    quantized = [(name, m) for name, m in todo if m.quantized is not None]
    if quantized and not dequantize:
        name, module = quantized[0]
        raise ValueError(f"fa.merge: {len(quantized)} adapted layer(s) have a quantized base, e.g. "
                         f"{merge_refusal(name, module.base_layer)}; nothing was merged")
    if quantized:
        dequantize_bases(model)
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


def dequantize_bases(model: nn.Module, dtype: torch.dtype | None = None, *, all_layers: bool = False) -> list[str]:
    """Replace the quantized base (bitsandbytes ``Linear4bit``/``Linear8bitLt``) of every adapter
    module — and with ``all_layers`` every other quantized linear too — by a frozen ``nn.Linear``
    holding its dequantized weight, in ``dtype`` (default: the dtype of the model's input
    embeddings, the dtype its activations run in). A 4-bit layer's output is unchanged up to that
    dtype's rounding of the weight (none when it is the compute dtype); an 8-bit layer's changes by
    LLM.int8()'s quantization of the activations, which the dequantized layer does not do. Returns
    the names of the modules changed."""
    model = distributed.unwrap(model)
    require_state(model)
    if dtype is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
    changed = []
    for name, module in adapter_modules(model):
        if module.quantized is not None:
            module.base_layer = dequantized_linear(module.base_layer, dtype)
            changed.append(name)
    if all_layers:
        for name, module in list(model.named_modules()):
            if quantized_kind(module) is not None:
                parent, attr = parent_and_attr(model, name)
                setattr(parent, attr, dequantized_linear(module, dtype))
                changed.append(name)
    return changed


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
