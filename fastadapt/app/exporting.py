"""Merge, export and prove the export right (a transformers checkpoint reloaded by transformers, a GGUF
file read back by transformers' GGUF loader): what ``fastadapt export`` and the main job both run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..export import (
    DEFAULT_GGUF_QUANT,
    GgufExport,
    export,
    export_gguf,
    parse_dtype,
    probe_batch,
    quantized_layers,
)
from ..merge import dequantize_bases, merge
from .gguf_agreement import gguf_transformers

logger = logging.getLogger(__name__)

#: Merged vs adapted logits, max relative difference: W + s·BA rounded once to the weight dtype
#: against the unmerged sum; bf16/fp16 weights round at ~4e-3 per element.
MERGE_TOLERANCE = {torch.float32: 1e-4}
LOW_PRECISION_MERGE_TOLERANCE = 3e-2
#: The reloaded files against the merged model with its weights rounded to the written dtype: both
#: run in the same dtype, so any difference is a wrong file.
RELOAD_TOLERANCE = 1e-6
#: A GGUF file read back by transformers against the adapted model, mean |Δlogit|: f32 holds the
#: merged weights themselves (differences are the merge's fp32 rounding); a quantized file may be
#: this much (relative) further than its own recorded quantization error, which was measured on the
#: same probe batch against the merged model rather than the adapted one.
GGUF_F32_TOLERANCE = 1e-4
GGUF_RELOAD_SLACK = 0.1


@dataclass(frozen=True)
class ExportCheck:
    path: Path
    merge_diff: float
    reload_diff: float


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def _probe(model, tokenizer) -> tuple[dict, torch.Tensor]:
    """(the probe batch, the adapted model's logits on it), the model put in eval mode. A quantized
    base (QLoRA) is exported dequantized: the model becomes that full-precision model first, so the
    checks compare like with like (bitsandbytes' own CPU kernels round otherwise)."""
    model.eval()
    if quantized_layers(model):
        dequantize_bases(model, all_layers=True)
    batch = probe_batch(tokenizer, model.config.vocab_size, next(model.parameters()).device)
    return batch, _logits(model, batch)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def merge_export_and_check(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> ExportCheck:
    """``fa.merge`` then ``fa.export`` a patched (LoRA or DoRA) model, checking each step on a probe batch:
    merged vs adapted logits within :data:`MERGE_TOLERANCE`, and the export reloaded with plain
    transformers vs the merged model within :data:`RELOAD_TOLERANCE`. Raises
    ``FloatingPointError`` on a mismatch (the export is left in place for inspection). The model
    ends merged, its weights rounded to the written dtype. A quantized base is dequantized first
    (``fa.dequantize_bases(all_layers=True)``): the checks then hold against that full-precision
    model, which for a 4-bit base computes what the adapted 4-bit model computed."""
    from transformers import AutoModelForCausalLM

    batch, adapted = _probe(model, tokenizer)
    device = batch["input_ids"].device
    merge(model)
    merge_diff = max_rel_diff(_logits(model, batch), adapted)
    logger.info("merged vs adapted logits: max relative difference %.2e", merge_diff)
    tolerance = MERGE_TOLERANCE.get(model.dtype, LOW_PRECISION_MERGE_TOLERANCE)
    if merge_diff > tolerance:
        raise FloatingPointError(
            f"the merged model differs from the adapted model ({merge_diff:.2e} > {tolerance:.0e})"
        )

    path = export(model, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    written = parse_dtype(dtype) or model.dtype
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(written))
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(device).eval()
    reload_diff = max_rel_diff(_logits(reloaded, batch), _logits(model, batch))
    logger.info("reloaded export vs merged model (%s weights): max relative difference %.2e", written, reload_diff)
    if reload_diff > RELOAD_TOLERANCE:
        raise FloatingPointError(f"the exported checkpoint does not reproduce the merged model ({reload_diff:.2e})")
    return ExportCheck(path=Path(path), merge_diff=merge_diff, reload_diff=reload_diff)


@dataclass(frozen=True)
class GgufCheck:
    """A GGUF export and its check by a real client: transformers' GGUF loader read the file back and
    its logits were compared to the adapted model's on the probe batch."""

    export: GgufExport
    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    argmax_agreement: float
    loaded: Any  # the model transformers' GGUF loader built from the file


def export_gguf_and_check(model: Any, tokenizer: Any, out: str | os.PathLike, *, quant: str = DEFAULT_GGUF_QUANT,
                          overwrite: bool = False) -> GgufCheck:
    """:func:`~fastadapt.export.export_gguf` ``model`` (patched, merged or not) to the file ``out``, then
    load the file with transformers' GGUF loader (``from_pretrained(folder, gguf_file=...)``) and
    compare its logits with ``model``'s on the probe batch. Raises ``FloatingPointError`` when the
    loaded model is further from ``model`` than the export's own measured quantization error allows
    (:data:`GGUF_RELOAD_SLACK`); f32 must be exact within :data:`GGUF_F32_TOLERANCE`. A quantized base
    (QLoRA) is dequantized first, as in :func:`merge_export_and_check`: the file holds the dequantized
    merged weights, and the check compares like with like."""
    batch, adapted = _probe(model, tokenizer)
    device = batch["input_ids"].device
    result = export_gguf(model, out, tokenizer=tokenizer, quant=quant, overwrite=overwrite)
    loaded = gguf_transformers(result.path).to(device)
    logits = _logits(loaded, batch)
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    diff = (logits - adapted).abs()[mask]
    agree = (logits.argmax(-1) == adapted.argmax(-1))[mask].float().mean().item()
    check = GgufCheck(export=result, mean_abs_logit_diff=diff.mean().item(), max_abs_logit_diff=diff.max().item(),
                      argmax_agreement=agree, loaded=loaded)
    # The loaded model holds the file's weights, so it must be as far from the adapted model as the
    # export measured its quantization to be (that measurement ran the same probe batch).
    allowed = GGUF_F32_TOLERANCE if result.error is None else (
        result.error.mean_abs_logit_diff * (1 + GGUF_RELOAD_SLACK) + GGUF_F32_TOLERANCE)
    logger.info("GGUF %s read back by transformers: mean |Δlogit| %.4f vs the adapted model (allowed %.4f), "
                "argmax agreement %.1f%%", quant, check.mean_abs_logit_diff, allowed, 100 * agree)
    if check.mean_abs_logit_diff > allowed:
        raise FloatingPointError(
            f"the GGUF file read back by transformers differs from the adapted model by mean |Δlogit| "
            f"{check.mean_abs_logit_diff:.4g}, more than its quantization accounts for ({allowed:.4g})")
    return check


def describe_gguf_check(check: GgufCheck) -> str:
    """One paragraph for the command line: the file, its quantization error, the read-back check."""
    e = check.export
    size = Path(e.path).stat().st_size / 2**20
    error = f"quantization error (probe batch, vs the unquantized merged model): {e.error}" if e.error else \
        "f32: no quantization"
    return (f"exported a {e.quant} GGUF to {e.path} ({size:.1f} MiB) in {e.seconds:.1f} s\n{error}\n"
            f"read back by transformers' GGUF loader: mean |Δlogit| {check.mean_abs_logit_diff:.4f}, max "
            f"{check.max_abs_logit_diff:.3f}, argmax agreement {check.argmax_agreement:.1%} vs the adapted model\n"
            f"run it: llama-cli -m {e.path}   (Ollama: a Modelfile with the line `FROM ./{Path(e.path).name}`)")
