"""Interpreter (CPU) tests of the bottleneck-adapter Triton kernels against float64 torch.

Both plans (``fused``: one row-block kernel per pass; ``split``: two kernels on 2-D grids) run
every activation with and without dropout and with and without a residual (d_out != d_in), at odd
shapes, with a learned scaling: out, hidden and every gradient (x, w_down, w_up, scaling). The
plan is forced through ``FUSED_MIN_PROGRAMS`` (the interpreter's M is far below the GPU threshold)
and checked, so no case silently runs the other plan.

Run: python -m pytest tests/kernels/test_bottleneck_adapter_kernels.py -q
"""

import itertools
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
    """Every buffer the launchers allocate starts as NaN (int32: 7), so unwritten elements show."""

    def poisoned(shape, *, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 7
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(_common, "alloc", poisoned)


@pytest.fixture(params=["fused", "split"])
def plan(request, monkeypatch):
    """Force the plan (at these M the fused plan would never run on its own; on a GPU fp32 never
    takes it either, but its math is the same in every dtype: the interpreter checks it in fp32
    against float64 at fp32 tolerance)."""
    fused = request.param == "fused"
    monkeypatch.setattr(K, "FUSED_MIN_PROGRAMS", 1 if fused else 1 << 30)
    if fused:
        monkeypatch.setattr(K, "FUSED_DTYPES", (*K.FUSED_DTYPES, torch.float32))
    return request.param


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


def _check(got, x, w_down, w_up, residual, dout, scaling, *, activation, keep, p, learned):
    """Compare (out, hidden, dx, dw_down, dw_up, ds) with float64; the floor is 2× the error of the
    same computation in x's dtype (DESIGN.md) plus _EPS of the magnitude."""
    dtype = x.dtype
    kw = dict(activation=activation, residual=residual, keep=keep, p=p, dout=dout, learned=learned)
    want = _reference(x, w_down, w_up, scaling, dtype=torch.float64, **kw)
    base = _reference(x, w_down, w_up, scaling, dtype=dtype, **kw)
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
        # ds is one sum of M·b terms whose rounding errors random-walk: scale by the terms' 2-norm
        scale = ds_scale if name == "dscaling" else w_.abs().max().item()
        tol = 2.0 * err_torch + _EPS[dtype] * max(1.0, scale)
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e} (torch {dtype} err {err_torch:.3e})"
    for name, g_ in zip(names[2:], got[2:]):
        if g_ is not None:
            assert g_.abs().max() > 0, f"{name} is all zeros"


def _run_and_check(x, w_down, w_up, residual, dout, scaling, *, activation, p=0.0, seed=0, learned=True,
                   expect_plan=None):
    dtype = x.dtype
    M, d_in = x.shape
    if expect_plan is not None:
        assert K.plan(M, w_down.shape[0], dtype) == expect_plan
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
    keep = None
    if p > 0:
        keep = K.dropout_mask(seed, M, d_in, p, device=x.device)
        assert torch.equal(_common.unpack_bits(bits, d_in), keep)  # the forward stores the mask it draws
    got = [out, hidden, dx, dwd, dwu, ds]
    _check(got, x, w_down, w_up, residual, dout, scaling, activation=activation, keep=keep, p=p, learned=learned)
    return got, bits


# Every activation × dropout × residual, each with its own odd shape and dtype, in both plans.
# Widths past 128 put several output tiles and K steps into every kernel (the fused kernels' reversed
# column loop included).
_SHAPES = [  # M, d_in, d_out (when there is a residual), b, dtype
    (1, 40, 72, 1, torch.float32), (3, 72, 264, 8, torch.bfloat16), (17, 300, 40, 24, torch.float32),
    (129, 40, 100, 100, torch.bfloat16), (17, 200, 140, 3, torch.float16), (3, 100, 72, 40, torch.float32),
    (65, 264, 24, 16, torch.bfloat16), (33, 72, 300, 7, torch.float32),
]
CASES = [
    (act, p, residual, *_SHAPES[i % len(_SHAPES)])
    for i, (act, p, residual) in enumerate(itertools.product(_ACT, (0.0, 0.2), (False, True)))
]


@pytest.mark.parametrize("activation,p,residual,M,d_in,d_out,b,dtype", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_fwd_bwd_match_float64(plan, activation, p, residual, M, d_in, d_out, b, dtype):
    x, w_down, w_up, res, dout, scaling = _make(M, d_in, d_out if residual else None, b, dtype, seed=M + b)
    _run_and_check(x, w_down, w_up, res, dout, scaling, activation=activation, p=p, seed=M, expect_plan=plan)


def test_plan_is_chosen_from_the_shape():
    """Fused only where the row blocks fill the GPU and the bottleneck fits on chip."""
    blocks = K.FUSED_MIN_PROGRAMS * K.FUSED_BLOCK_M
    assert K.plan(8192, 256) == "fused" and K.plan(blocks, K.FUSED_MAX_R) == "fused"
    assert K.plan(blocks - K.FUSED_BLOCK_M, 256) == "split"  # M = 2048 … 6080: too few row blocks
    assert K.plan(8192, K.FUSED_MAX_R + 1) == "split"  # b too wide for the on-chip tile
    assert K.plan(16, 256) == "split"  # decode
    assert K.plan(8192, 256, torch.float16) == "fused" and K.plan(8192, 256, torch.float32) == "split"


@pytest.mark.parametrize("M,d_out,b,activation,dtype,p", [
    (17, None, 300, "gelu", torch.float32, 0.0),
    (3, 24, 1000, "tanh", torch.bfloat16, 0.1),
], ids=["b300-fp32", "b1000-bf16-residual-dropout"])
def test_wide_bottleneck_runs_split_in_chunks(monkeypatch, M, d_out, b, activation, dtype, p):
    """b > FUSED_MAX_R: the split plan, whatever M (the fused plan is allowed here but not taken)."""
    monkeypatch.setattr(K, "FUSED_MIN_PROGRAMS", 1)
    monkeypatch.setattr(K, "FUSED_DTYPES", (torch.bfloat16, torch.float32))
    x, w_down, w_up, residual, dout, scaling = _make(M, 40, d_out, b, dtype, seed=2)
    _run_and_check(x, w_down, w_up, residual, dout, scaling, activation=activation, p=p, seed=4, expect_plan="split")


def test_split_chunks_load_one_drawn_mask(monkeypatch):
    """Several bottleneck chunks per row block: the mask is drawn once (its own launch) and every
    chunk loads it; a single chunk draws it in the kernel."""
    monkeypatch.setattr(K, "FUSED_MIN_PROGRAMS", 1 << 30)
    draws = []
    real = K.dropout_bits
    monkeypatch.setattr(K, "dropout_bits", lambda *a, **k: draws.append(a) or real(*a, **k))
    x, w_down, w_up, residual, dout, scaling = _make(33, 40, 24, 100, torch.float32, seed=3)  # 2 chunks of 64
    _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="silu", p=0.2, seed=11)
    assert len(draws) == 1
    x, w_down, w_up, residual, dout, scaling = _make(33, 40, 24, 50, torch.float32, seed=3)  # 1 chunk
    _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="silu", p=0.2, seed=11)
    assert len(draws) == 1


def test_backward_uses_the_stored_mask(plan):
    """The backward takes no seed: it applies whatever mask it is given. With the forward's bits it
    matches the forward's mask; with the complementary bits it matches the complementary mask —
    so nothing is regenerated."""
    p, seed, M, d = 0.3, 5, 33, 72
    x, w_down, w_up, residual, dout, scaling = _make(M, d, 40, 8, torch.float32, seed=7)
    with_forward_mask, bits = _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="tanh", p=p,
                                             seed=seed, learned=False)
    out, hidden, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="tanh", residual=residual,
                                      dropout_p=p, seed=seed)
    flipped = ~bits  # the complement (padding bits past d are never read)
    got = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, activation="tanh", has_residual=True,
                           dropout_p=p, bits=flipped)
    keep = _common.unpack_bits(bits, d)
    # the reference: hidden as the forward computed it (kept mask), gradients through the flipped one
    xs = x.double().requires_grad_()
    wd, wu = w_down.double().requires_grad_(), w_up.double().requires_grad_()
    h = (x.double() * keep * _common.keep_scale(p)) @ wd.T  # hidden: the forward's mask
    h_flip = (xs * ~keep * _common.keep_scale(p)) @ wd.T  # gradients: the mask backward was given
    h_used = h.detach() + h_flip - h_flip.detach()
    o = 0.75 * torch.tanh(h_used) @ wu.T
    dx, dwd, dwu = torch.autograd.grad(o, (xs, wd, wu), dout.double())
    for name, g_, w_ in zip(("dx", "dw_down", "dw_up"), got[:3], (dx, dwd, dwu)):
        torch.testing.assert_close(g_.double(), w_, rtol=1e-5, atol=1e-5, msg=name)
    # and the mask made the difference: every row keeps some columns and drops others
    assert (keep.any(1) & (~keep).any(1)).all()
    assert (got[0] - with_forward_mask[2]).abs().max() > 0.1


def test_scaling_grad_only_when_asked_and_backward_deterministic(plan):
    x, w_down, w_up, residual, dout, scaling = _make(17, 40, None, 24, torch.float32, seed=1)
    out, hidden, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="gelu")
    kw = dict(activation="gelu", has_residual=False)
    r1 = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, **kw)
    assert r1[3] is None
    r2 = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, need_scaling_grad=True, **kw)
    for a, b in zip(r1[:3], r2[:3]):
        assert torch.equal(a, b)  # no atomics: bitwise reproducible
    assert r2[3].shape == scaling.shape and r2[3].dtype == torch.float32


def test_plans_agree(monkeypatch):
    """Both plans round hidden once and apply the activation to the rounded value: same numbers."""
    x, w_down, w_up, residual, dout, scaling = _make(65, 72, 40, 24, torch.bfloat16, seed=8)
    results = []
    assert K.plan(1 << 20, 24, x.dtype) == "fused"
    for threshold in (1, 1 << 30):
        monkeypatch.setattr(K, "FUSED_MIN_PROGRAMS", threshold)
        out, hidden, bits = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="silu", residual=residual,
                                             dropout_p=0.1, seed=2)
        results.append((out, hidden, bits))
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][2], results[1][2])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)


def test_scaling_is_read_on_device(plan):
    """A different scaling tensor (e.g. a learned one after a step) changes out without recompiling."""
    x, w_down, w_up, residual, dout, scaling = _make(3, 40, None, 8, torch.float32)
    out1, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="tanh")
    out2, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling * 2, activation="tanh")
    torch.testing.assert_close(out2 - x, 2 * (out1 - x), rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs(plan):
    M, d_in, d_out, b = 17, 40, 72, 24
    x, w_down, w_up, residual, dout, scaling = _make(M, d_in, d_out, b, torch.float32, seed=4)
    x_nc = x.t().contiguous().t()  # column-major
    dout_nc = torch.empty(M, 2 * d_out)[:, ::2]
    dout_nc.copy_(dout)
    res_nc = torch.empty(2 * M, d_out)[::2]
    res_nc.copy_(residual)
    w_up_nc = w_up.t().contiguous().t()
    assert not (x_nc.is_contiguous() or dout_nc.is_contiguous() or res_nc.is_contiguous())
    got, _ = _run_and_check(x_nc, w_down, w_up_nc, res_nc, dout_nc, scaling, activation="tanh", p=0.1, seed=5)
    # the same math on contiguous copies gives the same numbers (dropout mask from logical indices)
    want, _ = _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="tanh", p=0.1, seed=5)
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
    kept = m1.float().mean().item()
    assert abs(kept - (1 - p)) < 0.02  # 12800 draws: std ≈ 0.004
    assert torch.equal(m1, K.dropout_mask(123, M, Kd, p, device=DEV))
    m2 = K.dropout_mask(124, M, Kd, p, device=DEV)
    assert (m1 != m2).float().mean() > 0.2  # new seed ⇒ new mask (independent: ≈ 2p(1-p) = 0.42)
    # logical offsets m*K + k: the first rows do not depend on how many rows there are
    assert torch.equal(K.dropout_mask(123, 5, Kd, p, device=DEV), m1[:5])
    assert K.dropout_mask(123, M, Kd, 0.0, device=DEV).all()


@pytest.mark.parametrize("d_out", [None, 24], ids=["no_residual", "residual"])
def test_dropout_seed_changes_the_forward_and_p0_is_no_dropout(d_out):
    p, seed = 0.25, 7
    x, w_down, w_up, residual, dout, scaling = _make(17, 40, d_out, 8, torch.float32, seed=6)
    got, _ = _run_and_check(x, w_down, w_up, residual, dout, scaling, activation="gelu", p=p, seed=seed)
    out2, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="gelu", residual=residual,
                                  dropout_p=p, seed=seed + 1)
    assert (out2 - got[0]).abs().max() > 1e-3
    out3, _, _ = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="gelu", residual=residual, seed=99)
    want = _reference(x, w_down, w_up, scaling, activation="gelu", residual=residual, keep=None, p=0.0,
                      dout=dout, dtype=torch.float64, learned=False)[0]
    torch.testing.assert_close(out3.double(), want, rtol=1e-5, atol=1e-5)


def test_empty_rows(plan):
    x, w_down, w_up, residual, dout, scaling = _make(0, 40, None, 8, torch.float32)
    out, hidden, bits = K.bottleneck_fwd(x, w_down, w_up, scaling, activation="tanh", dropout_p=0.1)
    assert out.shape == (0, 40) and hidden.shape == (0, 8) and bits.shape == (0, 2)
    dx, dwd, dwu, ds = K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, activation="tanh",
                                        has_residual=False, need_scaling_grad=True, dropout_p=0.1, bits=bits)
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
    with pytest.raises(ValueError, match="bits must be given exactly when dropout_p > 0"):
        K.bottleneck_bwd(dout, x, hidden, w_down, w_up, scaling, activation="tanh", has_residual=False,
                         dropout_p=0.1)


# ----------------------------------------------------------------------------- shared helpers


@pytest.mark.parametrize("M,b,d,split", [(300, 24, 40, True), (33, 3, 100, False)], ids=["split-M", "one-split"])
def test_weight_grad_pair_matches_float64(monkeypatch, M, b, d, split):
    """Both gradients of one launch: dh^T (mask ⊙ x) · c and s · dout^T act(hidden), vs float64;
    with split-M partials (fewer tiles than a wave) and without (tiles count as a wave)."""
    if not split:
        monkeypatch.setattr(_common, "WGRAD_WAVE_TILES", 1)
    g = torch.Generator().manual_seed(0)
    dh, x = torch.randn(M, b, generator=g), torch.randn(M, d, generator=g)
    dout, hidden = torch.randn(M, d, generator=g), torch.randn(M, b, generator=g)
    bits = K.dropout_bits(3, M, d, 0.4, device=DEV)
    s = torch.tensor([0.5])
    calls = []
    real = _common._weight_grad_kernel
    monkeypatch.setattr(_common, "_weight_grad_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: calls.append(grid) or real[grid]})())
    c1, c2 = _common.weight_grad_pair(
        _common.WeightGrad(dh, x, scale=1.5, bits=bits),
        _common.WeightGrad(dout, hidden, scale_tensor=s, b_activation=_common.ACTIVATIONS["gelu"]),
    )
    keep = _common.unpack_bits(bits, d).double()
    torch.testing.assert_close(c1.double(), 1.5 * dh.double().T @ (x.double() * keep), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c2.double(), 0.5 * dout.double().T @ F.gelu(hidden.double()), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and (calls[0][1] > 1) == split


def test_split_rows_does_not_split_a_wave():
    assert _common.split_rows(8192, 32, _common.WGRAD_WAVE_TILES) == (1, 8192)
    splits, rows = _common.split_rows(8192, 32, 32)
    assert splits > 1 and splits * rows >= 8192 and rows % 32 == 0


def test_cast_pair_rounds_like_torch():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 72, generator=g)[:, ::2]  # strided
    b = torch.randn(7, 3, generator=g).t()  # transposed
    for dtype in (torch.bfloat16, torch.float16):
        ca, cb = _common.cast_pair(a, b, dtype)
        assert ca.is_contiguous() and cb.is_contiguous()
        assert torch.equal(ca, a.to(dtype)) and torch.equal(cb, b.to(dtype))


# ----------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs CUDA and TRITON_INTERPRET=0 (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M,b,plan_16bit", [(1027, 100, "split"), (6151, 256, "fused"), (1027, 1000, "split"),
                                            (16, 256, "split")],
                         ids=["split-b100", "fused-b256", "split-b1000", "decode"])
def test_gpu_compiled_matches_float64(monkeypatch, dtype, M, b, plan_16bit):
    """The compiled kernels (both plans, every dtype path) against float64 at real widths."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32: IEEE dots
    expect = "split" if dtype == torch.float32 else plan_16bit
    for d_out, act, p in [(None, "tanh", 0.0), (1000, "gelu", 0.1), (None, "silu", 0.1), (1000, "relu", 0.0)]:
        x, w_down, w_up, residual, dout, scaling = _make(M, 4096 + 40, d_out, b, dtype, seed=b)
        tensors = [t if t is None else t.cuda() for t in (x, w_down, w_up, residual, dout, scaling)]
        _run_and_check(*tensors, activation=act, p=p, seed=3, expect_plan=expect)
