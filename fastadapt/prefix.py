"""Prefix tuning: trainable per-layer key/value prefixes (Li & Liang, 2021; LLM-Adapters' "prefix").

``fa.patch(model, "prefix", num_virtual_tokens=10, projection=False)`` gives every attention layer
``l`` ``P = num_virtual_tokens`` extra keys ``K_l`` and values ``V_l`` of shape
``(num_key_value_heads, P, head_dim)`` that every query attends to::

    attn_l(x) = softmax(q [K_l ; k(x)]ᵀ · scale + [0 ; mask]) [V_l ; v(x)]

How it plugs in (and why it survives transformers' Cache rewrites): transformers ≥ 4.51 route every
attention call of LLaMA-family models through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the attention module as first argument, AFTER the real keys went through RoPE and the KV cache.
Patching registers a wrapper implementation (``fastadapt_prefix_sdpa`` / ``fastadapt_prefix_eager``)
that prepends the prefix to the keys/values and ``P`` always-visible columns to the mask, then calls
the original implementation. The cache (``DynamicCache`` or any other) only ever holds real tokens,
positions are untouched, and ``generate`` needs no special input preparation — the things that broke
LLM-Adapters' (PEFT 0.3's) ``past_key_values``-based version on newer transformers.

Parameters live in ``model.fastadapt_prefix`` (a :class:`PrefixEncoder`, kept in fp32 for the
optimizer; cast to the activation dtype in the forward). ``projection=True`` is PEFT's
reparameterisation: ``table = W2 · tanh(W1 · E + b1) + b2`` from an ``(P, hidden)`` embedding ``E``.

On disk (PEFT's prompt-learning layout): ``adapter_config.json`` with ``peft_type: "PREFIX_TUNING"``
and ``adapter_model.safetensors`` holding ``prompt_embeddings`` of shape ``(P, L·2·H_kv·D)``, per
token laid out as ``(layer, key|value, kv head, head dim)``. With ``projection=True`` the projected
table is saved (as PEFT does), so loading gives a projection-free model with identical outputs.
The numbers do not match a PEFT prefix model: PEFT feeds the prefix as a cache, which shifts the
real tokens' RoPE positions by ``P``; here positions stay ``0..T-1`` as in the base model.

Supported: models whose attention modules use transformers' attention interface and expose
``layer_idx`` (LLaMA, Mistral, Qwen2, Qwen3, Gemma, Phi-3 and most other current decoders) with
``attn_implementation`` ``"sdpa"`` or ``"eager"``; anything else is a clear error at patch time.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import read_adapter_tensors, register_loader, write_adapter_files
from .patch import Method, get_state, make_config, patch, register_method, unpatch

logger = logging.getLogger(__name__)

PEFT_TYPE = "PREFIX_TUNING"
TABLE_KEY = "prompt_embeddings"
_PREFIX_IMPL = "fastadapt_prefix_"
MERGE_ERROR = (
    "prefix tuning adds extra attention keys and values (virtual tokens) that every query attends "
    "to; that changes the softmax over keys, which no weight delta can express. Keep the adapter "
    "(fa.save_adapter / fa.load_adapter) and serve the patched model instead"
)


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: ``num_virtual_tokens`` trainable keys/values per attention layer.

    ``projection``: PEFT's MLP reparameterisation (``encoder_hidden_size`` hidden units, default the
    model's hidden size); ``init_std``: std of the normal init of the prefix table (PEFT: 1.0)."""

    num_virtual_tokens: int = 10
    projection: bool = False
    encoder_hidden_size: int | None = None
    init_std: float = 1.0
    method: str = field(default="prefix", init=False)

    def __post_init__(self) -> None:
        p = self.num_virtual_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {p!r}")
        if not isinstance(self.projection, bool):
            raise TypeError(f"projection must be a bool, got {self.projection!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise ValueError(f"encoder_hidden_size must be a positive int or None, got {h!r}")
        s = self.init_std
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"init_std must be a positive finite number, got {s!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrefixEncoder(nn.Module):
    """The prefix table ``(P, L·2·H_kv·D)`` (fp32), directly or through PEFT's projection MLP.

    :meth:`layer_kv` returns layer ``l``'s keys and values, each ``(H_kv, P, D)``; with a projection
    only that layer's rows of the output layer are computed."""

    def __init__(
        self,
        *,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        projection: bool = False,
        hidden_size: int | None = None,
        encoder_hidden_size: int | None = None,
        init_std: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.projection = projection
        self.init_std = init_std
        width = num_layers * 2 * num_kv_heads * head_dim
        factory = {"device": device, "dtype": torch.float32}
        if projection:
            if hidden_size is None:
                raise ValueError("hidden_size is required with projection=True")
            hidden = encoder_hidden_size or hidden_size
            self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, hidden_size, **factory))
            self.transform = nn.Sequential(
                nn.Linear(hidden_size, hidden, **factory), nn.Tanh(), nn.Linear(hidden, width, **factory)
            )
        else:
            self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, width, **factory))
            self.transform = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embedding, std=self.init_std)  # PEFT: nn.Embedding's N(0, 1)
        if self.transform is not None:
            self.transform[0].reset_parameters()
            self.transform[2].reset_parameters()

    @property
    def layer_width(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def table(self) -> torch.Tensor:
        """The whole prefix table ``(P, L·2·H_kv·D)``, fp32 (what is saved)."""
        if self.transform is None:
            return self.embedding
        return self.transform(self.embedding)

    def layer_kv(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``layer``, each ``(H_kv, P, D)`` in ``dtype``."""
        w = self.layer_width
        lo = layer * w
        if self.transform is None:
            rows = self.embedding[:, lo : lo + w]
        else:
            first, _, last = self.transform
            hidden = torch.tanh(first(self.embedding))
            rows = nn.functional.linear(hidden, last.weight[lo : lo + w], last.bias[lo : lo + w])
        kv = rows.to(dtype).view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3)  # (2, H_kv, P, D)
        return kv[0], kv[1]

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, projection={self.projection}"
        )


# -- the attention wrapper ---------------------------------------------------------------------


class _LayerPrefix:
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
    spec: _LayerPrefix | None = module.__dict__.get("_fastadapt_prefix")
    if spec is None:  # an unpatched module sharing a patched config: run the base implementation
        name = getattr(getattr(module, "config", None), "_attn_implementation", "") or ""
        return _base_attention(module, name.removeprefix(_PREFIX_IMPL))(
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


def _register_impl(base_impl: str) -> str:
    name = _PREFIX_IMPL + base_impl
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, prefix_attention_forward)
    try:  # transformers >= 4.53 builds masks through an interface keyed by the same name
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older versions build a float 4-D mask for unknown names: handled above
        return name
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_impl])
    return name


# -- patching ----------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, m in model.named_modules():
        if not type(m).__name__.endswith("Attention") or not isinstance(getattr(m, "layer_idx", None), int):
            continue
        mod = sys.modules.get(type(m).__module__)
        if mod is None or not hasattr(mod, "ALL_ATTENTION_FUNCTIONS"):
            continue
        found.append((name, m))
    return found


def _unsupported(model: nn.Module, why: str) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ValueError(
        f"prefix tuning does not support this model (model_type {model_type!r}): {why}. It needs "
        "attention modules that call transformers' attention interface and have a layer_idx "
        "(LLaMA, Mistral, Qwen2, Gemma, Phi-3 and most current decoders)"
    )


def _apply_prefix(model: nn.Module, config: PrefixConfig):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise _unsupported(model, "it has no transformers config")
    base_impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if base_impl.startswith(_PREFIX_IMPL):
        raise RuntimeError("model already carries prefix attention (config._attn_implementation is "
                           f"{base_impl!r}); call fa.unpatch(model) first")
    if base_impl not in ("sdpa", "eager"):
        raise ValueError(
            f"prefix tuning works with attn_implementation 'sdpa' or 'eager', the model uses "
            f"{base_impl!r}; load it with attn_implementation='sdpa'"
        )
    attn = _attention_modules(model)
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
    impl_name = _register_impl(base_impl)
    model.add_module("fastadapt_prefix", encoder)
    for _, m in attn:
        m.__dict__["_fastadapt_prefix"] = _LayerPrefix(encoder, m.layer_idx, base_impl)
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


# -- saving and loading --------------------------------------------------------------------------


def _save_prefix(model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
    encoder = prefix_encoder(model)
    cfg = get_state(model).config
    with torch.no_grad():
        if state_dict is not None and "fastadapt_prefix.embedding" in state_dict and encoder.transform is None:
            table = state_dict["fastadapt_prefix.embedding"]
        else:
            table = encoder.table()
    tensors = {TABLE_KEY: table.detach().float().cpu().contiguous()}
    mcfg = model.config
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(mcfg, "_name_or_path", None),
        "num_virtual_tokens": encoder.num_virtual_tokens,
        "num_layers": encoder.num_layers,
        "num_key_value_heads": encoder.num_kv_heads,
        "head_dim": encoder.head_dim,
        "num_attention_heads": getattr(mcfg, "num_attention_heads", None),
        "token_dim": getattr(mcfg, "hidden_size", None),
        "prefix_projection": cfg.projection,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "inference_mode": True,
        "layout": "per token: (layer, key|value, kv_head, head_dim); keys/values are post-RoPE",
    }
    write_adapter_files(path, tensors, config)


def _load_prefix(model: nn.Module, path: Path, config: dict[str, Any]) -> nn.Module:
    """Loader for ``peft_type: "PREFIX_TUNING"``: patches an unpatched model (projection-free), or
    loads into a model already patched with prefix tuning of the same size. Strict about keys and shapes."""
    p = config.get("num_virtual_tokens")
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
        raise ValueError(f"adapter config at {str(path)!r} has no valid num_virtual_tokens (got {p!r})")
    tensors = read_adapter_tensors(path)
    unexpected = sorted(set(tensors) - {TABLE_KEY})
    if TABLE_KEY not in tensors:
        raise KeyError(f"adapter at {str(path)!r} is missing key {TABLE_KEY!r} (has {sorted(tensors)[:5]})")
    if unexpected:
        raise KeyError(f"adapter at {str(path)!r} has unexpected key(s) {unexpected[:5]}")
    table = tensors[TABLE_KEY]
    state = get_state(model)
    patched_here = state is None
    if patched_here:
        patch(model, "prefix", num_virtual_tokens=p, projection=False)
    elif state.method != "prefix":
        raise ValueError(f"model is patched with {state.method!r}; the adapter at {str(path)!r} is prefix tuning")
    try:
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
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


register_method(
    "prefix",
    Method(
        make_config=lambda m, o: make_config(PrefixConfig, m, o),
        apply=_apply_prefix,
        save=_save_prefix,
        merge_error=MERGE_ERROR,
    ),
)
register_loader(PEFT_TYPE, _load_prefix)

__all__ = ["MERGE_ERROR", "PrefixConfig", "PrefixEncoder", "prefix_attention_forward", "prefix_encoder"]
