"""Tiny random configs of each supported architecture (no hub: built from config classes)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

VOCAB = 97

CONFIGS = {
    "llama": lambda: LlamaConfig(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "mistral": lambda: MistralConfig(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "qwen2": lambda: Qwen2Config(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "bloom": lambda: BloomConfig(bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=4),
    "opt": lambda: OPTConfig(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, hidden_size=48, ffn_dim=72, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=48,
    ),
    "gptj": lambda: GPTJConfig(bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "gpt2": lambda: GPT2Config(bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: GPTNeoXConfig(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    ),
    # FalconLinear: an nn.Linear subclass with its own (linear) forward
    "falcon": lambda: FalconConfig(bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, hidden_size=48,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
    ),
    # fused projections (qkv_proj, gate_up_proj)
    "phi3": lambda: Phi3Config(bos_token_id=1, eos_token_id=2, pad_token_id=0,
        vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    ),
}

ARCHS = list(CONFIGS)


def tiny_config(arch: str):
    return CONFIGS[arch]()


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tokens(batch: int = 2, seq: int = 7, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)
