"""Layer-1 tests of kernels/fastadapt_kernels/dora_linear.py and the DoRA side of LoRA's kernels: every launcher vs a
float64 torch reference, in the interpreter on CPU (TRITON_INTERPRET=1), at small odd shapes, outputs
poisoned with NaN first (the fixture of test_lora_linear_kernels). Low precision: error ≤ 2× the
same computation by torch in that dtype plus one output ulp (``assert_matches``)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_lora_linear_kernels import (  # noqa: E402, F401  (_poison_outputs: the autouse fixture)
    _d,
    _lowp,
    _poison_outputs,
    _rand,
    _w,
    _x,
    assert_matches,
)

from fastadapt.kernels import _common  # noqa: E402
from fastadapt.kernels import dora_linear as D  # noqa: E402
from fastadapt.kernels import lora_linear as L  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _magnitude_and_norm(N, seed=11):
    """A magnitude (fp32 parameter) and positive norms with g = m / norm spread around 1."""
    m = _rand(N, seed=seed).abs() + 0.5
    norm = (_rand(N, seed=seed + 1).abs() + 0.5).contiguous()
    return m, norm


# ----------------------------------------------------------------------------------------------
# row norms without the N×K sum
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,K,R,dtype,wt",
    [
        (1, 40, 1, F32, False),
        (40, 72, 3, F32, True),  # a Conv1D weight's transposed view
        (100, 40, 8, BF16, False),
        (72, 100, 16, F32, True),
        (40, 72, 24, F16, True),
        (33, 72, 100, F32, False),  # R > 64: two rank tiles, the cross terms of A Aᵀ between them
    ],
)
def test_norm(N, K, R, dtype, wt):
    w = _w(N, K, dtype, wt)
    a = _rand(R, K, seed=3, scale=K**-0.5)  # fp32 master copies
    b = _rand(N, R, seed=4, scale=0.5)
    norm = D.dora_norm(w, a, b, (a @ a.t()).contiguous(), scaling=1.7)
    assert norm.dtype == F32 and norm.shape == (N,)
    ref = (_d(w) + 1.7 * _d(b) @ _d(a)).norm(dim=1)
    assert_matches(norm, ref, _lowp(dtype, lambda: torch.linalg.norm(w + (1.7 * b @ a).to(dtype), dim=1)))


def test_norm_of_a_fresh_adapter_is_the_weight_norm():
    w = _w(40, 72, F32, False)
    a, b = _rand(4, 72, seed=3), torch.zeros(40, 4)
    torch.testing.assert_close(D.dora_norm(w, a, b, (a @ a.t()).contiguous(), scaling=3.0), w.norm(dim=1),
                               rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# forward: the shrink's x_d, the DoRA epilogue (after cuBLAS or inside the fused GEMM)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_shrink_writes_the_dropped_input(dtype):
    M, K, R, p, seed = 17, 72, 40, 0.3, 77  # R=40 < 64: one rank tile; x_d from the first tile only
    x = _x(M, K, dtype, True)
    a = _rand(R, K, seed=3)
    x_d = torch.full((M, K), float("nan"), dtype=dtype)
    s, bits = D.lora_shrink(x, a, scaling=2.0, dropout_p=p, seed=seed, dropped=x_d)
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert torch.equal(_common.unpack_bits(bits, K), mask)
    want = x * mask * _common.keep_scale(p)
    assert torch.equal(x_d, want.to(dtype)) if dtype == F32 else (x_d - want).abs().max() <= want.abs().max() / 128
    s_plain, _ = D.lora_shrink(x, a, scaling=2.0, dropout_p=p, seed=seed)
    assert torch.equal(s, s_plain)


_EPI_CASES = [
    # M, K, N, R, dtype, bias, dropout form, keep z
    (1, 40, 72, 1, F32, True, False, True),
    (3, 72, 100, 3, BF16, False, True, True),
    (17, 100, 40, 8, F32, True, True, False),
    (129, 40, 72, 16, BF16, True, False, False),
    (17, 72, 100, 40, F16, True, True, True),
    (17, 40, 100, 100, F32, False, False, True),  # R > the 64-wide rank step
]


def _epilogue_inputs(M, K, N, R, dtype, has_bias, form):
    x = _x(M, K, dtype, M > 1)  # a one-row slice is contiguous anyway
    w = _w(N, K, dtype, True)
    s = _rand(M, R, dtype=dtype, seed=4)
    b = _rand(N, R, seed=5)
    m, norm = _magnitude_and_norm(N)
    bias = _rand(N, dtype=dtype, seed=6) if has_bias else None
    rank = _d(s) @ _d(b.to(dtype)).T
    z = _d(x) @ _d(w).T + rank
    g = _d(m) / _d(norm)
    y = (g - 1) * z + rank if form else g * z
    y = y + (_d(bias) if has_bias else 0.0)

    def lowp():  # torch in the low dtype, the epilogue's formula
        zl = x @ w.T + s @ b.to(dtype).T
        gl = (m / norm).to(dtype)
        yl = (gl - 1) * zl + s @ b.to(dtype).T if form else gl * zl
        return (yl + bias if has_bias else yl), zl

    return x, w, s, b, bias, D.DoraScale(m, norm, form), z, y, (None if dtype == F32 else lowp())


@pytest.mark.parametrize("M,K,N,R,dtype,has_bias,form,keep_z", _EPI_CASES)
def test_dora_epilogue_after_the_base_gemm(M, K, N, R, dtype, has_bias, form, keep_z):
    x, w, s, b, bias, dora, z_ref, y_ref, lowp = _epilogue_inputs(M, K, N, R, dtype, has_bias, form)
    base = x @ w.T
    y = torch.empty(M, N, dtype=dtype) if keep_z else None
    out = D.lora_rank(s, b, out=base, bias=bias, accumulate=True, dora=dora, y=y)
    if keep_z:
        assert out is y
        assert_matches(base, z_ref, None if lowp is None else lowp[1])  # z stays in the base product's buffer
    else:
        assert out is base  # y written over the base product
    assert_matches(out, y_ref, None if lowp is None else lowp[0])


@pytest.mark.parametrize("M,K,N,R,dtype,has_bias,form,keep_z",
                         [c for c in _EPI_CASES if not c[6]] + [(17, 72, 100, 3, BF16, True, False, True)])
def test_dora_epilogue_in_the_fused_gemm(M, K, N, R, dtype, has_bias, form, keep_z):
    x, w, s, b, bias, dora, z_ref, y_ref, lowp = _epilogue_inputs(M, K, N, R, dtype, has_bias, form)
    y = torch.empty(M, N, dtype=dtype) if keep_z else None
    out = D.lora_gemm(x, w, s, b, bias=bias, dora=dora, y=y)
    if keep_z:
        assert_matches(out, z_ref, None if lowp is None else lowp[1])
        assert_matches(y, y_ref, None if lowp is None else lowp[0])
    else:
        assert_matches(out, y_ref, None if lowp is None else lowp[0])


def test_fused_gemm_refuses_the_dropout_form():
    """PEFT's dropout form needs the rank term apart from the base product: the fused GEMM keeps one
    accumulator, so the op runs that form through the epilogue (``_forward_variant``) and the
    launcher refuses it."""
    x, w, s, b, bias, dora, *_ = _epilogue_inputs(3, 72, 100, 3, BF16, False, True)
    with pytest.raises(AssertionError, match="dropout form"):
        D.lora_gemm(x, w, s, b, bias=bias, dora=dora)


# ----------------------------------------------------------------------------------------------
# backward: the dY pass with dZ = g ⊙ dY, d magnitude and dX's GEMM input; the masked pass
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M,N,R,dtype,form,side,two_pass",
    [
        (1, 40, 1, F32, False, True, False),
        (3, 100, 3, BF16, True, True, False),
        (17, 72, 8, F32, True, False, True),  # the two-pass plan (partials past their bound)
        (129, 40, 16, BF16, False, True, True),
        (129, 100, 40, F32, True, True, False),
        (17, 40, 100, F32, False, True, False),  # R > 64: the two-pass plan by rank
        (17, 40, 100, F32, True, True, False),
        (200, 72, 5, F16, False, False, False),  # several row splits: d magnitude partials summed
    ],
)
def test_dora_dy_pass(M, N, R, dtype, form, side, two_pass, monkeypatch):
    if two_pass:
        monkeypatch.setattr(L, "PARTIAL_BYTES_CAP", 0)
    dy = _rand(M, N + 9, dtype=dtype, seed=7)[:, 4 : 4 + N]  # strided dY
    z = _rand(M, N, dtype=dtype, seed=12)
    s = _rand(M, R, dtype=dtype, seed=8)
    b = _rand(N, R, seed=9)
    m, norm = _magnitude_and_norm(N)
    out = torch.empty(M, N, dtype=dtype) if side else None
    ds, db, dm = D.dy_pass(dy, s, b, dora=D.DoraScale(m, norm, form), z=z, side=out)
    assert ds.dtype == db.dtype == dm.dtype == F32 and dm.shape == (N,)
    g = _d(m) / _d(norm)
    dz = _d(dy) * g
    bl = b.to(dtype)

    def lowp(fn):
        return _lowp(dtype, lambda: fn(dy * (m / norm).to(dtype)))

    assert_matches(ds, dz @ _d(bl), lowp(lambda dzl: dzl @ bl))
    assert_matches(db, dz.T @ _d(s), lowp(lambda dzl: dzl.T @ s))
    assert_matches(dm, (_d(dy) * _d(z)).sum(0) / _d(norm), _lowp(dtype, lambda: (dy * z).sum(0) / norm))
    if side:
        want = _d(dy) * (g - 1) if form else dz
        assert_matches(out, want, _lowp(dtype, lambda: dy * ((m / norm).to(dtype) - (1 if form else 0))))
    for t in (ds, db, dm):
        assert t.abs().sum() > 0


@pytest.mark.parametrize("M,K,dtype", [(1, 40, F32), (17, 72, BF16), (129, 100, F32)])
def test_masked_scale(M, K, dtype):
    p, seed = 0.3, 99
    t = _rand(M, K, dtype=dtype, seed=3)
    before = t.clone()
    bits = L.dropout_bits(seed, M, K, p, device="cpu")
    out = D.masked_scale_(t, bits, 1.25)
    assert out is t
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert_matches(t, _d(before) * mask * 1.25, _lowp(dtype, lambda: (before * mask * 1.25).to(dtype)))
    assert torch.equal(t == 0, ~mask | (before == 0))
