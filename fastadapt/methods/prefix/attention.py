"""The attention implementation that prepends each layer's prefix keys/values (see the package
docstring for why it hooks transformers' attention interface)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ...modules.prefix import PrefixEncoder

#: Name prefix of the registered implementations: ``fastadapt_prefix_sdpa`` / ``fastadapt_prefix_eager``.
PREFIX_IMPL = "fastadapt_prefix_"


class LayerPrefix:
    """What a patched attention module carries (a plain object, not a submodule): its layer index,
    the original attention implementation and a way to reach the shared encoder."""

    __slots__ = ("encoder", "layer", "base_impl")

    def __init__(self, encoder: PrefixEncoder, layer: int, base_impl: str) -> None:
        self.encoder = encoder
        self.layer = layer
        self.base_impl = base_impl


def _base_attention(module: nn.Module, base_impl: str):
    if base_impl == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:  # pragma: no cover - checked at patch time
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base_impl]


def _extend_mask(mask: torch.Tensor | None, *, q_len: int, kv_len: int, prefix: int,
                 causal: bool, device: torch.device) -> torch.Tensor:
    """The mask for ``[prefix ; keys]``: ``prefix`` always-visible columns before ``mask``'s.

    ``mask`` is ``None`` (causal over the keys, the query block ending at the last key), a boolean
    ``(B|1, 1|H, Q, K)`` mask (True = attend) or an additive float mask (0 = attend)."""
    if mask is None:
        if causal and q_len > 1:
            rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
            mask = torch.arange(kv_len, device=device).unsqueeze(0) <= rows
        else:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        mask = mask.view(1, 1, q_len, kv_len)
    if mask.dim() != 4:
        raise RuntimeError(
            f"prefix tuning needs a 4-D attention mask (batch, heads, queries, keys), got shape "
            f"{tuple(mask.shape)}; use attn_implementation='sdpa' or 'eager'"
        )
    if mask.shape[-1] > kv_len:  # masks sized for a static cache: the keys are its first kv_len
        mask = mask[..., :kv_len]
    shape = (*mask.shape[:-1], prefix)
    if mask.dtype == torch.bool:
        visible = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        visible = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs: Any):
    """An attention implementation for transformers' ``AttentionInterface``: prepends the module's
    prefix keys/values ``(H_kv, P, D)`` to ``key``/``value`` ``(B, H_kv, K, D)`` and ``P`` visible
    columns to the mask, then calls the original implementation (``sdpa`` or the model's eager)."""
    spec: LayerPrefix | None = module.__dict__.get("_fastadapt_prefix")
    if spec is None:  # an unpatched module sharing a patched config: run the base implementation
        name = getattr(getattr(module, "config", None), "_attn_implementation", "") or ""
        return _base_attention(module, name.removeprefix(PREFIX_IMPL))(
            module, query, key, value, attention_mask, **kwargs)
    k_p, v_p = spec.encoder.layer_kv(spec.layer, key.dtype)
    if key.dim() != 4 or k_p.shape[0] != key.shape[1] or k_p.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"prefix tuning on {type(module).__name__} (layer {spec.layer}): keys have shape "
            f"{tuple(key.shape)}, expected (batch, {k_p.shape[0]} kv heads, seq, {k_p.shape[-1]}); "
            "this architecture lays out its attention differently and is not supported"
        )
    batch, _, kv_len, _ = key.shape
    prefix = k_p.shape[1]
    k_p = k_p.to(key.device).unsqueeze(0).expand(batch, -1, -1, -1)
    v_p = v_p.to(value.device).unsqueeze(0).expand(batch, -1, -1, -1)
    key = torch.cat([k_p, key], dim=2)
    value = torch.cat([v_p, value], dim=2)
    mask = _extend_mask(attention_mask, q_len=query.shape[2], kv_len=kv_len, prefix=prefix,
                        causal=bool(getattr(module, "is_causal", True)), device=query.device)
    kwargs.pop("is_causal", None)  # the mask is explicit now
    return _base_attention(module, spec.base_impl)(module, query, key, value, mask, **kwargs)


def register_impl(base_impl: str) -> str:
    name = PREFIX_IMPL + base_impl
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, prefix_attention_forward)
    try:  # transformers >= 4.53 builds masks through an interface keyed by the same name
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older versions build a float 4-D mask for unknown names: handled above
        return name
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Attention") or not isinstance(getattr(m, "layer_idx", None), int):
            continue
        mod = sys.modules.get(type(m).__module__)
        if mod is None or not hasattr(mod, "ALL_ATTENTION_FUNCTIONS"):
            continue
        found.append((name, m))
    return found
