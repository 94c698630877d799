"""Merge, export and prove the export right: what ``fastadapt export`` and the main job both run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..export import export, parse_dtype, quantized_layers
from ..merge import dequantize_bases, merge

logger = logging.getLogger(__name__)

PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Natalia sold 48 clips in April.")
#: Merged vs adapted logits, max relative difference: W + s·BA rounded once to the weight dtype
#: against the unmerged sum; bf16/fp16 weights round at ~4e-3 per element.
MERGE_TOLERANCE = {torch.float32: 1e-4}
LOW_PRECISION_MERGE_TOLERANCE = 3e-2
#: The reloaded files against the merged model with its weights rounded to the written dtype: both
#: run in the same dtype, so any difference is a wrong file.
RELOAD_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ExportCheck:
    path: Path
    merge_diff: float
    reload_diff: float


def probe_batch(tokenizer: Any, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    if tokenizer is not None:
        batch = dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))
    else:
        g = torch.Generator().manual_seed(0)
        batch = {"input_ids": torch.randint(0, vocab_size, (2, 12), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


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

    model.eval()
    if quantized_layers(model):
        # A quantized base (QLoRA) is exported dequantized: the model becomes that full-precision model
        # first, so both checks compare like with like (bitsandbytes' own CPU kernels round otherwise).
        dequantize_bases(model, all_layers=True)
    device = next(model.parameters()).device
    batch = probe_batch(tokenizer, model.config.vocab_size, device)
    adapted = _logits(model, batch)
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
