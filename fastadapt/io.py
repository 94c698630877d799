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
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import _files, distributed, gguf_io
from .methods import Method, NamedAdapter, adapter_modules, get_method, get_state, method_for_peft_type
from .methods.registry import peft_types
from .modules.bank import active_tensors, trim_saved

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
#: What a patched model's save_pretrained also writes: the adapter under the model's own names,
#: which is what transformers.Trainer(resume_from_checkpoint=...) reads back.
TRAINER_WEIGHTS_NAME = "model.safetensors"
#: Files that make a folder a model's: save_pretrained never writes TRAINER_WEIGHTS_NAME beside them.
MODEL_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: safetensors metadata of TRAINER_WEIGHTS_NAME marking it as fastadapt's (the adapter only)
ADAPTER_ONLY_KEY = "fastadapt_adapter_only"
#: safetensors metadata of the adapter weights: the options (JSON) of the config they were saved with
OPTIONS_KEY = "fastadapt_options"
#: what earlier versions recorded instead: the sha256 of the whole adapter_config.json
LEGACY_CONFIG_HASH_KEY = "fastadapt_config_sha256"


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
    owners = {f"{name}.": module for name, module in adapter_modules(model)}
    out = {}
    for key in sorted(state.adapter_keys):
        tensor = distributed.full_tensor(source[key].detach()).to("cpu")
        prefix = next((p for p in owners if key.startswith(p)), None)
        if prefix is not None:  # a slot larger than the active adapter's rank keeps zero rows: not saved
            tensor = trim_saved(owners[prefix], key[len(prefix):], tensor)
        out[key] = tensor.contiguous()
    return out


#: what ``save_adapter(format=...)`` writes
ADAPTER_FORMATS = ("peft", "gguf")


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, format: str = "peft", adapter_name: str | None = None,
    _state_dict: dict | None = None, _writer: bool | None = None,
) -> Path:
    """Write the adapter. ``format="peft"`` (default): the folder ``path`` gets ``adapter_config.json``
    and ``adapter_model.safetensors``; LoRA is PEFT's format: keys
    ``base_model.model.<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r); loads with
    ``peft.PeftModel.from_pretrained`` and ``fa.load_adapter``. ``format="gguf"``: the file ``path``
    (``adapter.gguf``) is a LoRA adapter for llama.cpp's ``--lora`` (:func:`.gguf_io.write_lora_adapter`:
    per-module scalings folded in; DoRA and bottleneck adapters are refused). Files are written to a
    temporary name and renamed, so an interrupted save never leaves a half-written file.

    ``adapter_name``: one of the model's named adapters (``fa.load_adapter(..., adapter_name=)``);
    ``format="gguf"`` takes the active one only (``fa.set_adapter`` first). ``format="peft"``: it is
    written back as the folder it came from — its ``adapter_config.json``, its file's name, keys,
    dtypes and metadata, its current values (bit for bit what was loaded, unless it was trained or
    hot-swapped since; a changed tensor the file's dtype would round is written in its own dtype,
    with a warning); one made by ``fa.patch`` in fastadapt's format. None: the active adapter.
    An adapter already at ``path`` is replaced (its files; nothing else in a folder is touched), as
    PEFT's ``save_pretrained`` does (Trainer checkpoints rely on it); :func:`.export.export` refuses
    without ``overwrite=True``.

    Distributed: a ``DistributedDataParallel`` wrapper is looked through. With a process group of
    more than one process only global rank 0 writes. An FSDP2-sharded model (DTensor parameters)
    is gathered to full tensors, which is a collective: call it on every rank; all ranks return
    once the files are written."""
    model = distributed.unwrap(model)
    if format not in ADAPTER_FORMATS:
        raise ValueError(f"format must be one of {list(ADAPTER_FORMATS)}, got {format!r}")
    state = get_state(model)
    if state is None:
        raise ValueError("model has no adapter to save: call fa.patch(model, ...) first")
    if adapter_name is not None and state.named:
        if adapter_name not in state.named:
            raise ValueError(f"adapter_name {adapter_name!r} is not one of the model's adapters {list(state.named)}")
        record = state.named[adapter_name]
        if format == "gguf" and adapter_name != state.active:
            raise ValueError(f"adapter_name {adapter_name!r} is not the active adapter ({state.active!r}): a GGUF "
                             f"adapter is written from the active adapter's tensors; call "
                             f"fa.set_adapter(model, {adapter_name!r}) first")
        if format == "peft" and (record.saved is not None or adapter_name != state.active):
            distributed.check_not_sharded(model, "saving a named adapter")
            if distributed.is_main_process() if _writer is None else _writer:
                write_named_adapter(model, Path(path), record)
            return Path(path)
    elif adapter_name is not None and adapter_name != state.active:
        raise ValueError(f"adapter_name {adapter_name!r} is not one of the model's adapters [{state.active!r}]")
    method = get_method(state.method)
    path = Path(path)
    if format == "gguf":  # every check before the collective gather
        gguf_io.check_lora_adapter(model)
        gguf_io.layout(model)
        if path.is_dir():
            raise IsADirectoryError(f"adapter path {str(path)!r} is a directory; a GGUF adapter is one file "
                                    "(adapter.gguf)")
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
        if format == "gguf":
            return gguf_io.write_lora_adapter(model, path, gathered)
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
    A folder that holds a model (``config.json``, or weights that are not an adapter's) gets the
    adapter files only: its weights are never overwritten or shadowed.
    Without ``state_dict`` an FSDP2-sharded model is gathered here: call it on every rank then."""
    if state_dict is None and distributed.is_sharded(self):
        state_dict = adapter_state_dict(self)  # collective: before the rank check
    if not is_main_process:
        return
    tensors = adapter_state_dict(self, state_dict)  # gathered/copied once, for both files
    save_adapter(self, save_directory, _state_dict=tensors, _writer=True)
    folder = Path(save_directory)
    held = _model_in(folder, set(tensors))
    if held is not None:
        logger.warning(
            "%s holds a model (%s): wrote only the adapter files (%s, %s) and left the model's files alone; "
            "save checkpoints to a folder of their own", folder, held, CONFIG_NAME, SAFE_WEIGHTS_NAME,
        )
        return
    # written through our own temporary: safetensors.save_file writes through one of its own
    # (.tmpXXXXXX), which a killed process would leave behind
    weights = safetensors_bytes(tensors, metadata={"format": "pt", ADAPTER_ONLY_KEY: "1"})
    _files.atomic_write(folder / TRAINER_WEIGHTS_NAME, lambda f: Path(f).write_bytes(weights))


def _model_in(folder: Path, adapter_keys: set[str]) -> str | None:
    """What makes ``folder`` a model's folder (which save_pretrained must not write weights into), or
    None: a model file, or a ``model.safetensors`` that is not an adapter-only one of ours."""
    for name in MODEL_FILES:
        if (folder / name).exists():
            return name
    weights = folder / TRAINER_WEIGHTS_NAME
    if weights.exists():
        try:
            with safe_open(str(weights), "pt") as f:
                ours = (f.metadata() or {}).get(ADAPTER_ONLY_KEY) == "1" or set(f.keys()) <= adapter_keys
        except Exception:  # not even a readable safetensors file: not ours to replace
            ours = False
        if not ours:
            return f"{TRAINER_WEIGHTS_NAME} with weights other than this adapter's"
    return None


def write_adapter_files(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json``, each written atomically: both
    temporaries first (our own: safetensors' ``save_file`` writes through a ``.tmpXXXXXX`` of its
    own, which a killed process would leave behind), then two renames back to back. The weights
    record the options of the config they belong to (:func:`options_record`), so a save killed
    between the renames (new weights beside an old config) is refused on load instead of loading
    with wrong settings, while edits that change no option (indentation, the base model's name)
    load as before."""
    method, options = read_options(config, str(path))
    weights = safetensors_bytes(tensors, metadata={"format": "pt", OPTIONS_KEY: options_record(method, options)})
    text = json.dumps(config, indent=2) + "\n"
    _files.atomic_write_all([(path / SAFE_WEIGHTS_NAME, lambda f: Path(f).write_bytes(weights)),
                             (path / CONFIG_NAME, lambda f: Path(f).write_text(text))])


def named_adapter_tensors(model: nn.Module, record: NamedAdapter) -> dict[str, torch.Tensor]:
    """A named adapter's tensors under the model's own keys (``<module>.<role>``), own shapes."""
    state = get_state(model)
    out = {}
    for name in record.modules:
        module = model.get_submodule(name)
        if record.name == state.active:
            tensors = {k: v.detach().clone() for k, v in active_tensors(module).items()}
        else:
            tensors = module.bank.take(record.name, module)
        out.update({f"{name}.{role}": t for role, t in tensors.items()})
    return out


def write_named_adapter(model: nn.Module, path: Path, record: NamedAdapter) -> None:
    """``record``'s folder: its config as read, its weights file under its own name with its keys,
    dtypes and metadata (both files written atomically, as :func:`write_adapter_files`)."""
    tensors = named_adapter_tensors(model, record)
    if record.saved is None:
        raise ValueError(f"adapter {record.name!r} was made by fa.patch and is not active: it has no folder format")
    keyed, widened = {}, []
    for k, t in tensors.items():
        stored = _stored_dtype(t, record.dtypes.get(k, t.dtype))
        if stored != record.dtypes.get(k, t.dtype):
            widened.append(k)
        keyed[record.keys.get(k, PEFT_PREFIX + k)] = t.to(stored).contiguous().cpu()
    if widened:
        logger.warning("adapter %r: %d tensors changed since loading (trained?) are not exact in the folder's "
                       "dtype and are written as %s instead of being rounded (e.g. %s)", record.name, len(widened),
                       keyed[record.keys.get(widened[0], PEFT_PREFIX + widened[0])].dtype, widened[0])
    text = json.dumps(record.saved, indent=2) + "\n"
    name = record.weights_file or SAFE_WEIGHTS_NAME
    if name == BIN_WEIGHTS_NAME:
        def write_weights(f):
            torch.save(keyed, f)
    else:
        weights = safetensors_bytes(keyed, metadata=record.metadata)

        def write_weights(f):
            Path(f).write_bytes(weights)
    path.mkdir(parents=True, exist_ok=True)
    _files.atomic_write_all([(path / name, write_weights), (path / CONFIG_NAME, lambda f: Path(f).write_text(text))])
    logger.info("saved adapter %r (%d tensors) to %s", record.name, len(keyed), path)


def _stored_dtype(t: torch.Tensor, source: torch.dtype) -> torch.dtype:
    """The folder's dtype for ``t`` when it holds t exactly (what was loaded, or written since in that
    precision), else t's own: a trained fp32 value is never rounded to a bf16 file silently."""
    if source == t.dtype or torch.equal(t.to(source).to(t.dtype), t):
        return source
    return t.dtype


def read_saved_layout(path: str | os.PathLike) -> tuple[str, dict[str, str], dict[str, torch.dtype], dict | None]:
    """How an adapter folder's weights are stored: ``(file name, {model key: key as spelled in the
    file}, {model key: dtype}, safetensors metadata or None)`` — what writing it back needs."""
    path = Path(path)
    if (path / SAFE_WEIGHTS_NAME).is_file():
        with safe_open(str(path / SAFE_WEIGHTS_NAME), "pt") as f:
            metadata = f.metadata()
            keys = list(f.keys())
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        unknown = {k: v for k, v in dtypes.items() if v not in _SAFETENSORS_DTYPES}
        if unknown:  # writing such a tensor back as another dtype would not be the folder it came from
            key, dtype = next(iter(unknown.items()))
            raise ValueError(f"adapter weights {str(path / SAFE_WEIGHTS_NAME)!r}: tensor {key!r} has dtype {dtype}, "
                             f"expected one of {sorted(_SAFETENSORS_DTYPES)}")
        torch_dtypes = {k: _SAFETENSORS_DTYPES[v] for k, v in dtypes.items()}
        return (SAFE_WEIGHTS_NAME, {strip_peft_prefix(k): k for k in keys},
                {strip_peft_prefix(k): torch_dtypes[k] for k in keys}, metadata)
    tensors = torch.load(path / BIN_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    return (BIN_WEIGHTS_NAME, {strip_peft_prefix(k): k for k in tensors},
            {strip_peft_prefix(k): v.dtype for k, v in tensors.items()}, None)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def options_record(method: Method, options: dict[str, Any]) -> str:
    """What must agree between the weights and the config: the method and its options (targets,
    ranks, scaling, ...), less those that only change training (``method.training_options``)."""
    kept = {k: v for k, v in options.items() if k not in method.training_options}
    return json.dumps({"method": method.name, **kept}, sort_keys=True, default=list)


# -- loading -----------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter path {str(path)!r} is not a directory")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        named = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
        if named:  # PEFT writes each adapter but "default" into a subfolder named after it
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in adapter directory {str(path)!r}, but its subfolders {named} each hold a named "
                f"adapter (PEFT saves adapters other than 'default' that way): pass one of them, e.g. "
                f"{str(path / named[0])!r}")
        raise FileNotFoundError(f"no {CONFIG_NAME} in adapter directory {str(path)!r}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None


def read_options(saved: dict[str, Any], where: str) -> tuple[Method, dict[str, Any]]:
    """The method and ``fa.patch`` options of a saved ``adapter_config.json``; a ``peft_type`` no
    method reads is refused by name."""
    peft_type = saved.get("peft_type")
    reader = method_for_peft_type(peft_type) if isinstance(peft_type, str) else None
    if reader is None:
        known = ", ".join(f"{t!r} ({title})" for t, title in peft_types().items())
        raise ValueError(
            f"adapter at {where!r} has peft_type {peft_type!r}, which fastadapt does not load: it loads {known}. "
            "Other PEFT methods change the model in other ways; load them with PEFT"
        )
    name, options = reader.read_config(saved, where)
    return get_method(name), options


def read_adapter_tensors(path: str | os.PathLike, *, options: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors from ``adapter_model.safetensors`` (or ``adapter_model.bin``, read with
    ``torch.load(weights_only=True)``: never unpickles arbitrary objects), under the model's own
    names (PEFT's ``base_model.model.`` prefix stripped). ``options``: the :func:`options_record` of
    the config being loaded; weights saved by fastadapt with other options are refused."""
    path = Path(path)
    weights = path / SAFE_WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(str(weights), "pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(weights))
        except Exception as e:  # SafetensorError (not an OSError): a truncated or damaged file
            raise ValueError(f"{weights} is not a readable safetensors file ({e}): the file is truncated or "
                             "damaged; save or download the adapter again") from None
        _check_saved_together(path, metadata, options)
        return {strip_peft_prefix(k): v for k, v in tensors.items()}
    if (path / BIN_WEIGHTS_NAME).is_file():
        try:
            tensors = torch.load(path / BIN_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError) as e:  # a damaged zip/pickle
            raise ValueError(f"{path / BIN_WEIGHTS_NAME} is not a readable torch checkpoint ({e}): the file is "
                             "truncated or damaged; save or download the adapter again") from None
        return {strip_peft_prefix(k): v for k, v in tensors.items()}
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} in {str(path)!r}")


def _check_saved_together(path: Path, metadata: dict[str, str], options: str | None) -> None:
    weights, config = path / SAFE_WEIGHTS_NAME, path / CONFIG_NAME
    hint = "the save was interrupted, or the config edited: save the adapter again"
    if OPTIONS_KEY in metadata and options is not None and metadata[OPTIONS_KEY] != options:
        theirs, ours = json.loads(metadata[OPTIONS_KEY]), json.loads(options)
        keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        raise ValueError(
            f"{weights} was saved for {', '.join(f'{k}={theirs.get(k)!r}' for k in keys)}, but {config.name} says "
            f"{', '.join(f'{k}={ours.get(k)!r}' for k in keys)} ({hint})"
        )
    legacy = metadata.get(LEGACY_CONFIG_HASH_KEY)
    if OPTIONS_KEY not in metadata and legacy is not None and config.is_file():
        if hashlib.sha256(config.read_text().encode()).hexdigest() != legacy:
            raise ValueError(f"{weights} was saved (by an earlier fastadapt) with another {config.name}: {hint}")


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
    named = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head.weight by its own name too
    tensors = _without_base_copies(tensors, named, state, path)
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


def _without_base_copies(tensors: dict[str, torch.Tensor], named: dict[str, torch.Tensor], state,
                         path) -> dict[str, torch.Tensor]:
    """``tensors`` less full copies of the model's own base weights, which PEFT writes beside an
    adapter: ``<module>.base_layer.weight`` of an adapted embedding or output head, and the whole
    input/output embeddings with ``save_embedding_layers`` (``model.embed_tokens.weight``,
    ``lm_head.weight``: for a resized vocabulary). A copy equal to the model's weight is dropped; one
    that differs is refused, naming the key — fastadapt never replaces a base weight."""
    inside = tuple(f"{m}.base_layer." for m in state.modules)
    adapter = set(state.adapter_keys)
    copies = [k for k in tensors if k.startswith(inside) or (k in named and k not in adapter)]
    for key in copies:
        mine = named.get(key)
        theirs = tensors[key]
        if mine is None or theirs.shape != mine.shape or not torch.equal(theirs.to(mine), mine):
            what = (f"shape {tuple(theirs.shape)}, the model's {tuple(mine.shape)}" if mine is not None
                    and theirs.shape != mine.shape else "other values than the model's")
            raise ValueError(
                f"adapter at {str(path)!r} holds {key!r}, a full copy of a base weight (PEFT's save_embedding_layers "
                f"saves the embeddings when the vocabulary was resized) with {what}: fastadapt never replaces base "
                "weights; load it into the base model it was trained on (resize_token_embeddings and copy the "
                "saved embeddings in first), or save the adapter with save_embedding_layers=False"
            )
    if copies:
        logger.info("adapter at %s: ignored %d saved copies of base weights equal to the model's (%s)",
                    path, len(copies), copies[0])
    return {k: v for k, v in tensors.items() if k not in copies}


def _like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` laid out like ``param``: scattered to its shards when ``param`` is a DTensor."""
    if not distributed.is_dtensor(param):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    local = tensor.to(device=param.device_mesh.device_type, dtype=param.dtype)
    return distribute_tensor(local, param.device_mesh, param.placements)

