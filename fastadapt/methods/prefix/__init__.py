"""Prefix tuning: trainable per-layer key/value prefixes (Li & Liang, 2021; LLM-Adapters' "prefix").

``fa.patch(model, "prefix", num_virtual_tokens=10, projection=False)`` gives every attention layer
``l`` ``P = num_virtual_tokens`` extra keys ``K_l`` and values ``V_l`` of shape
``(num_key_value_heads, P, head_dim)`` that every query attends to::

    attn_l(x) = softmax(q [K_l ; k(x)]ᵀ · scale + [0 ; mask]) [V_l ; v(x)]

How it plugs in (and why it survives transformers' Cache rewrites): transformers ≥ 4.51 route every
attention call of LLaMA-family models through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the attention module as first argument, AFTER the real keys went through RoPE and the KV cache.
Patching registers a wrapper implementation (``fastadapt_prefix_sdpa`` / ``fastadapt_prefix_eager``,
:mod:`.attention`) that prepends the prefix to the keys/values and ``P`` always-visible columns to
the mask, then calls the original implementation. The cache (``DynamicCache`` or any other) only ever
holds real tokens, positions are untouched, and ``generate`` needs no special input preparation —
the things that broke LLM-Adapters' (PEFT 0.3's) ``past_key_values``-based version on newer
transformers.

Parameters live in ``model.fastadapt_prefix`` (a :class:`~fastadapt.modules.prefix.PrefixEncoder`,
kept in fp32 for the optimizer; cast to the activation dtype in the forward). ``projection=True`` is
PEFT's reparameterisation: ``table = W2 · tanh(W1 · E + b1) + b2`` from an ``(P, hidden)`` embedding ``E``.

On disk (PEFT's prompt-learning layout under a type of its own): ``adapter_config.json`` with
``peft_type: "FASTADAPT_PREFIX"`` (which PEFT refuses) and the geometry (layers, kv heads, head
size, checked on load), and ``adapter_model.safetensors`` holding ``prompt_embeddings`` of shape
``(P, L·2·H_kv·D)``, per token laid out as ``(layer, key|value, kv head, head dim)``. With
``projection=True`` the projected table is saved (as PEFT does), so loading gives a projection-free
model with identical outputs. The numbers do not match a PEFT prefix model: PEFT feeds the prefix as
a cache, which shifts the real tokens' RoPE positions by ``P``; here positions stay ``0..T-1`` as in
the base model. So the formats are refused both ways: PEFT does not know ``FASTADAPT_PREFIX``, and
``fa.load_adapter`` refuses PEFT's ``PREFIX_TUNING`` folders (docs/interop.md).

Supported: models whose attention modules use transformers' attention interface and expose
``layer_idx`` (LLaMA, Mistral, Qwen2, Qwen3, Gemma, Phi-3 and most other current decoders) with
``attn_implementation`` ``"sdpa"`` or ``"eager"``; anything else is a clear error at patch time.
"""

from ..registry import Method, register_method
from . import model
from .attention import prefix_attention_forward
from .config import PRESETS, PrefixConfig
from .model import MERGE_ERROR, prefix_encoder

METHOD = Method.from_hooks(model, name="prefix", title="prefix tuning", config_class=PrefixConfig, presets=PRESETS)
register_method(METHOD)

__all__ = ["MERGE_ERROR", "METHOD", "PrefixConfig", "prefix_attention_forward", "prefix_encoder"]
