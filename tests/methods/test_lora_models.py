"""LoRA and DoRA (PEFT's LoRA with ``use_dora``) on every supported architecture: parity with PEFT,
merge, export, save/load both ways. What only DoRA has: test_dora.py."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import norm_rel_err, randomize_adapters, rel_err
from tiny_models import ARCHS, tiny_model, tokens
from transformers import AutoModelForCausalLM

import fastadapt as fa
from fastadapt.methods import adapter_modules

peft = pytest.importorskip("peft")


METHODS = ("lora", "dora")


def patched(arch: str, *, method: str = "lora", targets="all-linear", r: int = 4, seed: int = 0,
            randomize: bool = True, dropout: float = 0.0, scale: float = 0.2):
    model = tiny_model(arch)
    fa.patch(model, method, r=r, alpha=2 * r + 1, dropout=dropout, targets=targets)
    if randomize:
        randomize_adapters(model, seed=seed, scale=scale)
    return model


def logits(model, ids=None):
    with torch.no_grad():
        return model(ids if ids is not None else tokens()).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_patch_leaves_output_unchanged_and_adapters_change_it(arch):
    model = tiny_model(arch)
    before = logits(model)
    fa.patch(model, "lora", r=4, targets="all-linear")
    assert torch.equal(logits(model), before)
    randomize_adapters(model)
    assert rel_err(logits(model), before) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_freezes_base_and_trains_only_adapters(arch):
    model = patched(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    s = fa.summary(model)
    assert s.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(s.rows) == len(model.fastadapt_state.modules) and "trainable%" in str(s)


def adapter_pairs(ours, twin):
    """(name, our parameter, PEFT's) for A, B and a DoRA magnitude of every adapted module."""
    for name, m in adapter_modules(ours):
        pm = twin.base_model.model.get_submodule(name)
        yield name, m.lora_A.weight, pm.lora_A["default"].weight
        yield name, m.lora_B.weight, pm.lora_B["default"].weight
        if ours.fastadapt_state.method == "dora":
            yield name, m.lora_magnitude_vector, pm.lora_magnitude_vector["default"].weight


def peft_twin(arch: str, ours):
    """PEFT's model with the same adapter (LoRA, or DoRA: ``use_dora``) and the same weights."""
    cfg = ours.fastadapt_state.config
    config = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(ours.fastadapt_state.modules),
        fan_in_fan_out=(arch == "gpt2"), use_dora=cfg.method == "dora",
    )
    twin = peft.get_peft_model(tiny_model(arch), config)
    with torch.no_grad():
        for _, mine, theirs in adapter_pairs(ours, twin):
            theirs.copy_(mine)
    return twin


@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("dora", 0.0), ("dora", 0.2)])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_gradients_match_peft(arch, method, dropout):
    """Logits and the adapter's gradients (DoRA: the magnitude's too), fp32. DoRA with dropout on
    the torch backend draws its masks as PEFT's nn.Dropout (one call per layer, same order), so
    PEFT's dropout form — the base product of the dropped input as well — meets identical masks."""
    ours = patched(arch, method=method, dropout=dropout, scale=0.1)
    twin = peft_twin(arch, ours)
    ids = tokens()
    ours.train()
    twin.train()
    torch.manual_seed(0)  # same dropout masks in both
    out_ours = ours(ids, labels=ids)
    torch.manual_seed(0)
    out_peft = twin(ids, labels=ids)
    assert rel_err(out_ours.logits, out_peft.logits) < 1e-5
    out_ours.loss.backward()
    out_peft.loss.backward()
    for name, mine, theirs in adapter_pairs(ours, twin):
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        assert norm_rel_err(mine.grad, theirs.grad) < 1e-5, name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge(arch, method):
    model = patched(arch, method=method)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in adapter_modules(model)}
    unmerged = logits(model)
    fa.merge(model)
    assert all(m.merged for _, m in adapter_modules(model))
    assert rel_err(logits(model), unmerged) < 1e-5
    with pytest.warns(UserWarning, match="already merged"):
        fa.merge(model)  # no double add
    assert rel_err(logits(model), unmerged) < 1e-5
    fa.unmerge(model)
    for n, m in adapter_modules(model):
        assert (m.base_layer.weight - originals[n]).abs().max() < 1e-6
    assert rel_err(logits(model), unmerged) < 1e-5
    before = {n: m.base_layer.weight.detach().clone() for n, m in adapter_modules(model)}
    fa.merge(model, keep_original=True)
    assert not any(torch.equal(m.base_layer.weight, before[n]) for n, m in adapter_modules(model))
    fa.unmerge(model)
    for n, m in adapter_modules(model):
        assert torch.equal(m.base_layer.weight, before[n])


def test_merge_is_one_rounding_in_bf16():
    model = tiny_model("llama", dtype=torch.bfloat16)
    fa.patch(model, "lora", r=4, targets="all-linear")
    randomize_adapters(model)
    # independent of the module's own helpers: W + (alpha / r) · B A in fp32, one rounding
    scaling = 16 / 4
    expected = {n: (m.base_layer.weight.float() + scaling * (m.lora_B.weight.float() @ m.lora_A.weight.float()))
                .to(torch.bfloat16) for n, m in adapter_modules(model)}
    fa.merge(model)
    for n, m in adapter_modules(model):
        assert torch.equal(m.base_layer.weight, expected[n]), n


@pytest.mark.parametrize("method", METHODS)
def test_merge_nan_is_an_error_naming_the_module_and_changes_nothing(method):
    model = patched("llama", method=method)
    names = model.fastadapt_state.modules
    weights = {n: model.get_submodule(n).base_layer.weight.clone() for n in names}
    with torch.no_grad():
        model.get_submodule(names[-1]).lora_B.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=names[-1].replace(".", r"\.")):
        fa.merge(model)
    for n in names:
        m = model.get_submodule(n)
        assert not m.merged and torch.equal(m.base_layer.weight, weights[n])


def test_unmerge_when_not_merged_is_an_error():
    with pytest.raises(RuntimeError, match="not merged"):
        fa.unmerge(patched("llama"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_export_reloads_in_plain_transformers(arch, method, tmp_path):
    model = patched(arch, method=method)
    expected = logits(model)
    out = fa.export(model, tmp_path / "merged")
    assert not any(m.merged for _, m in adapter_modules(model))  # export leaves the model as it was
    files = {p.name for p in out.iterdir()}
    assert "config.json" in files and "model.safetensors" in files
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(reloaded, "fastadapt_state")
    assert rel_err(logits(reloaded), expected) < 1e-5


def test_export_of_merged_model_and_dtype(tmp_path):
    model = patched("llama")
    expected = logits(model)
    fa.merge(model)
    out = fa.export(model, tmp_path / "bf16", dtype="bf16")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert rel_err(logits(reloaded.float()), expected) < 2e-2
    assert model.dtype == torch.float32 and not any(m.merged is False for _, m in adapter_modules(model))


def test_export_refuses_non_empty_folder_and_leaves_it(tmp_path):
    model = patched("llama")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        fa.export(model, target)
    assert (target / "keep.txt").read_text() == "precious"
    fa.export(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_export_without_adapter_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no adapter to export"):
        fa.export(tiny_model("llama"), tmp_path / "x")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trips_with_peft(arch, method, tmp_path):
    ours = patched(arch, method=method)
    expected = logits(ours)
    fa.save_adapter(ours, tmp_path / "ours")
    # fastadapt -> PEFT
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ours").eval()
    assert rel_err(logits(theirs), expected) < 1e-5
    # PEFT -> fastadapt
    theirs.save_pretrained(tmp_path / "peft")
    fresh = tiny_model(arch)
    fa.load_adapter(fresh, tmp_path / "peft")
    assert fresh.fastadapt_state.method == method
    assert rel_err(logits(fresh), expected) < 1e-5
    # fastadapt -> fastadapt
    again = tiny_model(arch)
    fa.load_adapter(again, tmp_path / "ours")
    assert rel_err(logits(again), expected) < 1e-5


def test_saved_config_is_peft_schema(tmp_path):
    model = patched("gpt2", targets=["c_attn"])
    fa.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 9
    assert cfg["target_modules"] == ["c_attn"] and cfg["fan_in_fan_out"] is True
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert tensors[key].shape == (4, 48)
    assert tensors[key.replace("lora_A", "lora_B")].shape == (144, 4)


def test_regex_targets_and_rslora(tmp_path):
    model = tiny_model("llama")
    fa.patch(model, "lora", r=4, alpha=8, targets=r".*\.(q_proj|down_proj)", rslora=True)
    names = model.fastadapt_state.modules
    assert names and all(n.endswith(("q_proj", "down_proj")) for n in names)
    assert all(m.scaling == 8 / 2 for _, m in adapter_modules(model))
    randomize_adapters(model)
    expected = logits(model)
    fa.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert rel_err(logits(theirs), expected) < 1e-5


def test_all_linear_takes_linear_subclasses_whose_forward_is_the_linear_map():
    """Falcon's FalconLinear subclasses nn.Linear with its own forward (x @ W.T + b): a target."""
    model = tiny_model("falcon")
    fa.patch(model, "lora", targets="all-linear")
    names = model.fastadapt_state.modules
    assert {n.rsplit(".", 1)[-1] for n in names} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert len(names) == 8


def test_all_linear_never_takes_the_output_head():
    for arch in ("llama", "gpt2", "opt"):
        model = tiny_model(arch)
        fa.patch(model, "lora", targets="all-linear")
        head = model.get_output_embeddings()
        assert all(model.get_submodule(n) is not head for n in model.fastadapt_state.modules)
        assert not any("lm_head" in n for n in model.fastadapt_state.modules)
