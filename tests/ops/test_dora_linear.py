"""fa.ops.dora_linear on the Triton backend (interpreter on CPU) and the torch backend vs float64."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import enable_activation_checkpointing, logits_and_grads, norm_rel_err, randomize_adapters, rel_err
from test_lora_linear import fused_gemm  # noqa: F401  (the fixture: every LoRA variant; addmm runs DoRA's forward as epilogue)
from tiny_models import tiny_model, tokens
from torch.utils._python_dispatch import TorchDispatchMode

import fastadapt as fa
from fastadapt.kernels import _common as kernel_common
from fastadapt.ops._inputs import draw_seed

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

op_module = importlib.import_module("fastadapt.ops.dora_linear")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALING = 1.7


def make(m, k, n, r, *, dtype=torch.float32, bias=True, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(*lead, m, k).to(DEVICE, dtype).requires_grad_()
    w = (rnd(n, k) / k**0.5).to(DEVICE, dtype)
    a = (rnd(r, k) / k**0.5).to(DEVICE).requires_grad_()  # fp32 parameters, as DoraLinear keeps them
    b = (rnd(n, r) * 0.3).to(DEVICE).requires_grad_()
    mag = (rnd(n).abs() + 0.5).to(DEVICE).requires_grad_()  # g = m / norm spread around 1
    c = rnd(n).to(DEVICE, dtype) if bias else None
    return x, w, a, b, mag, c


def grads(y, inputs, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return torch.autograd.grad(y, inputs, g)


def exact(x, w, a, b, mag, c, *, mask=None, keep=1.0, scaling=SCALING):
    """float64 DoRA written out (PEFT's formulas), with ``mask`` the dropout keep-mask (None: p = 0).
    Returns y and the float64 leaves it differentiates (a float64 input that requires grad is kept)."""
    x, w, a, b, mag = (t if t.dtype == torch.float64 and t.requires_grad else t.detach().double().requires_grad_()
                       for t in (x, w, a, b, mag))
    norm = (w + scaling * b @ a).norm(dim=1).detach()
    g = mag / norm
    bias = 0.0 if c is None else c.double()
    if mask is None:
        y = g * (x @ w.t() + scaling * (x @ a.t()) @ b.t()) + bias
    else:
        xd = x * mask * keep
        y = x @ w.t() + bias + (g - 1) * (xd @ w.t()) + g * (scaling * (xd @ a.t()) @ b.t())
    return y, (x, w, a, b, mag)


@pytest.mark.parametrize("m,k,n,r", [(1, 40, 72, 1), (3, 72, 40, 3), (17, 100, 72, 8), (129, 40, 100, 16)])
@pytest.mark.usefixtures("fused_gemm")
def test_forward_and_grads_match_float64(m, k, n, r):
    x, w, a, b, mag, c = make(m, k, n, r, lead=(2,) if m == 17 else ())
    y = fa.ops.dora_linear(x, w, a, b, mag, scaling=SCALING, bias=c, backend="triton")
    y_ref, ref_in = exact(x, w, a, b, mag, c)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, a, b, mag)), grads(y_ref, (ref_in[0], *ref_in[2:]))):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("m,k,n,r", [(3, 72, 40, 3), (40, 64, 48, 4)])
@pytest.mark.usefixtures("fused_gemm")
def test_dropout_form_with_the_stored_mask(m, k, n, r):
    """PEFT's dropout form (a second base product, of x_d), with the mask the forward drew."""
    p = 0.3
    x, w, a, b, mag, c = make(m, k, n, r)
    torch.manual_seed(123)
    y = fa.ops.dora_linear(x, w, a, b, mag, scaling=SCALING, bias=c, dropout_p=p, backend="triton")
    torch.manual_seed(123)
    mask = kernel_common.dropout_mask(draw_seed(x.device), m, k, p, device=x.device)
    y_ref, ref_in = exact(x, w, a, b, mag, c, mask=mask, keep=kernel_common.keep_scale(p))
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, a, b, mag)), grads(y_ref, (ref_in[0], *ref_in[2:]))):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_input_transposed_weight_and_trainable_base(backend, p):
    """A Conv1D-style weight (a .t() view), a strided x, and base weight and bias that train."""
    x_wide = torch.randn(9, 96, device=DEVICE, requires_grad=True)
    x = x_wide[:, 5:77]
    w = (torch.randn(72, 40, device=DEVICE) / 8).t().requires_grad_()  # (N=40, K=72) view of (K, N)
    a = torch.randn(4, 72, device=DEVICE, requires_grad=True)
    b = torch.randn(40, 4, device=DEVICE, requires_grad=True)
    mag = (torch.rand(40, device=DEVICE) + 0.5).requires_grad_()
    c = torch.randn(40, device=DEVICE, requires_grad=True)
    torch.manual_seed(9)
    y = fa.ops.dora_linear(x, w, a, b, mag, scaling=0.5, bias=c, dropout_p=p, backend=backend)
    torch.manual_seed(9)
    if p == 0:
        mask, keep = None, 1.0
    elif backend == "triton":
        mask, keep = kernel_common.dropout_mask(draw_seed(x.device), 9, 72, p, device=x.device), kernel_common.keep_scale(p)
    else:  # torch's own dropout draw
        mask, keep = torch.nn.functional.dropout(torch.ones(9, 72, device=DEVICE), p) != 0, 1 / (1 - p)
    xd = x_wide.detach().double().requires_grad_()
    cd = c.detach().double().requires_grad_()
    y_ref, (_, wd, ad, bd, md) = exact(xd[:, 5:77], w, a, b, mag, cd, mask=mask, keep=keep, scaling=0.5)
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x_wide, w, a, b, mag, c)), grads(y_ref, (xd, wd, ad, bd, md, cd))):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_of_torch_same_dtype(dtype):
    x, w, a, b, mag, c = make(33, 72, 100, 8, dtype=dtype)
    y = fa.ops.dora_linear(x, w, a, b, mag, scaling=2.0, bias=c, backend="triton")
    same = fa.ops.dora_linear_ref(x, w, a, b, mag, scaling=2.0, bias=c)
    want, ref_in = exact(x, w, a, b, mag, c, scaling=2.0)
    assert y.dtype == dtype
    assert rel_err(y, want) <= 2 * rel_err(same, want) + 1e-3
    inputs = (x, a, b, mag)
    for got, ref, w_ in zip(grads(y, inputs), grads(same, inputs), grads(want, (ref_in[0], *ref_in[2:]))):
        assert norm_rel_err(got, w_) <= 2 * norm_rel_err(ref, w_) + 1e-3


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_autocast_bf16_on_fp32_inputs(p):
    """Under autocast the frozen product runs in bf16 while the norms stay fp32 (both backends)."""
    x, w, a, b, mag, c = make(17, 72, 40, 4)
    outs = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(2)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            outs[backend] = fa.ops.dora_linear(x, w, a, b, mag, scaling=1.5, bias=c, dropout_p=p, backend=backend)
        assert outs[backend].dtype == torch.bfloat16
        g = grads(outs[backend], (a, mag))
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() and t.abs().sum() > 0 for t in g)
    if p == 0:  # (the two backends draw different masks)
        want, _ = exact(x, w, a, b, mag, c, scaling=1.5)
        for y in outs.values():
            assert rel_err(y, want) < 2e-2


class _Sizes(TorchDispatchMode):
    """The largest tensor any op allocates (temporaries included; views and in-place results are
    not allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_weight_sized_tensor_saved_or_made(backend, p):
    """M = 4 rows against a 96×80 weight: every activation is far smaller than W. Neither backend
    makes or saves a tensor of W's size (PEFT makes the K×K identity and W + s·B A each step)."""
    x, w, a, b, mag, c = make(4, 80, 96, 4)
    saved = []
    with _Sizes() as sizes, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fa.ops.dora_linear(x, w, a, b, mag, scaling=1.0, bias=c, dropout_p=p, backend=backend)
        y.backward(torch.ones_like(y))
    assert sizes.largest < w.numel()
    big = [t for t in saved if t.numel() >= w.numel()]
    assert all(t.data_ptr() == w.data_ptr() for t in big)  # the frozen weight itself, by reference
    assert mag.grad.abs().sum() > 0


def test_saved_tensors_on_the_triton_path_are_x_s_z_the_bits_and_the_norms():
    x, w, a, b, mag, _ = make(64, 48, 40, 4, bias=False)
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fa.ops.dora_linear(x, w, a, b, mag, scaling=1.0, dropout_p=0.2, backend="triton")
    activations = sorted((tuple(t.shape), t.dtype) for t in saved if t.dim() == 2 and t.shape[0] == 64)
    # x, S (M×r), z (M×N), the mask (M×⌈K/32⌉ int32: 1 bit per element) — no dropped copy of x
    assert activations == [((64, 2), torch.int32), ((64, 4), torch.float32), ((64, 40), torch.float32),
                           ((64, 48), torch.float32)]
    assert {t.data_ptr() for t in saved if tuple(t.shape) == (64, 48)} == {x.data_ptr()}
    assert [tuple(t.shape) for t in saved if t.dim() == 1] == [(40,), (40,)]  # the magnitude and the norms


def test_row_norms_computed_on_every_training_forward_and_reused_only_while_fresh(monkeypatch):
    """Training (grad mode on) never reads a cached norm; without gradients the norms are reused until
    W, A or B change by any path: an in-place op (version counter), a fused optimizer step and a
    ``.data`` write (neither moves the counter), new storage, fa.ops.invalidate_caches; and never in a
    multi-process run (FSDP2 refills gathered parameters without a version bump)."""
    calls = []
    real = op_module.dora_norm_triton
    monkeypatch.setattr(op_module, "dora_norm_triton", lambda *args: calls.append(1) or real(*args))
    x, _, a, b, mag, _ = make(5, 40, 24, 3)
    w = (torch.randn(40, 24) / 6).t()  # a fresh view each call, as Conv1D's base_weight_nk gives
    base = w._base

    def no_grad_forward():
        with torch.no_grad():
            y = fa.ops.dora_linear(x, base.t(), a, b, mag, scaling=1.0, backend="triton")
        y_ref, _ = exact(x, base.t(), a, b, mag, None, scaling=1.0)
        assert rel_err(y, y_ref) < 1e-5
        return len(calls)

    for _ in range(3):
        fa.ops.dora_linear(x, base.t(), a, b, mag, scaling=1.0, backend="triton").sum().backward()
    assert len(calls) == 3  # micro-batches and recomputations each compute their own
    assert [no_grad_forward() for _ in range(3)] == [4, 4, 4]  # decode: one pass over W, then reused
    a.grad = b.grad = mag.grad = None
    fa.ops.dora_linear(x, base.t(), a, b, mag, scaling=1.0, backend="triton").sum().backward()
    torch.optim.AdamW([a, b, mag], lr=0.1, fused=True).step()  # moves no version counter
    assert [no_grad_forward() for _ in range(2)] == [6, 6]
    b.data.copy_(torch.randn_like(b))  # no version counter, no optimizer: only the compare sees it
    assert no_grad_forward() == 7
    with torch.no_grad():
        base.mul_(2.0)  # the frozen weight itself, in place (a load): its version counter
    assert no_grad_forward() == 8
    a.data = a.data.clone()  # new storage, same version counter
    assert no_grad_forward() == 9
    base.data.mul_(0.5)  # a .data write into the frozen weight is not compared; invalidating says it
    fa.ops.invalidate_caches()
    assert no_grad_forward() == 10
    assert no_grad_forward() == 10
    from fastadapt.ops import _cache

    monkeypatch.setattr(_cache, "is_initialized", lambda: True)
    assert [no_grad_forward() for _ in range(2)] == [11, 12]


def test_torch_compile_fullgraph_no_graph_break():
    x, w, a, b, mag, c = make(5, 16, 12, 2)

    def f(x, a, b, mag):
        return fa.ops.dora_linear(x, w, a, b, mag, scaling=2.0, bias=c, dropout_p=0.1, backend="triton").sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, a, b, mag)
    loss.backward()
    assert torch.isfinite(loss) and all(t.grad is not None and t.grad.abs().sum() > 0 for t in (a, mag))


def test_bad_inputs_name_the_argument():
    x, w, a, b, mag, _ = make(3, 8, 6, 2, bias=False)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(out_features,\) = \(6,\), got \(5,\)"):
        fa.ops.dora_linear(x, w, a, b, mag[:5], scaling=1.0)
    with pytest.raises(TypeError, match="magnitude must be a floating-point tensor"):
        fa.ops.dora_linear(x, w, a, b, torch.ones(6, dtype=torch.int64), scaling=1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \(out_features, r\) = \(6, 2\)"):
        fa.ops.dora_linear(x, w, a, b[:, :1], mag, scaling=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fa.ops.dora_linear(x, w, a, b, mag, scaling=1.0, backend="tpu")
    with pytest.raises(ValueError, match=r"norm must have shape \(out_features,\) = \(6,\)"):
        fa.ops.dora_merge(w.clone(), a, b, mag, scaling=1.0, norm=torch.ones(5))
    with pytest.raises(ValueError, match=r"sign must be one of \[1, -1\], got 2"):
        fa.ops.dora_merge(w.clone(), a, b, mag, scaling=1.0, norm=torch.ones(6), sign=2)


# -- whole models through the Triton kernels ---------------------------------------------------------


def _dora_llama(targets="all-linear", dropout=0.0):
    model = tiny_model("llama").train()
    fa.patch(model, "dora", r=4, targets=targets, dropout=dropout)
    randomize_adapters(model, scale=0.1)
    return model


def test_tiny_llama_triton_equals_torch_backend(monkeypatch):
    ids = tokens(2, 9)
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTADAPT_BACKEND", backend)
        out[backend] = logits_and_grads(_dora_llama(), ids)
    assert rel_err(out["triton"][0], out["torch"][0]) < 1e-5
    for n, g in out["torch"][1].items():
        assert norm_rel_err(out["triton"][1][n], g) < 1e-5, n


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_checkpointing_with_dropout_gives_the_same_gradients(monkeypatch, backend):
    monkeypatch.setenv("FASTADAPT_BACKEND", backend)
    ids = tokens(2, 9)
    grads = {}
    for mode in ("plain", "checkpointed"):
        model = _dora_llama(targets=["q_proj", "down_proj"], dropout=0.3)
        if mode == "checkpointed":
            enable_activation_checkpointing(model, use_reentrant=False)
        torch.manual_seed(7)
        grads[mode] = logits_and_grads(model, ids)[1]
    assert any(n.endswith("lora_magnitude_vector") for n in grads["plain"])
    for n, g in grads["plain"].items():
        assert g.abs().sum() > 0
        assert norm_rel_err(grads["checkpointed"][n], g) < 1e-5, n


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="real shapes: compiled kernels only")
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_real_shapes_bf16(k, n, p):
    x, w, a, b, mag, _ = make(2048, k, n, 16, dtype=torch.bfloat16, bias=False)
    torch.manual_seed(0)
    y = fa.ops.dora_linear(x, w, a, b, mag, scaling=2.0, dropout_p=p, backend="triton")
    torch.manual_seed(0)
    mask = kernel_common.dropout_mask(draw_seed(x.device), 2048, k, p, device=x.device) if p else None
    want, ref_in = exact(x, w, a, b, mag, None, mask=mask, keep=kernel_common.keep_scale(p), scaling=2.0)
    assert rel_err(y, want) < 2e-2
    for got, w_ in zip(grads(y, (x, a, b, mag)), grads(want, (ref_in[0], *ref_in[2:]))):
        assert torch.isfinite(got).all() and norm_rel_err(got, w_) < 2e-2
