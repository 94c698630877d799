"""Every field of PEFT's ``LoraConfig``, enumerated from the dataclass at test time, is classified in
``fastadapt.methods.lora.peft_fields``: a supported field (and each value of an enumerated one)
loads a PEFT-built adapter through ``fa.load_adapter`` with PEFT's logits (≤ 1e-5 relative, fp32),
a refused one is an error naming it. A field a new PEFT adds fails ``test_every_field_is_classified``
until it is classified there and given a case here. Random combinations of the supported fields:
test_peft_lora_properties.py."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import types
import typing
from pathlib import Path

import pytest
import torch
from helpers import rel_err
from peft_adapters import TARGETS, edit_config, logits, peft_adapter, peft_model, train_like
from tiny_models import tiny_model

import fastadapt as fa
from fastadapt.methods.lora import peft_fields

peft = pytest.importorskip("peft")
lora_config_module = pytest.importorskip("peft.tuners.lora.config")

FIELDS = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
HINTS = typing.get_type_hints(peft.LoraConfig)


def enumerated_values(tp) -> list:
    """The values a field's type enumerates: a bool's two, a Literal's, an Enum's (recursively through
    Optional/Union)."""
    if tp is bool:
        return [True, False]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [m.value for m in tp]
    if origin in (typing.Union, types.UnionType):
        return [v for arg in typing.get_args(tp) for v in enumerated_values(arg)]
    return []


def concrete(value):
    """A Literal placeholder as a real value ('pissa_niter_[number of iters]' -> 'pissa_niter_4')."""
    return value.replace("[number of iters]", "4") if isinstance(value, str) else value


def default_of(name: str):
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# -- the cases: field -> supported builds (LoraConfig kwargs, on llama unless "arch" says) ----------

SUPPORTED: dict[str, list[dict]] = {
    "task_type": [{"task_type": "CAUSAL_LM"}],
    "peft_type": [{}],  # LORA: every build here; the other types are refused (test_interop.py)
    "auto_mapping": [{}],  # written by PEFT itself when task_type is None
    "peft_version": [{}],  # written by PEFT itself
    "base_model_name_or_path": [{"name_or_path": "org/some-model"}],
    "revision": [{"revision": "v1.0"}],
    "inference_mode": [{"inference_mode": True}],
    "r": [{"r": 1}, {"r": 7}],
    "target_modules": [{"target_modules": ["o_proj", "down_proj"]}, {"target_modules": r".*\.(k_proj|up_proj)"},
                       {"target_modules": "all-linear"}],
    "lora_alpha": [{"lora_alpha": 3}, {"lora_alpha": 20.5}],
    "lora_dropout": [{"lora_dropout": 0.2}],
    "fan_in_fan_out": [{"arch": "gpt2", "fan_in_fan_out": True}],
    "use_rslora": [{"use_rslora": True}, {"arch": "gpt2", "use_rslora": True, "init_lora_weights": "pissa"}],
    "init_lora_weights": [
        {"init_lora_weights": False}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": "orthogonal"},
        {"init_lora_weights": "eva"}, {"init_lora_weights": "mica"}, {"init_lora_weights": "nora"},
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"}, {"arch": "gpt2", "init_lora_weights": "pissa"},
        {"init_lora_weights": "pissa", "use_rslora": True, "r": 3},
    ],
    "megatron_core": [{"megatron_core": "other.core"}],
    # PEFT drops a loftq_config unless the init is LoftQ (refused); another writer's file may keep it
    "loftq_config": [{"json": {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}}],
    "eva_config": [{"eva_config": peft.EvaConfig(rho=1.0)}],
    "corda_config": [{"corda_config": lora_config_module.CordaConfig()}],
    "astra_config": [{"astra_config": lora_config_module.AstraConfig()}],  # kept by PEFT unless init_lora_weights='astra'
    "lora_ga_config": [{"lora_ga_config": peft.LoraGAConfig()}],
    "qalora_group_size": [{"qalora_group_size": 8}],
    "runtime_config": [{"json": {"runtime_config": {"ephemeral_gpu_offload": True}}}],  # PEFT never saves it
    "ensure_weight_tying": [{"ensure_weight_tying": True}],
    "use_dora": [{"use_dora": True}, {"arch": "gpt2", "use_dora": True, "use_rslora": True}],  # loads as "dora"
}

#: field -> refused values (written into a saved PEFT config; PEFT_BUILT also builds them in PEFT)
REFUSED: dict[str, list] = {
    "task_type": ["SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"],
    "exclude_modules": [["o_proj"], "o_proj"],
    "layers_to_transform": [0, [1]],
    "layers_pattern": ["layers"],
    "bias": ["all", "lora_only"],
    "modules_to_save": [["lm_head"]],
    "rank_pattern": [{"q_proj": 2}],
    "alpha_pattern": [{"q_proj": 2}],
    "megatron_config": [{"tensor_model_parallel_size": 1}],
    "trainable_token_indices": [[3, 4]],
    "velora_config": [{"num_groups": 64}],
    "alora_invocation_tokens": [[5, 6]],
    "use_qalora": [True],
    "monteclora_config": [{"num_samples": 8}],
    "layer_replication": [[[0, 2], [1, 2]]],
    "lora_bias": [True],
    "target_parameters": [["mlp.experts.gate_up_proj"]],
    "use_bdlora": [{"target_modules_bd_a": ["q_proj"]}],
    "arrow_config": [{"top_k": 2}],
    "kasa_config": [{"beta": 1e-4}],
    "init_lora_weights": ["pissa_niter_4", "corda", "astra", "loftq", "lora_ga"],
}

#: refused configurations PEFT builds offline, to refuse a real PEFT folder and not only an edited one
PEFT_BUILT = [
    {"bias": "all"}, {"bias": "lora_only"}, {"modules_to_save": ["lm_head"]},
    {"rank_pattern": {"q_proj": 2}}, {"alpha_pattern": {"v_proj": 3}}, {"layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj"]}, {"lora_bias": True},
    {"trainable_token_indices": [3, 4]}, {"layer_replication": [[0, 2], [1, 2]]}, {"kasa_config": peft.KasaConfig()},
    {"velora_config": peft.VeloraConfig()}, {"monteclora_config": peft.MontecloraConfig()},
    {"alora_invocation_tokens": [5, 6]}, {"use_qalora": True}, {"init_lora_weights": "pissa_niter_4"},
    {"init_lora_weights": "lora_ga"},
]


# -- the classification is complete ------------------------------------------------------------


def test_every_field_is_classified():
    classified = set(peft_fields.READ) | set(peft_fields.IGNORED) | set(peft_fields.REFUSED)
    new = sorted(set(FIELDS) - classified)
    assert not new, f"PEFT's LoraConfig has fields fastadapt has not classified: {new} (peft_fields.py, docs/interop.md)"
    assert not set(peft_fields.READ) & set(peft_fields.IGNORED)
    assert not (set(peft_fields.READ) | set(peft_fields.IGNORED)) & set(peft_fields.REFUSED)


def test_every_field_has_cases():
    for name in FIELDS:
        if name in peft_fields.REFUSED:
            assert REFUSED.get(name), f"refused field {name!r} needs a refusal case"
        else:
            assert SUPPORTED.get(name), f"supported field {name!r} needs a PEFT-built case"


@pytest.mark.parametrize("name", [n for n in FIELDS if enumerated_values(HINTS[n]) and n != "peft_type"])
def test_every_value_of_an_enumerated_field_is_classified(name):
    supported = {default_of(name)} | {case[name] for case in SUPPORTED.get(name, []) if name in case}
    refused = set(map(json.dumps, REFUSED.get(name, [])))
    for value in map(concrete, enumerated_values(HINTS[name])):
        assert (value in supported) != (json.dumps(value) in refused), (name, value)


# -- supported: PEFT-built, loaded with PEFT's logits ----------------------------------------------


def cases(table):
    return [pytest.param(field, case, id=f"{field}-{i}") for field, items in table.items() for i, case in enumerate(items)]


@pytest.mark.parametrize("field, case", cases(SUPPORTED))
def test_supported_field_loads_with_peft_logits(field, case, tmp_path):
    case = dict(case)
    arch = case.pop("arch", "llama")
    theirs = peft_adapter(tmp_path, arch=arch, json_fields=case.pop("json", None), **case)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved[field] != default_of(field)  # the case sets the field to something else than the default
    ours = fa.load_adapter(tiny_model(arch), tmp_path)
    assert rel_err(logits(ours), logits(theirs)) <= 1e-5


def test_residual_inits_load_as_the_rank_2r_lora_peft_converts_them_to(tmp_path):
    """PiSSA: fastadapt's load equals PEFT's own conversion (path_initial_model_for_weight_conversion),
    the base weight is untouched, and fastadapt's save of it loads in PEFT with the same logits."""
    theirs = peft_model(init_lora_weights="pissa")
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    train_like(theirs).save_pretrained(tmp_path / "pissa")
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["init_lora_weights"] is True
    fresh = tiny_model("llama")
    base = {n: p.clone() for n, p in fresh.named_parameters()}
    ours = fa.load_adapter(fresh, tmp_path / "pissa")
    assert ours.fastadapt_state.config.r == 8 and ours.fastadapt_state.config.alpha == 16
    assert all(torch.equal(p, base[n.replace(".base_layer", "")]) for n, p in ours.named_parameters() if n.replace(".base_layer", "") in base)
    assert rel_err(logits(ours), logits(theirs)) <= 1e-5
    converted = fa.load_adapter(tiny_model("llama"), tmp_path / "converted")
    assert rel_err(logits(converted), logits(ours)) <= 1e-5
    fa.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    assert rel_err(logits(back), logits(theirs)) <= 1e-5
    patched = fa.patch(tiny_model("llama"), "lora", r=4, alpha=8, targets=TARGETS["llama"])
    with pytest.raises(ValueError, match=r"patched with r=4 .* has r=8 \(its pissa r=4 loads as rank 2r"):
        fa.load_adapter(patched, tmp_path / "pissa")
    patched = fa.patch(tiny_model("llama"), "lora", r=8, alpha=16, targets=TARGETS["llama"])
    assert rel_err(logits(fa.load_adapter(patched, tmp_path / "pissa")), logits(theirs)) <= 1e-5


# -- refused: an error naming the field --------------------------------------------------------------


def copy_with(source: Path, folder: Path, **fields) -> None:
    """A copy of the adapter folder ``source`` in ``folder`` with ``fields`` set in its config."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    edit_config(folder, **fields)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    peft_adapter(folder)
    return folder


@pytest.mark.parametrize("field, value", cases(REFUSED))
def test_refused_field_is_an_error_naming_it(field, value, plain_folder, tmp_path):
    copy_with(plain_folder, tmp_path, **{field: value})
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=re.escape(f"sets {field}={value!r}")):
        fa.load_adapter(model, tmp_path)
    assert not hasattr(model, "fastadapt_state")


@pytest.mark.parametrize("case", PEFT_BUILT, ids=lambda c: "-".join(c))
def test_refused_peft_built_adapter_is_an_error_naming_the_field(case, tmp_path):
    field = "init_lora_weights" if "init_lora_weights" in case else next(k for k in case if k != "target_modules")
    if case.get("init_lora_weights") == "lora_ga":  # PEFT builds it from gradients; without them it falls back
        peft_adapter(tmp_path, **{**case, "lora_ga_config": peft.LoraGAConfig()})
    else:
        peft_adapter(tmp_path, **case)
    with pytest.raises(ValueError, match=rf"sets {field}="):
        fa.load_adapter(tiny_model("llama"), tmp_path)


def test_a_field_fastadapt_does_not_know_is_refused_unless_empty(plain_folder, tmp_path):
    copy_with(plain_folder, tmp_path, use_hypothetical_variant=None)  # empty: nothing to honour
    fa.load_adapter(tiny_model("llama"), tmp_path)
    edit_config(tmp_path, use_hypothetical_variant=True)
    with pytest.raises(ValueError, match="sets use_hypothetical_variant=True, a field this version of fastadapt does not know"):
        fa.load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("field, value, match", [
    ("lora_dropout", None, r"lora_dropout must be in \[0, 1\), got None"),
    ("lora_dropout", 1.5, r"lora_dropout must be in \[0, 1\), got 1.5"),
    ("r", 0, "r must be a positive int, got 0"),
    ("r", "8", "r must be a positive int, got '8'"),
    ("lora_alpha", None, "lora_alpha must be a finite number, got None"),
    ("use_rslora", "yes", "use_rslora must be a bool, got 'yes'"),
    ("target_modules", None, "has no target_modules"),
])
def test_bad_values_name_the_field(field, value, match, plain_folder, tmp_path):
    copy_with(plain_folder, tmp_path, **{field: value})
    with pytest.raises(ValueError, match=match):
        fa.load_adapter(tiny_model("llama"), tmp_path)
