"""GPU tests of the compiled Triton series and parallel adapters at issue 18's shapes (d = 4096,
b = 256, bf16, fp32 master weights, a learned scaling), both series plans, with and without dropout.

What the interpreter tests (tests/kernels, tests/ops) cannot show: the sm_90 compiles (wgmma tiles,
pipelining, 64-row blocks) compute the same numbers, the plan the shape selects is the one that
runs, and the backward's temporaries stay as bounded on the device as the offline report says.

Tolerance (DESIGN.md): against an fp32 reference, the error is at most 2x the error of the same
computation in bf16 eager PyTorch (+ a small floor). Skipped without a CUDA device; run with
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import norm_rel_err, rel_err

import fastadapt as fa
from fastadapt.kernels import _common
from fastadapt.ops._inputs import draw_seed
from fastadapt.ops.reference import BOTTLENECK_ACTIVATIONS, parallel_adapter_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA device and compiled Triton kernels"),
]

D, B = 4096, 256


def _series_kernels():
    return importlib.import_module("fastadapt.ops.bottleneck_adapter")._kernels()


def _inputs(m: int, d_out: int, *, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, D, device="cuda", generator=g).bfloat16().requires_grad_()
    wd = (torch.randn(B, D, device="cuda", generator=g) / D**0.5).requires_grad_()
    wu = (torch.randn(d_out, B, device="cuda", generator=g) * 0.05).requires_grad_()
    s = torch.tensor([0.8], device="cuda", requires_grad=True)
    return x, wd, wu, s


def _series(x, wd, wu, s, *, act, keep, p, dtype):
    """x + s · up(act(down(mask ⊙ x / (1-p)))) in `dtype` (eager), with the kernel's mask."""
    xd = x.to(dtype)
    z = xd if keep is None else xd * keep.to(dtype) * _common.keep_scale(p)
    h = z @ wd.to(dtype).t()
    return xd + s.to(dtype) * (BOTTLENECK_ACTIVATIONS[act](h) @ wu.to(dtype).t())


def _grads(y, inputs, seed=1):
    """Gradients for one upstream gradient, rounded to bf16 first: every output sees the same one."""
    g = torch.randn(y.shape, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda")
    return torch.autograd.grad(y, inputs, g.bfloat16().to(y.dtype))


def _grads_and_extra_memory(y, inputs, g):
    """The gradients, and the backward's peak device memory above its start and what it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(y, inputs, g)
    torch.cuda.synchronize()
    returned = sum(t.numel() * t.element_size() for t in grads)
    return grads, torch.cuda.max_memory_allocated() - base - returned


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("m,plan", [(2048, "split"), (8192, "fused")])
@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_series_triton_matches_reference(m, plan, p, act):
    assert _series_kernels().plan(m, B, torch.bfloat16) == plan
    x, wd, wu, s = _inputs(m, D)
    torch.manual_seed(7)
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation=act, scaling=s, dropout_p=p, backend="triton")
    keep = None
    if p > 0:  # the mask the forward drew: same seed, same Philox stream
        torch.manual_seed(7)
        keep = _common.dropout_mask(draw_seed(x.device), m, D, p, device=x.device)
    inputs = (x, wd, wu, s)
    same = _series(*inputs, act=act, keep=keep, p=p, dtype=torch.bfloat16)
    exact = _series(*inputs, act=act, keep=keep, p=p, dtype=torch.float32)
    assert rel_err(y, exact) <= 2 * rel_err(same, exact) + 1e-3
    for name, got, ref, want in zip(("x", "w_down", "w_up", "scaling"), _grads(y, inputs), _grads(same, inputs),
                                    _grads(exact, inputs)):
        assert torch.isfinite(got).all(), name
        assert norm_rel_err(got, want) <= 2 * norm_rel_err(ref, want) + 1e-3, name


@pytest.mark.parametrize("m", [2048, 8192])
def test_series_triton_backward_memory_is_bounded(m):
    """Peak memory of the backward above what it returns: dh (M × b) and the small weight
    gradients, never an activation-sized temporary (the report's 64 MiB cap)."""
    x, wd, wu, s = _inputs(m, D)
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=s, dropout_p=0.1, backend="triton")
    _, extra = _grads_and_extra_memory(y, (x, wd, wu, s), torch.randn_like(y))
    assert extra <= 64 << 20


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_parallel_triton_matches_reference_and_bounded(p):
    """The parallel adapter at the gate/up width (N = 11008): correct, and its backward holds no
    activation-sized temporary (its dY pass once kept 1376 MiB of fp32 partials here)."""
    m, n = 8192, 11008
    x, wd, wu, s = _inputs(m, n, seed=3)
    w = (torch.randn(n, D, device="cuda") / D**0.5).bfloat16()
    torch.manual_seed(11)
    y = fa.ops.parallel_adapter(x, w, wd, wu, activation="silu", scaling=s, dropout_p=p, backend="triton")
    g = torch.randn_like(y)
    got, extra = _grads_and_extra_memory(y, (x, wd, wu, s), g)
    assert extra <= 64 << 20
    if p == 0:  # with dropout the torch twin draws its own mask: compare without
        same = parallel_adapter_ref(x, w, wd, wu, activation="silu", scaling=s)
        exact = parallel_adapter_ref(x.float(), w.float(), wd, wu, activation="silu", scaling=s)
        assert rel_err(y, exact) <= 2 * rel_err(same, exact) + 1e-3
        for got_t, ref, want in zip(got, torch.autograd.grad(same, (x, wd, wu, s), g),
                                    torch.autograd.grad(exact, (x, wd, wu, s), g.float())):
            assert norm_rel_err(got_t, want) <= 2 * norm_rel_err(ref, want) + 1e-3
