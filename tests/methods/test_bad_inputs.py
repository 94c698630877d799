"""Bad input gets a clear error that names what is wrong, and loses nothing."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapters
from tiny_models import tiny_model
from torch import nn

import fastadapt as fa


@pytest.fixture
def model():
    return tiny_model("llama")


def test_unknown_method(model):
    with pytest.raises(ValueError, match="method must be one of"):
        fa.patch(model, "lorra")


@pytest.mark.parametrize("r", [0, -3])
def test_rank_not_positive(model, r):
    with pytest.raises(ValueError, match="r must be a positive int"):
        fa.patch(model, "lora", r=r)


@pytest.mark.parametrize("r", [2.5, "8", True])
def test_rank_not_int(model, r):
    with pytest.raises(TypeError, match="r must be a positive int"):
        fa.patch(model, "lora", r=r)


def test_rank_above_layer_size_warns(model):
    with pytest.warns(UserWarning, match=r"r=64 > min\(in_features, out_features\)"):
        fa.patch(model, "lora", r=64, targets=["k_proj"])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(model, p):
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fa.patch(model, "lora", dropout=p)


def test_unknown_option(model):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\]"):
        fa.patch(model, "lora", rank=8)


def test_targets_matching_nothing_lists_candidates(model):
    with pytest.raises(ValueError, match=r"matched no module; candidate linear layers: \['q_proj'"):
        fa.patch(model, "lora", targets=["query"])
    with pytest.raises(ValueError, match="regex 'nothing.*' matched no module"):
        fa.patch(model, "lora", targets="nothing.*")


def test_invalid_regex(model):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        fa.patch(model, "lora", targets="q_proj(")


def test_unsupported_module_type(model):
    with pytest.raises(TypeError, match=r"target 'model.layers.0.mlp': unsupported module type .*LlamaMLP"):
        fa.patch(model, "lora", targets=r"model\.layers\.0\.mlp")
    # nothing was changed by the failed call
    assert not hasattr(model, "fastadapt_state")
    assert all(p.requires_grad for p in model.parameters())


def test_subclass_with_its_own_forward_is_refused():
    class Quantized(nn.Linear):
        def forward(self, x):  # computes something else from its weight
            return super().forward(x) * 2

    model = nn.Sequential(Quantized(4, 4))
    with pytest.raises(TypeError, match="unsupported module type"):
        fa.patch(model, "lora", targets=["0"])


def test_auto_targets_unknown_architecture():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="targets='auto' has no default for model_type None"):
        fa.patch(model, "lora")


def test_patching_twice(model):
    fa.patch(model, "lora")
    with pytest.raises(RuntimeError, match="already patched with 'lora'"):
        fa.patch(model, "lora")


def test_tied_weights_are_refused():
    model = tiny_model("gpt2")  # lm_head is tied to the token embeddings
    with pytest.raises(ValueError, match="tied weights"):
        fa.patch(model, "lora", targets=["lm_head"])


def test_unpatch_restores_the_original_model(model):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
    names = [n for n, _ in model.named_parameters()]
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fa.patch(model, "lora", targets="all-linear")
    fa.unpatch(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "save_pretrained" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    fa.patch(model, "lora")  # can be patched again


def test_patch_keeps_train_eval_mode():
    m = tiny_model("llama").eval()
    fa.patch(m, "lora", dropout=0.5)
    assert not any(mod.training for mod in m.modules())
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m(ids).logits)  # no dropout in eval mode
    m2 = tiny_model("llama").train()
    fa.patch(m2, "lora")
    assert all(mod.training for mod in m2.modules())


def _saved(model, tmp_path, name="a"):
    randomize_adapters(model)
    return fa.save_adapter(model, tmp_path / name)


def test_load_mismatched_adapter_names_the_key(tmp_path):
    src = tiny_model("llama")
    fa.patch(src, "lora", r=4, targets=["q_proj", "v_proj"])
    path = _saved(src, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    # missing key
    missing = dict(tensors)
    del missing[key]
    save_file(missing, path / "adapter_model.safetensors")
    dst = tiny_model("llama")
    with pytest.raises(KeyError, match="missing key.*layers.1.self_attn.v_proj.lora_B.weight"):
        fa.load_adapter(dst, path)
    assert not hasattr(dst, "fastadapt_state")  # left as it was
    # unexpected key
    extra = dict(tensors)
    extra["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"] = torch.zeros(4, 48)
    save_file(extra, path / "adapter_model.safetensors")
    with pytest.raises(KeyError, match="unexpected key.*o_proj.lora_A.weight"):
        fa.load_adapter(tiny_model("llama"), path)
    # shape mismatch
    bad = dict(tensors)
    bad[key] = torch.zeros(23, 4)
    save_file(bad, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"v_proj.lora_B.weight' has shape \(23, 4\), the model expects \(24, 4\)"):
        fa.load_adapter(tiny_model("llama"), path)


def test_load_into_differently_patched_model(tmp_path):
    src = tiny_model("llama")
    fa.patch(src, "lora", r=4)
    path = _saved(src, tmp_path)
    dst = tiny_model("llama")
    fa.patch(dst, "lora", r=8)
    with pytest.raises(ValueError, match="patched with r=8 but the adapter .* has r=4"):
        fa.load_adapter(dst, path)


def test_load_unsupported_peft_features(tmp_path):
    src = tiny_model("llama")
    fa.patch(src, "lora", r=4)
    path = _saved(src, tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 8}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank_pattern=\\{'q_proj': 8\\}, which fastadapt does not support"):
        fa.load_adapter(tiny_model("llama"), path)
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}, "use_dora": "yes"}))
    with pytest.raises(ValueError, match="use_dora='yes'; expected true or false"):
        fa.load_adapter(tiny_model("llama"), path)


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        fa.load_adapter(tiny_model("llama"), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        fa.load_adapter(tiny_model("llama"), tmp_path)


def test_merge_or_save_without_patch(model, tmp_path):
    with pytest.raises(ValueError, match=r"not patched by fastadapt: call fa.patch"):
        fa.merge(model)
    with pytest.raises(ValueError, match="no adapter to save"):
        fa.save_adapter(model, tmp_path)


class TestOp:
    """Validation at the public boundary of fa.ops.lora_linear."""

    def args(self, **over):
        a = dict(x=torch.randn(3, 8), weight=torch.randn(6, 8), lora_a=torch.randn(2, 8),
                 lora_b=torch.randn(6, 2))
        a.update(over)
        return a

    @pytest.mark.parametrize(
        "over, err, match",
        [
            ({"x": torch.randn(3, 7)}, ValueError, r"x must have last dimension in_features = 8"),
            ({"lora_a": torch.randn(2, 7)}, ValueError, r"lora_a must have shape \(r, in_features\) = \(r, 8\), got \(2, 7\)"),
            ({"lora_b": torch.randn(6, 3)}, ValueError, r"lora_b must have shape \(out_features, r\) = \(6, 2\)"),
            ({"weight": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "weight dtype torch.float64 must match x dtype"),
            ({"x": torch.ones(3, 8, dtype=torch.int64)}, TypeError, "x must be a floating-point tensor"),
        ],
    )
    def test_shapes_and_dtypes(self, over, err, match):
        with pytest.raises(err, match=match):
            fa.ops.lora_linear(**self.args(**over), scaling=1.0)

    @pytest.mark.parametrize("backend", ["torch", "triton"])
    def test_rank_zero(self, backend):
        with pytest.raises(ValueError, match=r"lora_a must have at least one row \(rank r ≥ 1\), got shape \(0, 8\)"):
            fa.ops.lora_linear(**self.args(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), scaling=1.0,
                               backend=backend)

    def test_bias_dropout_backend(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(out_features,\) = \(6,\)"):
            fa.ops.lora_linear(**self.args(), scaling=1.0, bias=torch.zeros(5))
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            fa.ops.lora_linear(**self.args(), scaling=1.0, dropout_p=1.0)
        with pytest.raises(ValueError, match="backend must be one of"):
            fa.ops.lora_linear(**self.args(), scaling=1.0, backend="tpu")
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            fa.ops.lora_linear(**self.args(), scaling=float("nan"))


def test_weights_and_config_from_different_saves_are_refused(tmp_path):
    """An interrupted re-save (new weights beside the old config) must not load with wrong settings."""
    src = tiny_model("llama")
    fa.patch(src, "lora", r=4, alpha=8)
    path = _saved(src, tmp_path)
    old_config = (path / "adapter_config.json").read_text()
    fa.unpatch(src)
    fa.patch(src, "lora", r=4, alpha=32)
    fa.save_adapter(src, path)
    (path / "adapter_config.json").write_text(old_config)  # as if the save stopped after the weights
    with pytest.raises(ValueError, match=r"saved for alpha=32, but adapter_config.json says alpha=8 \(the save was "
                                         "interrupted, or the config edited"):
        fa.load_adapter(tiny_model("llama"), path)


def test_edits_that_change_no_option_still_load(tmp_path):
    """Re-indenting the config, renaming the base model or changing the dropout is not an interrupted save."""
    src = tiny_model("llama")
    fa.patch(src, "lora", r=4, alpha=8)
    path = _saved(src, tmp_path)
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        expected = src(ids).logits
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "somewhere/else"
    cfg["lora_dropout"] = 0.3
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=4, sort_keys=True))
    dst = fa.load_adapter(tiny_model("llama"), path)
    with torch.no_grad():
        assert torch.equal(dst(ids).logits, expected)
    cfg["lora_alpha"] = 16  # an option the weights depend on: refused, naming it
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="saved for alpha=8, but adapter_config.json says alpha=16"):
        fa.load_adapter(tiny_model("llama"), path)


def test_failed_load_leaves_requires_grad_as_it_was(tmp_path):
    src = tiny_model("llama")
    fa.patch(src, "lora", r=4)
    path = _saved(src, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    tensors.popitem()
    save_file(tensors, path / "adapter_model.safetensors")
    dst = tiny_model("llama")
    dst.model.embed_tokens.weight.requires_grad_(False)  # a user's own choice must survive too
    before = {n: p.requires_grad for n, p in dst.named_parameters()}
    with pytest.raises(KeyError):
        fa.load_adapter(dst, path)
    assert {n: p.requires_grad for n, p in dst.named_parameters()} == before


def test_failure_while_swapping_leaves_the_model_unpatched(monkeypatch):
    from fastadapt.modules import lora as lora_module

    model = tiny_model("llama")
    names = [n for n, _ in model.named_modules()]
    real_init = lora_module.LoraLinear.__init__
    calls = []

    def failing_init(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(lora_module.LoraLinear, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated"):
        fa.patch(model, "lora", targets="all-linear")
    assert [n for n, _ in model.named_modules()] == names
    assert not hasattr(model, "fastadapt_state") and all(p.requires_grad for p in model.parameters())


def test_patching_a_peft_model_says_it_is_one(model):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for targets in ("all-linear", "auto"):  # all-linear used to blame tied weights
        with pytest.raises(TypeError, match=r"^model holds PEFT adapter layers \(PeftModel.*unload\(\).*fa.load_adapter"):
            fa.patch(theirs, "lora", targets=targets)
    assert not hasattr(theirs, "fastadapt_state")


def test_dora_on_a_meta_device_model_says_to_load_weights_first():
    with torch.device("meta"):
        meta = tiny_model("llama")
    with pytest.raises(ValueError, match=r"^target 'model.layers.0.self_attn.q_proj': DoRA initialises its magnitude "
                                         r"from the base weight's row norms, but the weight is on the meta device"):
        fa.patch(meta, "dora")
    assert not hasattr(meta, "fastadapt_state")
    fa.patch(meta, "lora")  # LoRA needs no values of the base weight


def test_a_folder_of_named_adapters_says_which_subfolders_hold_them(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    theirs.save_pretrained(tmp_path, selected_adapters=["one", "two"])
    with pytest.raises(FileNotFoundError, match=r"its subfolders \['one', 'two'\] each hold a named adapter.*pass one "
                                                r"of them, e.g. '.*/one'"):
        fa.load_adapter(tiny_model("llama"), tmp_path)
    fa.load_adapter(tiny_model("llama"), tmp_path / "one")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_weights_file_is_named(damage, tmp_path):
    fa.save_adapter(fa.patch(tiny_model("llama"), "lora", r=2), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "truncated" else b"not safetensors" * 8)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=rf"^{weights} is not a readable safetensors file \(.*\): the file is "
                                         "truncated or damaged"):
        fa.load_adapter(model, tmp_path)
    assert not hasattr(model, "fastadapt_state")
