"""Named adapters in one model: ``fa.save_adapter(..., adapter_name=)`` writes back exactly the folder
an adapter came from (file name, keys, dtypes, metadata, config, bit-equal tensors) whichever adapter
is active; list/switch/delete; ``fa.hotswap_adapter`` replaces weights in place, and a compiled
model does not recompile for it while the rank fits the slots."""

from __future__ import annotations

import json

import pytest
import torch
from named_adapters import LORA_SPECS, alone, folders, loaded, peft_folders
from safetensors import safe_open
from tiny_models import tiny_model, tokens

import fastadapt as fa


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _folder(path):
    """(weights file name, {key: (dtype, raw bytes)}, metadata, config) of a saved adapter folder."""
    name = "adapter_model.safetensors"
    with safe_open(str(path / name), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    raw = {k: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).flatten().tolist()) for k, t in tensors.items()}
    return name, raw, metadata, json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", ["lora", "dora", "series", "parallel", "lora-bf16"])
def test_named_save_writes_back_the_folder_it_came_from(method, tmp_path):
    paths = (peft_folders(tmp_path / "in", dtype=torch.bfloat16) if method == "lora-bf16"
             else folders(tmp_path / "in", method))
    model = loaded(paths)
    names = list(paths)
    fa.set_adapter(model, names[1])  # the adapters move between parameters and slots: still exact
    fa.set_adapter(model, names[2])
    for name, path in paths.items():
        out = fa.save_adapter(model, tmp_path / "out" / name, adapter_name=name)
        adapter_files = sorted(p.name for p in path.iterdir() if p.name != "README.md")  # PEFT's model card
        assert sorted(p.name for p in out.iterdir()) == adapter_files
        assert _folder(out) == _folder(path), name
    if method == "lora-bf16":
        assert all(dt == torch.bfloat16 for dt, _, _ in _folder(out)[1].values())  # a vacuity check


def test_a_trained_adapter_from_a_bf16_folder_is_not_rounded_on_save(tmp_path, caplog):
    """The folder is bf16; training moves the fp32 parameters by less than a bf16 step: writing them
    back in the folder's dtype would silently undo the training. Unchanged tensors keep bf16."""
    paths = peft_folders(tmp_path / "in", dtype=torch.bfloat16)
    model = loaded(paths)
    active = fa.active_adapter(model)
    module = next(m for _, m in fa.methods.wrapped_modules(model))
    with torch.no_grad():
        module.lora_B.weight.add_(1e-4)  # far below bf16's step at these magnitudes
    want = module.lora_B.weight[:, :module.r].detach().clone()
    fa.set_adapter(model, next(n for n in paths if n != active))  # saved from its slot, not active
    out = fa.save_adapter(model, tmp_path / "out", adapter_name=active)
    _, raw, _, _ = _folder(out)
    widened = {k for k, (dt, _, _) in raw.items() if dt == torch.float32}
    assert len(widened) == 1 and next(iter(widened)).endswith("lora_B.weight")
    assert all(dt == torch.bfloat16 for k, (dt, _, _) in raw.items() if k not in widened)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(next(iter(widened))), want)
    assert "not exact in the folder's dtype" in caplog.text


def test_list_switch_and_delete(tmp_path):
    paths = peft_folders(tmp_path)
    model = loaded(paths)
    assert fa.list_adapters(model) == list(LORA_SPECS)
    assert fa.active_adapter(model) == "math"
    ids = tokens(2, 6)
    with torch.no_grad():
        for name in ("chat", "code", "math"):
            fa.set_adapter(model, name)
            assert fa.active_adapter(model) == name
            assert (model(ids).logits - alone(paths[name])(ids).logits).abs().max() <= 1e-5, name
        # only the active adapter's parameters train
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".q_proj." in n or ".v_proj." in n for n in trainable)
        with pytest.raises(ValueError, match="is the active adapter"):
            fa.delete_adapter(model, "math")
        with pytest.raises(ValueError, match="not one of the model's adapters"):
            fa.set_adapter(model, "nope")
        with pytest.raises(ValueError, match="already loaded"):
            fa.load_adapter(model, paths["code"], adapter_name="code")
        with pytest.raises(ValueError, match="reserved"):
            fa.load_adapter(model, paths["code"], adapter_name="__base__")
        fa.delete_adapter(model, "chat")  # the only adapter on o_proj / gate_proj
        assert fa.list_adapters(model) == ["math", "code"]
        assert not any(n.endswith(("o_proj", "gate_proj")) for n, _ in fa.methods.wrapped_modules(model))
        got = model(ids, adapter_names=["code", "math"]).logits
        assert (got[0] - alone(paths["code"])(ids).logits[0]).abs().max() <= 1e-5
        assert (got[1] - alone(paths["math"])(ids).logits[1]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="does not hold"):
            model(ids, adapter_names=["chat", "math"])


def _other(tmp_path, name: str, r: int):
    """A LoRA folder on ``name``'s targets with another rank, alpha and weights."""
    import peft

    targets = LORA_SPECS[name][2]
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=r, lora_alpha=3 * r + 1, target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(r)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path / f"{name}-r{r}")
    return tmp_path / f"{name}-r{r}"


def test_hotswap_in_place_without_recompiling(tmp_path):
    """Hot-swapping the active adapter for one of a smaller rank and another alpha (the same slots):
    the compiled model makes no new graph and computes the new adapter. A banked adapter swapped
    under a compiled mixed batch is right (its graphs may specialise again on its rank and scaling,
    which the segmented math uses as numbers). A larger rank grows the slot and is still right."""
    pytest.importorskip("peft")
    paths = peft_folders(tmp_path)
    model = loaded(paths)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    ids = tokens(3, 6)
    names = ["math", "code", "__base__"]
    with torch.no_grad():
        compiled(ids)
        before = len(graphs)
        math2 = _other(tmp_path, "math", 2)  # math is rank 4
        fa.hotswap_adapter(model, math2, adapter_name="math")
        assert (compiled(ids).logits - alone(math2)(ids).logits).abs().max() <= 1e-5
        assert len(graphs) == before > 0, f"the active hot-swap made {len(graphs) - before} new graph(s)"
        compiled(ids, adapter_names=names)
        code2 = _other(tmp_path, "code", 8)  # code (rank 8, alpha 4) in its bank slot: new weights and alpha
        fa.hotswap_adapter(model, code2, adapter_name="code")
        mixed = compiled(ids, adapter_names=names).logits
        assert (mixed[0] - alone(math2)(ids).logits[0]).abs().max() <= 1e-5
        assert (mixed[1] - alone(code2)(ids).logits[1]).abs().max() <= 1e-5
        assert (mixed[2] - tiny_model("llama")(ids).logits[2]).abs().max() <= 1e-5
        large = _other(tmp_path, "math", 9)
        fa.hotswap_adapter(model, large, adapter_name="math")  # grows the slot once
        assert (compiled(ids).logits - alone(large)(ids).logits).abs().max() <= 1e-5
    assert _folder(fa.save_adapter(model, tmp_path / "saved", adapter_name="math")) == _folder(large)
    torch._dynamo.reset()


def test_hotswap_refuses_new_targets_and_leaves_the_model_alone(tmp_path):
    paths = peft_folders(tmp_path)
    model = loaded(paths)
    ids = tokens(2, 5)
    with torch.no_grad():
        before = model(ids, adapter_names=["math", "code"]).logits
        with pytest.raises(ValueError, match="does not adapt"):
            fa.hotswap_adapter(model, paths["code"], adapter_name="math")  # code targets more modules
        with pytest.raises(ValueError, match="not one of the model's adapters"):
            fa.hotswap_adapter(model, paths["code"], adapter_name="nope")
        assert torch.equal(model(ids, adapter_names=["math", "code"]).logits, before)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("where", ["active", "banked"])
def test_hotswap_to_fewer_targets_leaves_the_others_untouched(dora, where, tmp_path):
    """``code`` (q/k/v/up/down) hot-swapped for ``math`` (q/v): k/up/down must compute the base layer
    again — not a zero adapter, which for DoRA (output scaled by the magnitude) erases the layer."""
    paths = peft_folders(tmp_path / "in", dora=dora)
    model = tiny_model("llama")
    if where == "banked":
        fa.load_adapter(model, paths["chat"], adapter_name="chat")
    fa.load_adapter(model, paths["code"], adapter_name="code")
    model.eval()
    fa.hotswap_adapter(model, paths["math"], adapter_name="code")
    ids = tokens(2, 7)
    with torch.no_grad():
        want = alone(paths["math"])(ids).logits
        got = model(ids, adapter_names=["code", "code"]).logits if where == "banked" else model(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        fa.set_adapter(model, "code")
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
    # what trains and what is saved is the new adapter's: it reloads with fastadapt and with PEFT
    trainable = {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert trainable == {"q_proj", "v_proj"}
    out = fa.save_adapter(model, tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    with torch.no_grad():
        torch.testing.assert_close(fa.load_adapter(tiny_model("llama"), out).eval()(ids).logits, want,
                                   rtol=0, atol=1e-5)
        import peft
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(out)).eval()
        torch.testing.assert_close(theirs(ids).logits, want, rtol=0, atol=1e-5)


def test_train_mode_under_no_grad_keeps_dropout_while_serving(tmp_path):
    """A named (slot-served) model left in train() computes as PEFT does under no_grad: with dropout."""
    model = fa.patch(tiny_model("llama"), "lora", r=4, dropout=0.5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    fa.save_adapter(model, tmp_path / "a")
    served = fa.load_adapter(tiny_model("llama"), tmp_path / "a", adapter_name="a")
    ids = tokens(2, 7)
    with torch.no_grad():
        served.train()
        torch.manual_seed(0)
        first = served(ids).logits
        torch.manual_seed(1)
        assert not torch.equal(served(ids).logits, first)  # masks drawn: dropout applied
        served.eval()
        torch.testing.assert_close(served(ids).logits, model.eval()(ids).logits, rtol=0, atol=1e-5)
