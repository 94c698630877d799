"""Interop with PEFT beyond LoRA's fields (docs/interop.md): every other PEFT ``peft_type`` is refused
by name, fastadapt's prefix folders and PEFT's are refused both ways, a prefix never loads into a
model of another geometry, and PEFT's saved copies of base layers load only when they are the model's."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err
from tiny_models import tiny_config, tiny_model, tokens
from transformers import AutoModelForCausalLM

import fastadapt as fa

peft = pytest.importorskip("peft")


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


@pytest.mark.parametrize("peft_type", [t.value for t in peft.PeftType if t.value != "LORA"])
def test_every_other_peft_type_is_refused_by_name(peft_type, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "task_type": "CAUSAL_LM"}))
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"peft_type '{peft_type}'"):
        fa.load_adapter(model, tmp_path)
    assert not hasattr(model, "fastadapt_state")


@pytest.mark.parametrize("config", [
    lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]),
    lambda: peft.AdaLoraConfig(r=2, target_modules=["q_proj"], total_step=10),
    lambda: peft.VeraConfig(r=2, target_modules=["q_proj"]),
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
], ids=["IA3", "LOHA", "ADALORA", "VERA", "PROMPT_TUNING", "PREFIX_TUNING"])
def test_peft_built_adapters_of_other_methods_are_refused(config, tmp_path):
    config = config()
    peft.get_peft_model(tiny_model("llama"), config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"peft_type '{config.peft_type.value}'"):
        fa.load_adapter(tiny_model("llama"), tmp_path)


def test_peft_prefix_is_refused_saying_why(tmp_path):
    peft.get_peft_model(tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
                        ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="PEFT's prefix tuning .* cannot be converted exactly"):
        fa.load_adapter(tiny_model("llama"), tmp_path)


def prefixed(arch="llama", config=None):
    model = AutoModelForCausalLM.from_config(config) if config is not None else tiny_model(arch)
    model.config._attn_implementation = "sdpa"
    fa.patch(model, "prefix", num_virtual_tokens=3)
    return model.eval()


def test_peft_refuses_fastadapt_prefix_and_old_fastadapt_prefix_folders_still_load(tmp_path):
    model = prefixed()
    fa.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "FASTADAPT_PREFIX"
    with pytest.raises(KeyError, match="FASTADAPT_PREFIX"):
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    # a folder an earlier fastadapt wrote (peft_type PREFIX_TUNING plus fastadapt's layout field)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "PREFIX_TUNING"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny_model("llama")
    fresh.config._attn_implementation = "sdpa"
    assert rel_err(logits(fa.load_adapter(fresh, tmp_path)), logits(model)) < 1e-6


@pytest.mark.parametrize("geometry, field", [
    ({"num_attention_heads": 8, "num_key_value_heads": 4}, "num_key_value_heads"),  # 4 x 6 wide, not 2 x 12
    ({"num_hidden_layers": 4, "num_key_value_heads": 1}, "num_layers"),  # 4 layers x 1 x 12, not 2 x 2 x 12
])
def test_prefix_is_refused_by_a_model_of_another_geometry_of_the_same_width(geometry, field, tmp_path):
    fa.save_adapter(prefixed(), tmp_path)
    config = tiny_config("llama")
    for key, value in geometry.items():
        setattr(config, key, value)
    other = AutoModelForCausalLM.from_config(config)
    other.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match=f"saved for a model with {field}="):
        fa.load_adapter(other, tmp_path)
    assert not hasattr(other, "fastadapt_state")
    patched = prefixed(config=config)  # already patched: the same check
    with pytest.raises(ValueError, match=f"saved for a model with {field}="):
        fa.load_adapter(patched, tmp_path)


def test_peft_copy_of_a_targeted_head_loads_when_it_is_the_models(tmp_path):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.eval().save_pretrained(tmp_path)  # holds lm_head.base_layer.weight too (save_embedding_layers)
    ours = fa.load_adapter(tiny_model("llama"), tmp_path)
    assert rel_err(logits(ours), logits(theirs)) < 1e-5
    other = tiny_model("llama", seed=1)  # another head: PEFT would replace it, fastadapt refuses
    with pytest.raises(ValueError, match="holds 'lm_head.base_layer.weight', a full copy of a base layer's weight"):
        fa.load_adapter(other, tmp_path)
    assert not hasattr(other, "fastadapt_state")
