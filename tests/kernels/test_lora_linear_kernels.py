"""Layer-1 tests of kernels/fastadapt_kernels/lora_linear.py: every launcher vs a float64 torch reference.

Runs the Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1, set below before
triton is imported). Shapes are small and odd on purpose (M in {1, 3, 17, 129}, K/N not multiples
of the blocks, R in {1, 3, 8, 16} plus R=40 (not a power of two), R=24 (a concatenated q/k/v
group) and ranks past each kernel's rank tile (R=100, 200, 300)).

bf16/fp16 tolerance: error vs float64 <= 2x the error of the same computation done by torch in that
dtype, plus one output ulp (4e-3 of the largest reference magnitude).

The GPU test at the bottom needs a CUDA device AND the compiled path:
    TRITON_INTERPRET=0 python -m pytest tests/kernels/test_lora_linear_kernels.py -m gpu
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fastadapt.kernels import _common  # noqa: E402
from fastadapt.kernels import lora_linear as L  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every float buffer the launchers allocate starts as NaN, so an unwritten element shows."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=F32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _x(M, K, dtype, noncontig, seed=1):
    """(M, K) input; noncontig: a column slice of a wider tensor (row stride K + 11)."""
    if noncontig:
        x = _rand(M, K + 11, dtype=dtype, seed=seed)[:, 5 : 5 + K]
        assert not x.is_contiguous()
        return x
    return _rand(M, K, dtype=dtype, seed=seed)


def _w(N, K, dtype, transposed, seed=2):
    """(N, K) weight; transposed: a .t() view of a (K, N) tensor (strides (1, N))."""
    if transposed:
        return _rand(K, N, dtype=dtype, seed=seed, scale=K**-0.5).t()
    return _rand(N, K, dtype=dtype, seed=seed, scale=K**-0.5)


def _d(t):
    return t.detach().to(torch.float64)


def assert_matches(out, ref64, lowp=None):
    """out vs the float64 reference. lowp: the same computation by torch in the low dtype."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert not torch.isnan(out).any(), "NaN in output (unwritten poisoned element?)"
    err = (_d(out) - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    if lowp is None:
        assert err <= 1e-5 * max(scale, 1.0), f"fp32 error {err:.3g} (ref max {scale:.3g})"
    else:
        torch_err = (_d(lowp) - ref64).abs().max().item()
        bound = 2.0 * torch_err + 4e-3 * scale + 1e-6
        assert err <= bound, f"low-precision error {err:.3g} > 2 x torch {torch_err:.3g} + eps"


def _lowp(dtype, fn):
    """Run fn for the low-precision torch comparison, or return None for fp32."""
    return None if dtype == F32 else fn()


# ----------------------------------------------------------------------------------------------
# dropout mask: drawn once, stored packed
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics_and_seeds(p):
    M, K = 64, 130  # 8320 elements; K not a multiple of 32
    m = L.dropout_mask(1234, M, K, p, device="cpu")
    assert m.dtype == torch.bool and m.shape == (M, K)
    kept = m.float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept
    assert torch.equal(m, L.dropout_mask(1234, M, K, p, device="cpu")), "same seed, different mask"
    other = L.dropout_mask(1235, M, K, p, device="cpu")
    assert (other != m).float().mean().item() > 0.05, "a new seed must give a new mask"
    # a row depends on its logical index only, not on M
    assert torch.equal(L.dropout_mask(1234, 2 * M, K, p, device="cpu")[:M], m)
    # neighbouring elements (the four outputs of one Philox call) are not correlated
    pairs = (m[:, 0:128:2] == m[:, 1:128:2]).float().mean().item()
    assert abs(pairs - ((1 - p) ** 2 + p**2)) < 0.05


def test_packed_mask_layout():
    bits = L.dropout_bits(99, 5, 70, 0.5, device="cpu")
    assert bits.dtype == torch.int32 and bits.shape == (5, 3)  # ceil(70 / 32) words per row
    mask = _common.unpack_bits(bits, 70)
    for j in (0, 31, 32, 69):  # bit j % 32 of word j // 32
        assert torch.equal(mask[:, j], ((bits[:, j // 32] >> (j % 32)) & 1).bool())
    assert not (bits[:, 2] >> 6).any(), "bits past K must be zero"


def test_large_seed_same_mask_everywhere():
    """Seeds from torch's generator are 63-bit: the kernels and dropout_mask must agree."""
    M, K, p, seed = 17, 40, 0.4, 2**62 + 12345
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert not torch.equal(mask, L.dropout_mask(seed & 0xFFFFFFFF, M, K, p, device="cpu"))
    x = _x(M, K, F32, True) + 3.0
    s, bits = L.lora_shrink(x, torch.eye(K), scaling=1.0, dropout_p=p, seed=seed)
    assert torch.equal(s != 0, mask) and torch.equal(_common.unpack_bits(bits, K), mask)


@pytest.mark.parametrize("seed", [5, 2**62 + 12345])
def test_seed_from_a_device_tensor(seed):
    """The graph-safe seed: a one-element int64 tensor the shrink kernel reads at run time draws the
    mask of the same seed as a host int; the kernel reads the tensor's value at launch (a CUDA
    graph's replay sees what the tensor holds then), and bad seed tensors are refused by name."""
    M, K, R, p = 17, 40, 3, 0.3
    x, a = _x(M, K, F32, True), _x(R, K, F32, False, seed=3)
    s_int, bits_int = L.lora_shrink(x, a, scaling=0.5, dropout_p=p, seed=seed)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    s_t, bits_t = L.lora_shrink(x, a, scaling=0.5, dropout_p=p, seed=seed_t)
    assert torch.equal(bits_t, bits_int) and torch.equal(s_t, s_int)
    assert torch.equal(_common.unpack_bits(bits_t, K), L.dropout_mask(seed_t, M, K, p, device="cpu"))
    seed_t.fill_(seed + 1)  # the same tensor, a new value: a new mask
    _, bits_next = L.lora_shrink(x, a, scaling=0.5, dropout_p=p, seed=seed_t)
    assert torch.equal(bits_next, L.dropout_bits(seed + 1, M, K, p, device="cpu"))
    assert not torch.equal(bits_next, bits_int)
    with pytest.raises(ValueError, match="one int64"):
        L.dropout_mask(torch.tensor([5], dtype=torch.int32), M, K, p, device="cpu")


def test_dropout_mask_p0_keeps_all():
    assert L.dropout_mask(7, 3, 50, 0.0, device="cpu").all()


# ----------------------------------------------------------------------------------------------
# shrink: s = scaling * dropout(x) @ A^T, the mask stored
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M,K,R,dtype,noncontig",
    [
        (1, 40, 1, F32, False),
        (3, 72, 3, BF16, True),
        (17, 100, 8, F32, True),
        (129, 72, 16, BF16, False),
        (17, 40, 40, F32, True),  # R not a power of two
        (3, 100, 16, F16, True),
        (5, 40, 300, F32, False),  # R > 256: tiled over the grid
    ],
)
def test_shrink(M, K, R, dtype, noncontig):
    x = _x(M, K, dtype, noncontig)
    a = _rand(R, K, dtype=dtype, seed=3)
    s, bits = L.lora_shrink(x, a, scaling=0.75)
    assert bits is None and s.dtype == dtype and s.shape == (M, R) and s.is_contiguous()
    ref = 0.75 * _d(x) @ _d(a).T
    assert_matches(s, ref, _lowp(dtype, lambda: (x @ a.T) * 0.75))


def test_shrink_takes_fp32_master_weights():
    """An fp32 A with bf16 x is rounded on load: the same S as casting A first."""
    x = _x(17, 72, BF16, True)
    a = _rand(8, 72, seed=3)
    torch.testing.assert_close(L.lora_shrink(x, a, scaling=2.0)[0], L.lora_shrink(x, a.to(BF16), scaling=2.0)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("R", [8, 300])  # 300: several rank tiles, the first alone stores the mask
def test_shrink_dropout(dtype, R):
    M, K, p, seed = 17, 72, 0.3, 99
    x = _x(M, K, dtype, True)
    a = _rand(R, K, dtype=dtype, seed=3)
    s, bits = L.lora_shrink(x, a, scaling=2.0, dropout_p=p, seed=seed)
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert torch.equal(_common.unpack_bits(bits, K), mask)
    xd = _d(x) * mask * _common.keep_scale(p)
    ref = 2.0 * xd @ _d(a).T
    assert_matches(s, ref, _lowp(dtype, lambda: ((x * mask * _common.keep_scale(p)).to(dtype) @ a.T) * 2.0))


def test_shrink_group_concat_r24():
    """q/k/v group: one shrink with the concatenated A == three separate shrinks."""
    M, K = 17, 100
    x = _x(M, K, F32, True)
    parts = [_rand(8, K, seed=10 + i) for i in range(3)]
    s, bits = L.lora_shrink(x, torch.cat(parts), scaling=0.5, dropout_p=0.2, seed=5)
    assert s.shape == (M, 24)
    for i, a in enumerate(parts):
        si, bi = L.lora_shrink(x, a, scaling=0.5, dropout_p=0.2, seed=5)
        torch.testing.assert_close(s[:, 8 * i : 8 * (i + 1)], si, rtol=1e-5, atol=1e-5)
        assert torch.equal(bi, bits)
    mask = L.dropout_mask(5, M, K, 0.2, device="cpu")
    assert_matches(s, 0.5 * (_d(x) * mask / 0.8) @ _d(torch.cat(parts)).T)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_shrink_mask_is_dropout_mask(p):
    """With A = I, s = scaling * mask * x / (1-p) elementwise: the kernel's mask is visible."""
    M, K, seed = 33, 40, 2024
    x = _x(M, K, F32, True) + 3.0  # no zeros in x, so zeros in s are drops
    s, bits = L.lora_shrink(x, torch.eye(K), scaling=1.5, dropout_p=p, seed=seed)
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert torch.equal(s != 0, mask) and torch.equal(_common.unpack_bits(bits, K), mask)
    torch.testing.assert_close(s[mask], (1.5 * _common.keep_scale(p)) * x[mask], rtol=1e-6, atol=0)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.08
    s2, _ = L.lora_shrink(x, torch.eye(K), scaling=1.5, dropout_p=p, seed=seed + 1)
    assert not torch.equal(s2 != 0, mask), "a new seed must give a new mask"


# ----------------------------------------------------------------------------------------------
# joining the rank term to the frozen GEMM: fused GEMM, rank pass (+ cuBLAS addmm_), epilogue
# ----------------------------------------------------------------------------------------------

_FWD_CASES = [
    # M, K, N, R, dtype, bias, noncontig x, transposed weight
    (1, 40, 72, 1, F32, True, False, False),
    (3, 72, 100, 3, BF16, False, True, True),
    (17, 100, 40, 8, F32, True, True, True),
    (129, 40, 72, 16, BF16, True, False, False),
    (17, 72, 100, 40, F32, False, True, False),
    (3, 40, 72, 24, F16, True, False, True),
    (17, 40, 100, 100, F32, True, True, False),  # R > the 64-wide rank step: two rank steps
]


def _fwd_inputs(M, K, N, R, dtype, has_bias, noncontig, wt):
    x = _x(M, K, dtype, noncontig)
    w = _w(N, K, dtype, wt)
    s = _rand(M, R, dtype=dtype, seed=4)
    b = _rand(N, R, seed=5)  # fp32 master copy: rounded to s's dtype on load
    bias = _rand(N, dtype=dtype, seed=6) if has_bias else None
    ref = _d(x) @ _d(w).T + _d(s) @ _d(b.to(dtype)).T + (_d(bias) if has_bias else 0.0)

    def torch_lowp():
        out = x @ w.T + s @ b.to(dtype).T
        return out + bias if has_bias else out

    return x, w, s, b, bias, ref, _lowp(dtype, torch_lowp)


@pytest.mark.parametrize("M,K,N,R,dtype,has_bias,noncontig,wt", _FWD_CASES)
def test_gemm_forward(M, K, N, R, dtype, has_bias, noncontig, wt):
    x, w, s, b, bias, ref, lowp = _fwd_inputs(M, K, N, R, dtype, has_bias, noncontig, wt)
    y = L.lora_gemm(x, w, s, b, bias=bias)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    assert_matches(y, ref, lowp)


@pytest.mark.parametrize("M,K,N,R,dtype,has_bias,noncontig,wt", _FWD_CASES)
def test_rank_pass_then_addmm(M, K, N, R, dtype, has_bias, noncontig, wt):
    x, w, s, b, bias, ref, lowp = _fwd_inputs(M, K, N, R, dtype, has_bias, noncontig, wt)
    y = L.lora_rank(s, b, bias=bias)
    assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
    rank_lowp = _lowp(dtype, lambda: s @ b.to(dtype).T + (bias if has_bias else 0))
    assert_matches(y, ref - _d(x) @ _d(w).T, rank_lowp)
    assert_matches(y.addmm_(x, w.T), ref, lowp)  # cuBLAS accumulates the base product onto it


@pytest.mark.parametrize("M,K,N,R,dtype,has_bias,noncontig,wt", _FWD_CASES[:4] + _FWD_CASES[-1:])
def test_rank_epilogue(M, K, N, R, dtype, has_bias, noncontig, wt):
    x, w, s, b, bias, ref, lowp = _fwd_inputs(M, K, N, R, dtype, has_bias, noncontig, wt)
    # y lives inside a wider buffer (strided view): columns outside it must stay untouched
    buf = torch.full((M, N + 7), 123.0, dtype=dtype)
    y = buf[:, 3 : 3 + N]
    y.copy_(x @ w.T)
    out = L.lora_rank(s, b, out=y, bias=bias, accumulate=True)
    assert out.data_ptr() == y.data_ptr()
    assert (buf[:, :3] == 123).all() and (buf[:, 3 + N :] == 123).all()
    assert_matches(y, ref, lowp)


# ----------------------------------------------------------------------------------------------
# backward: dy pass (ds, db), dX three ways, grad_a
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M,N,R,dtype,two_pass",
    [
        (1, 40, 1, F32, False),
        (3, 100, 3, BF16, False),
        (17, 72, 8, F32, True),
        (129, 40, 16, BF16, False),
        (129, 100, 40, F32, False),
        (129, 72, 24, F32, True),
        (17, 40, 200, F32, False),  # R > 64: the two-pass plan by rank
        (200, 72, 5, BF16, False),  # several row splits
    ],
)
def test_dy_pass(M, N, R, dtype, two_pass, monkeypatch):
    if two_pass:
        monkeypatch.setattr(L, "PARTIAL_BYTES_CAP", 0)  # the plan past the partial-buffer bound
    assert L.dy_pass_plan(M, N, R)["one_pass"] == (R <= L.ONE_PASS_MAX_RANK and not two_pass)
    dy = _rand(M, N + 9, dtype=dtype, seed=7)[:, 4 : 4 + N]  # strided dY
    s = _rand(M, R, dtype=dtype, seed=8)
    b = _rand(N, R, seed=9)  # fp32 master copy
    ds, db = L.lora_dy_pass(dy, s, b)
    assert ds.dtype == db.dtype == F32 and ds.shape == (M, R) and db.shape == (N, R)
    bl = b.to(dtype)
    assert_matches(ds, _d(dy) @ _d(bl), _lowp(dtype, lambda: dy @ bl))
    assert_matches(db, _d(dy).T @ _d(s), _lowp(dtype, lambda: dy.T @ s))
    assert db.abs().sum() > 0 and ds.abs().sum() > 0


def test_dy_pass_is_bitwise_reproducible_and_bounded():
    dy, s, b = _rand(129, 72, seed=1), _rand(129, 8, seed=2), _rand(72, 8, seed=3)
    ds1, db1 = L.lora_dy_pass(dy, s, b)
    ds2, db2 = L.lora_dy_pass(dy, s, b)
    assert torch.equal(ds1, ds2) and torch.equal(db1, db2)
    # the partial buffers stay within their bound at the sweep's largest shapes
    for m, n, r in ((8192, 4096, 16), (8192, 11008, 16), (16384, 11008, 48), (8192, 4096, 64)):
        assert L.dy_pass_plan(m, n, r)["partial_bytes"] <= L.PARTIAL_BYTES_CAP


_DX_CASES = [
    # M, N, K, R, dtype, p, transposed weight
    (1, 40, 72, 1, F32, 0.0, False),
    (3, 72, 100, 3, BF16, 0.3, True),
    (17, 100, 40, 8, F32, 0.1, True),
    (129, 40, 72, 16, BF16, 0.0, False),
    (17, 72, 100, 40, F32, 0.5, False),
    (3, 40, 72, 24, F16, 0.2, True),
]


def _dx_inputs(M, N, K, R, dtype, p, wt):
    seed = 4321
    dy = _rand(M, N + 5, dtype=dtype, seed=7)[:, 2 : 2 + N]
    w = _w(N, K, dtype, wt)
    ds = _rand(M, R, seed=8)  # fp32, as lora_dy_pass returns it
    a = _rand(R, K, seed=9)  # fp32 master copy
    bits = L.dropout_bits(seed, M, K, p, device="cpu") if p > 0 else None
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    scale = 0.5 * _common.keep_scale(p)
    ref = _d(dy) @ _d(w) + mask * (scale * _d(ds) @ _d(a))

    def torch_lowp():
        return dy @ w + (mask * (scale * ds @ a)).to(dtype)

    return dy, w, ds, a, bits, scale, ref, _lowp(dtype, torch_lowp)


@pytest.mark.parametrize("M,N,K,R,dtype,p,wt", _DX_CASES)
def test_dx_fused_gemm(M, N, K, R, dtype, p, wt):
    dy, w, ds, a, bits, scale, ref, lowp = _dx_inputs(M, N, K, R, dtype, p, wt)
    dx = L.lora_gemm(dy, w.t(), ds, a.t(), scale=scale, bits=bits)
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert_matches(dx, ref, lowp)


@pytest.mark.parametrize("M,N,K,R,dtype,p,wt", _DX_CASES)
def test_dx_rank_pass_then_addmm_and_epilogue(M, N, K, R, dtype, p, wt):
    dy, w, ds, a, bits, scale, ref, lowp = _dx_inputs(M, N, K, R, dtype, p, wt)
    dx = L.lora_rank(ds, a.t(), out_dtype=dtype, scale=scale, bits=bits)
    assert dx.dtype == dtype
    assert_matches(dx.addmm_(dy, w), ref, lowp)
    epi = L.lora_rank(ds, a.t(), out=dy @ w, scale=scale, bits=bits, accumulate=True)
    assert_matches(epi, ref, lowp)


_DX_GRAD_A_CASES = _DX_CASES + [
    (129, 104, 72, 40, BF16, 0.1, False),  # several row blocks, R past the 16-wide rank steps
    (33, 40, 100, 5, F32, 0.0, True),
]


@pytest.mark.parametrize("M,N,K,R,dtype,p,wt", _DX_GRAD_A_CASES)
@pytest.mark.parametrize("tma", [False, True], ids=["plain", "tma"])
def test_dx_with_grad_a_inside(M, N, K, R, dtype, p, wt, tma, monkeypatch):
    """dA inside dX: lora_gemm_dx returns dX (as lora_gemm) and dA = scale · dSᵀ (mask ⊙ X), the
    row blocks' shares summed in a fixed order; vs float64, with and without dropout. ``tma``: the
    Hopper path (descriptors, persistent grid), which triton's interpreter emulates."""
    if tma:
        if L._TensorDescriptor is None or dtype == F32 or wt:
            pytest.skip("the TMA path takes 16-bit operands with unit-stride rows (else the plain path runs)")
        monkeypatch.setattr(L, "_FORCE_TMA", True)
    dy, w, ds, a, bits, scale, ref, lowp = _dx_inputs(M, N, K, R, dtype, p, wt)
    if tma:
        dy = dy.contiguous()  # TMA rows: 16-byte aligned strides
        if not L._tma_ok(dy, w.t()):
            pytest.skip("rows not 16-byte aligned: the plain path runs (the other parametrization)")
    x = _x(M, K, dtype, noncontig=not tma and M > 1, seed=11)
    mask = L.dropout_mask(4321, M, K, p, device="cpu")
    dx, da = L.lora_gemm_dx(dy, w.t(), ds, a.t(), x, scale=scale, bits=bits)
    assert dx.dtype == dtype and dx.shape == (M, K) and da.dtype == F32 and da.shape == (R, K)
    assert_matches(dx, ref, lowp)
    da_ref = scale * _d(ds).T @ (_d(x) * mask)

    def da_lowp():
        return (scale * ds.to(dtype)).T @ (x * mask).to(dtype)

    assert_matches(da, da_ref, _lowp(dtype, da_lowp))
    assert da.abs().sum() > 0
    # deterministic: the same shares summed in the same order
    dx2, da2 = L.lora_gemm_dx(dy, w.t(), ds, a.t(), x, scale=scale, bits=bits)
    assert torch.equal(dx, dx2) and torch.equal(da, da2)


@pytest.mark.parametrize("M,K,N,R,dtype,has_bias,noncontig,wt", [c for c in _FWD_CASES if c[4] != F32 and not c[6]])
def test_gemm_forward_tma_path(M, K, N, R, dtype, has_bias, noncontig, wt, monkeypatch):
    """The Hopper path of the fused forward (TMA descriptors for x and W, persistent grid of
    ``num_sms`` programs: 2 in the interpreter, so each program walks several tiles)."""
    if L._TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")
    monkeypatch.setattr(L, "_FORCE_TMA", True)
    x, w, s, b, bias, ref, lowp = _fwd_inputs(M, K, N, R, dtype, has_bias, noncontig, wt)
    assert L._tma_ok(x, w)
    y = L.lora_gemm(x, w, s, b, bias=bias)
    assert_matches(y, ref, lowp)


def test_autotune_key_buckets_m_and_configs_fit_the_bucket():
    """The autotuner keys on M rounded up to a power of two (a batch of 8191 tokens reuses 8192's
    tuning) and times only configs whose row block fits the bucket, and none that the offline
    compile found spilling on that path (plain pointer loads, DoRA's epilogue, dA inside dX)."""
    assert [L.m_bucket(m) for m in (1, 16, 17, 4095, 4096, 8191, 8193)] == [16, 16, 32, 4096, 4096, 8192, 16384]
    configs = L._gemm_configs()

    def tiles(kept):
        return {(c.kwargs.get("BLOCK_M"), c.kwargs["BLOCK_N"], c.num_warps) for c in kept}

    for bucket, rows in ((16, {16}), (64, {16, 32, 64}), (8192, {128, 256})):
        kept = L._prune_by_rows(configs, {"M_BUCKET": bucket}, W_NK=True)  # the TMA LoRA GEMM: every tile
        assert {c.kwargs["BLOCK_M"] for c in kept} == rows
    plain = L._prune_by_rows(configs, {"M_BUCKET": 8192})
    assert tiles(plain) == {(128, 128, 8)}  # 128×256, 256×128 and 128×128 at 4 warps spill there
    plain_small = L._prune_by_rows(configs, {"M_BUCKET": 128})
    assert tiles(plain_small) == {(128, 128, 8), (32, 128, 4), (16, 128, 4)}  # 64×128 at 4 warps spills
    dora = L._prune_by_rows(configs, {"M_BUCKET": 8192}, W_NK=True, DORA=1)
    assert tiles(dora) == {(128, 128, 8)}
    fixed = L._gemm_configs(block_m=128)  # dA inside dX: the host fixes the row block
    assert all("BLOCK_M" not in c.kwargs and c.num_warps == 8 for c in fixed)
    assert L._prune_by_rows(fixed, {"M_BUCKET": 16}, GRAD_A=True, BLOCK_M=128, W_NK=True) == fixed
    plain_da = L._prune_by_rows(fixed, {"M_BUCKET": 16}, GRAD_A=True, BLOCK_M=128)
    assert {c.kwargs["BLOCK_N"] for c in plain_da} == {64}
    assert "M_BUCKET" in L._lora_gemm_kernel_tuned.keys and "HAS_MASK" in L._lora_gemm_kernel_tuned.keys


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dx_uses_the_stored_mask(p):
    """dy = 0 and A = I: dx = scaling * mask * ds / (1-p) shows the mask the forward drew."""
    M, K, seed = 33, 40, 2024
    ds = _rand(M, K, seed=3) + 5.0  # no zeros
    dy, w = torch.zeros(M, 24), torch.ones(24, K)
    bits = L.dropout_bits(seed, M, K, p, device="cpu")
    dx = L.lora_gemm(dy, w.t(), ds, torch.eye(K), scale=1.5 * _common.keep_scale(p), bits=bits)
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert torch.equal(dx != 0, mask)
    torch.testing.assert_close(dx[mask], (1.5 * _common.keep_scale(p)) * ds[mask], rtol=1e-6, atol=0)
    rank = L.lora_rank(ds, torch.eye(K), scale=1.5 * _common.keep_scale(p), bits=bits)
    assert torch.equal(rank, dx)


@pytest.mark.parametrize(
    "M,K,R,dtype,p,noncontig",
    [
        (1, 40, 1, F32, 0.0, False),
        (3, 72, 3, BF16, 0.3, True),
        (17, 100, 8, F32, 0.1, True),
        (129, 72, 16, BF16, 0.0, True),
        (129, 40, 40, F32, 0.5, False),
        (129, 100, 24, F32, 0.2, True),
        (17, 40, 100, F32, 0.2, False),  # R > 64: two rank tiles
    ],
)
def test_grad_a(M, K, R, dtype, p, noncontig):
    seed = 555
    x = _x(M, K, dtype, noncontig)
    ds = _rand(M, R, seed=8)
    bits = L.dropout_bits(seed, M, K, p, device="cpu") if p > 0 else None
    da = L.lora_grad_a(x, ds, scaling=0.25, dropout_p=p, bits=bits)
    assert da.dtype == F32 and da.shape == (R, K)
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    xd = _d(x) * mask * _common.keep_scale(p)

    def torch_lowp():
        return (0.25 * ds.to(dtype)).T @ (x * mask * _common.keep_scale(p)).to(dtype)

    assert_matches(da, 0.25 * _d(ds).T @ xd, _lowp(dtype, torch_lowp))
    assert da.abs().sum() > 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_grad_a_uses_the_stored_mask(p):
    """ds = I (M = R): da = scaling * mask * x / (1-p) row by row; M=200 spans several row splits."""
    M, K, seed = 200, 72, 2024
    x = _x(M, K, F32, True) + 4.0
    bits = L.dropout_bits(seed, M, K, p, device="cpu")
    da = L.lora_grad_a(x, torch.eye(M), scaling=1.5, dropout_p=p, bits=bits)
    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    assert torch.equal(da != 0, mask)
    torch.testing.assert_close(da[mask], (1.5 * _common.keep_scale(p)) * x[mask], rtol=1e-6, atol=0)


def test_forward_backward_chain_matches_autograd():
    """The launchers composed as the op layer does: grads of x, A, B vs float64 autograd."""
    M, K, N, R, p, seed, scaling = 17, 72, 40, 8, 0.25, 31337, 2.0
    x, w = _x(M, K, F32, True), _w(N, K, F32, True)
    a, b, bias = _rand(R, K, seed=3), _rand(N, R, seed=4), _rand(N, seed=5)
    dy = _rand(M, N, seed=6)

    s, bits = L.lora_shrink(x, a, scaling=scaling, dropout_p=p, seed=seed)
    y = L.lora_gemm(x, w, s, b, bias=bias)
    ds, db = L.lora_dy_pass(dy, s, b)
    dx = L.lora_gemm(dy, w.t(), ds, a.t(), scale=scaling * _common.keep_scale(p), bits=bits)
    da = L.lora_grad_a(x, ds, scaling=scaling, dropout_p=p, bits=bits)

    mask = L.dropout_mask(seed, M, K, p, device="cpu")
    x64, a64, b64 = (_d(t).requires_grad_() for t in (x, a, b))
    y64 = x64 @ _d(w).T + _d(bias) + scaling * ((x64 * mask * _common.keep_scale(p)) @ a64.T) @ b64.T
    y64.backward(_d(dy))
    assert_matches(y, y64.detach())
    assert_matches(dx, x64.grad)
    assert_matches(da, a64.grad)
    assert_matches(db, b64.grad)
    for g in (dx, da, db):
        assert g.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# GPU (compiled kernels, autotuned GEMMs): TRITON_INTERPRET=0 python -m pytest ... -m gpu
# ----------------------------------------------------------------------------------------------


_GPU_DEVICE = "cuda"  # a dry run on CPU (interpreter) can monkeypatch this to "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("M", [1, 16, 1000])
def test_gpu_real_shapes(M, dtype):
    dev = _GPU_DEVICE
    K, N, R, p, seed, scaling = 1024, 1536, 16, 0.1, 42, 2.0
    torch.manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    x = rnd(M, K + 64)[:, 32 : 32 + K]
    w = rnd(K, N, scale=K**-0.5).t()
    a, b, bias, dy = rnd(R, K, scale=K**-0.5), rnd(N, R), rnd(N), rnd(M, N)
    mask = L.dropout_mask(seed, M, K, p, device=dev)

    def err(out, ref):
        return (out.double() - ref.double()).abs().max().item()

    def check(out, ref32, lowp, what):
        assert not torch.isnan(out).any(), what
        e, scale = err(out, ref32), ref32.abs().max().item()
        if dtype == F32:  # TF32 is off below, so the kernels run full fp32 ("ieee")
            assert e <= 1e-4 * max(scale, 1.0), f"{what}: fp32 error {e:.3g}"
        else:
            te = err(lowp, ref32)
            assert e <= 2 * te + 4e-3 * scale + 1e-6, f"{what}: {e:.3g} vs torch {te:.3g}"

    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference (and fp32 kernels) in full fp32
    try:
        xf, wf, af, bf, dyf = (t.float() for t in (x, w, a, b, dy))
        s, bits = L.lora_shrink(x, a, scaling=scaling, dropout_p=p, seed=seed)
        assert torch.equal(_common.unpack_bits(bits, K), mask)
        s32 = scaling * (xf * mask * _common.keep_scale(p)) @ af.T
        check(s, s32, scaling * ((x * mask * _common.keep_scale(p)).to(dtype) @ a.T), "shrink")
        y32 = xf @ wf.T + s.float() @ bf.T + bias.float()
        y_lowp = x @ w.T + s @ b.T + bias
        check(L.lora_gemm(x, w, s, b, bias=bias, tune=False), y32, y_lowp, "fused gemm")
        check(L.lora_rank(s, b, bias=bias).addmm_(x, w.T), y32, y_lowp, "rank + addmm")
        check(L.lora_rank(s, b, out=x @ w.T, bias=bias, accumulate=True), y32, y_lowp, "epilogue")
        ds, db = L.lora_dy_pass(dy, s, b)
        check(ds, dyf @ bf, dy @ b, "ds")
        check(db, dyf.T @ s.float(), dy.T @ s, "db")
        scale = scaling * _common.keep_scale(p)
        lora32 = mask * (scale * ds @ af)
        dx_lowp = dy @ w + (mask * (scale * ds @ a.float())).to(dtype)
        check(L.lora_gemm(dy, w.t(), ds, a.t(), scale=scale, bits=bits, tune=False), dyf @ wf + lora32, dx_lowp,
              "dx fused")
        check(L.lora_rank(ds, a.t(), out_dtype=dtype, scale=scale, bits=bits).addmm_(dy, w), dyf @ wf + lora32,
              dx_lowp, "dx rank + addmm")
        da32 = scaling * ds.T @ (xf * mask * _common.keep_scale(p))
        da_lowp = (scaling * ds.to(dtype)).T @ (x * mask * _common.keep_scale(p)).to(dtype)
        check(L.lora_grad_a(x, ds, scaling=scaling, dropout_p=p, bits=bits), da32, da_lowp, "grad_a")
        # bf16 extremes: large-magnitude inputs must not overflow the fp32 accumulators
        if dtype == BF16:
            big = (x.float() * 1e4).to(dtype)
            s_big, _ = L.lora_shrink(big, a, scaling=scaling)
            assert torch.isfinite(L.lora_gemm(big, w, s_big, b, bias=bias, tune=False)).all()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
