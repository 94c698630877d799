"""``fa.export``: a merged, plain-transformers checkpoint that loads without fastadapt."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _files, distributed
from .methods import adapter_modules, get_method, get_state

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def merged_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, *, full_state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict under its original (unpatched) names with every adapter folded into
    its weight (fp32 math, one rounding) and the adapter's own tensors dropped. Merged modules are
    used as they are; unmerged ones get a merged copy (costs the memory of those weights: call
    ``fa.merge`` first to avoid it). ``full_state_dict``:
    the model's tensors gathered from a sharded model (see ``_gather_full_state_dict``)."""
    state = get_state(model)
    if state is None:
        raise ValueError(
            "model has no adapter to export: fa.export writes a model with its adapter merged; "
            "a plain model is saved with model.save_pretrained"
        )
    reason = get_method(state.method).merge_error
    if reason is not None:
        raise ValueError(f"cannot export a {state.method!r} adapter as a merged model: {reason}")
    replaced: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    for name, module in adapter_modules(model):
        if full_state_dict is not None:
            weight = _merged_from(module, full_state_dict, name, dtype)
        else:  # unmerged: rounded once, straight to the export dtype
            weight = module.base_layer.weight if module.merged else module.merged_weight(dtype)
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"merged weight of {name!r} holds NaN/Inf; nothing was exported")
        replaced[f"{name}.base_layer.weight"] = weight
        dropped.update(f"{name}.{key}" for key in _adapter_tensor_names(module))
    out = {}
    source = model.state_dict() if full_state_dict is None else full_state_dict
    for key, tensor in source.items():
        if key in dropped:
            continue
        tensor = replaced.get(key, tensor)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key.replace(".base_layer.", ".")] = tensor.detach()
    return out


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write ``model`` with its LoRA/DoRA adapters merged as a plain transformers checkpoint (safetensors,
    config, generation config, and the tokenizer when given) that
    ``AutoModelForCausalLM.from_pretrained(path)`` loads without fastadapt. The model itself is not
    changed. Writes into a temporary folder beside ``path`` and swaps it in at the end (one atomic
    step on Linux: ``path`` is always the old export or the new one, even if the process is
    killed); a later export removes what a killed one left. Refuses a non-empty ``path`` unless
    ``overwrite=True``.

    Distributed: a ``DistributedDataParallel`` wrapper is looked through and, with more than one
    process, only global rank 0 writes. An FSDP2-sharded model is gathered to full CPU tensors on
    rank 0 (a collective: call it on every rank; rank 0 needs CPU memory for the whole model)."""
    from transformers import PreTrainedModel

    model = distributed.unwrap(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    path = _export_target(Path(path))
    if distributed.is_main_process():
        _files.clean_stale(path)  # temporaries of a killed export; a target it moved aside comes back
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export path {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"export path {str(path)!r} is not empty; pass overwrite=True to replace it")
    torch_dtype = parse_dtype(dtype)
    state = get_state(model)
    if state is None or get_method(state.method).merge_error is not None:  # every rank, before any collective
        merged_state_dict(model, torch_dtype)  # raises the guidance error
    if distributed.is_sharded(model):
        full = _gather_full_state_dict(model)  # collective; empty off rank 0
        try:
            if distributed.is_main_process():
                _write_export(model, path, merged_state_dict(model, torch_dtype, full_state_dict=full),
                              tokenizer=tokenizer, torch_dtype=torch_dtype, max_shard_size=max_shard_size)
        finally:
            distributed.barrier()
        return path
    if not distributed.is_main_process():
        return path
    _write_export(model, path, merged_state_dict(model, torch_dtype), tokenizer=tokenizer,
                  torch_dtype=torch_dtype, max_shard_size=max_shard_size)
    return path


def _export_target(path: Path) -> Path:
    """The folder an export replaces: a symlink is written through (the link stays and points to the
    new export); the current folder, or one holding it, is refused (the export swaps in a new folder,
    which would leave this process in a deleted one)."""
    target = path.resolve() if path.is_symlink() else path
    if target is not path and target.exists() and not target.is_dir():
        raise FileExistsError(f"export path {str(path)!r} is a symlink to {str(target)!r}, which is not a directory")
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise ValueError(f"export path {str(path)!r} is the current directory or holds it: fa.export replaces the "
                         "whole folder; export into a new folder, e.g. fa.export(model, 'merged')")
    return target


def _write_export(model, path: Path, state_dict, *, tokenizer, torch_dtype, max_shard_size) -> None:
    from transformers import PreTrainedModel

    tmp = _files.new_dir(path)
    old_dtype = getattr(model.config, "dtype", None)
    try:
        # The class's own save_pretrained: the instance's one (set by patch) saves adapters only.
        PreTrainedModel.save_pretrained(model, tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        if torch_dtype is not None:
            _set_config_dtype(tmp / "config.json", torch_dtype)
        _unshard_architectures(tmp / "config.json", model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _files.umask_modes(tmp)  # safetensors >= 0.8 writes weights 0600 whatever the umask
        _files.replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config.dtype = old_dtype
    logger.info("exported merged model to %s", path)


def _gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a sharded model on rank 0 (an empty dict elsewhere); every rank calls it."""
    out = {}
    keep = distributed.is_main_process()
    for key, tensor in model.state_dict().items():
        full = distributed.full_tensor(tensor.detach())  # collective, same key order on every rank
        if keep:
            out[key] = full.cpu()
    return out


def _adapter_tensor_names(module: nn.Module) -> list[str]:
    """The adapter's own tensors under the module (``lora_A.weight``, ``lora_magnitude_vector``, ...):
    everything but the wrapped layer's."""
    return [key for key in module.state_dict() if not key.startswith("base_layer.")]


@torch.no_grad()
def _merged_from(
    module: nn.Module, full: dict[str, torch.Tensor], name: str, dtype: torch.dtype | None
) -> torch.Tensor:
    """The module's merged weight from gathered tensors (one rounding, to ``dtype`` or W's dtype)."""
    if module.merged:
        return full[f"{name}.base_layer.weight"]
    prefix = f"{name}."
    return module.merged_weight(dtype, tensors={k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    # save_pretrained records the in-memory model's dtype; the files hold ``dtype``.
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:  # transformers 4.x spelling
        config["torch_dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _unshard_architectures(config_file: Path, model: nn.Module) -> None:
    # FSDP2 swaps the class of a sharded model for "FSDP<Class>"; the config must name <Class>.
    from transformers import PreTrainedModel

    if not type(model).__name__.startswith("FSDP"):
        return
    plain = next(
        (c for c in type(model).__mro__ if issubclass(c, PreTrainedModel) and not c.__name__.startswith("FSDP")),
        None,
    )
    config = json.loads(config_file.read_text())
    if plain is not None and config.get("architectures") == [type(model).__name__]:
        config["architectures"] = [plain.__name__]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
