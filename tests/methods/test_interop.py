"""Interop with PEFT beyond LoRA's fields (docs/interop.md): every other PEFT ``peft_type`` is refused
by name, fastadapt's prefix folders and PEFT's are refused both ways, a prefix never loads into a
model of another geometry, and PEFT's saved copies of base layers load only when they are the model's."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import rel_err
from peft_adapters import edit_config, peft_adapter
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
    with pytest.raises(ValueError, match="holds 'lm_head.base_layer.weight', a full copy of a base weight"):
        fa.load_adapter(other, tmp_path)
    assert not hasattr(other, "fastadapt_state")


def test_peft_save_embedding_layers_copies_load_when_equal_and_are_named_when_not(tmp_path):
    """PEFT's save_embedding_layers writes the whole input and output embeddings beside the adapter:
    equal to the model's, they are dropped; different, the error says what they are and what to do."""
    theirs = peft_adapter(tmp_path, target_modules=["q_proj"])
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    from safetensors.torch import load_file

    assert "base_model.model.model.embed_tokens.weight" in load_file(tmp_path / "adapter_model.safetensors")
    assert rel_err(logits(fa.load_adapter(tiny_model("llama"), tmp_path)), logits(theirs)) < 1e-5
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match=r"full copy of a base weight \(PEFT's save_embedding_layers.*"
                                         r"save_embedding_layers=False"):
        fa.load_adapter(other, tmp_path)
    assert not hasattr(other, "fastadapt_state")


@pytest.mark.parametrize("targets", [["c_attn"], ["c_proj", "c_fc"]])
def test_olora_on_gpt2_conv1d_from_peft_022_loads_exactly(targets, tmp_path):
    """PEFT 0.22 factorises a Conv1D weight for OLoRA in nn.Linear's layout (the QR of Wᵀ as stored)."""
    theirs = peft_adapter(tmp_path, arch="gpt2", init_lora_weights="olora", target_modules=targets)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"].startswith("0.22")
    assert rel_err(logits(fa.load_adapter(tiny_model("gpt2"), tmp_path)), logits(theirs)) < 1e-5


def _olora_stored_layout_logits(folder):
    """What PEFT 0.21 computes for a GPT-2 OLoRA adapter on square Conv1D layers: QR of the weight as
    stored, ``W - s·Q_r R_r`` (stored layout), plus the trained LoRA term, written out by hand."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(folder / "adapter_model.safetensors")
    model = tiny_model("gpt2")
    r, s = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key not in tensors:
                continue
            w = module.weight  # Conv1D: (in, out)
            q, rr = torch.linalg.qr(w.float())
            a, b = tensors[key].float(), tensors[key.replace("lora_A", "lora_B")].float()
            w.copy_(w.float() - s * q[:, :r] @ rr[:r] + s * (b @ a).t())
    return logits(model.eval())


def test_olora_on_gpt2_conv1d_follows_the_writers_peft_version(tmp_path):
    """PEFT 0.21 and earlier took the QR of a Conv1D weight as stored: an adapter whose config says so
    loads with that residual; with no peft_version (or one between the two conventions) an OLoRA
    adapter on a Conv1D layer is refused by name, while on nn.Linear layers (both conventions agree)
    it loads."""
    peft_adapter(tmp_path, arch="gpt2", init_lora_weights="olora", target_modules=["attn.c_proj"])
    edit_config(tmp_path, peft_version="0.21.0")
    got = logits(fa.load_adapter(tiny_model("gpt2"), tmp_path))
    assert rel_err(got, _olora_stored_layout_logits(tmp_path)) < 1e-5
    edit_config(tmp_path, peft_version="0.22.0")  # the other convention: not the same model
    assert rel_err(logits(fa.load_adapter(tiny_model("gpt2"), tmp_path)), got) > 1e-3
    for version in (None, "0.21.1.dev0@0123abc"):
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        config.pop("peft_version", None)
        if version is not None:
            config["peft_version"] = version
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        model = tiny_model("gpt2")
        with pytest.raises(ValueError, match=r"OLoRA adapter on 'transformer.h.0.attn.c_proj', a Conv1D layer"):
            fa.load_adapter(model, tmp_path)
        assert not hasattr(model, "fastadapt_state")
    llama = tmp_path / "llama"
    theirs = peft_adapter(llama, init_lora_weights="olora")
    edit_config(llama, peft_version=None)
    assert rel_err(logits(fa.load_adapter(tiny_model("llama"), llama)), logits(theirs)) < 1e-5
