"""In-place LoRA merge ``W += s·B·A`` (issue 6): the CUDA kernel's bandwidth as a fraction of the
measured device copy bandwidth (target >= 80%), beside the torch path ``fa.merge`` falls back to.

Bytes moved by an ideal merge: one read and one write of W (A and B are tiny). The copy reference is
``dst.copy_(src)`` of the same size, timed in the same run. On CPU only a smoke case runs (torch
path, tiny shape): it proves the code runs, its numbers mean nothing."""

from __future__ import annotations

import benchlib
import pytest
import torch

from fastadapt.modules import LoraLinear
from fastadapt.ops.reference import lora_delta

CUDA = torch.cuda.is_available()
DEVICE = benchlib.bench_device()
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in) of LLaMA-7B projections
SMOKE_SHAPES = [(72, 40)]


def _layer(n: int, k: int, r: int, dtype: torch.dtype) -> LoraLinear:
    base = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=dtype)
    layer = LoraLinear(base, r=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.02)  # never time a zero delta
    return layer


@torch.no_grad()
def _merge(layer: LoraLinear, backend: str, sign: int):
    """One merge (``sign`` 1) or unmerge (-1) of ``backend``'s device work. ``fa.ops.lora_merge`` returns
    its finite check as a Python bool, a host sync per call that would hide the bandwidth measured here:
    the CUDA kernel is called as the op calls it, the torch path does ``lora_merge_ref``'s work with the
    check left on the device."""
    w, a, b = layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight
    if backend == "cuda":
        torch.ops.fastadapt.lora_merge_cuda_(w, a.float(), b.float(), float(layer.scaling), False, sign, False)
    else:
        merged = (w.float() + sign * lora_delta(a, b, layer.scaling)).to(w.dtype)
        torch.isfinite(merged).all()
        w.copy_(merged)


def _variants():
    out = ["torch"]
    if CUDA:
        out.append("cuda")
    return out


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("n,k", SHAPES if CUDA else SMOKE_SHAPES)
def test_bench_lora_merge(benchmark, n, k, r, variant):
    if not CUDA and r != 16:
        pytest.skip("CPU smoke: one case")
    if variant == "cuda":
        from fastadapt.ops import _native

        if not _native.native_available():
            pytest.skip(f"CUDA extension unavailable: {_native.native_load_error()}")
    dtype = torch.bfloat16 if CUDA else torch.float32
    layer = _layer(benchlib.dim(n), benchlib.dim(k), r, dtype)
    # merge, unmerge, merge, ...: W stays where it started instead of drifting over thousands of calls
    fn = benchlib.Rotator([lambda: _merge(layer, variant, 1), lambda: _merge(layer, variant, -1)])
    w = layer.base_layer.weight
    src, dst = torch.empty_like(w).normal_(), torch.empty_like(w)
    copy_ms = benchlib.median_ms(lambda: dst.copy_(src), DEVICE, cpu_iters=2)
    fn()  # warm-up (and JIT/autotune)
    med = benchlib.median_ms(fn, DEVICE, cpu_iters=1)
    peak, _ = benchlib.peak_memory_delta(fn, DEVICE)
    benchmark.group = f"lora_merge {n}x{k} r={r}"
    benchmark.pedantic(benchlib.synchronized(fn, DEVICE), rounds=5 if CUDA else 1, iterations=1)
    moved = 2 * w.numel() * w.element_size()
    benchlib.record(benchmark, {
        "suite": "lora_merge", "case": f"W {n}x{k} r={r}", "variant": variant, "mode": "merge",
        "M": n, "K": k, "r": r, "dtype": dtype, "median_ms": med, "peak_mem_bytes": peak,
        "ref_variant": "device_copy", "ref_ms": copy_ms,
        "bandwidth_gbps": moved / (med * 1e-3) / 1e9 if med else None,
        "fraction_of_copy_bandwidth": copy_ms / med if med else None,
    })
