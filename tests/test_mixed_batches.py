"""Mixed batches (``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``):
each row equals that row run alone on its adapter (a fresh model holding only it: fp32 logits within
1e-5, greedy tokens identical), LoRA equals PEFT's ``adapter_names`` (logits, greedy and beam tokens),
DoRA rows equal PEFT's single-adapter DoRA, series and parallel adapters too; rows are grouped once
per forward; PEFT's refusals (training mode, unknown names, merged adapters) and ours (prefix tuning)."""

from __future__ import annotations

import importlib

import pytest
import torch
from named_adapters import LORA_SPECS, alone, folders, loaded, peft_folders
from tiny_models import tiny_model, tokens

import fastadapt as fa
from fastadapt.ops.lora_mixed import SlotRows

NAMES = {"lora": list(LORA_SPECS), "dora": list(LORA_SPECS), "series": ["s1", "s2", "s3"],
         "parallel": ["p1", "p2", "p3"]}


def _rows(method: str) -> list[str]:
    a, b, c = NAMES[method]
    return [a, b, "__base__", c, b, a, "__base__"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds spin-waits on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["lora", "dora", "series", "parallel"])
def test_each_row_equals_that_row_alone_on_its_adapter(method, tmp_path):
    paths = folders(tmp_path, method)
    model = loaded(paths)
    names = _rows(method)
    ids = tokens(len(names), 9, seed=5)
    with torch.no_grad():
        got = model(ids, adapter_names=names).logits
        base = tiny_model("llama")(ids).logits
        singles = {n: alone(p)(ids).logits for n, p in paths.items()}
    for i, name in enumerate(names):
        want = base[i] if name == "__base__" else singles[name][i]
        err = (got[i] - want).abs().max().item()
        assert err <= 1e-5, f"row {i} ({name}): {err:.3g}"
        if name != "__base__":
            assert (want - base[i]).abs().max() > 1e-2, "the adapter must change the row (else the test is vacuous)"


@pytest.mark.parametrize("method", ["lora", "dora", "series", "parallel"])
def test_greedy_generation_of_each_row_equals_the_row_alone(method, tmp_path):
    """Left-padded prompts of different lengths, greedy: every row's tokens are those of the row
    generated alone (no padding) by a model holding only its adapter."""
    paths = folders(tmp_path, method)
    model = loaded(paths)
    names = _rows(method)
    lengths = [5, 9, 7, 3, 9, 6, 4]
    full = tokens(len(names), 9, seed=8)
    ids = torch.zeros_like(full)
    mask = torch.zeros_like(full)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = full[i, :n]
        mask[i, 9 - n:] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=6,
                         min_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, (name, n) in enumerate(zip(names, lengths)):
        single = tiny_model("llama").eval() if name == "__base__" else alone(paths[name])
        want = single.generate(input_ids=full[i:i + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                               max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, 9:], want[0, n:]), f"row {i} ({name})"


def test_lora_mixed_batch_equals_peft_adapter_names(tmp_path):
    peft = pytest.importorskip("peft")
    paths = peft_folders(tmp_path)
    ours = loaded(paths)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), paths["math"], adapter_name="math")
    for name in ("code", "chat"):
        theirs.load_adapter(paths[name], adapter_name=name)
    theirs.eval()
    names = _rows("lora")
    ids = tokens(len(names), 8, seed=2)
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # a left-padded row
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, adapter_names=names).logits
        want = theirs(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert (got - want).abs().max() <= 1e-5
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, adapter_names=names, **kw),
                       theirs.generate(input_ids=ids, adapter_names=names, **kw))
    beams = {"num_beams": 2, **kw}  # the names repeat with the beams, as in PEFT
    assert torch.equal(ours.generate(ids, adapter_names=names, **beams),
                       theirs.generate(input_ids=ids, adapter_names=names, **beams))


def test_dora_rows_equal_peft_dora_on_each_adapter(tmp_path):
    """PEFT refuses DoRA in mixed batches; each of our DoRA rows equals PEFT's DoRA model with that
    adapter active."""
    peft = pytest.importorskip("peft")
    paths = peft_folders(tmp_path, dora=True)
    ours = loaded(paths)

    def peft_model():
        model = peft.PeftModel.from_pretrained(tiny_model("llama"), paths["math"], adapter_name="math")
        for name in ("code", "chat"):
            model.load_adapter(paths[name], adapter_name=name)
        return model.eval()

    names = _rows("dora")
    ids = tokens(len(names), 7, seed=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="DoRA"):  # (its hooks stay behind after the refusal: a fresh model below)
            peft_model()(input_ids=ids, adapter_names=names)
        theirs = peft_model()
        got = ours(ids, adapter_names=names).logits
        for name in set(names) - {"__base__"}:
            theirs.set_adapter(name)
            want = theirs(input_ids=ids).logits
            for i in (i for i, n in enumerate(names) if n == name):
                assert (got[i] - want[i]).abs().max() <= 1e-5, (name, i)


def test_rows_are_grouped_once_per_forward_not_per_layer(tmp_path, monkeypatch):
    """Layers holding the same adapters share one row grouping per forward: the groupings made are
    as many as the distinct sets of adapters a layer holds, whatever the number of layers."""
    paths = peft_folders(tmp_path)
    model = loaded(paths)
    made = []
    real = SlotRows.__init__

    def counting(self, *args, **kwargs):
        made.append(args)
        real(self, *args, **kwargs)

    monkeypatch.setattr(SlotRows, "__init__", counting)
    wrapped = [m for _, m in fa.methods.wrapped_modules(model)]
    layouts = {(m.active, tuple(m.bank.names) if m.bank is not None else ()) for m in wrapped}
    with torch.no_grad():
        model(tokens(4, 5), adapter_names=["math", "code", "chat", "__base__"])
    assert len(wrapped) > 2 * len(layouts)  # per-layer grouping would make more than the bound below
    assert 0 < len(made) <= 2 * len(layouts), (len(made), layouts)  # an active and a bank grouping per set


def test_refusals_name_the_problem(tmp_path):
    paths = peft_folders(tmp_path)
    model = loaded(paths)
    ids = tokens(2, 5)
    with pytest.raises(ValueError, match="does not hold"):
        model(ids, adapter_names=["math", "nope"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(ids, adapter_names="math")
    with pytest.raises(ValueError, match="one adapter name per row"):
        with torch.no_grad():
            model(ids, adapter_names=["math"])
    model.train()
    with pytest.raises(ValueError, match="inference only"):
        model(ids, adapter_names=["math", "code"])
    model.eval()
    fa.merge(model)
    with pytest.raises(ValueError, match="merged"):
        model(ids, adapter_names=["math", "code"])
    fa.unmerge(model)
    with torch.no_grad():  # the failed calls left nothing behind
        assert model(ids, adapter_names=["math", "code"]).logits.shape[0] == 2
    prefix = tiny_model("llama")
    fa.patch(prefix, "prefix", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="prefix tuning has no named adapters"):
        prefix(ids, adapter_names=["default", "default"])


def test_triton_backend_in_the_interpreter_matches_the_torch_path(tmp_path, monkeypatch):
    paths = peft_folders(tmp_path, dora=True)
    model = loaded(paths)
    names = _rows("dora")
    with torch.no_grad():
        for t in (1, 6):  # decode form and segmented form
            ids = tokens(len(names), t, seed=t)
            monkeypatch.setenv("FASTADAPT_BACKEND", "torch")
            want = model(ids, adapter_names=names).logits
            monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
            got = model(ids, adapter_names=names).logits
            assert (got - want).abs().max() <= 1e-4


def test_bf16_mixed_batch_is_close_to_rows_alone(tmp_path):
    """A bf16 model with fp32 adapters (as fa.load_adapter makes them): each row within bf16 noise
    of the row alone (the scaling is applied in fp32, never rounded to 16 bits)."""
    paths = peft_folders(tmp_path)
    model = tiny_model("llama", dtype=torch.bfloat16)
    for name, path in paths.items():
        fa.load_adapter(model, path, adapter_name=name)
    names = _rows("lora")
    ids = tokens(len(names), 6, seed=4)
    with torch.no_grad():
        got = model.eval()(ids, adapter_names=names).logits.float()
        for name, path in paths.items():
            single = tiny_model("llama", dtype=torch.bfloat16)
            fa.load_adapter(single, path)
            want = single.eval()(ids).logits.float()
            for i in (i for i, n in enumerate(names) if n == name):
                assert (got[i] - want[i]).abs().max() <= 0.05 * want[i].abs().max(), (name, i)


def test_backend_is_decided_once_per_forward_and_bank_layouts_follow_every_write(tmp_path, monkeypatch):
    """The backend of a mixed forward is decided once per row plan (shape class), not per layer call;
    a bank's host layout (offsets, ranks, scalings), memoized between writes, follows a slot that
    grows, an adapter that goes and one that comes: the source a layer reads always equals the
    layout formed afresh."""
    lm = importlib.import_module("fastadapt.ops.lora_mixed")  # the module (fastadapt.ops exports the function)
    paths = peft_folders(tmp_path)
    model = loaded(paths)
    calls = []
    real = lm.selected_backend
    monkeypatch.setattr(lm, "selected_backend", lambda *a, **k: calls.append(a) or real(*a, **k))
    with torch.no_grad():
        model(tokens(3, 5), adapter_names=["math", "code", "__base__"])
    wrapped = [m for _, m in fa.methods.wrapped_modules(model)]
    assert len(wrapped) > 2 and 0 < len(calls) <= 2, len(calls)  # one per op kind, not per layer

    def fresh(bank):
        return (tuple(bank.offsets), tuple(bank.capacities), tuple(s.rank for s in bank.settings),
                tuple(s.scaling for s in bank.settings))

    module = next(m for m in wrapped if m.bank is not None and len(m.bank.names) >= 1)
    bank = module.bank
    a, b = torch.randn(2, module.in_features), torch.randn(module.out_features, 2)
    bank.source(module, torch.float32)  # fills the memo
    settings = bank.settings[0].__class__(rank=2, scaling=0.5)
    bank.put("extra", module, {"lora_A.weight": a, "lora_B.weight": b}, settings)  # a new slot
    src = bank.source(module, torch.float32)
    assert (src.offsets, src.capacities, src.ranks, src.scalings_host) == fresh(bank)
    grown = bank.settings[0].__class__(rank=12, scaling=0.25)
    bank.put("extra", module, {"lora_A.weight": torch.randn(12, module.in_features),
                               "lora_B.weight": torch.randn(module.out_features, 12)}, grown)  # the slot grows
    src = bank.source(module, torch.float32)
    assert (src.offsets, src.capacities, src.ranks, src.scalings_host) == fresh(bank)
    assert src.ranks[-1] == 12 and src.scalings_host[-1] == 0.25
    rescaled = bank.settings[0].__class__(rank=12, scaling=0.75)  # in place: same rank, another scaling
    bank.put("extra", module, {"lora_A.weight": torch.randn(12, module.in_features),
                               "lora_B.weight": torch.randn(module.out_features, 12)}, rescaled)
    src = bank.source(module, torch.float32)
    assert (src.offsets, src.capacities, src.ranks, src.scalings_host) == fresh(bank)
    assert src.scalings_host[-1] == 0.75
    bank.remove(bank.names[0])  # the slots after it move up
    src = bank.source(module, torch.float32)
    assert (src.offsets, src.capacities, src.ranks, src.scalings_host) == fresh(bank)
