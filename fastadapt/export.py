"""``fa.export``: the model with its adapter merged, as a plain-transformers checkpoint that loads
without fastadapt, or as one GGUF file for llama.cpp and Ollama (:func:`export_gguf`; the file
format itself is :mod:`.gguf_io`)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _files, distributed, gguf_io
from .methods import adapter_modules, get_method, get_state

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("transformers", "gguf")
DEFAULT_GGUF_QUANT = "q8_0"
#: The probe batch on which exports are checked (merged vs adapted, reloaded vs merged, quantized vs
#: unquantized): a sentence and a GSM8K-style problem.
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Natalia sold 48 clips in April.")


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


def probe_batch(tokenizer: Any, vocab_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """:data:`PROBE_TEXTS` tokenized (random ids without a tokenizer), on ``device``."""
    if tokenizer is not None:
        batch = dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))
    else:
        g = torch.Generator().manual_seed(0)
        batch = {"input_ids": torch.randint(0, vocab_size, (2, 12), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "transformers",
    tokenizer: Any = None,
    dtype: str | torch.dtype | None = None,
    quant: str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write ``model`` with its LoRA/DoRA adapters merged; the model itself is not changed.

    ``format="transformers"`` (default): a plain transformers checkpoint folder (safetensors, config,
    generation config, and the tokenizer when given) that ``AutoModelForCausalLM.from_pretrained(path)``
    loads without fastadapt, weights in ``dtype`` ("bf16", "fp16", "fp32"; default: the model's).
    Writes into a temporary folder beside ``path`` and swaps it in at the end (one atomic
    step on Linux: ``path`` is always the old export or the new one, even if the process is
    killed); a later export removes what a killed one left. Refuses a non-empty ``path`` unless
    ``overwrite=True``.

    ``format="gguf"``: one GGUF file at ``path`` for llama.cpp / Ollama, weights in ``quant``
    (:data:`.gguf_io.QUANTS`: "q8_0" (default), "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16", "f32");
    ``tokenizer`` is required (the file carries it). See :func:`export_gguf`.

    Distributed: a ``DistributedDataParallel`` wrapper is looked through and, with more than one
    process, only global rank 0 writes. An FSDP2-sharded model is gathered to full CPU tensors on
    rank 0 (a collective: call it on every rank; rank 0 needs CPU memory for the whole model)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == "gguf":
        if dtype is not None:
            raise ValueError("dtype is for format='transformers'; a GGUF export takes quant= (e.g. 'f16', 'q8_0')")
        return export_gguf(model, path, quant=quant or DEFAULT_GGUF_QUANT, tokenizer=tokenizer,
                           overwrite=overwrite).path
    if quant is not None:
        raise ValueError("quant is for format='gguf'; a transformers export takes dtype= ('bf16', 'fp16', 'fp32')")
    model = _pretrained(model)
    path = Path(path)
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


def _pretrained(model: nn.Module) -> nn.Module:
    from transformers import PreTrainedModel

    model = distributed.unwrap(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return model


def _full_state_dict(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor] | None:
    """What an export writes: the merged state dict (the model's own when it has no adapter), gathered
    from shards on rank 0 (a collective: every rank calls it); None off rank 0."""
    full = _gather_full_state_dict(model) if distributed.is_sharded(model) else None
    if not distributed.is_main_process():
        return None
    if get_state(model) is None:
        source = full if full is not None else model.state_dict()
        return {k: v.detach() for k, v in source.items()}
    return merged_state_dict(model, dtype, full_state_dict=full)


@dataclass(frozen=True)
class QuantizationError:
    """The quantized model's logits against the unquantized merged model's on :data:`PROBE_TEXTS`."""

    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    argmax_agreement: float  # fraction of positions where both pick the same next token
    tokens: int

    def __str__(self) -> str:
        return (f"mean |Δlogit| {self.mean_abs_logit_diff:.4f}, max {self.max_abs_logit_diff:.3f}, "
                f"argmax agreement {self.argmax_agreement:.1%} on {self.tokens} probe tokens")


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote: the file, its type, the error its quantization adds (None for
    f32), and the wall-clock seconds it took."""

    path: Path
    quant: str
    error: QuantizationError | None
    seconds: float


def export_gguf(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any, quant: str = DEFAULT_GGUF_QUANT,
                overwrite: bool = False, name: str | None = None) -> GgufExport:
    """Write ``model`` (its LoRA/DoRA adapter merged; a model without an adapter as it is) as one GGUF file
    that llama.cpp and Ollama run with no other file: the architecture's metadata, tensors named by
    the ``gguf`` package's maps, the tokenizer, and weights in ``quant`` (:mod:`.gguf_io` says what
    goes in and why). Model types: :func:`.gguf_io.supported_model_types` (LLaMA, Mistral, Qwen2 and
    SmolLM); others are refused by name.

    Except for ``f32``, the quantization's error is measured before writing: the logits of the model
    with the file's weights (dequantized) against those of the unquantized merged model on
    :data:`PROBE_TEXTS`; it is logged, returned and recorded in the file under
    ``fastadapt.quantization.*``. Measuring holds one more copy of the weights (in the model's dtype).
    The file is written to a temporary name and renamed: a killed export never leaves a half-written
    file at ``path``. An existing ``path`` is refused unless ``overwrite=True``. ``name``: the file's
    ``general.name`` (default: the model's name or path). Distributed as :func:`export`."""
    start = time.perf_counter()
    model = _pretrained(model)
    quant = gguf_io.check_quant(quant)
    path = Path(path)
    if distributed.is_main_process():
        _files.clean_stale(path)
    if path.is_dir():
        raise IsADirectoryError(f"export path {str(path)!r} is a directory; a GGUF export is one file (model.gguf)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"export path {str(path)!r} exists; pass overwrite=True to replace it")
    # everything that can refuse the model runs on every rank before any collective
    lay, hp, tok = check_gguf(model, tokenizer)
    state = get_state(model)
    try:
        state_dict = _full_state_dict(model, None)
        if state_dict is None:  # not rank 0
            return GgufExport(path=path, quant=quant, error=None, seconds=time.perf_counter() - start)
        if _tied(model):
            state_dict.pop("lm_head.weight", None)
        tensors = gguf_io.file_tensors(state_dict, lay, quant)
        error = None if quant == "f32" else _quantization_error(model, state_dict, tensors, lay, tokenizer)
        extra = {"source": "fastadapt export", "adapter": state.method if state is not None else "none"}
        if error is not None:
            extra.update({"quantization.type": quant, "quantization.probe_tokens": error.tokens,
                          "quantization.mean_abs_logit_diff": error.mean_abs_logit_diff,
                          "quantization.max_abs_logit_diff": error.max_abs_logit_diff,
                          "quantization.argmax_agreement": error.argmax_agreement})
        gguf_io.write_model(path, lay=lay, hp=hp, tokenizer=tok, tensors=tensors, quant=quant,
                            name=name or _model_name(model, path), extra=extra)
    finally:
        if distributed.is_sharded(model):
            distributed.barrier()
    seconds = time.perf_counter() - start
    logger.info("exported %s GGUF (%s) to %s in %.1f s%s", lay.arch, quant, path, seconds,
                f"; quantization error: {error}" if error is not None else "")
    return GgufExport(path=path, quant=quant, error=error, seconds=seconds)


def check_gguf(model: nn.Module, tokenizer: Any) -> tuple[Any, Any, Any]:
    """Raise, naming what and why, when ``model`` (with its adapter) and ``tokenizer`` cannot be written as
    GGUF; else ``(layout, hyper-parameters, tokenizer facts)`` (:mod:`.gguf_io`)."""
    model = _pretrained(model)
    if tokenizer is None:
        raise ValueError("tokenizer is required for format='gguf': the file carries the tokenizer llama.cpp runs")
    state = get_state(model)
    if state is not None and get_method(state.method).merge_error is not None:
        merged_state_dict(model)  # raises the guidance error
    lay = gguf_io.layout(model)
    hp = gguf_io.hparams(model, lay.arch)
    return lay, hp, gguf_io.tokenizer_facts(tokenizer, hp.vocab_size)


def _tied(model: nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


def _model_name(model: nn.Module, path: Path) -> str:
    return str(getattr(model.config, "_name_or_path", "") or path.stem)


@torch.no_grad()
def _quantization_error(model: nn.Module, state_dict: dict[str, torch.Tensor], tensors: list, lay: Any,
                        tokenizer: Any) -> QuantizationError:
    """Logits of a plain copy of the model holding the file's (dequantized) weights against the same
    copy holding ``state_dict`` (the unquantized merged weights)."""
    dtype = next(iter(state_dict.values())).dtype
    device = next(iter(state_dict.values())).device
    values = {t.hf_name: t.values(lay).to(device, dtype) for t in tensors}
    config = copy.deepcopy(model.config)
    twin = _plain_class(model).from_pretrained(None, config=config, state_dict=values, dtype=dtype).to(device).eval()
    batch = probe_batch(tokenizer, model.config.vocab_size, device)
    quantized = twin(**batch).logits.float()
    if not torch.isfinite(quantized).all():  # a block scale overflowed float16: say which tensor
        bad = next((n for n, v in values.items() if not torch.isfinite(v).all()), "none (the activations)")
        raise FloatingPointError(f"the quantized model's logits are not finite; non-finite tensor: {bad!r}")
    missing, unexpected = twin.load_state_dict(state_dict, strict=False)  # copies into the twin's tensors
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    reference = twin(**batch).logits.float()
    mask = batch.get("attention_mask", torch.ones(batch["input_ids"].shape, device=device)).bool()
    diff = (quantized - reference).abs()[mask]
    agree = (quantized.argmax(-1) == reference.argmax(-1))[mask]
    return QuantizationError(mean_abs_logit_diff=diff.mean().item(), max_abs_logit_diff=diff.max().item(),
                             argmax_agreement=agree.float().mean().item(), tokens=int(mask.sum()))


def _plain_class(model: nn.Module) -> type:
    """The model's transformers class (FSDP2 swaps the class of a sharded model for ``FSDP<Class>``)."""
    from transformers import PreTrainedModel

    return next(c for c in type(model).__mro__
                if issubclass(c, PreTrainedModel) and not c.__name__.startswith("FSDP"))


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
    if not type(model).__name__.startswith("FSDP"):
        return
    plain = _plain_class(model)
    config = json.loads(config_file.read_text())
    if config.get("architectures") == [type(model).__name__]:
        config["architectures"] = [plain.__name__]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
