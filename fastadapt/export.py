"""``fa.export``: a merged, plain-transformers checkpoint that loads without fastadapt."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _files, distributed
from .methods import adapter_modules, get_method, get_state
from .methods.targets import parent_and_attr
from .modules.quantized import (
    Dequantizing,
    dequantized_weight,
    describe,
    quantized_kind,
    requantized_like,
    state_dict_extras,
)

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: written beside an export from a quantized base: how it was merged, and (quantized export) the
#: output change the re-quantization adds
METADATA_NAME = "fastadapt_export.json"


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
    if full_state_dict is None and quantized_layers(model):
        dtype = dtype or activation_dtype(model)
        replaced, dropped = _dequantized_entries(model, dtype)
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
    quantize: bool = False,
    probe: dict[str, torch.Tensor] | torch.Tensor | None = None,
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
    rank 0 (a collective: call it on every rank; rank 0 needs CPU memory for the whole model).

    Quantized bases (bitsandbytes 4-bit/8-bit, ``fa.load_model(quantize=...)``): every quantized
    layer is dequantized, the adapters merged in fp32 and the checkpoint written in ``dtype``
    (default: the dtype the model computes in) with no ``quantization_config``: it loads with plain
    transformers. ``quantize=True`` instead merges into the base's own 4-bit format (re-quantizing
    each adapted layer as its base was), which rounds part of the adapter away: the change of the
    logits on ``probe`` (token ids, or a batch dict; default: 2x16 seeded random ids) against the
    unmerged adapted model is logged and written, with the adapter's own effect for scale, to
    ``fastadapt_export.json`` in the export; that checkpoint needs bitsandbytes to load."""
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
    if quantize:
        return _export_quantized(model, path, tokenizer=tokenizer, probe=probe, max_shard_size=max_shard_size)
    if torch_dtype is None and quantized_layers(model):
        torch_dtype = activation_dtype(model)  # dequantized: the dtype the model computes in
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
    quantized = quantized_layers(model)
    try:
        # The class's own save_pretrained: the instance's one (set by patch) saves adapters only.
        with _saved_as_plain_model(model):
            PreTrainedModel.save_pretrained(model, tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        if quantized:
            _write_metadata(tmp, {"base": sorted({describe(m) for _, m in quantized}), "dequantized": True,
                                  "merge": "adapters folded into the dequantized weights in fp32, rounded once to "
                                           f"{str(torch_dtype or old_dtype).removeprefix('torch.')}"})
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


# -- quantized bases ---------------------------------------------------------------------------


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every bitsandbytes quantized linear in the model (adapter bases too)."""
    return [(name, m) for name, m in model.named_modules() if quantized_kind(m) is not None]


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's activations run in: its input embeddings'."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.dtype if embeddings is not None else torch.float32


def _dequantized_entries(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], set[str]]:
    """State-dict entries that replace the quantized layers: each layer's dequantized weight (an
    adapter's base gets its merged weight later) and the quantization-state keys dropped."""
    replaced: dict[str, torch.Tensor] = {}
    dropped: set[str] = set()
    for name, layer in quantized_layers(model):
        replaced[f"{name}.weight"] = dequantized_weight(layer, dtype)
        dropped.update(f"{name}.{key}" for key in state_dict_extras(layer))
    return replaced, dropped


@contextlib.contextmanager
def _saved_as_plain_model(model: nn.Module) -> Iterator[None]:
    """While saving a dequantized export: no quantizer (it would replace the state dict and write a
    ``quantization_config``) and no transformers adapter flag (it would save adapters only)."""
    saved = {key: model.__dict__[key] for key in ("hf_quantizer", "_hf_peft_config_loaded") if key in model.__dict__}
    config = getattr(model.config, "quantization_config", None)
    model.__dict__["hf_quantizer"] = None
    model.__dict__["_hf_peft_config_loaded"] = False
    if config is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        for key in ("hf_quantizer", "_hf_peft_config_loaded"):
            if key in saved:
                model.__dict__[key] = saved[key]
            else:
                model.__dict__.pop(key, None)
        if config is not None:
            model.config.quantization_config = config


def _write_metadata(folder: Path, record: dict) -> None:
    (folder / METADATA_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _probe_inputs(model: nn.Module, probe) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    if probe is None:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    batch = {"input_ids": probe} if isinstance(probe, torch.Tensor) else dict(probe)
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()


@contextlib.contextmanager
def _swapped(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[None]:
    """``layers`` (by module name) in place of the model's modules, put back on exit."""
    originals = {name: model.get_submodule(name) for name in layers}
    try:
        for name, layer in layers.items():
            parent, attr = parent_and_attr(model, name)
            setattr(parent, attr, layer)
        yield
    finally:
        for name, layer in originals.items():
            parent, attr = parent_and_attr(model, name)
            setattr(parent, attr, layer)


def _stats(diff: torch.Tensor) -> dict[str, float]:
    return {"max_abs": diff.abs().max().item(), "mean_abs": diff.abs().mean().item()}


def _export_quantized(model: nn.Module, path: Path, *, tokenizer, probe, max_shard_size) -> Path:
    """``export(quantize=True)``: merge in fp32, re-quantize each adapted layer as its base, measure
    the output change on the probe batch, write a bitsandbytes checkpoint with that in its metadata."""
    from transformers import PreTrainedModel

    state = get_state(model)
    reason = None if state is None else get_method(state.method).merge_error
    if state is None or reason is not None:
        raise ValueError("quantize=True exports a patched LoRA/DoRA model: "
                         + (reason or "model has no adapter"))
    modules = list(adapter_modules(model))
    plain = [name for name, m in modules if m.quantized != "4bit"]
    if plain:
        raise ValueError(f"quantize=True merges into 4-bit bases; {plain[0]!r} has no 4-bit base "
                         f"({len(plain)} such module(s)): export it with a dtype instead")
    if any(m.merged for _, m in modules):
        raise ValueError("quantize=True takes an unmerged model (the merge into 4-bit happens in the export)")
    batch = _probe_inputs(model, probe)
    was_training = model.training
    model.eval()
    try:
        adapted = _logits(model, batch)
        with _swapped(model, {name: Dequantizing(m.base_layer) for name, m in modules}):
            base = _logits(model, batch)
        requantized = {name: requantized_like(m.base_layer, m.merged_weight(torch.float32)) for name, m in modules}
        tmp = _files.new_dir(path)
        try:
            with _swapped(model, {name: Dequantizing(layer) for name, layer in requantized.items()}):
                merged = _logits(model, batch)
            with _swapped(model, requantized):
                flag = model.__dict__.pop("_hf_peft_config_loaded", None)
                try:  # transformers' adapter flag would make it save adapters only
                    PreTrainedModel.save_pretrained(model, tmp, max_shard_size=max_shard_size)
                finally:
                    if flag is not None:
                        model.__dict__["_hf_peft_config_loaded"] = flag
            change, effect = _stats(merged - adapted), _stats(adapted - base)
            record = {"base": sorted({describe(m.base_layer) for _, m in modules}), "dequantized": False,
                      "merge": "adapters folded into the dequantized weights in fp32, then re-quantized to the "
                               "base's 4-bit format (rounds part of the adapter away)",
                      "quantized_merge_error": {**change, "probe_shape": list(batch["input_ids"].shape),
                                                "what": "logits of the re-quantized merged model minus the "
                                                        "unmerged adapted model's, on the probe batch"},
                      "adapter_effect": {**effect, "what": "logits of the adapted model minus the base's"}}
            _write_metadata(tmp, record)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _files.replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        model.train(was_training)
    logger.warning("quantized export to %s: merging into 4-bit changed the logits by up to %.3g (mean %.3g) on the "
                   "probe batch; the adapter itself moves them by up to %.3g (mean %.3g). Recorded in %s",
                   path, change["max_abs"], change["mean_abs"], effect["max_abs"], effect["mean_abs"], METADATA_NAME)
    return path
