"""Kernel-level benchmark of QLoRA's op, ``fa.ops.lora_linear_4bit`` (suite ``lora_linear_4bit``): the
records' measurement of ``scripts/gpu-check.sh`` (its bench-lora step, after the LoRA goals).

Variants, bf16 activations, a double-quantized NF4 frozen weight (block size 64), fp32 adapters r=16:
- ``torch``                 the torch path (``backend="torch"``: dequantize then matmul, what ``auto``
                            runs without a record; every record's reference);
- ``fastadapt_fused``       the Triton backend, fused dequantizing GEMM variant;
- ``fastadapt_dequantize``  the Triton backend, dequantize kernel + LoRA's cuBLAS addmm variant.
Modes: ``fwd_bwd`` at M=8192 (``autograd.grad`` of dX, dA, dB) and ``decode`` (no-grad forward) at
M=1 and 16, on the LLaMA-7B shapes q/o (4096x4096) and gate/up (4096x11008); dropout 0 (the GPU
harness checks dropout). The weight and inputs are drawn on the device (tests/gpu/test_fused_ops_gpu.py's
``weight4bit``). Without CUDA only the ``smoke`` case runs (tiny shape, every variant, interpreter).
"""

from __future__ import annotations

import importlib
import sys

import benchlib
import pytest
import torch

import fastadapt as fa

sys.path.insert(0, str(benchlib.REPO / "tests" / "gpu"))
from test_fused_ops_gpu import weight4bit  # noqa: E402  (one home for a random 4-bit weight)

SHAPES = ((4096, 4096), (4096, 11008))
CASES_M = {"fwd_bwd": (8192,), "decode": (1, 16)}
RANK = 16
VARIANTS = ("torch", "fastadapt_fused", "fastadapt_dequantize")
DTYPE = torch.bfloat16


def _inputs(M, K, N, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    w4 = weight4bit(N, K, g, device, scale=K**-0.5)
    x = torch.randn(M, K, generator=g, device=device).to(DTYPE).requires_grad_()
    a = (torch.randn(RANK, K, generator=g, device=device) * K**-0.5).requires_grad_()
    b = (torch.randn(N, RANK, generator=g, device=device) * 0.1).requires_grad_()
    return w4, x, a, b, torch.randn(M, N, generator=g, device=device).to(DTYPE)


def _step(variant, mode, M, K, N, device, seed):
    w4, x, a, b, dy = _inputs(M, K, N, device, seed)
    backend = "torch" if variant == "torch" else "triton"

    def fwd():
        return fa.ops.lora_linear_4bit(x, w4, a, b, scaling=2.0, backend=backend)

    if mode == "decode":
        return torch.no_grad()(fwd)
    return lambda: torch.autograd.grad(fwd(), (x, a, b), dy)


def run(benchmark, monkeypatch, variant, mode, M, K, N, *, rounds, cpu_iters):
    if variant != "torch":  # pin the variant (rows pick it until a record does)
        op4 = importlib.import_module("fastadapt.ops.lora_linear_4bit")
        monkeypatch.setattr(op4, "FUSED_MAX_ROWS", 1 << 62 if variant == "fastadapt_fused" else 0)
    device = benchlib.bench_device()
    dims = benchlib.dim(M), benchlib.dim(K), benchlib.dim(N)
    set_bytes = dims[0] * dims[1] * 2 + dims[1] * dims[2] // 2 + dims[0] * dims[2] * 2
    rot = benchlib.Rotator([_step(variant, mode, *dims, device, seed=100 + i)
                            for i in range(benchlib.rotations(set_bytes, device))])
    med = benchlib.median_ms(rot, device, cpu_iters=cpu_iters)
    benchmark.group = f"lora_linear_4bit {mode} K{K}xN{N}-M{M}"
    benchmark.pedantic(benchlib.synchronized(rot, device), rounds=rounds, warmup_rounds=int(device.type == "cuda"),
                       iterations=1)
    case = f"K{K}xN{N}-M{M}-r{RANK}-p0"
    info = benchlib.record(benchmark, {
        "suite": "lora_linear_4bit", "case": case, "mode": mode, "variant": variant, "ref_variant": "torch",
        "ref_key": case, "median_ms": med, "M": M, "K": K, "N": N, "r": RANK, "dropout": 0.0, "dtype": DTYPE,
        "weight": "nf4, double-quantized, blocksize 64", "adapter_dtype": "float32", "shape": f"K{K}xN{N}",
    })
    assert info["median_ms"] > 0


def _cases():
    return [pytest.param(variant, mode, M, K, N, id=f"{mode}-K{K}xN{N}-M{M}-r{RANK}-p0-{variant}")
            for K, N in SHAPES for mode, ms in CASES_M.items() for M in ms for variant in VARIANTS]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU benchmark)")
@pytest.mark.parametrize("variant,mode,M,K,N", _cases())
def test_lora_linear_4bit(benchmark, monkeypatch, variant, mode, M, K, N):
    run(benchmark, monkeypatch, variant, mode, M, K, N, rounds=benchlib.env_int("FASTADAPT_BENCH_ROUNDS", 5),
        cpu_iters=0)


@pytest.mark.smoke
@pytest.mark.parametrize("mode", CASES_M)
@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_lora_linear_4bit(benchmark, monkeypatch, variant, mode):
    run(benchmark, monkeypatch, variant, mode, 5, 40, 24, rounds=2, cpu_iters=1)
