"""LoRA in a model: target selection, the swap, and PEFT's ``adapter_config.json`` both ways."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...architectures import lookup, model_type, shared_input_groups
from ...modules import LoraLinear
from ...modules.lora import SharedInputGroup
from ..state import adapter_modules
from ..targets import (
    candidate_names,
    check_not_tied,
    minimal_targets,
    select_targets,
    swap_module,
    warn_large_rank,
)
from .config import LoraConfig

PEFT_TYPE = "LORA"

# PEFT LoRA options that change the math; a value other than these defaults cannot be honoured.
# (``use_dora: true`` is honoured: it selects the "dora" method, fastadapt/methods/dora.)
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "modules_to_save": None,
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def resolve_targets(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    if targets == "auto":
        arch = lookup(model)
        if arch is None:
            raise ValueError(
                f"targets='auto' has no default for model_type {model_type(model)!r}; pass targets= a list of "
                f"module names, e.g. {candidate_names(model)[:8]}, or 'all-linear'"
            )
        targets = arch.lora_targets
    return select_targets(model, targets)


def apply(model: nn.Module, config: LoraConfig) -> tuple[list[str], list]:
    names = swap_in(model, config, LoraLinear)
    _group_shared_inputs(model, names)
    return names, []


def swap_in(model: nn.Module, config: LoraConfig, module_class: type[LoraLinear]) -> list[str]:
    """Put a ``module_class`` (LoraLinear or a subclass) on every target; returns their names."""
    names = resolve_targets(model, config.targets)
    check_not_tied(model, names)
    warn_large_rank(model, names, config.r)
    for name in names:
        base = model.get_submodule(name)
        swap_module(model, name, module_class(base, r=config.r, alpha=config.alpha, dropout=config.dropout,
                                              rslora=config.rslora))
    return names


def _group_shared_inputs(model: nn.Module, names: list[str]) -> None:
    """Siblings fed the same tensor (the architecture's q/k/v, gate/up) share one pass over it."""
    by_parent: dict[str, dict[str, LoraLinear]] = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        by_parent.setdefault(parent, {})[attr] = model.get_submodule(name)
    for siblings in by_parent.values():
        for shared in shared_input_groups(model):
            members = [siblings[a] for a in shared if a in siblings]
            if len(members) < 2:
                continue
            first = members[0]
            w = first.base_layer.weight
            if all(
                m.in_features == first.in_features
                and m.base_layer.weight.dtype == w.dtype
                and m.base_layer.weight.device == w.device
                and m.scaling == first.scaling
                and m.dropout == first.dropout
                for m in members
            ):
                group = SharedInputGroup(members)
                for m in members:
                    m.group = group


def adapter_config(model: nn.Module, config: LoraConfig) -> dict[str, Any]:
    """PEFT's LoRA ``adapter_config.json``."""
    modules = dict(adapter_modules(model))
    return {
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": minimal_targets(model, list(modules)),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules.values()),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def read_config(config: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The ``fa.patch(model, "lora" | "dora", ...)`` options of a fastadapt or PEFT LoRA adapter
    (PEFT's DoRA is a LoRA config with ``use_dora: true``)."""
    for key, default in _UNSUPPORTED_PEFT_FIELDS.items():
        value = config.get(key)
        if value not in (None, {}, [], False) and value != default:
            raise ValueError(
                f"adapter at {path!r} sets {key}={value!r}, which fastadapt does not support (expected {default!r})"
            )
    targets = config.get("target_modules")
    if targets is None:
        raise ValueError(f"adapter config at {path!r} has no target_modules")
    # A list of suffixes, or a string: "all-linear" or a regex (as in PEFT).
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"adapter config at {path!r} needs r, a positive int; got {r!r}")
    use_dora = config.get("use_dora", False)
    if use_dora not in (None, False, True):
        raise ValueError(f"adapter config at {path!r} has use_dora={use_dora!r}; expected true or false")
    return ("dora" if use_dora else "lora"), {
        "r": r,
        "alpha": config.get("lora_alpha", 8),
        "dropout": float(config.get("lora_dropout", 0.0)),
        "rslora": bool(config.get("use_rslora", False)),
        "targets": targets,
    }


def check_loaded(model: nn.Module, config: LoraConfig, options: dict[str, Any], saved: dict, path: str) -> None:
    """A model already patched with LoRA (or DoRA) takes the weights only if rank and scaling agree."""
    for field_name, ours in (("r", config.r), ("alpha", config.alpha), ("rslora", config.rslora)):
        if options[field_name] != ours:
            raise ValueError(
                f"model is patched with {field_name}={ours!r} but the adapter at {path!r} has "
                f"{field_name}={options[field_name]!r}; load it into an unpatched model"
            )
