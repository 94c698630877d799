"""LoRA in a model: target selection, the swap, and PEFT's ``adapter_config.json`` both ways."""

from __future__ import annotations

import math
from typing import Any

import torch
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
from . import peft_fields
from .config import LoraConfig

PEFT_TYPE = "LORA"
#: Options that change how the adapter trains, not what its saved weights compute.
TRAINING_OPTIONS = ("dropout",)


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


def targets(model: nn.Module, config: LoraConfig) -> dict[str, dict[str, Any]]:
    """The modules a LoRA adapter of ``config`` goes on (already wrapped ones included), no options."""
    return dict.fromkeys(resolve_targets(model, config.targets), {})


def build(layer: nn.Module, config: LoraConfig, module_class: type[LoraLinear] = LoraLinear) -> LoraLinear:
    """One target's module, as ``apply`` builds it."""
    return module_class(layer, r=config.r, alpha=config.alpha, dropout=config.dropout, rslora=config.rslora)


def swap_in(model: nn.Module, config: LoraConfig, module_class: type[LoraLinear]) -> list[str]:
    """Put a ``module_class`` (LoraLinear or a subclass) on every target; returns their names."""
    names = resolve_targets(model, config.targets)
    check_not_tied(model, names)
    warn_large_rank(model, names, config.r)
    for name in names:
        base = model.get_submodule(name)
        try:
            new = build(base, config, module_class)
        except (TypeError, ValueError) as e:  # the module's own check: say which target
            raise type(e)(f"target {name!r}: {e}") from None
        swap_module(model, name, new)
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
    """The ``fa.patch(model, "lora" | "dora", ...)`` options of a fastadapt or PEFT LoRA adapter (PEFT's
    DoRA is a LoRA config with ``use_dora: true``); every PEFT field fastadapt cannot honour is refused
    by name (:mod:`.peft_fields`)."""
    where = f"adapter config at {path!r}"
    use_dora = config.get("use_dora", False)
    if use_dora not in (None, False, True):
        raise ValueError(f"{where} has use_dora={use_dora!r}; expected true or false")
    options = peft_fields.read_options(config, where)
    if use_dora and peft_fields.init_kind(config, where) == "residual":
        raise ValueError(f"{where} sets use_dora with init_lora_weights={config['init_lora_weights']!r}: a DoRA "
                         f"adapter with a residual init cannot be loaded exactly; {peft_fields.CONVERT_HINT}")
    return ("dora" if use_dora else "lora"), options


def convert_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], saved: dict[str, Any],
                    path: str) -> dict[str, torch.Tensor]:
    """A PiSSA / OLoRA adapter as the rank-2r LoRA PEFT's own conversion writes: PEFT recomputes the
    initial ``B0``, ``A0`` from the base weight at load and runs ``W - s·B0·A0 + s·B·A``, which is
    ``W + s·[B, -B0]·[A; A0]`` — the same logits, with the base weight left as it is."""
    where = f"adapter at {path!r}"
    if peft_fields.init_kind(saved, where) != "residual":
        return tensors
    init = saved["init_lora_weights"]
    r, alpha = peft_fields.file_rank_and_alpha(saved, where)
    scaling = alpha / (math.sqrt(r) if saved.get("use_rslora") else r)
    out = dict(tensors)
    for name, module in adapter_modules(model):
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_a not in out or key_b not in out:
            continue  # the strict load names the missing key
        for key, shape in ((key_a, (r, module.in_features)), (key_b, (module.out_features, r))):
            if tuple(out[key].shape) != shape:
                raise ValueError(f"adapter key {key!r} has shape {tuple(out[key].shape)}; a {init} adapter with "
                                 f"r={r} on this model needs {shape}")
        a0, b0 = _initial_factors(init, module, r, scaling, _olora_layout(init, module, name, saved, where))
        out[key_a] = torch.cat([out[key_a].float(), a0])
        out[key_b] = torch.cat([out[key_b].float(), -b0], dim=1)
    return out


def _olora_layout(init: str, module: LoraLinear, name: str, saved: dict[str, Any], where: str) -> str:
    """The layout OLoRA's QR ran on for this module in the PEFT that wrote the adapter (see
    ``peft_fields.olora_layout``); for an nn.Linear both layouts are the same weight."""
    layout = peft_fields.olora_layout(saved)
    if init != "olora" or not module.fan_in_fan_out or layout is not None:
        return layout or "linear"
    version = saved.get("peft_version")
    said = f"peft_version={version!r}" if version is not None else "no peft_version (PEFT < 0.18, or another writer)"
    raise ValueError(
        f"{where} is an OLoRA adapter on {name!r}, a Conv1D layer, with {said}: PEFT 0.21 and earlier factorised "
        f"such a weight as stored, 0.22 and later transposed, and the file does not say which; "
        f"{peft_fields.CONVERT_HINT}")


@torch.no_grad()
def _initial_factors(init: str, module: LoraLinear, r: int, scaling: float, layout: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` (r, in) and (out, r), fp32, with ``scaling·B0·A0`` what PEFT's ``pissa_init`` /
    ``olora_init`` subtract from the base weight (the same formulas, on the same fp32 copy of it).
    ``layout``: which weight OLoRA's QR factorises — ``"linear"`` (out, in) as PEFT >= 0.22, or
    ``"stored"`` (a Conv1D's (in, out) weight as stored) as PEFT <= 0.21."""
    if init == "pissa":  # the top-r singular triplets of W (out, in), split as PEFT splits them
        u, s, vh = torch.linalg.svd(module.base_weight_nk().float(), full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        return root[:, None] * vh[:r], u[:, :r] * root
    stored = layout == "stored" and module.fan_in_fan_out
    q, rr = torch.linalg.qr((module.base_layer.weight if stored else module.base_weight_nk()).float())
    a0, b0 = rr[:r], q[:, :r]
    if stored:  # the stored weight is (in, out): its correction is (B0·A0)ᵀ
        a0, b0 = b0.t(), a0.t()
    return a0.contiguous(), b0.contiguous()


def check_loaded(model: nn.Module, config: LoraConfig, options: dict[str, Any], saved: dict, path: str) -> None:
    """A model already patched with LoRA (or DoRA) takes the weights only if rank and scaling agree."""
    init = saved.get("init_lora_weights")
    residual = f" (its {init} r={saved.get('r')!r} loads as rank 2r: docs/interop.md)" if isinstance(init, str) \
        and init in peft_fields.RESIDUAL_INITS else ""
    for field_name, ours in (("r", config.r), ("alpha", config.alpha), ("rslora", config.rslora)):
        if options[field_name] != ours:
            raise ValueError(
                f"model is patched with {field_name}={ours!r} but the adapter at {path!r} has "
                f"{field_name}={options[field_name]!r}{residual}; load it into an unpatched model"
            )
