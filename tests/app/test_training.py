"""A patched model trains: plain loop, gradient checkpointing, autocast, bf16, transformers.Trainer."""

from __future__ import annotations

import pytest
import torch
from helpers import enable_activation_checkpointing, norm_rel_err, randomize_adapters, rel_err
from tiny_models import tiny_model, tokens

import fastadapt as fa
from fastadapt.methods import adapter_modules


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_plain_loop_trains_only_the_adapter():
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    fa.patch(model, "lora", r=4, targets="all-linear")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(4, 12)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids = tokens(2, 9)
    ref = tiny_model("llama").train()
    fa.patch(ref, "lora", r=4, targets="all-linear", dropout=0.0)
    randomize_adapters(ref)
    ref(ids, labels=ids).loss.backward()
    expected = adapter_grads(ref)

    model = tiny_model("llama").train()
    fa.patch(model, "lora", r=4, targets="all-linear", dropout=0.0)
    randomize_adapters(model)
    enable_activation_checkpointing(model, use_reentrant=use_reentrant)
    model(ids, labels=ids).loss.backward()
    got = adapter_grads(model)
    assert got.keys() == expected.keys()
    for n in expected:
        assert got[n].abs().sum() > 0, n
        assert norm_rel_err(got[n], expected[n]) < 1e-5, n


def test_autocast_bf16_step():
    model = tiny_model("llama").train()
    fa.patch(model, "lora", r=4, targets="all-linear")
    randomize_adapters(model)
    ids = tokens(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0, n


def test_bf16_model_stays_bf16_and_matches_float64():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", dtype=torch.bfloat16)
    fa.patch(model, "lora", r=4, targets="all-linear", dropout=0.0)
    randomize_adapters(model, scale=0.05)
    reference = tiny_model("llama", dtype=torch.bfloat16).double()  # same bf16-rounded base weights
    fa.patch(reference, "lora", r=4, targets="all-linear", dropout=0.0)
    reference.load_state_dict(model.state_dict())
    # the same-dtype PyTorch yardstick: PEFT with bf16 adapters
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=model.fastadapt_state.modules)
    yardstick = peft.get_peft_model(tiny_model("llama", dtype=torch.bfloat16), cfg, autocast_adapter_dtype=False)
    ids = tokens(2, 9)
    with torch.no_grad():
        for name, m in adapter_modules(model):
            pm = yardstick.base_model.model.get_submodule(name)
            pm.lora_A["default"].weight.copy_(m.lora_A.weight)
            pm.lora_B["default"].weight.copy_(m.lora_B.weight)
        got, want, same_dtype = model(ids).logits, reference(ids).logits, yardstick(ids).logits
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= 2 * rel_err(same_dtype, want)
    assert rel_err(got, want) < 2e-2


def test_lora_module_saves_no_fp32_activations():
    """The LoRA path saves nothing of size M x K in fp32 (PEFT's default upcast does)."""
    model = tiny_model("llama", dtype=torch.bfloat16).train()
    fa.patch(model, "lora", r=4, targets=["q_proj"], dropout=0.0)
    randomize_adapters(model)
    layer = next(m for _, m in adapter_modules(model))
    x = torch.randn(5, 7, 48, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    rows = x.numel() // x.shape[-1]
    activations = [t for t in saved if t.dim() >= 2 and t.numel() // t.shape[-1] == rows]
    assert activations and all(t.dtype == torch.bfloat16 for t in activations), [
        (t.dtype, tuple(t.shape)) for t in activations]
    # beyond x itself (the graph holds it anyway) only S (M x r) is kept
    extra = [t for t in activations if t.data_ptr() != x.data_ptr()]
    assert all(t.shape[-1] == layer.r for t in extra), [tuple(t.shape) for t in extra]


def _dataset(n=12, seq=10):
    ids = tokens(n, seq, seed=3)
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(model, out, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="steps", save_steps=2,
        dataloader_num_workers=0, disable_tqdm=True, **args,
    )
    return Trainer(model=model, args=targs, train_dataset=_dataset())


def _fresh():
    model = tiny_model("llama").train()
    fa.patch(model, "lora", r=4, targets="all-linear", dropout=0.1)
    return model


def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    pytest.importorskip("accelerate")
    full = _fresh()
    _trainer(full, tmp_path / "a", max_steps=4).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "config.json" not in files  # not a full model under foreign names
    from safetensors.torch import load_file

    assert all(".lora_" in k for k in load_file(ckpt / "model.safetensors"))
    # the checkpoint is a loadable adapter
    loaded = tiny_model("llama")
    fa.load_adapter(loaded, ckpt)

    resumed = _fresh()
    _trainer(resumed, tmp_path / "b", max_steps=4).train(resume_from_checkpoint=str(ckpt))
    a = dict(full.named_parameters())
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, a[n], rtol=1e-6, atol=1e-7), n
    assert any((p != 0).any() for n, p in resumed.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("method", ["series", "parallel"])
def test_save_pretrained_of_bottleneck_model_holds_the_adapter(method, tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    fa.patch(model, method, bottleneck=8, scaling="learned")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = tiny_model("llama")
    fa.patch(fresh, method, bottleneck=8, scaling="learned")
    result = fresh.load_state_dict(tensors, strict=False)  # what Trainer's resume does
    assert not result.missing_keys and not result.unexpected_keys
    ids = tokens(1, 6)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert "b=8" in str(fa.summary(model))
