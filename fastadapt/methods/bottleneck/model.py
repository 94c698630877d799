"""Bottleneck adapters in a model: targets, sides, the swap, and LLM-Adapters' files both ways."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...architectures import ARCHITECTURES, lookup, matches, model_type
from ...modules import BottleneckLinear
from ...ops.reference import BOTTLENECK_ACTIVATIONS
from ..state import adapter_modules
from ..targets import minimal_targets, select_targets, swap_module
from .config import MLP_TARGETS, BottleneckConfig, SeriesConfig

PEFT_TYPE = "BOTTLENECK"

MERGE_ERROR = (
    "a bottleneck adapter computes up(act(down(x))); the activation makes it non-linear in x, so no "
    "change to the frozen weight can reproduce it (LoRA's B·A is linear, which is why LoRA merges). Keep "
    "the adapter instead: fa.save_adapter(model, dir), then serve the base model with "
    "fa.load_adapter(model, dir); a plain transformers checkpoint (fa.export) cannot hold it"
)

_KNOWN_MLP = sorted(t for t, a in ARCHITECTURES.items() if a.mlp_input or a.mlp_output)


def resolve_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    targets = config.targets
    if targets == "auto" or targets in MLP_TARGETS:
        arch = lookup(model)
        if arch is None or not (arch.mlp_input or arch.mlp_output):
            raise ValueError(
                f"targets={targets!r} has no MLP table for model_type {model_type(model)!r}; pass targets= a "
                f"list of module names{' and position=' if config.method == 'series' else ''} "
                f"(known model types: {_KNOWN_MLP})"
            )
        sides = MLP_TARGETS.get(targets, ("input", "output"))
        targets = tuple(k for side in sides for k in (arch.mlp_input if side == "input" else arch.mlp_output))
    return select_targets(model, targets)


def series_position(model: nn.Module, config: SeriesConfig, name: str) -> str:
    """Which side of the layer ``name`` the series adapter goes on."""
    if isinstance(config.position, str) and config.position != "auto":
        return config.position
    if not isinstance(config.position, str):
        for key, side in config.position:
            if matches(name, key):
                return side
    arch = lookup(model)
    side = arch.mlp_side(name) if arch is not None else None
    if side is not None:
        return side
    known = "none for this model type"
    if arch is not None and (arch.mlp_input or arch.mlp_output):
        known = ", ".join([f"{k} → input" for k in arch.mlp_input] + [f"{k} → output" for k in arch.mlp_output])
    raise ValueError(
        f"series adapter on {name!r}: it is not a known MLP input or output projection of model_type "
        f"{model_type(model)!r} ({known}), so which side of the layer the adapter goes on is unknown. "
        "Pass position='input' (y = W(x + s·A(x)) + c) or position='output' (y = h + s·A(h), h = W x + c), "
        f"or a dict {{{name.rsplit('.', 1)[-1]!r}: 'input'}}"
    )


def targets(model: nn.Module, config: BottleneckConfig) -> dict[str, dict[str, Any]]:
    """The modules an adapter of ``config`` goes on, each with its side (all checked here)."""
    names = resolve_targets(model, config)
    if config.method == "parallel":
        return {n: {"position": "parallel"} for n in names}
    return {n: {"position": series_position(model, config, n)} for n in names}


def build(layer: nn.Module, config: BottleneckConfig, *, position: str) -> BottleneckLinear:
    """One target's module, as ``apply`` builds it."""
    return BottleneckLinear(layer, position=position, bottleneck=config.bottleneck, activation=config.activation,
                            dropout=config.dropout, scaling=config.scaling, init=config.init)


def apply(model: nn.Module, config: BottleneckConfig) -> tuple[list[str], list]:
    chosen = targets(model, config)  # all checked before any swap
    for name, options in chosen.items():
        swap_module(model, name, build(model.get_submodule(name), config, **options))
    return list(chosen), []


def adapter_config(model: nn.Module, config: BottleneckConfig) -> dict[str, Any]:
    """LLM-Adapters' ``adapter_config.json`` fields plus ``fastadapt_*`` ones it ignores."""
    modules = dict(adapter_modules(model))
    positions = {n: m.position for n, m in modules.items()}
    return {
        "bottleneck_size": config.bottleneck,
        "non_linearity": config.activation,
        "adapter_dropout": config.dropout,
        "use_parallel_adapter": config.method == "parallel",
        "use_adapterp": config.method == "series" and set(positions.values()) == {"output"},
        "target_modules": minimal_targets(model, list(modules)),
        "scaling": config.scaling,
        "bias": "none",
        # LLM-Adapters only knows "bert" / "mam_adapter" (and raises on others when it builds the
        # modules); the init does not matter once weights are loaded.
        "init_weights": "bert" if config.init == "bert" else "mam_adapter",
        "modules_to_save": None,
        "fastadapt_method": config.method,
        "fastadapt_init": config.init,
        "fastadapt_positions": positions,
    }


_LLM_ADAPTERS_SIDES = {"mh_adapter": "input", "output_adapter": "output", "parallel_adapter": "parallel"}


def read_config(config: dict[str, Any], path: str) -> tuple[str, dict[str, Any]]:
    """The patch call of a fastadapt or LLM-Adapters bottleneck adapter."""
    where = f"adapter config at {path!r}"
    b = config.get("bottleneck_size")
    if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
        raise ValueError(f"{where} has no valid bottleneck_size (a positive int), got {b!r}")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(f"{where} sets bias={bias!r}: trained biases are not supported (expected 'none')")
    if config.get("modules_to_save"):
        raise ValueError(f"{where} sets modules_to_save={config['modules_to_save']!r}; fastadapt does not support it")
    activation = config.get("non_linearity", "tanh")
    if activation not in BOTTLENECK_ACTIVATIONS:
        raise ValueError(f"{where} has non_linearity={activation!r}; supported: {list(BOTTLENECK_ACTIVATIONS)}")
    parallel = bool(config.get("use_parallel_adapter", False))
    method = config.get("fastadapt_method") or ("parallel" if parallel else "series")
    targets = config.get("target_modules")
    position: Any = "auto"
    if isinstance(targets, dict):  # {name: "mh_adapter" | "output_adapter"} (seen in LLM-Adapters forks)
        position = {k: _LLM_ADAPTERS_SIDES.get(v, v) for k, v in targets.items()} if not parallel else "auto"
        targets = list(targets)
    elif targets is None:
        targets = "mlp-output" if config.get("use_adapterp") and not parallel else "auto"
    if method == "series" and isinstance(config.get("fastadapt_positions"), dict):
        position = dict(config["fastadapt_positions"])
    init = config.get("fastadapt_init") or ("zeros" if config.get("init_weights") == "mam_adapter" else "bert")
    return method, {
        "bottleneck": b,
        "activation": activation,
        "dropout": float(config.get("adapter_dropout", 0.0) or 0.0),
        "scaling": config.get("scaling", 1.0),
        "init": init,
        "targets": targets,
        "position": position,
    }


def check_loaded(model: nn.Module, config: BottleneckConfig, options: dict[str, Any], saved: dict, path: str) -> None:
    """A model already patched the same way takes the weights: same size, activation, scaling and sides."""
    for key in ("bottleneck", "activation", "scaling"):
        if getattr(config, key) != options[key]:
            raise ValueError(
                f"model is patched with {key}={getattr(config, key)!r} but the adapter at {path!r} has "
                f"{key}={options[key]!r}; load it into an unpatched model"
            )
    saved_positions = saved.get("fastadapt_positions")
    if isinstance(saved_positions, dict):
        ours = {n: m.position for n, m in adapter_modules(model)}
        if ours != saved_positions:
            raise ValueError(
                f"model's adapters sit at other positions than the adapter at {path!r} "
                "(input/output/parallel per module); load it into an unpatched model"
            )
