"""Frozen bases that bitsandbytes quantized: ``Linear4bit`` (NF4/FP4, with or without double
quantization, any compute dtype) and ``Linear8bitLt`` (LLM.int8()).

The adapter modules (LoRA, DoRA, series/parallel bottleneck) wrap them like any linear layer; the
frozen product is what changes:

- 4-bit: ``fa.ops.lora_linear_4bit`` on the layer's packed weight (:func:`weight_4bit`): the lean
  dequantizing matmul on the torch backend, the fused dequantizing GEMM on Triton. The values are
  bitsandbytes' (``dequantize_4bit``), formed in the layer's compute dtype as its forward does.
- 8-bit: the layer's own forward (bitsandbytes' int8 matmul), plus the rank term beside it, as PEFT
  does (``peft/tuners/lora/bnb.py``); its numerics are bitsandbytes'.

DoRA needs the row norms of the dequantized weight. They are recomputed on every forward (one
dequantization of the layer, no cache): a cached norm would have to detect every change of the
quantized storage and of A and B, and the training path may never read a cached value anyway.

Merging into quantized storage would round the adapter away (the 4-bit grid is coarser than most
updates), so it is refused here by name; :func:`dequantized_linear` gives the full-precision layer
that ``fa.merge(model, dequantize=True)`` and ``fa.export`` merge into instead.

bitsandbytes is optional (``pip install 'fastadapt[quant]'``): nothing here imports it until a
quantized layer is met, so a model without one never needs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import bottleneck_adapter, dora_norm_ref
from ..ops.lora_linear_4bit import Weight4bit, dora_frozen, frozen_4bit_linear, lora_linear_4bit, rank_term

#: bitsandbytes' class name -> what fastadapt calls that kind of frozen base
KINDS = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}
#: LLM.int8()'s dequantization: int8 codes · row scale / 127 (bitsandbytes' int8_vectorwise_dequant)
INT8_SCALE = 7.874015718698502e-3


def quantized_kind(module: nn.Module) -> str | None:
    """``"4bit"`` for a bitsandbytes ``Linear4bit`` (and its subclasses ``LinearNF4``/``LinearFP4``),
    ``"8bit"`` for ``Linear8bitLt``, else None. Decided by class, without importing bitsandbytes."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes.") and cls.__name__ in KINDS:
            return KINDS[cls.__name__]
    return None


def describe(module: nn.Module) -> str:
    """``"bitsandbytes Linear4bit (nf4, double-quantized)"`` and the like, for messages."""
    kind = quantized_kind(module)
    if kind == "4bit":
        state = _quant_state(module)
        nested = ", double-quantized" if state.nested else ""
        return f"bitsandbytes {type(module).__name__} ({state.quant_type}{nested})"
    return f"bitsandbytes {type(module).__name__} (int8)"


def _quant_state(module: nn.Module):
    """The layer's QuantState, in bitsandbytes' standard layout: a CPU inference forward on an
    AVX512-BF16 machine repacks the weight in place (``packing_format_for_cpu``); undo that first."""
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} has no quantization state: move it to a device (which "
                           "quantizes it) or load it with a BitsAndBytesConfig before patching")
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    return state


def weight_4bit(module: nn.Module) -> Weight4bit:
    """The packed weight of a ``Linear4bit`` as ``fa.ops.Weight4bit`` (views, nothing copied)."""
    state = _quant_state(module)
    if len(state.shape) != 2 or tuple(state.shape) != (module.out_features, module.in_features):
        raise ValueError(f"{type(module).__name__} was quantized from a {tuple(state.shape)} tensor; expected "
                         f"(out_features, in_features) = ({module.out_features}, {module.in_features})")
    nested = state.state2 if state.nested else None
    data = module.weight.data
    if data.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes
        data = data.view(torch.uint8)
    return Weight4bit(
        packed=data.reshape(-1),
        code=state.code.to(torch.float32),
        absmax=state.absmax.reshape(-1),
        shape=(module.out_features, module.in_features),
        blocksize=state.blocksize,
        compute_dtype=module.compute_dtype,
        nested_absmax=None if nested is None else nested.absmax.reshape(-1),
        nested_code=None if nested is None else nested.code.to(torch.float32),
        nested_offset=None if nested is None else torch.as_tensor(state.offset, dtype=torch.float32),
        nested_blocksize=256 if nested is None else nested.blocksize,
    )


def _int8_codes_and_scales(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (N, K), fp32 row scales (N,)) of a ``Linear8bitLt`` (before its first forward the
    scales sit on the weight, after it in the layer's state)."""
    weight = module.weight
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(module.state, "SCB", None)
    if weight.dtype != torch.int8 or scales is None:
        raise ValueError(f"{type(module).__name__} holds no int8 weight (has_fp16_weights=True or not yet "
                         "quantized): nothing to dequantize")
    return weight.data, scales


@torch.no_grad()
def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The frozen weight a quantized layer computes with, (out, in) in ``dtype`` (formed in fp32):
    bitsandbytes' own dequantization, bit for bit. A fresh tensor every call."""
    kind = quantized_kind(module)
    if kind == "4bit":
        return weight_4bit(module).dequantize(dtype)
    if kind == "8bit":
        codes, scales = _int8_codes_and_scales(module)
        return (codes.float() * scales.float().view(-1, 1) * INT8_SCALE).to(dtype)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")


@torch.no_grad()
def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` computing with the quantized layer's weight, in ``dtype`` (frozen)."""
    bias = module.bias
    out = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=module.weight.device,
                    dtype=dtype)
    out.weight.copy_(dequantized_weight(module, dtype))
    if bias is not None:
        out.bias.copy_(bias.to(dtype))
    out.requires_grad_(False)
    out.train(module.training)
    return out


def state_dict_extras(module: nn.Module) -> list[str]:
    """The state-dict keys (under the layer) that hold quantization state besides ``weight`` and
    ``bias``: ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ...
    for 4-bit; ``SCB``, ``weight_format`` for 8-bit."""
    return [k for k in module.state_dict() if k not in ("weight", "bias")]


def merge_refusal(name: str, module: nn.Module) -> str:
    """Why ``fa.merge`` will not fold an adapter into this quantized base, and what to do instead."""
    return (f"{name!r} has a quantized base ({describe(module)}): merging into its quantized storage would round the "
            "adapter away. Call fa.merge(model, dequantize=True) to replace the quantized bases by full-precision "
            "layers first (the merge is then exact), or fa.export(model, path, dtype=...) to write a merged "
            "full-precision checkpoint without changing the model")


# -- the frozen product of each adapter kind ------------------------------------------------------


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The quantized layer's output ``x deq(W)ᵀ + bias``. 4-bit: the lean dequantizing matmul, not
    bitsandbytes' forward, whose CPU inference path repacks the weight in place (and fails on widths
    that are not a multiple of 32); 8-bit: the layer's own forward."""
    if quantized_kind(base) == "4bit":
        return frozen_4bit_linear(x, weight_4bit(base), base.bias)
    return base(x)


class Dequantizing(nn.Module):
    """A quantized layer computed through :func:`base_forward` (for measuring a quantized model)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_forward(self.layer, x)


def frozen_product(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x deq(W)ᵀ`` without bias, in x's dtype (4-bit: the lean dequantizing matmul; 8-bit: the
    layer's own int8 matmul, its bias taken off again as PEFT's DoRA does)."""
    if quantized_kind(base) == "4bit":
        return frozen_4bit_linear(x, weight_4bit(base))
    y = base(x)
    return y if base.bias is None else y - base.bias.to(y.dtype)


def lora_forward(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                 scaling: float, dropout_p: float) -> torch.Tensor:
    """LoRA on a quantized base: ``base(x) + scaling · B A dropout(x)``."""
    if quantized_kind(base) == "4bit":
        return lora_linear_4bit(x, weight_4bit(base), lora_a, lora_b, scaling=scaling, bias=base.bias,
                                dropout_p=dropout_p)
    return base(x) + rank_term(x, lora_a, lora_b, scaling=scaling, dropout_p=dropout_p)


@torch.no_grad()
def dora_weight_norm(base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """‖deq(W)_n + scaling · B_n A‖ per output row, fp32, recomputed from the quantized storage."""
    return dora_norm_ref(dequantized_weight(base), lora_a.detach(), lora_b.detach(), scaling=scaling)


def dora_forward(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 magnitude: torch.Tensor, *, scaling: float, dropout_p: float) -> torch.Tensor:
    """DoRA on a quantized base (PEFT's formulas; the norms recomputed, see the module docstring)."""
    norm = dora_weight_norm(base, lora_a, lora_b, scaling=scaling)
    return dora_frozen(x, lambda h: frozen_product(base, h), lora_a, lora_b, magnitude, norm, scaling=scaling,
                       bias=base.bias, dropout_p=dropout_p)


def parallel_forward(base: nn.Module, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
                     **options: Any) -> torch.Tensor:
    """A parallel bottleneck adapter beside a quantized base: ``base(x) + s·up(act(down(x)))``, the
    series op with the base's output as its residual."""
    return bottleneck_adapter(x, w_down, w_up, residual=base_forward(base, x), **options)


@torch.no_grad()
def requantized_like(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new ``Linear4bit`` holding ``weight`` (out, in) quantized as ``module`` was (quant type,
    block size, double quantization, storage, compute dtype), sharing its bias: what a merge into
    4-bit storage writes. Only 4-bit bases (8-bit: an error naming it)."""
    if quantized_kind(module) != "4bit":
        raise ValueError(f"a quantized export re-quantizes 4-bit bases; this base is {describe(module)}")
    import bitsandbytes as bnb

    state = _quant_state(module)
    out = type(module)(module.in_features, module.out_features, bias=module.bias is not None,
                       compute_dtype=module.compute_dtype, compress_statistics=state.nested,
                       quant_type=state.quant_type, quant_storage=module.weight.quant_storage, device="meta")
    out.weight = bnb.nn.Params4bit(weight.to(device="cpu", dtype=state.dtype), requires_grad=False,
                                   compress_statistics=state.nested, quant_type=state.quant_type,
                                   blocksize=state.blocksize, quant_storage=module.weight.quant_storage,
                                   module=out).to(module.weight.device)
    out.bias = module.bias
    out.train(module.training)
    return out
