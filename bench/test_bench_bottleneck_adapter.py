"""Bottleneck adapters: fused (Triton / CUDA) vs eager PyTorch, forward and fwd+bwd, peak memory.

Issue 18 shapes (H100/H200, bf16): d = 4096, b = 256, M = 8192 (the Triton series adapter's fused
plan) and M = 2048 (its split plan), dropout 0 and 0.1 (the stored-mask path). Baselines:
- "llm_adapters": eager, LLM-Adapters as it runs (fp32 adapter math: x.float() → dropout → down →
  act → up, then cast back and added; separate ops);
- "eager_bf16": the torch backend (``bottleneck_adapter_ref`` / ``parallel_adapter_ref``) in bf16 —
  the eager baseline of the offline report (.ci/check_triton.py), and the reference of the ratios.
Targets: fused series fwd+bwd ≥ 2.5× faster than eager (predicted 2.54× / 3.18× at M = 8192,
p = 0 / 0.1 over "eager_bf16": bench/NOTES.md) and within 1.3× of the memory floor (read x, write
out: bytes / measured copy bandwidth); parallel within 1.15× of the frozen linear plus the
adapter's own GEMM FLOPs.

Cases are marked ``gpu`` (target shape) or ``smoke`` (tiny CPU run in the interpreter; numbers mean
nothing). Records go through ``benchlib.record``: suite, case, variant, mode (forward | fwd_bwd), M, d,
b, dtype, median_ms, peak_mem_bytes (CUDA), floor_bytes / floor_ms (series) or the FLOP counts (parallel).
"""

from __future__ import annotations

import os

import benchlib
import pytest
import torch

import fastadapt as fa
from fastadapt.ops.reference import bottleneck_adapter_ref, parallel_adapter_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [pytest.param(8192, 4096, 256, marks=pytest.mark.gpu),  # (M, d, b): the issue-18 target
          pytest.param(16, 40, 8, marks=pytest.mark.smoke)]
SERIES_SHAPES = [*SHAPES, pytest.param(2048, 4096, 256, marks=pytest.mark.gpu)]  # + the split plan
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _llm_adapters_series(x, wd, wu, s, p=0.0):
    z = torch.nn.functional.dropout(x.float(), p) if p > 0 else x.float()
    out = (torch.tanh(z @ wd.t()) @ wu.t()).to(x.dtype) * s
    return out + x


def _llm_adapters_parallel(x, w, wd, wu, s):
    return x @ w.t() + (torch.tanh(x.float() @ wd.t()) @ wu.t()).to(x.dtype) * s


def _inputs(m, d, b, *, n=None):
    """x, W_down, W_up (and the frozen W of a parallel adapter), drawn on the device, at benchlib.dim sizes."""
    m, d, b, n = benchlib.dim(m), benchlib.dim(d), benchlib.dim(b), benchlib.dim(n or d)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, d, generator=g, device=DEVICE).to(DTYPE).requires_grad_()
    wd = (torch.randn(b, d, generator=g, device=DEVICE) * 0.02).requires_grad_()
    wu = (torch.randn(n, b, generator=g, device=DEVICE) * 0.02).requires_grad_()
    w = (torch.randn(n, d, generator=g, device=DEVICE) * 0.02).to(DTYPE)
    return x, wd, wu, w


def _run(benchmark, fn, inputs, *, backward, info):
    """Time ``fn`` (plus its backward: the gradients of ``inputs`` for a fixed random dY, returned, never
    accumulated into ``.grad`` inside the timed region) with benchlib; record the flat extra_info dict."""
    device = benchlib.bench_device()
    dy = torch.randn_like(fn()) if backward else None

    def step():
        y = fn()
        if backward:
            return torch.autograd.grad(y, inputs, dy, allow_unused=True)
        return y

    step()  # warm-up / autotune
    med = benchlib.median_ms(step, device, cpu_iters=1)
    peak, _ = benchlib.peak_memory_delta(step, device)
    benchmark.group = f"{info['suite']} {info['mode']} {info['case']}"
    benchmark.pedantic(benchlib.synchronized(step, device), rounds=5 if CUDA else 1, iterations=1,
                       warmup_rounds=1 if CUDA else 0)
    floor_bytes = info.get("floor_bytes")
    info = {**info, "median_ms": med, "peak_mem_bytes": peak,
            "floor_ms": benchlib.floor_ms(0.0, floor_bytes, device) if floor_bytes else None}
    benchlib.record(benchmark, info)


def _backends():
    out = ["llm_adapters", "eager_bf16"]
    if CUDA or os.environ.get("TRITON_INTERPRET") == "1":  # CPU: interpreter smoke only
        out.append("triton")
    if CUDA:
        out.append("cuda")
    return out


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", _backends())
@pytest.mark.parametrize("m,d,b", SERIES_SHAPES)
def test_bench_series(benchmark, m, d, b, variant, backward, p):
    x, wd, wu, _ = _inputs(m, d, b)
    s = 1.0
    info = {}
    if variant == "cuda":
        from fastadapt.ops import _native

        if p > 0:
            pytest.skip("the CUDA backend has no dropout")
        if not _native.native_available():
            pytest.skip(f"CUDA extension unavailable: {_native.native_load_error()}")
    if variant == "llm_adapters":
        fn = lambda: _llm_adapters_series(x, wd, wu, s, p)
    elif variant == "eager_bf16":
        fn = lambda: bottleneck_adapter_ref(x, wd, wu, activation="tanh", scaling=s, dropout_p=p)
    else:
        fn = lambda: fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=s, dropout_p=p, backend=variant)
    if variant == "triton":
        from fastadapt.kernels import bottleneck_adapter as kernels

        info["plan"] = kernels.plan(m, b, DTYPE)  # fused / split: which Triton kernels this case times
    floor = 2 * x.numel() * x.element_size()  # read x, write out
    case = f"series M={m} d={d} b={b} p={p:g}"
    _run(benchmark, fn, (x, wd, wu), backward=backward, info={
        "suite": "bottleneck_adapter", "case": case, "variant": variant,
        "mode": "fwd_bwd" if backward else "forward", "M": m, "d": d, "b": b, "dropout": p, "dtype": DTYPE,
        "floor_bytes": floor, "ref_variant": "eager_bf16", "ref_key": case, **info,
    })


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", ["frozen_linear", *_backends()])
@pytest.mark.parametrize("m,d,b", SHAPES)
def test_bench_parallel(benchmark, m, d, b, variant, backward):
    x, wd, wu, w = _inputs(m, d, b)
    if variant == "cuda":
        from fastadapt.ops import _native

        if not _native.native_available():
            pytest.skip(f"CUDA extension unavailable: {_native.native_load_error()}")
    if variant == "frozen_linear":
        fn = lambda: x @ w.t()
    elif variant == "llm_adapters":
        fn = lambda: _llm_adapters_parallel(x, w, wd, wu, 1.0)
    elif variant == "eager_bf16":
        fn = lambda: parallel_adapter_ref(x, w, wd, wu, activation="tanh", scaling=1.0)
    else:
        fn = lambda: fa.ops.parallel_adapter(x, w, wd, wu, activation="tanh", scaling=1.0, backend=variant)
    _run(benchmark, fn, (x, wd, wu), backward=backward, info={
        "suite": "parallel_adapter", "case": f"parallel M={m} d={d} b={b}", "variant": variant,
        "mode": "fwd_bwd" if backward else "forward", "M": m, "d": d, "b": b, "dtype": DTYPE,
        "adapter_flops": 2 * 2 * m * d * b, "linear_flops": 2 * m * d * d,
    })
