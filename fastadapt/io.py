"""Adapter files: PEFT's on-disk format for LoRA (``adapter_config.json`` +
``adapter_model.safetensors``), read and written strictly."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .patch import adapter_modules, get_state, method_impl, patch, unpatch

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
#: What a patched model's save_pretrained also writes: the adapter under the model's own names,
#: which is what transformers.Trainer(resume_from_checkpoint=...) reads back.
TRAINER_WEIGHTS_NAME = "model.safetensors"
#: safetensors metadata key holding the sha256 of the adapter_config.json written with the weights
CONFIG_HASH_KEY = "fastadapt_config_sha256"

# PEFT LoRA options that change the math; a value other than these defaults cannot be honoured.
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "use_dora": False,
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


# -- saving ------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The adapter tensors under the model's own names (``<module>.lora_A.weight``,
    ``<module>.adapter_down.weight`` ...), taken from ``state_dict`` when given (e.g. a gathered
    one), else from the model. Sharded (FSDP2 DTensor) tensors are gathered to full ones: then every
    rank must call this (keys are visited in one fixed order)."""
    model = distributed.unwrap(model)
    state = get_state(model)
    if state is None:
        raise ValueError("model has no adapter: call fa.patch(model, ...) first")
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    return {
        key: distributed.full_tensor(source[key].detach()).to("cpu").contiguous()
        for key in sorted(state.adapter_keys)
    }


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, _state_dict: dict | None = None, _writer: bool | None = None
) -> Path:
    """Write the adapter in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``
    with keys ``base_model.model.<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r).
    Loads with ``peft.PeftModel.from_pretrained`` and ``fa.load_adapter``. Files are written to a
    temporary name and renamed, so an interrupted save never leaves a half-written file.

    Distributed: a ``DistributedDataParallel`` wrapper is looked through. With a process group of
    more than one process only global rank 0 writes. An FSDP2-sharded model (DTensor parameters)
    is gathered to full tensors, which is a collective: call it on every rank; all ranks return
    once the files are written."""
    model = distributed.unwrap(model)
    state = get_state(model)
    if state is None:
        raise ValueError("model has no adapter to save: call fa.patch(model, ...) first")
    path = Path(path)
    # _writer: the caller already chose the writing process (save_pretrained's is_main_process).
    writer = distributed.is_main_process() if _writer is None else _writer
    custom_save = method_impl(state.method).save
    if custom_save is not None:
        if _state_dict is None:
            distributed.check_not_sharded(model, f"saving a {state.method!r} adapter")
        if writer:
            path.mkdir(parents=True, exist_ok=True)
            custom_save(model, path, _state_dict)
        return path
    sharded = _state_dict is None and distributed.is_sharded(model)
    tensors = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(model, _state_dict).items()}
    if not writer:
        if sharded:
            distributed.barrier()  # return when rank 0 has written, as rank 0 does
        return path
    try:
        _write_lora_adapter(model, path, tensors)
    finally:
        if sharded:
            distributed.barrier()
    return path


def _write_lora_adapter(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    write_adapter_files(path, tensors, _peft_config(model))
    logger.info("saved %d adapter tensors to %s", len(tensors), path)


def save_pretrained_adapter(
    self: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    **kwargs: Any,
) -> None:
    """``model.save_pretrained`` of a patched model (the Trainer calls it for checkpoints): writes
    the PEFT-format adapter plus ``model.safetensors`` holding only the adapter under the model's
    own names, which ``Trainer(resume_from_checkpoint=...)`` loads back. No config.json is written,
    so ``from_pretrained`` cannot mistake the folder for a full model; use ``fa.export`` for that.
    Without ``state_dict`` an FSDP2-sharded model is gathered here: call it on every rank then."""
    if state_dict is None and distributed.is_sharded(self):
        state_dict = adapter_state_dict(self)  # collective: before the rank check
    if not is_main_process:
        return
    tensors = adapter_state_dict(self, state_dict)  # gathered/copied once, for both files
    save_adapter(self, save_directory, _state_dict=tensors, _writer=True)
    _atomic_write(
        Path(save_directory) / TRAINER_WEIGHTS_NAME,
        lambda f: save_file(tensors, f, metadata={"format": "pt"}),
    )


def _peft_config(model: nn.Module) -> dict[str, Any]:
    state = get_state(model)
    cfg = state.config
    modules = dict(adapter_modules(model))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": minimal_targets(model, list(modules)),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules.values()),
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }


def minimal_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Last-name suffixes when they select exactly ``names`` (PEFT's suffix match) among the model's
    own modules, else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    inside = tuple(f"{n}." for n in names)  # adapter internals: base_layer, lora_A, adapter_down, ...
    plain = {n for n, _ in model.named_modules() if n and not n.startswith(inside)}
    matched = {n for n in plain if any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if matched == set(names) else sorted(names)


def write_adapter_files(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """``adapter_model.safetensors`` then ``adapter_config.json``, each written atomically. The
    weights carry a hash of the config they belong to, so a save interrupted between the two files
    (new weights beside an old config) is detected on load instead of loading with wrong settings."""
    text = json.dumps(config, indent=2) + "\n"
    metadata = {"format": "pt", CONFIG_HASH_KEY: _sha256(text)}
    _atomic_write(path / SAFE_WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=metadata))
    _atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(text))


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- loading -----------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter path {str(path)!r} is not a directory")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {str(path)!r}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Adapter tensors from ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
    ``torch.load(weights_only=True)``: never unpickles arbitrary objects)."""
    path = Path(path)
    weights = path / SAFE_WEIGHTS_NAME
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            expected = (f.metadata() or {}).get(CONFIG_HASH_KEY)
        config_file = path / CONFIG_NAME
        if expected is not None and config_file.is_file() and _sha256(config_file.read_text()) != expected:
            raise ValueError(
                f"{weights} and {config_file} come from different saves (an interrupted save?); "
                "save the adapter again"
            )
        return load_file(str(weights))
    if (path / BIN_WEIGHTS_NAME).is_file():
        return torch.load(path / BIN_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in {str(path)!r}")


#: peft_type -> loader(model, path, config) for adapter kinds other than LoRA.
_LOADERS: dict[str, Callable[[nn.Module, Path, dict[str, Any]], nn.Module]] = {}


def register_loader(peft_type: str, loader: Callable[[nn.Module, Path, dict[str, Any]], nn.Module]) -> None:
    _LOADERS[peft_type.upper()] = loader


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Patch ``model`` as the adapter's config says (unless already patched the same way) and load
    its weights. Reads fastadapt and PEFT LoRA directories (and the other kinds registered with
    ``register_loader``). Strict: a missing or unexpected key or a shape mismatch raises an error
    naming the key, and the model is left as it was.

    Distributed: load before ``fully_shard`` (every rank reads the files). Into a model that is
    already patched and sharded, every rank must call it (the tensors are scattered to the shards)."""
    model = distributed.unwrap(model)
    config = read_adapter_config(path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in _LOADERS:
        return _LOADERS[peft_type](model, Path(path), config)
    if peft_type != "LORA":
        raise ValueError(
            f"adapter at {str(path)!r} has peft_type {config.get('peft_type')!r}; expected one of "
            f"{['LORA', *_LOADERS]}"
        )
    options = _lora_options(config, path)
    tensors = {strip_peft_prefix(k): v for k, v in read_adapter_tensors(path).items()}

    state = get_state(model)
    patched_here = state is None
    if patched_here and distributed.is_sharded(model):
        raise RuntimeError(
            "model is sharded (FSDP2) but not patched: call fa.load_adapter (or fa.patch) before "
            "fully_shard / fastadapt.distributed.shard_model, so the adapters are sharded with their layers"
        )
    if patched_here:
        patch(model, "lora", **options)
    else:
        _check_same_lora(state, options, path)
    try:
        _load_lora_tensors(model, tensors, path)
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


def _lora_options(config: dict[str, Any], path) -> dict[str, Any]:
    for key, default in _UNSUPPORTED_PEFT_FIELDS.items():
        value = config.get(key)
        if value not in (None, {}, [], False) and value != default:
            raise ValueError(
                f"adapter at {str(path)!r} sets {key}={value!r}, which fastadapt does not support "
                f"(expected {default!r})"
            )
    targets = config.get("target_modules")
    if targets is None:
        raise ValueError(f"adapter config at {str(path)!r} has no target_modules")
    # A list of suffixes, or a string: "all-linear" or a regex (as in PEFT).
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"adapter config at {str(path)!r} needs r, a positive int; got {r!r}")
    return {
        "r": r,
        "alpha": config.get("lora_alpha", 8),
        "dropout": float(config.get("lora_dropout", 0.0)),
        "rslora": bool(config.get("use_rslora", False)),
        "targets": targets,
    }


def _check_same_lora(state, options: dict[str, Any], path) -> None:
    cfg = state.config
    if cfg.method != "lora":
        raise ValueError(f"model is patched with {cfg.method!r}; the adapter at {str(path)!r} is LoRA")
    for field_name, ours in (("r", cfg.r), ("alpha", cfg.alpha), ("rslora", cfg.rslora)):
        if options[field_name] != ours:
            raise ValueError(
                f"model is patched with {field_name}={ours!r} but the adapter at {str(path)!r} has "
                f"{field_name}={options[field_name]!r}; load it into an unpatched model"
            )


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.<path>.lora_A.weight`` -> ``<path>.lora_A.weight``; PEFT keeps the adapter
    name in memory (``lora_A.default.weight``) and normally omits it in files: drop it too."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return re.sub(r"\.default\.weight$", ".weight", key)


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy ``tensors`` (keys under the model's own names) into the adapter's parameters, strictly:
    every check runs before the first copy, and a missing or unexpected key, a shape mismatch or a
    non-float tensor is an error naming the key."""
    state = get_state(model)
    named = dict(model.named_parameters())
    params = {key: named[key] for key in state.adapter_keys}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"adapter at {str(path)!r} is missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise KeyError(
            f"adapter at {str(path)!r} has unexpected key(s) {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (the model has no such adapter parameter)"
        )
    for key, param in params.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(
                f"adapter key {key!r} has shape {tuple(tensors[key].shape)}, the model expects "
                f"{tuple(param.shape)}"
            )
        if not tensors[key].is_floating_point():
            raise TypeError(f"adapter key {key!r} has dtype {tensors[key].dtype}; expected a float tensor")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(_like(tensors[key], param))


def _load_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    for name, module in adapter_modules(model):
        if module.merged:
            raise RuntimeError(f"module {name!r} is merged; call fa.unmerge(model) before loading an adapter")
    load_adapter_tensors(model, tensors, path)


def _like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` laid out like ``param``: scattered to its shards when ``param`` is a DTensor."""
    if not distributed.is_dtensor(param):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    local = tensor.to(device=param.device_mesh.device_type, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements)

