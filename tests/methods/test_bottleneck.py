"""Series / parallel bottleneck adapters on whole tiny models: LLM-Adapters semantics, checkpoints, options."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import norm_rel_err, rel_err
from tiny_models import ARCHS, tiny_model, tokens

import fastadapt as fa
from fastadapt.architectures import ARCHITECTURES
from fastadapt.methods import adapter_modules
from fastadapt.modules import BottleneckLinear

ACT = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def randomize(model, *, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            for w in (m.adapter_down.weight, m.adapter_up.weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)
            if m.learned_scaling:
                m.adapter_scaling.fill_(0.7)


def adapters_of(model) -> dict:
    """name -> (position, w_down, w_up, scaling, activation), detached."""
    out = {}
    for name, m in adapter_modules(model):
        s = m.adapter_scaling.detach().clone() if m.learned_scaling else m.scaling
        out[name] = (m.position, m.adapter_down.weight.detach().clone(), m.adapter_up.weight.detach().clone(), s,
                     m.activation)
    return out


def formula_logits(arch: str, adapters: dict, ids) -> torch.Tensor:
    """Logits of the unpatched base model in float64 with LLM-Adapters' formulas added by hooks:
    input: x -> x + s·A(x) before W; output: h -> h + s·A(h); parallel: W x + c + s·A(x)."""
    model = tiny_model(arch).double()

    def A(z, wd, wu, s, act):
        s = s.double() if isinstance(s, torch.Tensor) else s
        return s * (ACT[act](z @ wd.double().t()) @ wu.double().t())

    for name, (pos, wd, wu, s, act) in adapters.items():
        mod = model.get_submodule(name)
        if pos == "input":
            mod.register_forward_pre_hook(lambda m, args, p=(wd, wu, s, act): (args[0] + A(args[0], *p),))
        elif pos == "output":
            mod.register_forward_hook(lambda m, args, out, p=(wd, wu, s, act): out + A(out, *p))
        else:
            mod.register_forward_hook(lambda m, args, out, p=(wd, wu, s, act): out + A(args[0], *p))
    with torch.no_grad():
        return model(ids).logits


# -- formula parity on every architecture ---------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_series_and_parallel_match_the_formulas_on_every_architecture(arch):
    ids = tokens(2, 7)
    with torch.no_grad():
        base = tiny_model(arch)(ids).logits
    for method, act in (("series", "tanh"), ("parallel", "gelu")):
        model = tiny_model(arch)
        fa.patch(model, method, bottleneck=5, activation=act, scaling=0.5)
        randomize(model)
        row = ARCHITECTURES[model.config.model_type]
        table = dict.fromkeys(row.mlp_input, "input") | dict.fromkeys(row.mlp_output, "output")
        positions = {n: m.position for n, m in adapter_modules(model)}
        assert len(positions) == 2 * len(table)  # two layers, every MLP projection
        if method == "series":
            for name, pos in positions.items():
                assert pos == next(v for k, v in table.items() if name.endswith("." + k))
            assert {"input", "output"} == set(positions.values())
        else:
            assert set(positions.values()) == {"parallel"}
        with torch.no_grad():
            got = model(ids).logits
        want = formula_logits(arch, adapters_of(model), ids)
        assert rel_err(got, want) < 1e-5, (arch, method)
        assert rel_err(got, base) > 1e-3  # the adapters do change the output


def test_adapterp_targets_only_the_output_projection_and_explicit_positions():
    ids = tokens(1, 6)
    model = tiny_model("llama")
    fa.patch(model, "series", bottleneck=3, targets="mlp-output")
    assert all(n.endswith("down_proj") for n in model.fastadapt_state.modules)
    fa.unpatch(model)
    # a module outside the MLP table needs an explicit side
    with pytest.raises(ValueError, match=r"not a known MLP input or output projection.*position='input'"):
        fa.patch(model, "series", bottleneck=3, targets=["q_proj"])
    assert getattr(model, "fastadapt_state", None) is None
    assert all(not isinstance(m, BottleneckLinear) for m in model.modules())  # nothing swapped in
    fa.patch(model, "series", bottleneck=3, targets=["q_proj", "o_proj", "down_proj"],
             position={"q_proj": "input", "o_proj": "output"})
    randomize(model)
    pos = {n.rsplit(".", 1)[-1]: m.position for n, m in adapter_modules(model)}
    assert pos == {"q_proj": "input", "o_proj": "output", "down_proj": "output"}
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, formula_logits("llama", adapters_of(model), ids)) < 1e-5


def test_init_zeros_changes_nothing_and_bert_init_is_normal_002():
    ids = tokens(2, 5)
    with torch.no_grad():
        base = tiny_model("opt")(ids).logits
    model = tiny_model("opt")
    fa.patch(model, "series", bottleneck=64, init="zeros")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    model = tiny_model("llama")
    torch.manual_seed(0)
    fa.patch(model, "parallel", bottleneck=64)
    w = torch.cat([m.adapter_up.weight.flatten() for _, m in adapter_modules(model)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert all(p.requires_grad == ("adapter_" in n) for n, p in model.named_parameters())
    names = [n for n, _ in model.named_parameters() if "adapter_" in n]
    assert "model.layers.0.mlp.gate_proj.adapter_down.weight" in names
    assert tuple(model.model.layers[0].mlp.down_proj.adapter_down.weight.shape) == (64, 72)
    assert tuple(model.model.layers[0].mlp.down_proj.adapter_up.weight.shape) == (48, 64)


# -- training ---------------------------------------------------------------------------------------


def test_learned_scaling_trains_and_gradients_match_float64():
    ids = tokens(2, 7)
    model = tiny_model("llama").train()
    fa.patch(model, "series", bottleneck=4, scaling="learned", dropout=0.0)
    randomize(model)
    loss = model(ids, labels=ids).loss
    loss.backward()
    scalings = [m.adapter_scaling for _, m in adapter_modules(model)]
    assert all(s.grad is not None and s.grad.abs().item() > 0 for s in scalings)
    # gradients vs a float64 model built from the same weights
    model64 = tiny_model("llama").double().train()
    fa.patch(model64, "series", bottleneck=4, scaling="learned")
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    model64(ids, labels=ids).loss.backward()
    p64 = dict(model64.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, n
            assert norm_rel_err(p.grad, p64[n].grad) < 1e-4, n
    before = [s.detach().clone() for s in scalings]
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(b, s) for b, s in zip(before, scalings))


def test_tiny_llama_triton_backend_equals_torch_backend(monkeypatch):
    ids = tokens(2, 9)
    for method in ("series", "parallel"):
        out = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("FASTADAPT_BACKEND", backend)
            model = tiny_model("llama").train()
            fa.patch(model, method, bottleneck=5, scaling="learned", activation="silu", dropout=0.0)
            randomize(model, scale=0.1)
            res = model(ids, labels=ids)
            res.loss.backward()
            out[backend] = (res.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert rel_err(out["triton"][0], out["torch"][0]) < 1e-5, method
        for n, g in out["torch"][1].items():
            assert g.abs().sum() > 0, n
            assert norm_rel_err(out["triton"][1][n], g) < 1e-5, (method, n)


# -- checkpoints --------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    ids = tokens(2, 6)
    for method, arch in (("series", "gpt2"), ("parallel", "bloom")):
        model = tiny_model(arch)
        fa.patch(model, method, bottleneck=6, scaling="learned", activation="relu")
        randomize(model)
        with torch.no_grad():
            want = model(ids).logits
        path = tmp_path / method
        fa.save_adapter(model, path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "BOTTLENECK" and cfg["bottleneck_size"] == 6 and cfg["scaling"] == "learned"
        assert cfg["use_parallel_adapter"] is (method == "parallel") and cfg["non_linearity"] == "relu"
        from safetensors.torch import load_file

        keys = set(load_file(str(path / "adapter_model.safetensors")))
        first = next(iter(model.fastadapt_state.modules))
        assert {f"base_model.model.{first}.{k}" for k in ("adapter_down.weight", "adapter_up.weight",
                                                          "adapter_scaling")} <= keys
        fresh = fa.load_adapter(tiny_model(arch), path)
        assert fresh.fastadapt_state.method == method
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, want)


def _write_llm_adapters_checkpoint(path, *, targets, parallel, scaling, adapterp=False, act="tanh", b=4, seed=0,
                                   extra_key=None):
    """An LLM-Adapters bottleneck checkpoint written by hand: their config fields and a torch.save'd
    dict with keys base_model.model.<path>.adapter_down.weight (b, d) / adapter_up.weight (d, b)."""
    model = tiny_model("llama")
    d, ffn = model.config.hidden_size, model.config.intermediate_size
    sides = {"gate_proj": (d, d), "up_proj": (d, d), "down_proj": (d, d), "q_proj": (d, d), "v_proj": (24, 24)}
    if parallel:
        sides = {"gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d), "q_proj": (d, d), "v_proj": (d, 24)}
    g = torch.Generator().manual_seed(seed)
    tensors, adapters = {}, {}
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in targets:
            continue
        d_a_in, d_a_out = sides[last]
        wd = torch.randn(b, d_a_in, generator=g) * 0.3
        wu = torch.randn(d_a_out, b, generator=g) * 0.3
        tensors[f"base_model.model.{name}.adapter_down.weight"] = wd.half()  # they train in fp16
        tensors[f"base_model.model.{name}.adapter_up.weight"] = wu.half()
        s = scaling
        if scaling == "learned":
            s = torch.tensor([0.6])
            tensors[f"base_model.model.{name}.adapter_scaling"] = s
        pos = "parallel" if parallel else ("output" if last == "down_proj" else "input")
        adapters[name] = (pos, wd.half().float(), wu.half().float(), s, act)
    if extra_key:
        tensors[extra_key] = torch.zeros(1)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "base_model_name_or_path": "yahma/llama-7b-hf", "bias": "none", "bottleneck_size": b,
        "adapter_dropout": 0.0, "inference_mode": True, "init_lora_weights": True, "init_weights": "bert",
        "modules_to_save": None, "non_linearity": act, "peft_type": "BOTTLENECK", "scaling": scaling,
        "target_modules": list(targets), "task_type": "CAUSAL_LM", "use_adapterp": adapterp,
        "use_parallel_adapter": parallel,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    torch.save(tensors, path / "adapter_model.bin")
    return adapters


@pytest.mark.parametrize("case", ["adapterh", "adapterp", "parallel"])
def test_llm_adapters_checkpoint_gives_the_formula_logits(tmp_path, case):
    ids = tokens(2, 7)
    kw = {
        "adapterh": {"targets": ["gate_proj", "up_proj", "down_proj"], "parallel": False, "scaling": 1.0},
        "adapterp": {"targets": ["down_proj"], "parallel": False, "scaling": "learned", "adapterp": True},
        "parallel": {"targets": ["q_proj", "v_proj", "down_proj"], "parallel": True, "scaling": 2.0, "act": "relu"},
    }[case]
    adapters = _write_llm_adapters_checkpoint(tmp_path, **kw)
    model = fa.load_adapter(tiny_model("llama"), tmp_path)
    assert model.fastadapt_state.method == ("parallel" if kw["parallel"] else "series")
    assert set(model.fastadapt_state.modules) == set(adapters)
    with torch.no_grad():
        got = model(ids).logits
    assert rel_err(got, formula_logits("llama", adapters, ids)) < 1e-5


def test_llm_adapters_checkpoint_strict_keys(tmp_path):
    _write_llm_adapters_checkpoint(tmp_path / "a", targets=["down_proj"], parallel=False, scaling=1.0,
                                   extra_key="base_model.model.model.layers.0.mlp.gate_proj.adapter_down.weight")
    model = tiny_model("llama")
    with pytest.raises(KeyError, match="unexpected key"):
        fa.load_adapter(model, tmp_path / "a")
    assert getattr(model, "fastadapt_state", None) is None  # left as it was
    _write_llm_adapters_checkpoint(tmp_path / "b", targets=["down_proj"], parallel=False, scaling=1.0, b=3)
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    cfg["bottleneck_size"] = 5
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        fa.load_adapter(model, tmp_path / "b")


# -- bad options and merge --------------------------------------------------------------------------


@pytest.mark.parametrize("options,error,match", [
    ({"bottleneck": 0}, ValueError, "bottleneck must be a positive int"),
    ({"bottleneck": -3}, ValueError, "bottleneck must be a positive int"),
    ({"bottleneck": 2.5}, TypeError, "bottleneck must be a positive int"),
    ({"activation": "gelu_new"}, ValueError, "activation must be one of"),
    ({"scaling": "big"}, ValueError, "scaling must be a finite number or 'learned'"),
    ({"scaling": True}, ValueError, "scaling must be a finite number or 'learned'"),
    ({"scaling": float("inf")}, ValueError, "scaling must be a finite number or 'learned'"),
    ({"dropout": 1.0}, ValueError, "dropout must be in"),
    ({"init": "xavier"}, ValueError, "init must be one of"),
    ({"position": "middle"}, ValueError, "position must be"),
    ({"r": 8}, TypeError, "unknown option"),
])
def test_bad_options_give_clear_errors(options, error, match):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        fa.patch(model, "series", **options)
    assert getattr(model, "fastadapt_state", None) is None


def test_parallel_rejects_position_and_unknown_model_type_needs_targets():
    with pytest.raises(ValueError, match="position applies to series adapters only"):
        fa.patch(tiny_model("llama"), "parallel", position="input")
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="no MLP table for model_type 'mystery'"):
        fa.patch(model, "series")
    fa.patch(model, "parallel", targets=["q_proj"], bottleneck=2)  # explicit targets work anywhere


def test_merge_is_an_error_that_explains_why():
    model = tiny_model("llama")
    fa.patch(model, "series", bottleneck=4)
    with pytest.raises(ValueError, match="non-linear.*fa.save_adapter"):
        fa.merge(model)
    fa.unpatch(model)
    assert not any(isinstance(m, BottleneckLinear) for m in model.modules())
