"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` written atomically and
read strictly. Every method's files go through here (its hooks decide the config and the tensors);
LoRA's are PEFT's format. Loading an adapter into a model is ``fa.load_adapter`` (``patch.py``),
which reads with the functions below."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .methods import adapter_modules, get_method, get_state

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
    """Write the adapter: ``adapter_config.json`` and ``adapter_model.safetensors``. LoRA is PEFT's
    format: keys ``base_model.model.<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r);
    loads with ``peft.PeftModel.from_pretrained`` and ``fa.load_adapter``. Files are written to a
    temporary name and renamed, so an interrupted save never leaves a half-written file.

    Distributed: a ``DistributedDataParallel`` wrapper is looked through. With a process group of
    more than one process only global rank 0 writes. An FSDP2-sharded model (DTensor parameters)
    is gathered to full tensors, which is a collective: call it on every rank; all ranks return
    once the files are written."""
    model = distributed.unwrap(model)
    state = get_state(model)
    if state is None:
        raise ValueError("model has no adapter to save: call fa.patch(model, ...) first")
    method = get_method(state.method)
    path = Path(path)
    # _writer: the caller already chose the writing process (save_pretrained's is_main_process).
    writer = distributed.is_main_process() if _writer is None else _writer
    sharded = _state_dict is None and distributed.is_sharded(model)
    if sharded and method.saved_tensors is not None:
        distributed.check_not_sharded(model, f"saving a {state.method!r} adapter")
    gathered = adapter_state_dict(model, _state_dict)  # collective when sharded: every rank
    if not writer:
        if sharded:
            distributed.barrier()  # return when rank 0 has written, as rank 0 does
        return path
    try:
        if method.saved_tensors is None:
            tensors = {PEFT_PREFIX + k: v for k, v in gathered.items()}
        else:
            tensors = method.saved_tensors(model, gathered)
        path.mkdir(parents=True, exist_ok=True)
        write_adapter_files(path, tensors, adapter_config(model))
        logger.info("saved %d %s adapter tensors to %s", len(tensors), state.method, path)
    finally:
        if sharded:
            distributed.barrier()
    return path


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """``adapter_config.json`` of a patched model: the fields every method writes (as PEFT does)
    around the method's own."""
    state = get_state(model)
    method = get_method(state.method)
    return {
        "peft_type": method.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        **method.adapter_config(model, state.config),
        "inference_mode": True,
    }


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


def write_adapter_files(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """``adapter_model.safetensors`` then ``adapter_config.json``, each written atomically. The
    weights carry a hash of the config they belong to, so a save interrupted between the two files
    (new weights beside an old config) is detected on load instead of loading with wrong settings."""
    text = json.dumps(config, indent=2) + "\n"
    metadata = {"format": "pt", CONFIG_HASH_KEY: _sha256(text)}
    _atomic_write(path / SAFE_WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata=metadata))
    _atomic_write(path / CONFIG_NAME, lambda f: Path(f).write_text(text))


def _sha256(text: str) -> str:
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
    ``torch.load(weights_only=True)``: never unpickles arbitrary objects), under the model's own
    names (PEFT's ``base_model.model.`` prefix stripped)."""
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
        return {strip_peft_prefix(k): v for k, v in load_file(str(weights)).items()}
    if (path / BIN_WEIGHTS_NAME).is_file():
        tensors = torch.load(path / BIN_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        return {strip_peft_prefix(k): v for k, v in tensors.items()}
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in {str(path)!r}")


def strip_peft_prefix(key: str) -> str:
    """``base_model.model.<path>.lora_A.weight`` -> ``<path>.lora_A.weight``; PEFT keeps the adapter
    name in memory (``lora_A.default.weight``) and normally omits it in files: drop it too."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return re.sub(r"\.default\.weight$", ".weight", key)


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy ``tensors`` (keys under the model's own names) into the adapter's parameters, strictly:
    every check runs before the first copy, and a missing or unexpected key, a shape mismatch or a
    non-float tensor is an error naming the key."""
    for name, module in adapter_modules(model):
        if getattr(module, "merged", False):
            raise RuntimeError(f"module {name!r} is merged; call fa.unmerge(model) before loading an adapter")
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


def _like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` laid out like ``param``: scattered to its shards when ``param`` is a DTensor."""
    if not distributed.is_dtensor(param):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    local = tensor.to(device=param.device_mesh.device_type, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements)

