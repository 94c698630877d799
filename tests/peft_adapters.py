"""PEFT-built LoRA adapters on the tiny models, for the interop tests (PEFT is a test dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import tiny_model, tokens

#: the targets of a PEFT adapter unless a test says otherwise
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def logits(model, ids=None):
    with torch.no_grad():
        return model(ids if ids is not None else tokens()).logits


def peft_model(arch: str = "llama", *, name_or_path: str | None = None, **kwargs):
    """A PEFT LoRA model on the tiny ``arch`` (r=4, alpha=8 on TARGETS unless ``kwargs`` say)."""
    import peft  # the tests that use it skip without it

    base = tiny_model(arch)
    if name_or_path is not None:
        base.name_or_path = name_or_path  # what PEFT records as base_model_name_or_path
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[arch], **kwargs}
    return peft.get_peft_model(base, peft.LoraConfig(**options))


def train_like(model, seed: int = 0):
    """Random, non-zero changes of every adapter weight (as training would make), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def peft_adapter(folder: Path, *, arch: str = "llama", seed: int = 0, json_fields: dict | None = None, **kwargs):
    """``train_like(peft_model(...))`` saved by PEFT to ``folder`` (then ``json_fields`` written into
    its adapter_config.json); returns the PEFT model."""
    model = train_like(peft_model(arch, **kwargs), seed)
    model.save_pretrained(folder)
    if json_fields:
        edit_config(folder, **json_fields)
    return model


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
