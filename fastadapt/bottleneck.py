"""Series and parallel bottleneck adapters (LLM-Adapters' AdapterH, AdapterP and Parallel).

``fa.patch(model, "series" | "parallel", bottleneck=256, activation="tanh", dropout=0.0,
scaling=1.0 | "learned", init="bert" | "zeros", targets="auto", position="auto")``.

With ``A(z) = up(act(down(dropout(z))))``, ``s`` the scaling and ``W x + c`` the frozen linear
(LLM-Adapters ``peft/src/peft/tuners/bottleneck.py``, ``Linear.forward``):

- series on an MLP input projection ("mh_adapter"): ``y = W (x + s·A(x)) + c``;
- series on the MLP output projection ("output_adapter"): ``h = W x + c; y = h + s·A(h)``;
- parallel on any linear ("parallel_adapter"): ``y = W x + c + s·A(x)``.

Which side a series target is on comes from a per-architecture table of MLP projections
(:data:`MLP_POSITIONS`, the same role as LLM-Adapters' ``TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING``);
for any other module pass ``position="input" | "output"`` (all targets) or a dict
``{module name or suffix: position}``. Targets: ``"auto"`` (series: MLP input + output projections =
AdapterH; parallel: the MLP projections), ``"mlp-output"`` (AdapterP), ``"mlp-input"``, ``"mlp"``, or
anything ``fa.patch`` accepts (a list of suffixes, a regex, ``"all-linear"``).

On disk: LLM-Adapters' layout (``adapter_config.json`` with ``peft_type: "BOTTLENECK"``,
``bottleneck_size``, ``non_linearity``, ``adapter_dropout``, ``use_parallel_adapter``,
``use_adapterp``, ``target_modules``, ``scaling``) plus ``fastadapt_positions`` (each module's side),
and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.adapter_down.weight`` (b, d_in),
``.adapter_up.weight`` (d_out, b) and ``.adapter_scaling`` (1,) when learned. ``fa.load_adapter`` also
reads LLM-Adapters' own checkpoints (``adapter_model.bin``, read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import validate_targets
from .io import (
    PEFT_PREFIX,
    adapter_state_dict,
    load_adapter_tensors,
    minimal_targets,
    read_adapter_tensors,
    register_loader,
    strip_peft_prefix,
    write_adapter_files,
)
from .modules.bottleneck import INITS, BottleneckLinear
from .ops.reference import BOTTLENECK_ACTIVATIONS
from .patch import (
    Method,
    _parent_and_attr,
    adapter_modules,
    get_state,
    patch,
    register_method,
    select_targets,
    unpatch,
)

logger = logging.getLogger(__name__)

PEFT_TYPE = "BOTTLENECK"
METHODS = ("series", "parallel")

MERGE_ERROR = (
    "a bottleneck adapter computes up(act(down(x))); the activation makes it non-linear in x, so no "
    "change to the frozen weight can reproduce it (LoRA's B·A is linear, which is why LoRA merges). Keep "
    "the adapter instead: fa.save_adapter(model, dir), then serve the base model with "
    "fa.load_adapter(model, dir); a plain transformers checkpoint (fa.export) cannot hold it"
)

_LLAMA_MLP = {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}
_H_TO_4H = {"dense_h_to_4h": "input", "dense_4h_to_h": "output"}
_FC_IN_OUT = {"fc_in": "input", "fc_out": "output"}
_C_FC = {"mlp.c_fc": "input", "mlp.c_proj": "output"}  # "mlp." so GPT-2's attn.c_proj is not taken

#: model_type -> {module-name suffix: side of the MLP}: the MLP input projections ("input") and the
#: MLP output projection ("output"). LLM-Adapters' table covers llama, bloom, gptj, opt (and gpt_neo,
#: chatglm in later versions) with the same names and sides.
MLP_POSITIONS: dict[str, dict[str, str]] = {
    "llama": _LLAMA_MLP,
    "mistral": _LLAMA_MLP,
    "qwen2": _LLAMA_MLP,
    "qwen3": _LLAMA_MLP,
    "gemma": _LLAMA_MLP,
    "gemma2": _LLAMA_MLP,
    "stablelm": _LLAMA_MLP,
    "phi3": {"gate_up_proj": "input", "down_proj": "output"},
    "bloom": _H_TO_4H,
    "gpt_neox": _H_TO_4H,
    "falcon": _H_TO_4H,
    "opt": {"fc1": "input", "fc2": "output"},
    "phi": {"mlp.fc1": "input", "mlp.fc2": "output"},
    "gptj": _FC_IN_OUT,
    "codegen": _FC_IN_OUT,
    "gpt2": _C_FC,
    "gpt_neo": _C_FC,
    "gpt_bigcode": _C_FC,
}

#: Target keywords resolved through MLP_POSITIONS ("auto" too): which sides they take.
_TARGET_PRESETS = {"mlp": ("input", "output"), "mlp-input": ("input",), "mlp-output": ("output",)}


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


# -- config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BottleneckConfig:
    """A series (``method="series"``) or parallel bottleneck adapter (see the module docstring).

    ``bottleneck``: b ≥ 1; ``activation``: tanh | relu | gelu | silu; ``dropout`` in [0, 1) on the
    adapter input; ``scaling``: a finite number or ``"learned"`` (one trainable scalar per module,
    initialised to 1); ``init``: ``"bert"`` (both matrices N(0, 0.02), LLM-Adapters' default),
    ``"zeros"`` (up zeros: a fresh patch changes nothing) or ``"mam_adapter"``; ``position``
    (series only): ``"auto"`` (the MLP table), ``"input"``, ``"output"``, or a dict
    ``{module name or suffix: "input" | "output"}`` (unlisted targets use the table)."""

    bottleneck: int = 256
    activation: str = "tanh"
    dropout: float = 0.0
    scaling: float | str = 1.0
    init: str = "bert"
    targets: str | tuple[str, ...] = "auto"
    position: str | tuple[tuple[str, str], ...] = "auto"
    method: str = "series"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        b = self.bottleneck
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"bottleneck must be a positive int, got {b!r} ({type(b).__name__})")
        if b <= 0:
            raise ValueError(f"bottleneck must be a positive int, got {b}")
        if not isinstance(self.activation, str) or self.activation not in BOTTLENECK_ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(BOTTLENECK_ACTIVATIONS)}, got {self.activation!r}")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p!r}")
        s = self.scaling
        if isinstance(s, str):
            if s != "learned":
                raise ValueError(f"scaling must be a finite number or 'learned', got {s!r}")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scaling must be a finite number or 'learned', got {s!r}")
        else:
            object.__setattr__(self, "scaling", float(s))
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "targets", validate_targets(self.targets))
        object.__setattr__(self, "position", self._check_position(self.position))

    def _check_position(self, position: Any) -> str | tuple[tuple[str, str], ...]:
        sides = ("input", "output")
        if self.method == "parallel":
            if position not in ("auto", "parallel"):
                raise ValueError(
                    "position applies to series adapters only (a parallel adapter sits beside the layer), "
                    f"got {position!r}"
                )
            return "auto"
        bad = f"position must be 'auto', 'input', 'output' or a dict {{name: side}}, got {position!r}"
        if isinstance(position, str):
            if position not in ("auto", *sides):
                raise ValueError(bad)
            return position
        items = position.items() if isinstance(position, dict) else position
        try:
            pairs = tuple((str(k), v) for k, v in items)
        except (TypeError, ValueError):
            raise TypeError(bad) from None
        for k, v in pairs:
            if v not in sides:
                raise ValueError(f"position[{k!r}] must be 'input' or 'output', got {v!r}")
        return pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bottleneck": self.bottleneck,
            "activation": self.activation,
            "dropout": self.dropout,
            "scaling": self.scaling,
            "init": self.init,
            "targets": self.targets if isinstance(self.targets, str) else list(self.targets),
            "position": self.position if isinstance(self.position, str) else dict(self.position),
        }


def make_bottleneck_config(method: str, options: dict[str, Any]) -> BottleneckConfig:
    known = [f for f in BottleneckConfig.__dataclass_fields__ if f != "method"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; expected some of {known}")
    return BottleneckConfig(method=method, **options)


# -- patching -----------------------------------------------------------------------------------


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _resolve_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    targets = config.targets
    if isinstance(targets, str) and (targets == "auto" or targets in _TARGET_PRESETS):
        table = MLP_POSITIONS.get(_model_type(model))
        if table is None:
            raise ValueError(
                f"targets={targets!r} has no MLP table for model_type {_model_type(model)!r}; pass targets= a "
                f"list of module names{' and position=' if config.method == 'series' else ''} "
                f"(known model types: {sorted(MLP_POSITIONS)})"
            )
        sides = _TARGET_PRESETS.get(targets, ("input", "output"))
        targets = tuple(k for k, side in table.items() if side in sides)
    return select_targets(model, targets)


def _series_position(model: nn.Module, config: BottleneckConfig, name: str) -> str:
    if isinstance(config.position, str) and config.position != "auto":
        return config.position
    if not isinstance(config.position, str):
        for key, side in config.position:
            if _matches(name, key):
                return side
    table = MLP_POSITIONS.get(_model_type(model), {})
    for key, side in table.items():
        if _matches(name, key):
            return side
    known = ", ".join(f"{k} → {v}" for k, v in table.items()) or "none for this model type"
    raise ValueError(
        f"series adapter on {name!r}: it is not a known MLP input or output projection of model_type "
        f"{_model_type(model)!r} ({known}), so which side of the layer the adapter goes on is unknown. "
        "Pass position='input' (y = W(x + s·A(x)) + c) or position='output' (y = h + s·A(h), h = W x + c), "
        f"or a dict {{{name.rsplit('.', 1)[-1]!r}: 'input'}}"
    )


def _apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> list[str]:
    names = _resolve_targets(model, config)
    if config.method == "parallel":
        positions = dict.fromkeys(names, "parallel")
    else:
        positions = {n: _series_position(model, config, n) for n in names}  # all checked before any swap
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        base = getattr(parent, attr)
        module = BottleneckLinear(
            base, position=positions[name], bottleneck=config.bottleneck, activation=config.activation,
            dropout=config.dropout, scaling=config.scaling, init=config.init,
        )
        setattr(parent, attr, module)
    return names


# -- saving ---------------------------------------------------------------------------------------


def bottleneck_config_dict(model: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` content: LLM-Adapters' fields plus ``fastadapt_*`` ones it ignores."""
    state = get_state(model)
    cfg: BottleneckConfig = state.config
    modules = dict(adapter_modules(model))
    positions = {n: m.position for n, m in modules.items()}
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "bottleneck_size": cfg.bottleneck,
        "non_linearity": cfg.activation,
        "adapter_dropout": cfg.dropout,
        "use_parallel_adapter": cfg.method == "parallel",
        "use_adapterp": cfg.method == "series" and set(positions.values()) == {"output"},
        "target_modules": minimal_targets(model, list(modules)),
        "scaling": cfg.scaling,
        "bias": "none",
        # LLM-Adapters only knows "bert" / "mam_adapter" (and raises on others when it builds the
        # modules); the init does not matter once weights are loaded.
        "init_weights": "bert" if cfg.init == "bert" else "mam_adapter",
        "modules_to_save": None,
        "inference_mode": True,
        "fastadapt_method": cfg.method,
        "fastadapt_init": cfg.init,
        "fastadapt_positions": positions,
    }


def _save_bottleneck(model: nn.Module, path: Path, state_dict: dict | None = None) -> None:
    tensors = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(model, state_dict).items()}
    config = bottleneck_config_dict(model)
    write_adapter_files(path, tensors, config)
    logger.info("saved %d bottleneck adapter tensors to %s", len(tensors), path)


# -- loading (fastadapt and LLM-Adapters checkpoints) ---------------------------------------------

_LLM_ADAPTERS_SIDES = {"mh_adapter": "input", "output_adapter": "output", "parallel_adapter": "parallel"}


def _options_from_config(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    where = f"adapter config at {str(path)!r}"
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


def _load_bottleneck(model: nn.Module, path: Path, config: dict[str, Any]) -> nn.Module:
    """Loader for ``peft_type: "BOTTLENECK"`` (fastadapt's files and LLM-Adapters' checkpoints):
    patches an unpatched model as the config says, or loads into a model patched the same way.
    Strict: a missing or unexpected key or a shape mismatch raises an error naming the key, and a
    model patched here is unpatched again."""
    method, options = _options_from_config(config, path)
    tensors = {strip_peft_prefix(k): v for k, v in read_adapter_tensors(path).items()}
    state = get_state(model)
    patched_here = state is None
    if patched_here:
        patch(model, method, **options)
    else:
        cfg = state.config
        if state.method != method:
            raise ValueError(f"model is patched with {state.method!r}; the adapter at {str(path)!r} is {method!r}")
        for key in ("bottleneck", "activation", "scaling"):
            if getattr(cfg, key) != options[key]:
                raise ValueError(
                    f"model is patched with {key}={getattr(cfg, key)!r} but the adapter at {str(path)!r} has "
                    f"{key}={options[key]!r}; load it into an unpatched model"
                )
        saved_positions = config.get("fastadapt_positions")
        if isinstance(saved_positions, dict):
            ours = {n: m.position for n, m in adapter_modules(model)}
            if ours != saved_positions:
                raise ValueError(
                    f"model's adapters sit at other positions than the adapter at {str(path)!r} "
                    f"(input/output/parallel per module); load it into an unpatched model"
                )
    try:
        load_adapter_tensors(model, tensors, path)
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


for _name in METHODS:
    register_method(
        _name,
        Method(make_config=make_bottleneck_config, apply=_apply_bottleneck, save=_save_bottleneck,
               merge_error=MERGE_ERROR),
    )
register_loader(PEFT_TYPE, _load_bottleneck)

__all__ = [
    "MERGE_ERROR",
    "MLP_POSITIONS",
    "BottleneckConfig",
    "bottleneck_config_dict",
    "make_bottleneck_config",
]
