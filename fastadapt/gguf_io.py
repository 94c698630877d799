"""GGUF, llama.cpp's file format: a model, or a LoRA adapter for llama.cpp's ``--lora``, as one file
that llama.cpp (and Ollama, LM Studio, transformers' GGUF loader) reads with no other file. Written
with the ``gguf`` package, llama.cpp's own Python library: its writer, its tensor-name maps and its
numpy quantizers — no llama.cpp build.

What goes into a model file, and why each piece is what it is:

- tensor names from ``gguf``'s name maps (``gguf.get_tensor_name_map``), so every name is the one
  llama.cpp's converter writes; a tensor that llama.cpp's graph for the architecture does not load
  is refused by name (llama.cpp would refuse the whole file);
- LLaMA's q/k rows permuted (:func:`rope_permute`, also on ``lora_b`` of q/k in an adapter): Hugging
  Face's RoPE rotates the two halves of each head, llama.cpp's "llama" graph rotates adjacent pairs.
  Qwen2's graph rotates halves (llama.cpp's NEOX RoPE), so its rows stay as they are;
- the hyper-parameters llama.cpp reads (context length, RoPE base and scaling, RMS-norm epsilon,
  head counts and sizes) under the architecture's keys; what llama.cpp's graph cannot compute is
  refused naming the config field (:func:`hparams`);
- the tokenizer (:func:`tokenizer_facts`): vocabulary, token types, merges, special tokens, whether
  BOS/EOS are added, the chat template; for byte-level BPE ``tokenizer.ggml.pre``, the llama.cpp
  pre-tokenizer that splits text exactly as this tokenizer's does (:func:`pre_tokenizer_name`); for
  SentencePiece-style BPE the scores that make llama.cpp merge in the tokenizer's order;
- weights in the chosen :data:`QUANTS` type, by ``gguf.quants`` (bit-exact with ggml's reference
  quantizers): 1-D tensors (norms, biases) stay F32, as llama.cpp's converter keeps them; a matrix
  whose rows do not split into whole blocks of the type is written F16 (the converter's fallback);
  with a 4- or 5-bit type the output projection (the embedding, when it is tied) is Q8_0, because
  llama.cpp's own quantizer keeps that tensor at higher precision (Q6_K, which gguf's numpy
  quantizers cannot write); in a quantized file, a matrix whose values a block type no larger than
  its own holds exactly keeps that type, losslessly (weights that came from a quantized GGUF file,
  like the embedded model's, and that the adapter did not change: :func:`exact_type`).

Every file is written to a temporary name beside the target and renamed (:mod:`._files`): a killed
write never leaves a half-written ``.gguf`` under the final name.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import _files
from .architectures import ARCHITECTURES, lookup, model_type
from .methods import adapter_modules, get_method, get_state
from .modules import LoraLinear

logger = logging.getLogger(__name__)

#: ``quant=`` -> (ggml tensor type of the matrices, llama.cpp file type); best first
QUANTS: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
#: the types whose output projection is written Q8_0 (see the module docstring)
LOW_BIT_QUANTS = ("q5_1", "q5_0", "q4_1", "q4_0")
#: llama.cpp architectures whose RoPE rotates adjacent pairs of a head (LLAMA_ROPE_TYPE_NORM in
#: llama.cpp's llama_model_rope_type): Hugging Face's q/k rows are permuted for them
INTERLEAVED_ROPE_ARCHS = ("llama",)
#: the oldest ``gguf`` release tested (its writer, name maps, quantizers and adapter keys)
GGUF_REQUIREMENT = "gguf>=0.19"
#: metadata keys fastadapt adds (llama.cpp ignores keys it does not know)
KEY_PREFIX = "fastadapt."


def import_gguf() -> Any:
    """The ``gguf`` package, or an ImportError that says how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"writing GGUF files needs the `gguf` package (llama.cpp's Python library): "
                          f"pip install '{GGUF_REQUIREMENT}'") from e
    return gguf


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {list(QUANTS)}, got {quant!r}")
    return quant


def supported_model_types() -> list[str]:
    return sorted(t for t, arch in ARCHITECTURES.items() if arch.gguf_arch is not None)


# -- names and layouts ---------------------------------------------------------------------------


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (or biases, or a LoRA ``lora_b``) from Hugging Face's RoPE layout (each head's first
    half, then its second half) to llama.cpp's (the halves interleaved in pairs); llama.cpp's
    converter does the same (``LlamaModel.permute``)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`rope_permute`."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@dataclass(frozen=True)
class Layout:
    """Where a Hugging Face model's tensors go in a GGUF file of llama.cpp architecture ``arch``."""

    arch: str
    name_map: Any  # gguf.TensorNameMap
    loaded: frozenset  # the gguf.MODEL_TENSOR kinds llama.cpp's graph of ``arch`` loads
    permute: dict  # gguf.MODEL_TENSOR kind -> head count of the rows to permute

    def name(self, hf_name: str) -> tuple[str, Any]:
        """``(GGUF name, tensor kind)`` of a parameter: ``model.layers.3.self_attn.q_proj.weight`` ->
        ``blk.3.attn_q.weight``; a tensor llama.cpp's graph does not load is refused by name."""
        found = self.name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in self.loaded:
            raise ValueError(
                f"tensor {hf_name!r} has no place in a GGUF file of llama.cpp architecture {self.arch!r} "
                "(llama.cpp's graph for it would not load it); this model variant cannot be written as GGUF"
            )
        return found[1], found[0]

    def to_file(self, kind: Any, rows: torch.Tensor) -> torch.Tensor:
        heads = self.permute.get(kind)
        return rows if heads is None else rope_permute(rows, heads)

    def from_file(self, kind: Any, rows: torch.Tensor) -> torch.Tensor:
        heads = self.permute.get(kind)
        return rows if heads is None else rope_unpermute(rows, heads)


def layout(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model``'s architecture; other model types are refused by name."""
    row = lookup(model)
    arch = row.gguf_arch if row is not None else None
    if arch is None:
        raise ValueError(
            f"GGUF export writes model types {supported_model_types()} (SmolLM is 'llama'), got model_type "
            f"{model_type(model)!r}; export a transformers checkpoint instead (format='transformers')"
        )
    gguf = import_gguf()
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    config = model.config
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    T = gguf.MODEL_TENSOR
    permute = {T.ATTN_Q: n_head, T.ATTN_K: n_kv_head} if arch in INTERLEAVED_ROPE_ARCHS else {}
    return Layout(arch=arch, name_map=gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers),
                  loaded=frozenset(gguf.MODEL_TENSORS[arch_enum]), permute=permute)


# -- hyper-parameters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hparams:
    """What llama.cpp reads about the network (validated by :func:`hparams`)."""

    block_count: int
    context_length: int
    embedding_length: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_freq_base: float
    rope_linear_factor: float | None
    rms_norm_eps: float
    vocab_size: int


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5's ``rope_parameters``, or the older ``rope_theta`` + ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **scaling}


def hparams(model: nn.Module, arch: str) -> Hparams:
    """The network's hyper-parameters as llama.cpp's ``arch`` graph reads them; what that graph would
    compute differently is refused, naming the config field."""
    config = model.config
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.hidden_act is {act!r}; llama.cpp's {arch!r} graph computes SiLU only")
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    factor = None
    if rope_type == "linear":
        factor = float(rope["factor"])
    elif rope_type != "default":
        raise ValueError(
            f"config.rope_parameters has rope_type {rope_type!r}; the GGUF writer handles 'default' and "
            "'linear' RoPE only (llama.cpp needs other keys or tensors for it, not written yet)"
        )
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"config.partial_rotary_factor is {partial}; llama.cpp's {arch!r} graph rotates whole heads")
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    context = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < context:
        if arch != "llama":
            raise ValueError(f"config.sliding_window is {window}; llama.cpp's {arch!r} graph has no sliding window")
        # llama.cpp's "llama" graph attends to the whole context: up to the window that is exactly
        # Mistral's sliding-window attention, so the file says the model's context ends there
        logger.info("sliding window of %d tokens: the GGUF file's context length is %d, not %d",
                    window, window, context)
        context = window
    return Hparams(
        block_count=config.num_hidden_layers, context_length=context, embedding_length=config.hidden_size,
        feed_forward_length=config.intermediate_size, head_count=n_head,
        head_count_kv=getattr(config, "num_key_value_heads", None) or n_head, head_dim=head_dim,
        rope_freq_base=float(rope.get("rope_theta", 10000.0)), rope_linear_factor=factor,
        rms_norm_eps=float(config.rms_norm_eps), vocab_size=config.vocab_size,
    )


def _add_hparams(w: Any, hp: Hparams) -> None:
    gguf = import_gguf()
    w.add_block_count(hp.block_count)
    w.add_context_length(hp.context_length)
    w.add_embedding_length(hp.embedding_length)
    w.add_feed_forward_length(hp.feed_forward_length)
    w.add_head_count(hp.head_count)
    w.add_head_count_kv(hp.head_count_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_freq_base)
    if hp.rope_linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp.rope_linear_factor)
    w.add_layer_norm_rms_eps(hp.rms_norm_eps)
    w.add_vocab_size(hp.vocab_size)


# -- the tokenizer -------------------------------------------------------------------------------

#: Hugging Face pre-tokenizer regexes (``Split`` patterns of tokenizer.json) of the tokenizer
#: families llama.cpp implements, spelled as tokenizer.json spells them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: A byte-level BPE tokenizer's pre-tokenizer steps -> the ``tokenizer.ggml.pre`` whose regexes
#: (llama.cpp's llama-vocab.cpp) split text the same way. Steps: ``("ByteLevel", use_regex)`` (GPT-2's
#: regex when true), ``("Digits",)`` (each digit alone), ``("Split", regex)``.
PRE_TOKENIZERS: dict[tuple[tuple, ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits",), ("ByteLevel", True)): "smollm",  # SmolLM's; llama.cpp's starcoder/refact are the same
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Split", TEKKEN_SPLIT), ("ByteLevel", False)): "tekken",
}


def _pre_step(step: dict[str, Any]) -> tuple:
    """One pre-tokenizer step of tokenizer.json as a key of :data:`PRE_TOKENIZERS` (None: no key)."""
    kind = step.get("type")
    if kind == "ByteLevel" and not step.get("add_prefix_space", False):
        return ("ByteLevel", bool(step.get("use_regex", True)))
    if kind == "Digits" and step.get("individual_digits"):
        return ("Digits",)
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert", False):
        return ("Split", (step.get("pattern") or {}).get("Regex"))
    return (kind, json.dumps(step, sort_keys=True))


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """``tokenizer.ggml.pre`` for a byte-level BPE tokenizer's tokenizer.json (``spec``): the name of the
    llama.cpp pre-tokenizer that splits text exactly as the tokenizer's own pre-tokenizer does. A
    wrong name makes llama.cpp cut text differently than the model was trained on (different tokens,
    silently worse output), so anything not in :data:`PRE_TOKENIZERS` is refused."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    key = tuple(_pre_step(s) for s in steps)
    normalizer = spec.get("normalizer")
    # NFC: Qwen2's tokenizer.json normalizes; llama.cpp's converter writes "qwen2" for it all the same
    if normalizer not in (None, {"type": "NFC"}) or key not in PRE_TOKENIZERS:
        raise ValueError(
            "the tokenizer's pre-tokenizer is not one llama.cpp implements as fastadapt can name it "
            f"(pre_tokenizer {json.dumps(pre)[:300]}, normalizer {json.dumps(normalizer)[:100]}); known: GPT-2's "
            "byte-level regex, SmolLM's (digits split first), and the Llama 3, Qwen2 and Tekken split regexes"
        )
    return PRE_TOKENIZERS[key]


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer as GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``). ``model``:
    ``"gpt2"`` (byte-level BPE, split by the ``pre`` regexes) or ``"llama"`` (SentencePiece: merges by
    ``scores``, spaces as ▁, byte fallback; ``pre`` is None)."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: Any  # str, list of {"name", "template"}, or None


def _looks_special(token: str) -> bool:
    # Added tokens some tokenizers do not mark special although they are control tokens (llama.cpp's
    # converter, does_token_look_special): "<|im_end|>" and the like.
    return token.startswith("<|") and token.endswith("|>") or token in ("<pad>", "<mask>")


def _merge_parts(merge: Any) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else (merge[0], merge[1])


def _merge_text(merge: Any) -> str:
    """A merge as GGUF spells it: ``"a b"``; a space inside a part (tokenizers >= 0.20 allow it) as
    U+0120, like gguf's SpecialVocab."""
    if isinstance(merge, str):
        return merge
    return " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends ▁ to the text (llama.cpp's
    ``add_space_prefix``). Its spaces must become ▁, by a ``Metaspace`` pre-tokenizer that does not
    split or by ``[Prepend("▁"),] Replace(" ", "▁")`` normalizers; anything else is refused.
    (llama.cpp prepends the space after every special token too, as ``prepend_scheme="always"`` and the
    Prepend normalizer do; with ``"first"`` a special token in the middle of a text is followed by
    different tokens.)"""
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if norm is None and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" \
            and not pre.get("split", True) and pre.get("prepend_scheme") in ("first", "always", "never"):
        return pre["prepend_scheme"] != "never"
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    if pre is None and steps == [spaces]:
        return False
    if pre is None and steps == [{"type": "Prepend", "prepend": "▁"}, spaces]:
        return True
    raise ValueError(
        "the SentencePiece-style tokenizer's normalizer/pre-tokenizer is not one llama.cpp reproduces "
        f"(normalizer {json.dumps(norm)[:200]}, pre_tokenizer {json.dumps(pre)[:200]}); known: spaces as ▁ by a "
        "Metaspace pre-tokenizer that does not split, or by Prepend + Replace normalizers"
    )


def _spm_scores(vocab: dict[str, int], merges: list[Any], n_vocab: int) -> list[float]:
    """SentencePiece scores that make llama.cpp's tokenizer (merge the adjacent pair whose merged
    piece scores highest) merge in the tokenizer's BPE merge order: a piece made by merge number i
    scores -i; other pieces (characters, bytes, special tokens) never win a merge."""
    scores = [-1e9] * n_vocab
    for rank, merge in enumerate(merges):
        piece = "".join(_merge_parts(merge))
        if piece in vocab and scores[vocab[piece]] == -1e9:
            scores[vocab[piece]] = -float(rank)
    return scores


def tokenizer_facts(tokenizer: Any, n_vocab: int) -> TokenizerFacts:
    """``tokenizer`` as GGUF metadata for a model with ``n_vocab`` embedding rows: a fast tokenizer that
    is byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2, Tekken: ``tokenizer.ggml.model = gpt2``) or
    SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B: ``llama``). Token ids the
    tokenizer does not use are written as unused ``[PAD<id>]`` tokens, as llama.cpp's converter does."""
    gguf = import_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer must be a fast tokenizer (🤗 tokenizers), got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    sentencepiece = bpe.get("type") == "BPE" and bool(bpe.get("byte_fallback"))
    if not sentencepiece and (bpe.get("type") != "BPE" or decoder != "ByteLevel"):
        raise ValueError(
            "the GGUF writer handles byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2, Tekken) and "
            f"SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B); this one has model "
            f"{bpe.get('type')!r} and decoder {decoder!r}"
        )
    pre = None if sentencepiece else pre_tokenizer_name(spec)
    space_prefix = _space_prefix(spec) if sentencepiece else None
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"the tokenizer has token id {max(vocab.values())}, beyond the model's {n_vocab} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
    T = gguf.TokenType
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(token)
        if sentencepiece and i == unk:
            types.append(T.UNKNOWN)
        elif i in added and (added[i].special or _looks_special(token)):
            types.append(T.CONTROL)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(T.BYTE)  # byte fallback pieces: <0x00> ... <0xFF>
        elif i in added:
            types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    merges = bpe.get("merges", [])
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if isinstance(v, int)}
    # Whether encoding adds BOS/EOS, from what the tokenizer does (its config flags vary by version).
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    extra = len(full) - len(plain)
    add_bos = extra > 0 and "bos" in special and full[0] == special["bos"]
    add_eos = extra > 0 and "eos" in special and full[-1] == special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    return TokenizerFacts(
        model="llama" if sentencepiece else "gpt2", pre=pre, tokens=tokens, token_types=[int(t) for t in types],
        scores=_spm_scores(vocab, merges, n_vocab) if sentencepiece else None,
        merges=[_merge_text(m) for m in merges], special_ids=special, add_bos=bool(add_bos),
        add_eos=bool(add_eos), add_space_prefix=space_prefix, chat_template=template or None,
    )


def _add_tokenizer(w: Any, tok: TokenizerFacts) -> None:
    w.add_tokenizer_model(tok.model)
    if tok.pre is not None:
        w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    if tok.scores is not None:
        w.add_token_scores(tok.scores)
    w.add_token_merges(tok.merges)
    for name, token_id in tok.special_ids.items():
        getattr(w, f"add_{name}_token_id")(token_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.add_space_prefix is not None:
        w.add_add_space_prefix(tok.add_space_prefix)
    if tok.chat_template is not None:
        w.add_chat_template(tok.chat_template)


# -- tensors and quantization ----------------------------------------------------------------------


@dataclass
class FileTensor:
    """One tensor as the file holds it: ``data`` in ``qtype`` (raw blocks for quantized types), rows
    in llama.cpp's layout; ``hf_name`` and ``kind`` say where it came from."""

    hf_name: str
    name: str
    kind: Any
    data: np.ndarray
    qtype: Any  # gguf.GGMLQuantizationType

    def values(self, layout: Layout) -> torch.Tensor:
        """The values a reader gets back (dequantized, fp32), in Hugging Face's layout."""
        gguf = import_gguf()
        values = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(self.data, self.qtype)))
        return layout.from_file(self.kind, values)


def tensor_type(quant: str, kind: Any, shape: tuple[int, ...], output_kind: Any) -> Any:
    """The ggml type of one tensor in a ``quant`` file (the rules of the module docstring)."""
    gguf = import_gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return Q.F32
    if quant in LOW_BIT_QUANTS and kind == output_kind:
        name = "q8_0"
    else:
        name = quant
    qtype = Q[QUANTS[name][0]]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        logger.warning("rows of %d values do not split into %s blocks of %d: writing that tensor F16 "
                       "(as llama.cpp's converter does)", shape[-1], qtype.name, block)
        return Q.F16
    return qtype


#: Block types by size, smallest first (what :func:`exact_type` tries)
_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
#: rows tried before a whole tensor is: a tensor not on a type's grid fails on its first rows
_SAMPLE_ROWS = 4


def exact_type(rows: np.ndarray, qtype: Any) -> tuple[Any, np.ndarray] | None:
    """The smallest block type no larger than ``qtype`` that holds ``rows`` exactly, with the rows in
    it; None when there is none. A model loaded from a quantized GGUF file (the embedded model is a
    Q4_1 one) has weights on that type's grid: the tensors the adapter did not change then go back
    into the file bit for bit instead of picking up a second rounding."""
    gguf = import_gguf()
    Q = gguf.GGMLQuantizationType
    if qtype.name not in _BLOCK_TYPES:
        return None
    for name in _BLOCK_TYPES[:_BLOCK_TYPES.index(qtype.name) + 1]:
        candidate = Q[name]
        if rows.shape[-1] % gguf.GGML_QUANT_SIZES[candidate][0]:
            continue
        sample = rows[:_SAMPLE_ROWS]
        if not np.array_equal(gguf.quants.dequantize(gguf.quants.quantize(sample, candidate), candidate), sample):
            continue
        data = gguf.quants.quantize(rows, candidate)
        if np.array_equal(gguf.quants.dequantize(data, candidate), rows):
            return candidate, data
    return None


def file_tensors(state_dict: dict[str, torch.Tensor], lay: Layout, quant: str) -> list[FileTensor]:
    """Every tensor of ``state_dict`` (Hugging Face names; no tied ``lm_head.weight``) under its GGUF
    name, laid out for llama.cpp and quantized to ``quant``'s types; in a quantized file, a tensor that
    a block type no larger than its own holds exactly is written in that type (:func:`exact_type`)."""
    gguf = import_gguf()
    T = gguf.MODEL_TENSOR
    named = [(k, *lay.name(k)) for k in state_dict]
    kinds = {kind for _, _, kind in named}
    output_kind = T.OUTPUT if T.OUTPUT in kinds else T.TOKEN_EMBD  # tied: the embedding is the output
    out = []
    for hf_name, name, kind in tqdm(named, desc=f"quantize ({quant})", unit="tensor", disable=None, leave=False):
        tensor = state_dict[hf_name].detach()
        if not tensor.is_floating_point():
            raise TypeError(f"tensor {hf_name!r} has dtype {tensor.dtype}; expected a float tensor")
        rows = lay.to_file(kind, tensor.to("cpu", torch.float32)).contiguous().numpy()
        qtype = tensor_type(quant, kind, rows.shape, output_kind)
        exact = exact_type(rows, qtype) if rows.ndim == 2 else None
        qtype, data = exact if exact is not None else (qtype, gguf.quants.quantize(rows, qtype))
        if qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
            raise FloatingPointError(f"tensor {hf_name!r} overflows float16 (|w| > 65504): write bf16 or f32")
        out.append(FileTensor(hf_name=hf_name, name=name, kind=kind, data=data, qtype=qtype))
    return out


# -- writing -----------------------------------------------------------------------------------


def _write(path: Path, arch: str, fill: Callable[[Any], None], tensors: list[tuple[str, np.ndarray, Any]]) -> None:
    """One GGUF file at ``path``, atomically: ``fill(writer)`` adds the metadata; ``tensors`` are
    ``(name, data, ggml type)``."""
    gguf = import_gguf()

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            fill(w)
            for name, data, qtype in tensors:
                w.add_tensor(name, data, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
        finally:
            w.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    _files.atomic_write(path, write)


def _add_extra(w: Any, extra: dict[str, Any]) -> None:
    """fastadapt's own keys: strings, ints, floats and bools."""
    for key, value in extra.items():
        key = KEY_PREFIX + key
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint64(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, str(value))


def write_model(path: str | os.PathLike, *, lay: Layout, hp: Hparams, tokenizer: TokenizerFacts,
                tensors: list[FileTensor], quant: str, name: str, extra: dict[str, Any] | None = None) -> Path:
    """A model file (``general.type = model``): metadata, tokenizer and ``tensors`` (:func:`file_tensors`),
    written atomically; ``extra``: more metadata under ``fastadapt.``."""
    gguf = import_gguf()

    def fill(w: Any) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        _add_hparams(w, hp)
        w.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokenizer)
        _add_extra(w, extra or {})

    path = Path(path)
    _write(path, lay.arch, fill, [(t.name, t.data, t.qtype) for t in tensors])
    return path


# -- LoRA adapters -------------------------------------------------------------------------------


def check_lora_adapter(model: nn.Module) -> None:
    """Refuse, naming the method, an adapter that llama.cpp's ``--lora`` cannot run: it adds
    ``scale · B A x`` to a weight's output and nothing else (no DoRA magnitude, no bottleneck)."""
    state = get_state(model)
    if state is None:
        raise ValueError("model has no adapter to save: call fa.patch(model, ...) first")
    method = get_method(state.method)
    if any(type(m) is not LoraLinear for _, m in adapter_modules(model)):
        if method.merge_error is None:
            hint = ("export the merged model instead: fa.export(model, 'model.gguf', format='gguf', "
                    "quant='q8_0', tokenizer=tokenizer)")
        else:
            hint = f"and it cannot be merged into the weights either ({method.merge_error})"
        raise ValueError(f"a {method.title} adapter cannot be written as a llama.cpp LoRA adapter (GGUF): "
                         f"llama.cpp's --lora adds scale·B·A only; {hint}")
    for name, module in adapter_modules(model):
        if module.fan_in_fan_out:
            raise ValueError(f"LoRA on {name!r} wraps a transposed (Conv1D) weight, which llama.cpp does not have")


def write_lora_adapter(model: nn.Module, path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """A GGUF LoRA adapter for llama.cpp's ``--lora`` (``general.type = adapter``, ``adapter.type =
    lora``, ``adapter.lora.alpha``; tensors ``blk.N.<weight>.weight.lora_a`` (r, in) and ``.lora_b``
    (out, r), F32) from the adapter tensors ``tensors`` (the model's own names, gathered).

    llama.cpp scales every pair by ``alpha / r`` with one ``alpha`` for the file and ``r`` read from the
    tensor. The file's alpha is ``scaling · r`` of the first adapted module, which keeps ``lora_b``
    as trained whenever every module has the same scaling and rank (rsLoRA's ``alpha / √r`` included:
    its file alpha is ``alpha · √r``); a module with another scaling or rank gets the difference
    folded into its ``lora_b``, so ``alpha / r · B' A`` is exactly its ``scaling · B A``."""
    check_lora_adapter(model)
    lay = layout(model)
    # with named adapters, a module the active adapter does not target holds zeros: not written
    modules = [(name, m) for name, m in adapter_modules(model) if getattr(m, "active", True)]
    if not modules:
        raise ValueError("model: no LoRA module holds an active adapter, so there is nothing to write as a "
                         "llama.cpp adapter; activate one (fa.set_adapter) or patch the model first")
    first_name, first = modules[0]
    first_r = tensors[f"{first_name}.lora_A.weight"].shape[0]
    # the file holds alpha as float32: fold against that value; a zero alpha means "no scaling" to llama.cpp
    alpha = float(np.float32(first.scaling * first_r or first_r))
    out: list[tuple[str, np.ndarray, Any]] = []
    folded = []
    gguf = import_gguf()
    for name, module in modules:
        a = tensors[f"{name}.lora_A.weight"].to("cpu", torch.float32)
        b = tensors[f"{name}.lora_B.weight"].to("cpu", torch.float32)
        factor = module.scaling * a.shape[0] / alpha
        if not math.isclose(factor, 1.0, rel_tol=1e-12):
            b = b * factor
            folded.append(name)
        gguf_name, kind = lay.name(f"{name}.weight")
        b = lay.to_file(kind, b)
        out.append((f"{gguf_name}.lora_a", a.contiguous().numpy(), gguf.GGMLQuantizationType.F32))
        out.append((f"{gguf_name}.lora_b", b.contiguous().numpy(), gguf.GGMLQuantizationType.F32))
    if folded:
        logger.info("GGUF adapter alpha %g; scaling folded into lora_b of %d modules with another scaling or rank "
                    "(first: %s)", alpha, len(folded), folded[0])

    def fill(w: Any) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(str(getattr(model.config, "_name_or_path", "") or "adapter"))
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        _add_extra(w, {"method": get_state(model).method, "folded_modules": len(folded)})

    path = Path(path)
    _write(path, lay.arch, fill, out)
    logger.info("saved a GGUF LoRA adapter (%d tensor pairs, alpha %g) to %s", len(modules), alpha, path)
    return path
