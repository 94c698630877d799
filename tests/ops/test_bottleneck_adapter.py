"""fa.ops.bottleneck_adapter / fa.ops.parallel_adapter on the Triton backend (interpreter on CPU) vs float64."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from helpers import norm_rel_err, rel_err

import fastadapt as fa
from fastadapt.kernels import _common as kernel_common
from fastadapt.ops._inputs import draw_seed
from fastadapt.ops.reference import bottleneck_adapter_ref, parallel_adapter_ref

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

op_module = importlib.import_module("fastadapt.ops.bottleneck_adapter")  # the module, not the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rnd(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def make(m, d_in, d_out, b, *, dtype=torch.float32, seed=0, lead=(), learned=True):
    g = torch.Generator().manual_seed(seed)
    x = rnd(*lead, m, d_in, g=g).to(dtype).requires_grad_()
    wd = (rnd(b, d_in, g=g) / d_in**0.5).requires_grad_()  # fp32 adapter params, as the modules keep them
    wu = (rnd(d_out, b, g=g) * 0.3).requires_grad_()
    s = torch.tensor([0.8], device=DEVICE, requires_grad=True) if learned else 0.8
    return x, wd, wu, s


def grads(y, inputs, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return torch.autograd.grad(y, inputs, g)


def as64(*ts):
    return [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in ts]


# (M, d_in, d_out, b, activation): odd M, d not a multiple of the blocks, b not a power of two
SHAPES = [(1, 40, 40, 1, "tanh"), (3, 72, 72, 3, "relu"), (17, 100, 100, 8, "gelu"), (129, 40, 40, 16, "silu")]


@pytest.mark.parametrize("m,d_in,d_out,b,act", SHAPES)
def test_series_forward_and_grads_match_float64(m, d_in, d_out, b, act):
    x, wd, wu, s = make(m, d_in, d_out, b, lead=(2,) if m == 17 else ())
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation=act, scaling=s, backend="triton")
    ref_in = as64(x, wd, wu, s)
    y_ref = bottleneck_adapter_ref(*ref_in[:3], activation=act, scaling=ref_in[3])
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, wd, wu, s)), grads(y_ref, ref_in)):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("m,d_in,d_out,b,act", [(3, 40, 72, 3, "tanh"), (33, 72, 40, 5, "gelu")])
def test_series_with_residual(m, d_in, d_out, b, act):
    x, wd, wu, s = make(m, d_in, d_out, b)
    res = torch.randn(m, d_out, device=DEVICE, requires_grad=True)
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation=act, scaling=s, residual=res, backend="triton")
    ref_in = as64(x, wd, wu, s, res)
    y_ref = bottleneck_adapter_ref(*ref_in[:3], activation=act, scaling=ref_in[3], residual=ref_in[4])
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, wd, wu, s, res)), grads(y_ref, ref_in)):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("m,k,n,b,act", [(1, 40, 72, 1, "tanh"), (17, 100, 72, 3, "relu"),
                                         (129, 72, 40, 16, "gelu"), (5, 48, 48, 7, "silu")])
def test_parallel_forward_and_grads_match_float64(m, k, n, b, act):
    x, wd, wu, s = make(m, k, n, b, lead=(2,) if m == 17 else ())
    g = torch.Generator().manual_seed(5)
    w = rnd(n, k, g=g) / k**0.5
    c = rnd(n, g=g)
    y = fa.ops.parallel_adapter(x, w, wd, wu, activation=act, scaling=s, bias=c, backend="triton")
    ref_in = as64(x, wd, wu, s)
    y_ref = parallel_adapter_ref(ref_in[0], w.double(), ref_in[1], ref_in[2], activation=act, scaling=ref_in[3],
                                 bias=c.double())
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, wd, wu, s)), grads(y_ref, ref_in)):
        assert got.abs().sum() > 0
        assert norm_rel_err(got, want) < 1e-5


def test_float_scaling_and_non_contiguous_input():
    x_wide = make(9, 96, 40, 4)[0]
    _, wd, wu, _ = make(9, 40, 40, 4, seed=3)
    x = x_wide[:, 5:45]  # strided column slice
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=1.5, backend="triton")
    xd, wdd, wud = as64(x_wide, wd, wu)
    y_ref = bottleneck_adapter_ref(xd[:, 5:45], wdd, wud, activation="tanh", scaling=1.5)
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x_wide, wd, wu)), grads(y_ref, (xd, wdd, wud))):
        assert norm_rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_2x_of_torch_same_dtype(dtype):
    x, wd, wu, s = make(33, 72, 72, 8, dtype=dtype)
    w = torch.randn(56, 72, device=DEVICE, dtype=dtype) / 72**0.5
    cases = [
        (lambda *a, **k: fa.ops.bottleneck_adapter(*a, **k), bottleneck_adapter_ref, ()),
        (lambda x_, *a, **k: fa.ops.parallel_adapter(x_, w, *a, **k), parallel_adapter_ref, (w,)),
    ]
    for i, (fused, ref, extra) in enumerate(cases):
        wu_i = wu if i == 0 else torch.randn(56, 8, device=DEVICE).mul(0.3).requires_grad_()
        y = fused(x, wd, wu_i, activation="gelu", scaling=s, backend="triton")
        same = ref(x, *extra, wd, wu_i, activation="gelu", scaling=s)
        ext64 = [t.double() for t in extra]
        exact = ref(x.double(), *ext64, wd.double(), wu_i.double(), activation="gelu", scaling=s.double())
        assert y.dtype == dtype
        assert rel_err(y, exact) <= 2 * rel_err(same, exact) + 1e-3
        for got, sm, want in zip(grads(y, (x, wd, wu_i)), grads(same, (x, wd, wu_i)), grads(exact, (x, wd, wu_i))):
            assert norm_rel_err(got, want) <= 2 * norm_rel_err(sm, want) + 1e-3


def test_series_dropout_mask_drawn_once_and_reused_in_backward():
    kernels = op_module._kernels()
    p, m, d, b = 0.3, 40, 64, 6
    x, wd, wu, s = make(m, d, d, b)
    torch.manual_seed(123)
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=s, dropout_p=p, backend="triton")
    torch.manual_seed(123)
    seed = draw_seed(x.device)
    mask = kernels.dropout_mask(seed, m, d, p, device=x.device)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05
    xd, wdd, wud, sd = as64(x, wd, wu, s)
    y_ref = xd + sd * torch.tanh((xd * mask * kernel_common.keep_scale(p)) @ wdd.t()) @ wud.t()
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, wd, wu, s)), grads(y_ref, (xd, wdd, wud, sd))):
        assert norm_rel_err(got, want) < 1e-5
    y2 = fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=s, dropout_p=p, backend="triton")
    assert not torch.equal(y, y2)


def test_parallel_dropout_mask_drawn_once_and_reused_in_backward():
    from fastadapt.kernels import lora_linear as lora_kernels

    p, m, k, n, b = 0.25, 40, 64, 48, 5
    x, wd, wu, s = make(m, k, n, b)
    w = torch.randn(n, k, device=DEVICE) / k**0.5
    torch.manual_seed(9)
    y = fa.ops.parallel_adapter(x, w, wd, wu, activation="silu", scaling=s, dropout_p=p, backend="triton")
    torch.manual_seed(9)
    mask = lora_kernels.dropout_mask(draw_seed(x.device), m, k, p, device=x.device)
    xd, wdd, wud, sd = as64(x, wd, wu, s)
    y_ref = xd @ w.double().t() + sd * torch.nn.functional.silu((xd * mask * kernel_common.keep_scale(p)) @ wdd.t()) @ wud.t()
    assert rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads(y, (x, wd, wu, s)), grads(y_ref, (xd, wdd, wud, sd))):
        assert norm_rel_err(got, want) < 1e-5


def test_saved_tensors_are_x_hidden_and_the_mask_at_one_bit_per_element():
    x, wd, wu, s = make(64, 48, 48, 4)
    w = torch.randn(40, 48, device=DEVICE)
    for call in (
        lambda: fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=s, dropout_p=0.2, backend="triton"),
        lambda: fa.ops.parallel_adapter(x, w, wd, torch.zeros(40, 4, device=DEVICE), activation="tanh", scaling=s,
                                        dropout_p=0.2, backend="triton"),
    ):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            call()
        acts = [t for t in saved if t.dim() == 2 and t.shape[0] == 64]
        assert {t.data_ptr() for t in acts if t.shape[1] == 48} == {x.data_ptr()}  # only x itself
        assert [tuple(t.shape) for t in acts if t.dtype == torch.int32] == [(64, 2)]  # the mask, 1 bit each
        assert [tuple(t.shape) for t in acts if t.shape[1] != 48 and t.dtype != torch.int32] == [(64, 4)]  # hidden
        assert not any(t.dtype == torch.bool for t in saved)


def test_series_backward_gets_the_forwards_mask_and_weight_copies(monkeypatch):
    """bf16 x with fp32 master weights: the forward casts both weights in one launch and saves the
    copies (not the fp32 weights); the backward kernel receives exactly those copies and the mask
    tensor the forward stored, and the gradients come back in the parameters' dtype."""
    kernels = op_module._kernels()
    seen = {}
    real_cast, real_fwd, real_bwd = kernels.cast_pair, kernels.bottleneck_fwd, kernels.bottleneck_bwd

    def cast_pair(*a, **k):
        seen.setdefault("casts", []).append(a)
        seen["copies"] = real_cast(*a, **k)
        return seen["copies"]

    def fwd(*a, **k):
        seen["fwd"] = real_fwd(*a, **k)
        return seen["fwd"]

    def bwd(*a, **k):
        seen["bwd_args"], seen["bwd_bits"] = a, k["bits"]
        return real_bwd(*a, **k)

    monkeypatch.setattr(kernels, "cast_pair", cast_pair)
    monkeypatch.setattr(kernels, "bottleneck_fwd", fwd)
    monkeypatch.setattr(kernels, "bottleneck_bwd", bwd)
    x, wd, wu, s = make(33, 72, 72, 8, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fa.ops.bottleneck_adapter(x, wd, wu, activation="gelu", scaling=s, dropout_p=0.2, backend="triton")
    assert len(seen["casts"]) == 1
    wd_lp, wu_lp = seen["copies"]
    assert wd_lp.dtype == wu_lp.dtype == torch.bfloat16
    ptrs = {t.data_ptr() for t in saved}
    assert wd.data_ptr() not in ptrs and wu.data_ptr() not in ptrs and wd_lp.data_ptr() in ptrs
    dx, dwd, dwu, ds = grads(y, (x, wd, wu, s))
    bits = seen["fwd"][2]
    assert seen["bwd_bits"].data_ptr() == bits.data_ptr() and bits.dtype == torch.int32  # stored, not redrawn
    assert seen["bwd_args"][3].data_ptr() == wd_lp.data_ptr() and seen["bwd_args"][4].data_ptr() == wu_lp.data_ptr()
    assert dwd.dtype == dwu.dtype == torch.float32 and dx.dtype == torch.bfloat16


def test_torch_compile_fullgraph_no_graph_break():
    x, wd, wu, s = make(5, 16, 16, 3)
    w = torch.randn(12, 16, device=DEVICE)
    wu_p = torch.randn(12, 3, device=DEVICE, requires_grad=True)

    def f(x, wd, wu, wu_p, s):
        h = fa.ops.bottleneck_adapter(x, wd, wu, activation="gelu", scaling=s, dropout_p=0.1, backend="triton")
        return fa.ops.parallel_adapter(h, w, wd, wu_p, activation="tanh", scaling=s, dropout_p=0.1,
                                       backend="triton").sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, wd, wu, wu_p, s)
    loss.backward()
    assert torch.isfinite(loss)
    for t in (wd, wu, wu_p, s):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_backend_selection_and_errors(monkeypatch):
    x, wd, wu, s = make(3, 8, 8, 2)
    # auto never picks Triton (or CUDA) until a GPU run verified it
    assert op_module.selected_backend(x.detach()) == "torch"
    monkeypatch.setenv("FASTADAPT_BACKEND", "triton")
    assert op_module.selected_backend(x.detach()) == "triton"
    monkeypatch.delenv("FASTADAPT_BACKEND")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs the fastadapt CUDA extension"):
            fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=1.0, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=1.0, backend="tpu")


@pytest.mark.parametrize("kwargs,match", [
    ({"activation": "gelu_new"}, "activation must be one of"),
    ({"scaling": "learned"}, "scaling must be a finite number"),
    ({"scaling": float("nan")}, "scaling must be a finite number"),
    ({"scaling": torch.ones(2)}, "1-element float tensor"),
    ({"dropout_p": 1.0}, "dropout_p must be in"),
    ({"w_up": torch.zeros(8, 3)}, r"w_up must have shape \(d_in, b\) = \(8, 2\)"),
    ({"w_down": torch.zeros(2, 7)}, r"w_down must have shape \(b, d_in\)"),
    ({"residual": torch.zeros(3, 5)}, r"residual must have shape"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    x, wd, wu, _ = make(3, 8, 8, 2)
    args = {"x": x, "w_down": wd, "w_up": wu}
    call = {"activation": "tanh", "scaling": 1.0}
    for k, v in kwargs.items():
        (args if k in args else call)[k] = v.to(DEVICE) if isinstance(v, torch.Tensor) else v
    with pytest.raises((ValueError, TypeError), match=match):
        fa.ops.bottleneck_adapter(args["x"], args["w_down"], args["w_up"], backend="triton", **call)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="real shapes: compiled kernels only")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend,m", [("triton", 2048), ("triton", 8192), ("cuda", 2048), ("cuda", 8192)],
                         ids=["triton-split", "triton-fused", "cuda-2048", "cuda-8192"])
def test_gpu_real_shapes_bf16(backend, m):
    """Issue-18 widths (d = 4096, b = 256), both Triton plans; fp32 master weights, a learned scaling."""
    if backend == "cuda":
        from fastadapt.ops import _native

        if not _native.native_available():
            pytest.skip(f"CUDA extension unavailable: {_native.native_load_error()}")
    else:
        assert op_module._kernels().plan(m, 256, torch.bfloat16) == ("fused" if m == 8192 else "split")
    x, wd, wu, s = make(m, 4096, 4096, 256, dtype=torch.bfloat16)
    y = fa.ops.bottleneck_adapter(x, wd, wu, activation="tanh", scaling=s, backend=backend)
    same = bottleneck_adapter_ref(x, wd, wu, activation="tanh", scaling=s)
    exact = bottleneck_adapter_ref(x.float(), wd, wu, activation="tanh", scaling=s)
    assert rel_err(y, exact) <= 2 * rel_err(same, exact) + 1e-4
    for got, ref, want in zip(grads(y, (x, wd, wu, s)), grads(same, (x, wd, wu, s)), grads(exact, (x, wd, wu, s))):
        assert torch.isfinite(got).all()
        assert norm_rel_err(got, want) <= 2 * norm_rel_err(ref, want) + 1e-4
    w = torch.randn(11008, 4096, device=DEVICE, dtype=torch.bfloat16) / 64
    wu2 = (torch.randn(11008, 256, device=DEVICE) * 0.02).requires_grad_()
    y = fa.ops.parallel_adapter(x, w, wd, wu2, activation="tanh", scaling=s, backend=backend)
    same = parallel_adapter_ref(x, w, wd, wu2, activation="tanh", scaling=s)
    exact = parallel_adapter_ref(x.float(), w.float(), wd, wu2, activation="tanh", scaling=s)
    assert rel_err(y, exact) <= 2 * rel_err(same, exact) + 1e-4
