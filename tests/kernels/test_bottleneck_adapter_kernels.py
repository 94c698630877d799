"""Interpreter (CPU) tests of the fused bottleneck-adapter Triton kernels against float64 torch.

Run: python -m pytest tests/kernels/test_bottleneck_adapter_kernels.py -q
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere


import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from fastadapt.kernels import _common  # noqa: E402
from fastadapt.kernels import bottleneck_adapter as K  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu"
_ACT = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}
# tolerance floor, relative to the reference's magnitude (on top of 2 × the same-dtype torch error)
_EPS = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN (int8: 7), so unwritten elements show."""

    def poisoned(shape, *, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 7
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(_common, "alloc", poisoned)


def _reference(x, w_down, w_up, scaling, *, activation, residual, keep, p, dout, dtype, learned):
    """The adapter in `dtype` with torch autograd: out, hidden, dx, dw_down, dw_up, ds (float64 copies)."""
    xs = x.detach().to(dtype).requires_grad_()
    wd = w_down.detach().to(dtype).requires_grad_()
    wu = w_up.detach().to(dtype).requires_grad_()
    s = scaling.detach().to(dtype).requires_grad_(learned)
    res = None if residual is None else residual.detach().to(dtype)
    xd = xs if keep is None else xs * keep.to(dtype) * _common.keep_scale(p)
    hidden = xd @ wd.T
    out = (xs if res is None else res) + s * (_ACT[activation](hidden) @ wu.T)
    out.backward(dout.to(dtype))
    ds = s.grad.double() if learned else None
    return [t.detach().double() for t in (out, hidden, xs.grad, wd.grad, wu.grad)] + [ds]


def _make(M, d_in, d_out, b, dtype, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_out = d_in if d_out is None else d_out
    x = torch.randn(M, d_in, generator=g).to(dtype)
    w_down = (torch.randn(b, d_in, generator=g) / d_in**0.5).to(dtype)
    w_up = (torch.randn(n_out, b, generator=g) / b**0.5).to(dtype)
    residual = None if d_out is None else torch.randn(M, d_out, generator=g).to(dtype)
    dout = torch.randn(M, n_out, generator=g).to(dtype)
    # 0.75 is exact in every dtype: the same-dtype reference is not penalised by rounding s
    scaling = torch.tensor([0.75], dtype=torch.float32)
    return x, w_down, w_up, residual, dout, scaling


def _run_and_check(x, w_down, w_up, residual, dout, scaling, *, activation, p=0.0, seed=0, learned=True):
    dtype = x.dtype
    M, d_in = x.shape
    out, hidden, bits = K.bottleneck_fwd(x, w_down, w_up, scaling, activation=activation, residual=residual,
                                         dropout_p=p, seed=seed)
    assert (bits is None) == (p == 0)
    dx, dwd, dwu, ds = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, activation=activation,
                                        has_residual=residual is not None, dropout_p=p, bits=bits,
                                        need_scaling_grad=learned)
    assert out.dtype == dtype and hidden.dtype == dtype and dx.dtype == dtype
    assert dwd.dtype == torch.float32 and dwu.dtype == torch.float32
    assert out.shape == (M, w_up.shape[0]) and hidden.shape == (M, w_down.shape[0]) and dx.shape == x.shape
    assert dwd.shape == w_down.shape and dwu.shape == w_up.shape
    got = [out, hidden, dx, dwd, dwu, ds]
    keep = None if p == 0.0 else K.dropout_mask(seed, M, d_in, p, device=x.device)
    kw = dict(activation=activation, residual=residual, keep=keep, p=p, dout=dout, learned=learned)
    want = _reference(x, w_down, w_up, scaling, dtype=torch.float64, **kw)
    base = want if dtype == torch.float64 else _reference(x, w_down, w_up, scaling, dtype=dtype, **kw)
    names = ["out", "hidden", "dx", "dw_down", "dw_up", "dscaling"]
    g64 = _ACT[activation](want[1])
    ds_scale = (g64 * (dout.double() @ w_up.double())).norm().item()
    for name, g_, w_, b_ in zip(names, got, want, base):
        if w_ is None:
            assert g_ is None, name
            continue
        g_ = g_.double().reshape(w_.shape)
        assert torch.isfinite(g_).all(), f"{name}: non-finite values (unwritten / poisoned?)"
        err = (g_ - w_).abs().max().item()
        err_torch = (b_ - w_).abs().max().item()
        # floor: _EPS of the magnitude. ds is one sum of M·b terms whose rounding errors
        # random-walk, so its max error is a single noisy draw: scale by the terms' 2-norm.
        scale = ds_scale if name == "dscaling" else w_.abs().max().item()
        tol = 2.0 * err_torch + _EPS[dtype] * max(1.0, scale)
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (torch {dtype} err {err_torch:.3e})"
    for name, g_ in zip(names[2:5], got[2:5]):
        assert g_.abs().max() > 0, f"{name} is all zeros"
    return got


# Odd shapes, each activation in fp32 and bf16, residual (d_out != d_in) and not. Not the full
# cross product: the interpreter is slow, and each axis value appears at least once.
CASES = [
    # M, d_in, d_out (None: no residual), b, activation, dtype
    (1, 40, None, 1, "tanh", torch.float32),
    (3, 72, 40, 8, "relu", torch.float32),
    (17, 100, None, 24, "gelu", torch.float32),
    (129, 40, 72, 100, "silu", torch.float32),
    (17, 72, None, 100, "tanh", torch.bfloat16),
    (129, 100, 40, 24, "gelu", torch.bfloat16),
    (3, 40, None, 8, "silu", torch.bfloat16),
    (129, 72, None, 1, "relu", torch.bfloat16),
    (17, 40, 100, 24, "tanh", torch.float16),
]


@pytest.mark.parametrize("M,d_in,d_out,b,activation,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_fwd_bwd_match_float64(M, d_in, d_out, b, activation, dtype):
    x, w_down, w_up, residual, dout, scaling = _make(M, d_in, d_out, b, dtype)
    _run_and_check(x, w_down, w_up, residual, dout, scaling, activation=activation)


def test_scaling_grad_only_when_asked_and_backward_deterministic():
    x, w_down, w_up, residual, dout, scaling = _make(17, 40, None, 24, torch.float32, seed=1)
    out, hidden, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="gelu")
    kw = dict(activation="gelu", has_residual=False)
    r1 = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, **kw)
    assert r1[3] is None
    r2 = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, need_scaling_grad=True, **kw)
    for a, b in zip(r1[:3], r2[:3]):
        assert torch.equal(a, b)  # no atomics: bitwise reproducible
    assert r2[3].shape == scaling.shape and r2[3].dtype == torch.float32


def test_scaling_is_read_on_device():
    """A different scaling tensor (e.g. a learned one after a step) changes out without recompiling."""
    x, w_down, w_up, residual, dout, scaling = _make(3, 40, None, 8, torch.float32)
    out1, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="tanh")
    out2, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling * 2, activation="tanh")
    torch.testing.assert_close(out2 - x, 2 * (out1 - x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M,d_out,b,activation,dtype", [
    (17, None, 300, "gelu", torch.float32),
    (3, 24, 1000, "tanh", torch.bfloat16),
], ids=["b300-fp32", "b1000-bf16-residual"])
def test_bottleneck_above_tile_limit_loops_over_chunks(M, d_out, b, activation, dtype):
    """b > _MAX_BLOCK_R (= 256): _CHUNK_R-wide chunks, hidden / dh round-trip through their buffers."""
    x, w_down, w_up, residual, dout, scaling = _make(M, 40, d_out, b, dtype, seed=2)
    _run_and_check(x, w_down, w_up, residual, dout, scaling, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_path_small_tile(monkeypatch, dtype):
    """Force 16-wide chunks: b = 100 gives 7 chunks, the last one partial; residual and dropout on."""
    monkeypatch.setattr(K, "_MAX_BLOCK_R", 16)
    monkeypatch.setattr(K, "_CHUNK_R", 16)
    x, w_down, w_up, residual, dout, scaling = _make(33, 40, 24, 100, dtype, seed=3)
    _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="silu", p=0.2, seed=11)


def test_non_contiguous_inputs():
    M, d_in, d_out, b = 17, 40, 72, 24
    x, w_down, w_up, residual, dout, scaling = _make(M, d_in, d_out, b, torch.float32, seed=4)
    x_nc = x.t().contiguous().t()  # column-major
    dout_nc = torch.empty(M, 2 * d_out)[:, ::2]
    dout_nc.copy_(dout)
    res_nc = torch.empty(2 * M, d_out)[::2]
    res_nc.copy_(residual)
    w_up_nc = w_up.t().contiguous().t()
    assert not (x_nc.is_contiguous() or dout_nc.is_contiguous() or res_nc.is_contiguous())
    got = _run_and_check(x_nc, w_down, w_up_nc, res_nc, dout_nc, scaling, activation="tanh", p=0.1, seed=5)
    # the same math on contiguous copies gives the same numbers (dropout mask from logical indices)
    want = _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="tanh", p=0.1, seed=5)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-6)

    # strided slice of a wider tensor, no residual (d_out == d_in)
    x, w_down, w_up, residual, dout, scaling = _make(3, 40, None, 8, torch.bfloat16, seed=5)
    x_sl = torch.zeros(3, 100, dtype=torch.bfloat16)[:, 10:50]
    x_sl.copy_(x)
    _run_and_check(x_sl, w_down, w_up, None, dout, scaling, activation="relu")


def test_dropout_mask_kept_fraction_and_seeds():
    M, Kd, p = 64, 200, 0.3
    m1 = K.dropout_mask(123, M, Kd, p, device=DEV)
    assert m1.dtype == torch.bool and m1.shape == (M, Kd)
    assert m1.view(torch.int8).max() <= 1  # every element written (poison is 7)
    kept = m1.float().mean().item()
    assert abs(kept - (1 - p)) < 0.02  # 12800 draws: std ≈ 0.004
    assert torch.equal(m1, K.dropout_mask(123, M, Kd, p, device=DEV))
    m2 = K.dropout_mask(124, M, Kd, p, device=DEV)
    assert (m1 != m2).float().mean() > 0.2  # new seed ⇒ new mask (independent: ≈ 2p(1-p) = 0.42)
    # logical offsets m*K + k: the first rows do not depend on how many rows there are
    assert torch.equal(K.dropout_mask(123, 5, Kd, p, device=DEV), m1[:5])
    assert K.dropout_mask(123, M, Kd, 0.0, device=DEV).all()


@pytest.mark.parametrize("d_out", [None, 24], ids=["no_residual", "residual"])
def test_dropout_fwd_bwd_use_the_mask(d_out):
    """Forward and backward regenerate exactly dropout_mask(seed, M, d_in, p) (reference uses it)."""
    p, seed = 0.25, 7
    x, w_down, w_up, residual, dout, scaling = _make(17, 40, d_out, 8, torch.float32, seed=6)
    got = _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="gelu", p=p, seed=seed)
    # a new seed changes the forward (new mask)
    out2, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="gelu", residual=residual,
                               dropout_p=p, seed=seed + 1)
    assert (out2 - got[0]).abs().max() > 1e-3
    # p = 0 equals no dropout at all, whatever the seed
    out3, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="gelu", residual=residual, seed=99)
    want = _reference(x, w_down, w_up, scaling, activation="gelu", residual=residual, keep=None, p=0.0,
                      dout=dout, dtype=torch.float64, learned=False)[0]
    torch.testing.assert_close(out3.double(), want, rtol=1e-5, atol=1e-5)


def test_empty_rows():
    x, w_down, w_up, residual, dout, scaling = _make(0, 40, None, 8, torch.float32)
    out, hidden, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="tanh")
    assert out.shape == (0, 40) and hidden.shape == (0, 8)
    dx, dwd, dwu, ds = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, activation="tanh",
                                        has_residual=False, need_scaling_grad=True)
    assert dx.shape == (0, 40) and not dwd.any() and not dwu.any() and ds.item() == 0.0


def test_bad_inputs_name_the_argument():
    x, w_down, w_up, residual, dout, scaling = _make(3, 40, None, 8, torch.float32)
    fwd = K.bottleneck_fwd
    with pytest.raises(ValueError, match="activation"):
        fwd(x, w_down, w_up, scaling, activation="swish")
    with pytest.raises(ValueError, match=r"w_down must have shape \(b, d_in\) = \(8, 40\), got \(8, 39\)"):
        fwd(x, w_down[:, :39], w_up, scaling, activation="tanh")
    with pytest.raises(ValueError, match="w_up must have x's dtype"):
        fwd(x, w_down, w_up.double(), scaling, activation="tanh")
    with pytest.raises(ValueError, match="scaling must be a 1-element float32 tensor"):
        fwd(x, w_down, w_up, scaling.double(), activation="tanh")
    with pytest.raises(ValueError, match="dropout_p"):
        fwd(x, w_down, w_up, scaling, activation="tanh", dropout_p=1.0)
    with pytest.raises(ValueError, match="seed"):
        fwd(x, w_down, w_up, scaling, activation="tanh", seed=-1)
    with pytest.raises(ValueError, match="d_out == d_in"):
        fwd(x, w_down, w_up[:30], scaling, activation="tanh")
    with pytest.raises(ValueError, match=r"residual must have shape \(M, d_out\)"):
        fwd(x, w_down, w_up, scaling, activation="tanh", residual=x[:2])
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fwd(x[None], w_down, w_up, scaling, activation="tanh")
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        fwd(x.double(), w_down.double(), w_up.double(), scaling, activation="tanh")
    _, hidden, _ = fwd(x, w_down, w_up, scaling, activation="tanh")
    with pytest.raises(ValueError, match=r"hidden must have shape \(M, b\)"):
        K.bottleneck_bwd(dout, x, hidden[:, :7], w_down, w_up, scaling, activation="tanh", has_residual=False)
    with pytest.raises(ValueError, match=r"dout must have shape \(M, d_out\)"):
        K.bottleneck_bwd(dout[:2], x, hidden, w_down, w_up, scaling, activation="tanh", has_residual=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs CUDA and TRITON_INTERPRET=0 (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("b", [100, 256, 1000])
def test_gpu_compiled_matches_float64(monkeypatch, dtype, b):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: IEEE dots
    for d_out, act, p in [(None, "tanh", 0.0), (1000, "gelu", 0.1)]:
        x, w_down, w_up, residual, dout, scaling = _make(1027, 4096 + 40, d_out, b, dtype, seed=b)
        tensors = [t if t is None else t.cuda() for t in (x, w_down, w_up, residual, dout, scaling)]
        _run_and_check(*tensors, activation=act, p=p, seed=3)
