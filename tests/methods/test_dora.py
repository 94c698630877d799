"""What only DoRA has, on top of the LoRA-family tests (test_lora_models.py runs PEFT parity of
logits and gradients — the magnitude's included, with and without dropout — save/load both ways,
merge/unmerge and export for "dora" on every architecture): the magnitude's init, the files'
schema, strict loading, PEFT's merged weights, a zero magnitude, options and preset."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters, rel_err
from safetensors.torch import load_file, save_file
from test_lora_models import logits, peft_twin
from test_lora_models import patched as lora_family_patched
from tiny_models import ARCHS, tiny_model
from transformers import AutoModelForCausalLM

import fastadapt as fa
from fastadapt.methods import adapter_modules

peft = pytest.importorskip("peft")


def patched(arch: str, **options):
    return lora_family_patched(arch, method="dora", scale=0.1, **options)


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_patch_changes_nothing_and_the_magnitude_is_the_weight_norm(arch):
    model = tiny_model(arch)
    before = logits(model)
    fa.patch(model, "dora", r=4, targets="all-linear")
    assert torch.allclose(logits(model), before, rtol=1e-5, atol=1e-6)  # g = ‖W‖ / ‖W‖ = 1 up to rounding
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")) for n in trainable)
    for _, m in adapter_modules(model):
        torch.testing.assert_close(m.lora_magnitude_vector, m.base_weight_nk().float().norm(dim=1), rtol=1e-6, atol=0)
        assert m.lora_magnitude_vector.dtype == torch.float32
    randomize_adapters(model)
    assert rel_err(logits(model), before) > 1e-3


def test_saved_files_are_peft_schema(tmp_path):
    model = patched("gpt2", targets=["c_attn"])
    fa.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["fan_in_fan_out"] is True
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 9 and cfg["target_modules"] == ["c_attn"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    assert tensors[key].shape == (144,)
    assert tensors[key.replace("lora_magnitude_vector", "lora_A.weight")].shape == (4, 48)
    assert len(tensors) == 3 * 2  # two layers: A, B and the magnitude each


def test_loading_is_strict(tmp_path):
    path = fa.save_adapter(patched("llama", targets=["q_proj", "v_proj"]), tmp_path / "a")
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, path / "adapter_model.safetensors")
    dst = tiny_model("llama")
    with pytest.raises(KeyError, match=r"missing key.*layers.1.self_attn.v_proj.lora_magnitude_vector"):
        fa.load_adapter(dst, path)
    assert not hasattr(dst, "fastadapt_state")  # left as it was
    save_file({**tensors, key: torch.ones(23)}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"v_proj.lora_magnitude_vector' has shape \(23,\), the model expects \(24,\)"):
        fa.load_adapter(tiny_model("llama"), path)
    # a PEFT LoRA adapter (use_dora false) is LoRA: it cannot load into a DoRA-patched model
    lora_src = tiny_model("llama")
    fa.patch(lora_src, "lora", r=4, targets=["q_proj", "v_proj"])
    lora_path = fa.save_adapter(lora_src, tmp_path / "lora")
    dora_dst = patched("llama", targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"patched with 'dora'; the adapter at .* is LoRA \('lora'\)"):
        fa.load_adapter(dora_dst, lora_path)
    # use_dora true on LoRA-only tensors: loads as DoRA and misses every magnitude
    cfg = json.loads((lora_path / "adapter_config.json").read_text())
    (lora_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    weights = lora_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # as PEFT writes it: no config hash to compare with
    with pytest.raises(KeyError, match="missing key.*lora_magnitude_vector"):
        fa.load_adapter(tiny_model("llama"), lora_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_writes_the_weights_peft_merges_and_the_merged_model_exports(arch, tmp_path):
    model = patched(arch)
    expected = logits(model)
    twin = peft_twin(arch, model).merge_and_unload()
    fa.merge(model)
    for n, m in adapter_modules(model):
        torch.testing.assert_close(m.base_layer.weight, twin.get_submodule(n).weight, rtol=1e-5, atol=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(fa.export(model, tmp_path / "merged")).eval()
    assert rel_err(logits(reloaded), expected) < 1e-5


def test_unmerge_of_a_zero_magnitude_row_needs_the_original():
    model = patched("llama", targets=["q_proj"])
    name, module = next(iter(adapter_modules(model)))
    with torch.no_grad():
        module.lora_magnitude_vector[3] = 0.0
    fa.merge(model)
    merged = module.base_layer.weight.clone()
    assert (merged[3] == 0).all()
    with pytest.raises(RuntimeError, match="magnitude has zeros.*keep_original=True"):
        fa.unmerge(model)
    assert torch.equal(module.base_layer.weight, merged) and module.merged  # nothing was changed


def test_options_defaults_preset_and_summary():
    model = tiny_model("llama")
    fa.patch(model, "dora")
    cfg = model.fastadapt_state.config
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.targets, cfg.method) == (8, 16, 0.0, "auto", "dora")
    assert {n.rsplit(".", 1)[-1] for n in model.fastadapt_state.modules} == {"q_proj", "v_proj"}  # PEFT's default
    assert "dora r=8 48->48" in str(fa.summary(model))
    with pytest.warns(UserWarning, match="r=32 > min"):
        paper = fa.patch(tiny_model("llama"), "dora", preset="llm-adapters")
    pc = paper.fastadapt_state.config
    assert (pc.r, pc.alpha, pc.dropout) == (32, 64, 0.05)
    assert pc.targets == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    assert fa.methods.get_method("dora").preset("llm-adapters").learning_rate == 1e-4
    with pytest.raises(ValueError, match=r"r must be a positive int, got 0"):
        fa.patch(tiny_model("llama"), "dora", r=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fa.patch(tiny_model("llama"), "dora", dropout=1.5)
