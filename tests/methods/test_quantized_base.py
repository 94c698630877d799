"""Adapters on a bitsandbytes-quantized base (QLoRA): NF4/FP4 ``Linear4bit`` with and without
double quantization, fp32 and bf16 compute, and ``Linear8bitLt``.

PEFT is the oracle: the same tiny LLaMA loaded quantized twice (``fa.load_model(quantize=...)``),
one copy patched by PEFT, one by fastadapt with PEFT's adapter weights; a training step's logits
and adapter gradients must agree. Tolerances: fp32 compute 1e-5 relative (the same dequantized
weights, the sums in another order); bf16 compute 2e-2 relative (PEFT forms the LoRA term in fp32
and rounds it once, fastadapt in bf16: a few bf16 roundings, 2^-8 each). Widths are multiples of
64 (bitsandbytes' CPU dequantize kernel mis-decodes rows shorter than a block:
tests/kernels/test_lora_linear_4bit_kernels.py), and PEFT runs in training mode (bitsandbytes'
CPU inference path repacks the weight in place).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import norm_rel_err, randomize_adapters
from transformers import AutoModelForCausalLM, LlamaConfig

import fastadapt as fa
from fastadapt.export import METADATA_NAME
from fastadapt.methods import adapter_modules
from fastadapt.models import quantization_config
from fastadapt.modules.quantized import dequantized_weight, weight_4bit

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'fastadapt[quant]'")
peft = pytest.importorskip("peft")

VOCAB = 97
KINDS = ["nf4", "fp4", "int8"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("tiny-llama64")
    model.save_pretrained(folder)
    return folder


def ids(batch=2, seq=9, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def quantized(folder, kind, *, dtype=None, double_quant=True):
    if kind == "int8" or double_quant:
        model, _ = fa.load_model(folder, quantize=kind, dtype=dtype)
        return model
    config = quantization_config(kind, compute_dtype=dtype, double_quant=False)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype or torch.float32)


def step(model, batch):
    model.train()
    out = model(batch, labels=batch)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def peft_pairs(ours, twin):
    for name, m in adapter_modules(ours):
        pm = twin.base_model.model.get_submodule(name)
        yield m.lora_A.weight, pm.lora_A["default"].weight
        yield m.lora_B.weight, pm.lora_B["default"].weight
        if hasattr(m, "lora_magnitude_vector"):
            yield m.lora_magnitude_vector, pm.lora_magnitude_vector["default"].weight


@pytest.mark.parametrize("kind,method,dtype,double_quant", [
    ("nf4", "lora", None, True), ("nf4", "lora", None, False), ("fp4", "lora", None, True),
    ("nf4", "dora", None, True), ("nf4", "lora", torch.bfloat16, True), ("int8", "lora", None, True),
    ("int8", "dora", None, True),
])
def test_logits_and_adapter_gradients_equal_peft(base_folder, kind, method, dtype, double_quant):
    ours = quantized(base_folder, kind, dtype=dtype, double_quant=double_quant)
    fa.patch(ours, method, r=4, alpha=9, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    randomize_adapters(ours, scale=0.1)
    twin = peft.get_peft_model(quantized(base_folder, kind, dtype=dtype, double_quant=double_quant), peft.LoraConfig(
        r=4, lora_alpha=9, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=method == "dora"))
    with torch.no_grad():
        for mine, theirs in peft_pairs(ours, twin):
            theirs.copy_(mine)
    batch = ids()
    ours_logits, ours_grads = step(ours, batch)
    peft_logits, peft_grads = step(twin, batch)
    tol = 1e-5 if dtype is None and kind != "int8" else 2e-2
    assert norm_rel_err(ours_logits, peft_logits) <= tol
    pairs = list(peft_pairs(ours, twin))
    assert pairs
    for mine, theirs in pairs:
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        assert norm_rel_err(mine.grad, theirs.grad) <= (1e-4 if tol == 1e-5 else 5e-2)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dropout_draws_peft_masks_and_keeps_no_dropped_copy(base_folder, kind):
    """LoRA with dropout on a quantized base (the torch backend's lean rank term): from one seed, the
    masks are PEFT's (each layer's ``nn.Dropout`` call, in order), so logits and gradients agree; and
    no tensor of x's size but x itself is kept for backward (PEFT keeps a dropped copy and a mask)."""
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = quantized(base_folder, kind)
    fa.patch(ours, "lora", r=4, alpha=9, dropout=0.3, targets=targets)
    randomize_adapters(ours, scale=0.1)
    twin = peft.get_peft_model(quantized(base_folder, kind), peft.LoraConfig(
        r=4, lora_alpha=9, lora_dropout=0.3, target_modules=targets))
    with torch.no_grad():
        for mine, theirs in peft_pairs(ours, twin):
            theirs.copy_(mine)
    batch = ids()
    torch.manual_seed(7)
    ours_logits, _ = step(ours, batch)
    torch.manual_seed(7)
    peft_logits, _ = step(twin, batch)
    assert norm_rel_err(ours_logits, peft_logits) <= (1e-5 if kind == "nf4" else 2e-2)
    for mine, theirs in peft_pairs(ours, twin):
        assert mine.grad.abs().sum() > 0
        assert norm_rel_err(mine.grad, theirs.grad) <= (1e-4 if kind == "nf4" else 5e-2)
    layer = ours.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 9, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    x_sized = [t for t in saved if t.numel() == x.numel() and t.untyped_storage().data_ptr() != x.data_ptr()]
    assert not x_sized and any(t.dtype == torch.uint8 and t.numel() == x.numel() // 8 for t in saved)


def test_peft_adapter_trained_on_a_4bit_base_loads_and_saves_back(base_folder, tmp_path):
    twin = peft.get_peft_model(quantized(base_folder, "nf4"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    twin.save_pretrained(tmp_path / "peft")
    batch = ids()
    want, _ = step(twin, batch)
    ours = fa.load_adapter(quantized(base_folder, "nf4"), tmp_path / "peft")
    got, _ = step(ours, batch)
    assert norm_rel_err(got, want) <= 1e-5
    fa.save_adapter(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(quantized(base_folder, "nf4"), tmp_path / "back", is_trainable=True)
    assert norm_rel_err(step(again, batch)[0], want) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["series", "parallel"])
def test_bottleneck_adapters_train_on_a_quantized_base(base_folder, kind, method):
    model = quantized(base_folder, kind)
    fa.patch(model, method, bottleneck=8, init="bert")
    logits, grads = step(model, ids())
    assert torch.isfinite(logits).all() and grads and all(g.abs().sum() > 0 for g in grads.values())
    assert all(m.quantized == ("8bit" if kind == "int8" else "4bit") for _, m in adapter_modules(model))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_refused_by_name_unless_dequantized_then_exact(base_folder, kind):
    model = quantized(base_folder, kind)
    # every linear adapted: bitsandbytes' own CPU inference kernel (used by unadapted 4-bit layers in
    # eval) is not bit-reproducible from call to call, which would blur the comparison
    fa.patch(model, "lora", r=4, targets="all-linear")
    randomize_adapters(model, scale=0.1)
    model.eval()
    batch = ids()
    with torch.no_grad():
        adapted = model(batch).logits
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*quantized base.*dequantize=True"):
        fa.merge(model)
    assert not any(m.merged for _, m in adapter_modules(model))
    if kind == "int8":  # LLM.int8() quantizes activations too: a dequantized layer computes otherwise
        return
    fa.merge(model, dequantize=True)
    assert all(m.quantized is None and m.merged for _, m in adapter_modules(model))
    with torch.no_grad():
        merged = model(batch).logits
        assert (merged - adapted).abs().max() <= 1e-4
        fa.unmerge(model)
        assert (model(batch).logits - adapted).abs().max() <= 1e-4


def test_dora_norms_follow_every_update_of_a_quantized_base(base_folder):
    """No cached norm: a p.data write to A (no version counter moves) shows at once."""
    model = quantized(base_folder, "nf4")
    fa.patch(model, "dora", r=4, targets=["q_proj"])
    randomize_adapters(model, scale=0.1)
    module = dict(adapter_modules(model))["model.layers.0.self_attn.q_proj"]
    first = module.weight_norm().clone()
    module.lora_A.weight.data = module.lora_A.weight.data * 2  # no version counter moves
    second = module.weight_norm()
    want = torch.linalg.vector_norm(dequantized_weight(module.base_layer) + module.scaling
                                    * module.lora_B.weight @ module.lora_A.weight, dim=1)
    assert not torch.allclose(first, second) and torch.allclose(second, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_from_a_4bit_base_reloads_with_plain_transformers(base_folder, tmp_path, method):
    model = quantized(base_folder, "nf4")
    fa.patch(model, method, r=4, targets="all-linear")
    randomize_adapters(model, scale=0.1)
    model.eval()
    batch = ids()
    with torch.no_grad():
        adapted = model(batch).logits
    for dtype, bound in (("fp32", 1e-4), ("bf16", None)):
        fa.export(model, tmp_path / dtype, dtype=dtype)
        config = json.loads((tmp_path / dtype / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        meta = json.loads((tmp_path / dtype / METADATA_NAME).read_text())
        assert meta["dequantized"] and "nf4" in meta["base"][0]
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / dtype, dtype=torch.float32)
        assert all(type(m).__name__ != "Linear4bit" for m in reloaded.modules())
        with torch.no_grad():
            got = reloaded(batch).logits
        if bound is None:  # the merged weights rounded to bf16: as far as that rounding moves the logits
            exact = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
            with torch.no_grad():
                for p in exact.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
                bound = 1e-4 + (exact(batch).logits - adapted).abs().max().item()
        assert (got - adapted).abs().max().item() <= bound
    assert all(m.quantized == "4bit" for _, m in adapter_modules(model))  # the model itself is unchanged


def test_quantized_export_records_the_error_it_adds(base_folder, tmp_path):
    model = quantized(base_folder, "nf4")
    fa.patch(model, "lora", r=4, targets=["q_proj", "v_proj"])
    randomize_adapters(model, scale=0.1)
    fa.export(model, tmp_path / "q", quantize=True)
    meta = json.loads((tmp_path / "q" / "fastadapt_export.json").read_text())
    error, effect = meta["quantized_merge_error"], meta["adapter_effect"]
    assert 0 < error["mean_abs"] <= error["max_abs"] and effect["max_abs"] > 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    for name, module in adapter_modules(model):  # the written 4-bit weights are the merged ones re-quantized
        merged = module.merged_weight(torch.float32)
        written = weight_4bit(reloaded.get_submodule(name)).dequantize()
        assert (written - merged).abs().max() <= 0.2 * merged.abs().max()
        assert not torch.equal(written, weight_4bit(module.base_layer).dequantize())


def test_without_bitsandbytes_a_clear_error(monkeypatch, base_folder):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"quantize='nf4' needs bitsandbytes.*fastadapt\[quant\]"):
        fa.load_model(base_folder, quantize="nf4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        fa.load_model(base_folder, quantize="q4")


def test_named_adapters_on_a_4bit_base_switch_and_mixed_batches_are_refused(base_folder, tmp_path):
    """Named adapters on a quantized base: the active one runs the quantized path (equal to that
    adapter alone on the same base), switching works; a mixed batch is refused by name (issue 27:
    not supported on 4-/8-bit bases yet)."""
    paths = {}
    for i, r in enumerate((4, 6)):
        model = quantized(base_folder, "nf4")
        fa.patch(model, "lora", r=r, alpha=2 * r, targets=["q_proj", "v_proj"])
        randomize_adapters(model, seed=i, scale=0.2)
        paths[f"a{i}"] = fa.save_adapter(model, tmp_path / f"a{i}")
    model = quantized(base_folder, "nf4")
    for name, path in paths.items():
        fa.load_adapter(model, path, adapter_name=name)
    model.eval()
    batch = ids()
    with torch.no_grad():
        for name in ("a1", "a0"):
            fa.set_adapter(model, name)
            alone = quantized(base_folder, "nf4")
            fa.load_adapter(alone, paths[name])
            assert torch.equal(model(batch).logits, alone.eval()(batch).logits), name
        with pytest.raises(ValueError, match="quantized"):
            model(batch, adapter_names=["a0", "a1"])
