"""The method registry: one entry per name, hooks driven generically, presets."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_models import tiny_model

import fastadapt as fa
from fastadapt.methods import get_method, method_for_peft_type, method_names, register_method


def test_builtin_methods_in_order():
    assert method_names() == ("lora", "dora", "series", "parallel", "prefix")
    assert method_for_peft_type("lora").name == "lora"  # peft_type matches case-insensitively (DoRA: use_dora)
    assert method_for_peft_type("BOTTLENECK").name == "series"
    assert method_for_peft_type("IA3") is None


def test_registering_a_name_twice_is_an_error():
    lora = get_method("lora")
    with pytest.raises(ValueError, match="a method named 'lora' is already registered"):
        register_method(dataclasses.replace(lora, title="another LoRA"))
    assert get_method("lora") is lora  # the first registration stands


def test_unknown_method_and_options_are_named():
    with pytest.raises(ValueError, match=r"method must be one of \('lora', 'dora', 'series', 'parallel', 'prefix'\), got 'dora2'"):
        fa.patch(tiny_model("llama"), "dora2")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\] for method 'lora'"):
        fa.patch(tiny_model("llama"), "lora", rank=4)


def test_llm_adapters_preset_is_the_papers_settings_and_options_override_it():
    with pytest.warns(UserWarning, match="r=32 > min"):  # the tiny model's k/v are 24 wide
        model = fa.patch(tiny_model("llama"), "lora", preset="llm-adapters")
    cfg = model.fastadapt_state.config
    assert (cfg.r, cfg.alpha, cfg.dropout) == (32, 64, 0.05)
    assert cfg.targets == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    model = fa.patch(tiny_model("llama"), "lora", preset="llm-adapters", r=4)
    assert model.fastadapt_state.config.r == 4 and model.fastadapt_state.config.alpha == 64
    # per architecture: BLOOM's fused query_key_value and MLP names
    bloom = fa.patch(tiny_model("bloom"), "lora", preset="llm-adapters")
    assert bloom.fastadapt_state.config.targets == ("query_key_value", "dense_h_to_4h", "dense_4h_to_h")
    series = fa.patch(tiny_model("llama"), "series", preset="llm-adapters")
    assert {m.position for _, m in fa.methods.adapter_modules(series)} == {"output"}
    with pytest.raises(ValueError, match="preset must be one of \\['llm-adapters'\\] for method 'lora', got 'paper'"):
        fa.patch(tiny_model("llama"), "lora", preset="paper")
