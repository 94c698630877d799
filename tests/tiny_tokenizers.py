"""Tiny byte-level BPE tokenizers trained on the spot (no hub), one per pre-tokenizer family that the
GGUF writer names for llama.cpp, and tiny LLaMA-family models sized for GGUF's quantization blocks."""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib import resources

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from fastadapt.gguf_io import LLAMA3_SPLIT, QWEN2_SPLIT

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _pre_tokenizer(kind: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt-2":
        return byte_level
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@cache
def training_texts() -> tuple[str, ...]:
    """The text the tiny tokenizers learn from: 400 GSM8K train problems with their solutions."""
    data = resources.files("fastadapt.app.data") / "gsm8k.train.jsonl.gz"
    with gzip.open(data.open("rb"), "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(400), f)]
    return tuple(r.get("question", "") + "\n" + r.get("answer", "") for r in rows)


@cache
def _trained(kind: str, vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(kind)
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_texts(), trainer)
    return tok.to_str()


def tiny_tokenizer(kind: str = "gpt-2", *, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the pre-tokenizer of ``kind`` (a llama.cpp pre name: "gpt-2",
    "smollm", "llama-bpe", "qwen2"), ChatML special tokens and a chat template; eos = pad = <|im_end|>."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(kind, vocab_size)),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


GGUF_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}


def gguf_model(arch: str = "llama", *, vocab_size: int, seed: int = 0, **overrides):
    """A random tiny model whose matrices split into GGUF's 32-value blocks (hidden 64, MLP 96,
    4 heads of 16, 2 KV heads, 2 layers)."""
    torch.manual_seed(seed)
    options = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                   eos_token_id=2, tie_word_embeddings=False)
    options.update(overrides)
    model = AutoModelForCausalLM.from_config(GGUF_CONFIGS[arch](**options), dtype=torch.float32)
    with torch.no_grad():  # wider than the 0.02 init, so that quantization and layout errors show
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@cache
def _sentencepiece_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(training_texts(), trainer)
    spec = json.loads(tok.to_str())
    return spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]


def tiny_sentencepiece_tokenizer(*, vocab_size: int = 640):
    """A SentencePiece-style tokenizer as transformers builds Llama 2's and Mistral 7B's: BPE with byte
    fallback (<0x00>..<0xFF>), spaces as ▁ (Metaspace), <unk>/<s>/</s>, BOS added."""
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_vocab(vocab_size)
    return LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True)
