"""Prefix tuning in a model: the patch, and its adapter files both ways."""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

from ...architectures import ARCHITECTURES, lookup, model_type
from ...modules.prefix import PrefixEncoder
from ..state import get_state
from .attention import PREFIX_IMPL, LayerPrefix, attention_modules, register_impl
from .config import PrefixConfig

logger = logging.getLogger(__name__)

#: fastadapt's own type: PEFT refuses to load it (its PREFIX_TUNING computes something else, below).
PEFT_TYPE = "FASTADAPT_PREFIX"
#: Read too: PEFT's prefix-tuning folders (refused, naming why) and fastadapt's own before it had a
#: type of its own (recognised by their ``layout`` field).
ALSO_READS = ("PREFIX_TUNING",)
TABLE_KEY = "prompt_embeddings"
LAYOUT = "per token: (layer, key|value, kv_head, head_dim); keys/values are post-RoPE"
PEFT_PREFIX_ERROR = (
    "it is PEFT's prefix tuning (peft_type 'PREFIX_TUNING'), which feeds the prefix to the model as past "
    "keys/values: the real tokens' positions start at num_virtual_tokens and the queries' rotary phases "
    "against the prefix differ. fastadapt's prefix tuning (peft_type 'FASTADAPT_PREFIX') keeps positions "
    "0..T-1, so the same table gives other outputs and cannot be converted exactly; load it with PEFT, or "
    "train a fastadapt prefix (fa.patch(model, 'prefix'))"
)
#: Saved geometry that must match the model: config field -> the encoder attribute.
_GEOMETRY = {"num_layers": "num_layers", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim"}
MERGE_ERROR = (
    "prefix tuning adds extra attention keys and values (virtual tokens) that every query attends "
    "to; that changes the softmax over keys, which no weight delta can express. Keep the adapter "
    "(fa.save_adapter / fa.load_adapter) and serve the patched model instead"
)


_SUPPORTED = ", ".join(sorted(t for t, a in ARCHITECTURES.items() if a.no_prefix_tuning is None))


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"prefix tuning does not support this model (model_type {model_type(model)!r}): {why}. It needs "
        "attention modules that call transformers' attention interface and have a layer_idx "
        f"(model types: {_SUPPORTED}, and most current decoders)"
    )


def apply(model: nn.Module, config: PrefixConfig) -> tuple[list[str], list]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise _unsupported(model, "it has no transformers config")
    arch = lookup(model)
    if arch is not None and arch.no_prefix_tuning is not None:
        raise _unsupported(model, arch.no_prefix_tuning)
    base_impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if base_impl.startswith(PREFIX_IMPL):
        raise RuntimeError("model already carries prefix attention (config._attn_implementation is "
                           f"{base_impl!r}); call fa.unpatch(model) first")
    if base_impl not in ("sdpa", "eager"):
        raise ValueError(
            f"prefix tuning works with attn_implementation 'sdpa' or 'eager', the model uses "
            f"{base_impl!r}; load it with attn_implementation='sdpa'"
        )
    attn = attention_modules(model)
    if not attn:
        raise _unsupported(model, "no attention module with a layer_idx uses the attention interface")
    layers = sorted({m.layer_idx for _, m in attn})
    if layers != list(range(len(layers))) or len(layers) != len(attn):
        raise _unsupported(model, f"attention layer indices are not 0..L-1 once each (got {layers[:8]}...)")
    if base_impl == "eager":
        for name, m in attn:
            if getattr(sys.modules[type(m).__module__], "eager_attention_forward", None) is None:
                raise _unsupported(model, f"{name} ({type(m).__name__}) has no eager_attention_forward")
    head_dims = {int(getattr(m, "head_dim", None) or getattr(m, "head_size", None) or 0) for _, m in attn}
    n_heads = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if len(head_dims) != 1 or 0 in head_dims or not isinstance(n_kv, int):
        raise _unsupported(model, "cannot read one head_dim and num_key_value_heads from the model")
    head_dim = head_dims.pop()
    device = next(model.parameters()).device
    encoder = PrefixEncoder(
        num_virtual_tokens=config.num_virtual_tokens, num_layers=len(layers), num_kv_heads=n_kv,
        head_dim=head_dim, projection=config.projection, hidden_size=getattr(cfg, "hidden_size", None),
        encoder_hidden_size=config.encoder_hidden_size, init_std=config.init_std, device=device,
    )
    impl_name = register_impl(base_impl)
    model.add_module("fastadapt_prefix", encoder)
    for _, m in attn:
        m.__dict__["_fastadapt_prefix"] = LayerPrefix(encoder, m.layer_idx, base_impl)
    cfg._attn_implementation = impl_name
    logger.info("prefix tuning: %d virtual tokens on %d attention layers (%s)", config.num_virtual_tokens,
                len(attn), base_impl)
    return [], [_Undo(model, attn, base_impl)]


class _Undo:
    """Handle that ``fa.unpatch`` calls: restores the attention implementation, drops the prefix."""

    def __init__(self, model: nn.Module, attn: list[tuple[str, nn.Module]], base_impl: str) -> None:
        self.model, self.attn, self.base_impl = model, attn, base_impl

    def remove(self) -> None:
        self.model.config._attn_implementation = self.base_impl
        for _, m in self.attn:
            m.__dict__.pop("_fastadapt_prefix", None)
        if "fastadapt_prefix" in self.model._modules:
            del self.model._modules["fastadapt_prefix"]


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    state = get_state(model)
    if state is None or state.method != "prefix":
        raise ValueError("model is not patched with prefix tuning: call fa.patch(model, 'prefix', ...) first")
    return model.fastadapt_prefix


# -- adapter files ------------------------------------------------------------------------------


def adapter_config(model: nn.Module, config: PrefixConfig) -> dict[str, Any]:
    """PEFT's prompt-learning fields plus the layout of the saved table."""
    encoder = prefix_encoder(model)
    mcfg = model.config
    return {
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "num_layers": encoder.num_layers,
        "num_key_value_heads": encoder.num_kv_heads,
        "head_dim": encoder.head_dim,
        "num_attention_heads": getattr(mcfg, "num_attention_heads", None),
        "token_dim": getattr(mcfg, "hidden_size", None),
        "prefix_projection": config.projection,
        "encoder_hidden_size": config.encoder_hidden_size,
        "layout": LAYOUT,
    }


def saved_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The (projected) prefix table under ``prompt_embeddings``, fp32: a projection-free prefix."""
    encoder = prefix_encoder(model)
    with torch.no_grad():
        if encoder.transform is None and "fastadapt_prefix.embedding" in tensors:
            table = tensors["fastadapt_prefix.embedding"]  # already gathered from a sharded model
        else:
            table = encoder.table()
    return {TABLE_KEY: table.detach().float().cpu().contiguous()}


def read_config(config: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    if str(config.get("peft_type")).upper() != PEFT_TYPE and config.get("layout") != LAYOUT:
        raise ValueError(f"adapter at {path!r} cannot be loaded: {PEFT_PREFIX_ERROR}")
    p = config.get("num_virtual_tokens")
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"adapter config at {path!r} has no valid num_virtual_tokens (got {p!r})")
    return "prefix", {"num_virtual_tokens": p, "projection": False}


def check_loaded(model: nn.Module, config: PrefixConfig, options: dict[str, Any], saved: dict, path: str) -> None:
    """The saved geometry (layers, kv heads, head size) is the model's: a table of the same total
    width laid out for another geometry would load and compute nonsense. Sizes are checked again
    against the table itself in :func:`load_tensors`."""
    encoder = prefix_encoder(model)
    for key, attr in _GEOMETRY.items():
        if key in saved and saved[key] != getattr(encoder, attr):
            raise ValueError(
                f"adapter at {path!r} was saved for a model with {key}={saved[key]!r}; this model has "
                f"{key}={getattr(encoder, attr)!r}"
            )


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Strict: exactly ``prompt_embeddings``, of the patched encoder's shape, into a projection-free encoder."""
    unexpected = sorted(set(tensors) - {TABLE_KEY})
    if TABLE_KEY not in tensors:
        raise KeyError(f"adapter at {path!r} is missing key {TABLE_KEY!r} (has {sorted(tensors)[:5]})")
    if unexpected:
        raise KeyError(f"adapter at {path!r} has unexpected key(s) {unexpected[:5]}")
    table = tensors[TABLE_KEY]
    encoder = prefix_encoder(model)
    expected = (encoder.num_virtual_tokens, encoder.num_layers * encoder.layer_width)
    if tuple(table.shape) != expected:
        raise ValueError(
            f"adapter key {TABLE_KEY!r} has shape {tuple(table.shape)}, the model expects {expected} "
            f"(num_virtual_tokens={expected[0]}, {encoder.num_layers} layers x 2 x "
            f"{encoder.num_kv_heads} kv heads x {encoder.head_dim})"
        )
    if encoder.transform is not None:
        raise ValueError(
            "the model is patched with projection=True, but a saved prefix holds the projected table; "
            "load it into an unpatched model (or one patched with projection=False)"
        )
    with torch.no_grad():
        encoder.embedding.copy_(table)
