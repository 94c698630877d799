"""``fa.export``: the model with its adapter merged, as a plain-transformers checkpoint that loads
without fastadapt, or as one GGUF file for llama.cpp and Ollama (:func:`export_gguf`; the file
format itself is :mod:`.gguf_io`)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _files, distributed, gguf_io
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
FORMATS = ("transformers", "gguf")
DEFAULT_GGUF_QUANT = "q8_0"
#: a quantized GGUF export warns when its error on the probe batch is at least this fraction of the
#: adapter's own effect there
LOST_ADAPTER = 0.5
#: The probe batch on which exports are checked (merged vs adapted, reloaded vs merged, quantized vs
#: unquantized): a sentence and a GSM8K-style problem.
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Natalia sold 48 clips in April.")
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
    quantize: bool = False,
    probe: dict[str, torch.Tensor] | torch.Tensor | None = None,
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
    rank 0 (a collective: call it on every rank; rank 0 needs CPU memory for the whole model).

    Quantized bases (bitsandbytes 4-bit/8-bit, ``fa.load_model(quantize=...)``): every quantized
    layer is dequantized, the adapters merged in fp32 and the checkpoint written in ``dtype``
    (default: the dtype the model computes in) with no ``quantization_config``: it loads with plain
    transformers. ``quantize=True`` instead merges into the base's own 4-bit format (re-quantizing
    each adapted layer as its base was), which rounds part of the adapter away: the change of the
    logits on ``probe`` (token ids, or a batch dict; default: 2x16 seeded random ids) against the
    unmerged adapted model is logged and written, with the adapter's own effect for scale, to
    ``fastadapt_export.json`` in the export; that checkpoint needs bitsandbytes to load."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == "gguf":
        if dtype is not None:
            raise ValueError("dtype is for format='transformers'; a GGUF export takes quant= (e.g. 'f16', 'q8_0')")
        if quantize or probe is not None:
            raise ValueError("quantize/probe are for format='transformers' (a bitsandbytes checkpoint); a GGUF "
                             "export dequantizes a 4-bit/8-bit base and takes quant= (e.g. 'q4_0', 'q8_0')")
        return export_gguf(model, path, quant=quant or DEFAULT_GGUF_QUANT, tokenizer=tokenizer,
                           overwrite=overwrite).path
    if quant is not None:
        raise ValueError("quant is for format='gguf'; a transformers export takes dtype= ('bf16', 'fp16', 'fp32')")
    model = _pretrained(model)
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
        # a 4-bit/8-bit base is written dequantized, as merged_state_dict does for an adapted one
        replaced, dropped = ({}, set()) if full is not None else _dequantized_entries(
            model, dtype or activation_dtype(model))
        return {k: replaced.get(k, v).detach() for k, v in source.items() if k not in dropped}
    return merged_state_dict(model, dtype, full_state_dict=full)


@dataclass(frozen=True)
class QuantizationError:
    """The quantized model's logits against the unquantized merged model's on :data:`PROBE_TEXTS`."""

    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    argmax_agreement: float  # fraction of positions where both pick the same next token
    tokens: int
    #: for scale, mean |Δlogit| of the unquantized merged model against its base (the adapter's own
    #: effect); None without an unmerged adapter
    adapter_effect: float | None = None

    def __str__(self) -> str:
        effect = "" if self.adapter_effect is None else f"; the adapter itself moves them by {self.adapter_effect:.4f}"
        return (f"mean |Δlogit| {self.mean_abs_logit_diff:.4f}, max {self.max_abs_logit_diff:.3f}, "
                f"argmax agreement {self.argmax_agreement:.1%} on {self.tokens} probe tokens{effect}")


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
        if _tied_output(model, state_dict):
            state_dict.pop("lm_head.weight")
        tensors = gguf_io.file_tensors(state_dict, lay, quant)
        error = None if quant == "f32" else _quantization_error(model, state_dict, tensors, lay, tokenizer,
                                                                _base_weights(model, state_dict))
        effect = None if error is None else error.adapter_effect
        if effect and error.mean_abs_logit_diff >= LOST_ADAPTER * effect:
            # a short fine-tune moves each weight by less than a quantization step: rounding the merged
            # weight lands it back on the base's grid point (docs/gguf.md, measured)
            logger.warning("%s rounding moves the logits by %.0f%% of what the adapter itself moves them (mean "
                           "|Δlogit| %.3g vs %.3g on the probe batch): the file has lost much of the adapter; "
                           "q8_0, or the base GGUF plus save_adapter(format='gguf'), keeps it", quant,
                           100 * error.mean_abs_logit_diff / error.adapter_effect, error.mean_abs_logit_diff,
                           error.adapter_effect)
        extra = {"source": "fastadapt export", "adapter": state.method if state is not None else "none"}
        if error is not None:
            extra.update({"quantization.type": quant, "quantization.probe_tokens": error.tokens,
                          "quantization.mean_abs_logit_diff": error.mean_abs_logit_diff,
                          "quantization.max_abs_logit_diff": error.max_abs_logit_diff,
                          "quantization.argmax_agreement": error.argmax_agreement})
            if error.adapter_effect is not None:
                extra["quantization.adapter_effect_mean_abs_logit_diff"] = error.adapter_effect
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


def _tied_output(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``lm_head.weight`` is the embedding, so the file leaves it out (llama.cpp then uses
    ``token_embd`` as the output). Judged by the values, not only the config's flag: an output
    projection that differs (untied by hand, a config that says tied over separate weights) is
    written as ``output.weight`` rather than dropped."""
    out = state_dict.get("lm_head.weight")
    if out is None or not _tied(model):
        return False
    embedding = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    emb = state_dict.get(f"{name}.weight") if name is not None else None
    if emb is not None and emb.shape == out.shape and torch.equal(emb, out):
        return True
    logger.warning("the config ties the word embeddings but lm_head.weight differs from the embedding: the "
                   "file keeps it as its own output projection (output.weight)")
    return False


def _model_name(model: nn.Module, path: Path) -> str:
    return str(getattr(model.config, "_name_or_path", "") or path.stem)


@torch.no_grad()
def _quantization_error(model: nn.Module, state_dict: dict[str, torch.Tensor], tensors: list, lay: Any,
                        tokenizer: Any, base: dict[str, torch.Tensor] | None = None) -> QuantizationError:
    """Logits of a plain copy of the model holding the file's (dequantized) weights against the same
    copy holding ``state_dict`` (the unquantized merged weights); with ``base`` (the adapted weights'
    base values, :func:`_base_weights`) also that copy's against its base."""
    dtype = next(iter(state_dict.values())).dtype
    device = next(iter(state_dict.values())).device
    values = {t.hf_name: t.values(lay).to(device, dtype) for t in tensors}
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:  # a 4-bit/8-bit base: the twin is plain
        del config.quantization_config
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
    effect = None
    if base:
        twin.load_state_dict(base, strict=False)
        effect = (twin(**batch).logits.float() - reference).abs()[mask].mean().item()
    return QuantizationError(mean_abs_logit_diff=diff.mean().item(), max_abs_logit_diff=diff.max().item(),
                             argmax_agreement=agree.float().mean().item(), tokens=int(mask.sum()),
                             adapter_effect=effect)


def _base_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The base weights under the merged state dict's names, for the unmerged adapted modules of an
    unsharded model (dequantized for a 4-bit/8-bit base); None when there are none."""
    if get_state(model) is None or distributed.is_sharded(model):
        return None
    out = {}
    for name, module in adapter_modules(model):
        key = f"{name}.weight"
        if module.merged or key not in state_dict:
            continue
        base = module.base_layer
        weight = dequantized_weight(base, torch.float32) if quantized_kind(base) is not None else base.weight
        out[key] = weight.detach().to(state_dict[key].device, state_dict[key].dtype)
    return out or None


def _plain_class(model: nn.Module) -> type:
    """The model's transformers class (FSDP2 swaps the class of a sharded model for ``FSDP<Class>``)."""
    from transformers import PreTrainedModel

    return next(c for c in type(model).__mro__
                if issubclass(c, PreTrainedModel) and not c.__name__.startswith("FSDP"))


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
    if not type(model).__name__.startswith("FSDP"):
        return
    plain = _plain_class(model)
    config = json.loads(config_file.read_text())
    if config.get("architectures") == [type(model).__name__]:
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
