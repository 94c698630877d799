"""Everything fastadapt knows about each Hugging Face ``model_type``, in one table.

Module names are suffixes of full module names (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``).
Adding an architecture is adding one row to :data:`ARCHITECTURES` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Per-``model_type`` facts.

    ``lora_targets``: LoRA's ``targets="auto"`` — PEFT's default, so PEFT users get no surprise.
    ``paper_lora_targets``: the LLM-Adapters preset (``preset="llm-adapters"``): the paper's
    q, k, v, up and down projections, or this architecture's equivalents.
    ``mlp_input`` / ``mlp_output``: the MLP's input projection(s) and its output projection; a
    series adapter goes before the first (``y = W(x + s·A(x)) + c``) and after the second
    (``y = h + s·A(h)``), as in LLM-Adapters' table.
    ``shared_input``: sibling linears that the decoder feeds the same tensor (q/k/v, gate/up): their
    LoRA rank projections come from one pass over it.
    ``fused``: single linears that compute several projections (qkv_proj, gate_up_proj, ...).
    ``no_prefix_tuning``: why prefix tuning cannot hook this architecture's attention (it needs
    transformers' attention interface and a ``layer_idx``), or None.
    ``gguf_arch``: the llama.cpp architecture (``general.architecture`` of a GGUF file) whose graph
    computes this model exactly, or None when fastadapt does not write this model type as GGUF.
    """

    lora_targets: tuple[str, ...]
    paper_lora_targets: tuple[str, ...]
    mlp_input: tuple[str, ...] = ()
    mlp_output: tuple[str, ...] = ()
    shared_input: tuple[tuple[str, ...], ...] = ()
    fused: tuple[str, ...] = ()
    no_prefix_tuning: str | None = None
    gguf_arch: str | None = None

    def mlp_side(self, name: str) -> str | None:
        """``"input"`` / ``"output"`` when ``name`` is one of the MLP projections, else None."""
        for side, keys in (("input", self.mlp_input), ("output", self.mlp_output)):
            if any(matches(name, key) for key in keys):
                return side
        return None


_QKV = ("q_proj", "k_proj", "v_proj")


def _separate_qkv(mlp_in: tuple[str, ...], mlp_out: str, *,
                  lora: tuple[str, ...] = ("q_proj", "v_proj")) -> Architecture:
    """q/k/v as three linears fed the same x, and an MLP (one or more input projections, one output);
    the paper's LoRA targets are q, k, v and the MLP's last input ("up") and its output projection."""
    return Architecture(
        lora_targets=lora,
        paper_lora_targets=(*_QKV, mlp_in[-1], mlp_out),
        mlp_input=mlp_in,
        mlp_output=(mlp_out,),
        shared_input=(_QKV, mlp_in) if len(mlp_in) > 1 else (_QKV,),
    )


def _fused_qkv(qkv: str, mlp_in: str, mlp_out: str, *, no_prefix_tuning: str | None = None) -> Architecture:
    """One linear computing q, k and v (PEFT's default target), and an MLP pair."""
    return Architecture(
        lora_targets=(qkv,),
        paper_lora_targets=(qkv, mlp_in, mlp_out),
        mlp_input=(mlp_in,),
        mlp_output=(mlp_out,),
        fused=(qkv,),
        no_prefix_tuning=no_prefix_tuning,
    )


_LLAMA = _separate_qkv(("gate_proj", "up_proj"), "down_proj")
_H_TO_4H = _fused_qkv("query_key_value", "dense_h_to_4h", "dense_4h_to_h")
# "mlp." so GPT-2's attn.c_proj is not taken for the MLP's.
_GPT2 = _fused_qkv("c_attn", "mlp.c_fc", "mlp.c_proj")

#: model_type -> :class:`Architecture`. "tested" in the README lists which rows the test suite covers.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": replace(_LLAMA, gguf_arch="llama"),
    # llama.cpp runs Mistral as "llama" (its converter does too); the sliding window is handled by
    # the GGUF writer (fastadapt/gguf_io.py)
    "mistral": replace(_LLAMA, gguf_arch="llama"),
    "qwen2": replace(_LLAMA, gguf_arch="qwen2"),
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "stablelm": _LLAMA,
    # Mixtral's MLP is a mixture of experts, not one linear pair: no MLP rows, attention only.
    "mixtral": Architecture(lora_targets=("q_proj", "v_proj"), paper_lora_targets=_QKV, shared_input=(_QKV,)),
    "phi3": Architecture(
        lora_targets=("qkv_proj",),
        paper_lora_targets=("qkv_proj", "gate_up_proj", "down_proj"),
        mlp_input=("gate_up_proj",),
        mlp_output=("down_proj",),
        fused=("qkv_proj", "gate_up_proj"),
    ),
    "phi": _separate_qkv(("mlp.fc1",), "mlp.fc2", lora=("q_proj", "v_proj", "fc1", "fc2")),
    "bloom": _fused_qkv("query_key_value", "dense_h_to_4h", "dense_4h_to_h",
                        no_prefix_tuning="BLOOM's ALiBi attention bypasses transformers' attention interface"),
    "gpt_neox": _H_TO_4H,
    "falcon": _H_TO_4H,
    "opt": _separate_qkv(("fc1",), "fc2"),
    "gptj": _separate_qkv(("fc_in",), "fc_out"),
    "codegen": _fused_qkv("qkv_proj", "fc_in", "fc_out"),
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "gpt_neo": _separate_qkv(("mlp.c_fc",), "mlp.c_proj"),
}

#: Sibling groups assumed for a model_type without a row: grouping only saves passes over x (a
#: member called with another tensor runs on its own), so a wrong guess costs speed, never numbers.
GENERIC_SHARED_INPUT: tuple[tuple[str, ...], ...] = (_QKV, ("gate_proj", "up_proj"), ("query", "key", "value"))


def matches(name: str, key: str) -> bool:
    """``key`` names the module ``name``: equal, or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def lookup(model: nn.Module) -> Architecture | None:
    """The row for ``model``'s ``config.model_type``, or None."""
    return ARCHITECTURES.get(model_type(model))


def shared_input_groups(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    arch = lookup(model)
    return arch.shared_input if arch is not None else GENERIC_SHARED_INPUT
