"""Fused LoRA linear kernels (Triton): the rank-r work around a frozen GEMM, dropout drawn once.

The op (wired up in ``fastadapt/ops/lora_linear.py``) is::

    y = x Wᵀ (+ bias) + S Bᵀ,        S = scaling · (mask ⊙ x) Aᵀ / (1-p)

with x (M, K), W (N, K) frozen, A (R, K), B (N, R). This module is layer 1: the ``@triton.jit``
kernels and one launcher per kernel. Launchers take 2-D tensors (the op layer flattens leading
dims), read every input through its strides (non-contiguous ``x`` and transposed ``weight`` views
are never copied), allocate contiguous outputs, and validate nothing beyond internal asserts.

Forward
    ``lora_shrink``   S = scaling · (mask ⊙ x) Aᵀ / (1-p), one pass over x; with dropout it draws
                      the mask there and returns it packed (``_common.keep_bits``: 1 bit/element;
                      p realised at 1/65536 resolution, 1/(1-p) exact for it).
    ``lora_rank``     out = scale · [mask ⊙] (S Bᵀ) (+ bias) (+ out): the rank term written as its
                      own pass — into an empty output that cuBLAS then accumulates the base
                      product onto (``addmm_``, beta=1: the extra read rides inside a
                      compute-bound GEMM), or onto cuBLAS's finished output (``accumulate``, the
                      epilogue variant). Serves dX's rank term too (S = dS, B = Aᵀ, the mask).
    ``lora_gemm``     out = a wᵀ + scale · [mask ⊙] (S Bᵀ) (+ bias): the base GEMM with the rank
                      as extra reduction steps (the fused variant): y = x Wᵀ + S Bᵀ, and
                      dX = dY W + mask ⊙ (scale · dS A).
Backward
    ``lora_dy_pass``  dS = dY B (M, R) and dB = dYᵀ S (N, R), fp32. R ≤ 64: one pass over dY on a
                      2-D grid (row ranges × column blocks) with bounded fp32 partials
                      (column-block partials of dS, row-range partials of dB, summed in a fixed
                      order by one more launch); larger R: dS by a row-block GEMM and dB by ``_common.weight_grad``
                      (two reads of dY, no partials).
    ``lora_grad_a``   dA = scale · dSᵀ (mask ⊙ x), fp32, from the stored mask.

DoRA (``kernels/fastadapt_kernels/dora_linear.py``) reuses these launches with a ``DoraScale`` (g = magnitude / norm):
``lora_rank`` / ``lora_gemm`` then end in DoRA's epilogue (``_dora_store``: z kept, y = g ⊙ z + bias),
``dy_pass`` multiplies dY by g and also yields d magnitude and dX's GEMM input from the same read,
and ``lora_shrink`` can write dropout(x). On LoRA's launches the ``DORA`` / ``STORE_*`` constexprs
are off, so the compiled LoRA kernels are what they were.

Numerics: fp32 accumulation everywhere; outputs in the input's dtype rounded once (``lora_dy_pass``
and ``lora_grad_a`` return fp32: they feed fp32 gradients). Adapter weights may be fp32 master
copies: they are cast to the compute dtype on load (the same rounding as casting first), except
where the other operand is fp32 (dS A, dSᵀ x): those products run in fp32 at the launcher's
``_common.dot_precision``. Reductions are deterministic (fixed-order partial sums, no atomics).
Interpreter: an ``INTERPRET`` constexpr routes dots and stores through ``_common.mma`` /
``_common.to_dtype``, which emulate the GPU numerics there.

Block sizes: the GEMM kernel is autotuned on CUDA over Hopper tiles (128x128/128x256/256x128 x64,
3-4 stages, 4/8 warps, GROUP_M=8 swizzle); the memory-bound kernels use fixed tiles chosen from
the offline sm_90a compile (``.ci/check_triton.py``: registers, spills). None was timed on a GPU yet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    bits_shape,
    device_ctx,
    dot_precision,
    dropout_threshold,
    interpreting,
    keep_bits,
    keep_scale,
    load_keep,
    mma,
    pow2_block,
    split_rows,
    swizzle,
    to_dtype,
    weight_grad,
)
from ._common import dropout_bits as dropout_bits
from ._common import dropout_mask as dropout_mask

__all__ = [
    "dropout_bits",
    "dropout_mask",
    "grad_a_partial_bytes",
    "lora_dy_pass",
    "lora_gemm",
    "lora_gemm_dx",
    "lora_grad_a",
    "lora_rank",
    "lora_shrink",
]

#: Largest rank ``lora_dy_pass`` handles in one pass over dY (larger: two passes, no partials).
ONE_PASS_MAX_RANK = 64
#: Bound on ``lora_dy_pass``'s fp32 partial buffers; past it the two-pass plan runs instead.
PARTIAL_BYTES_CAP = 64 << 20


def _check_2d(*named: tuple[str, torch.Tensor]) -> None:
    for name, t in named:
        assert t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}"


def _keep_scale(scaling: float, dropout_p: float) -> float:
    assert 0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}"
    return float(scaling) * keep_scale(dropout_p)


def _bits_args(bits: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer, row stride) of a packed mask, or a dummy pair when there is none."""
    return (bits, bits.stride(0)) if bits is not None else (like, 0)


class DoraScale(NamedTuple):
    """What turns a LoRA launch into its DoRA twin (``kernels/fastadapt_kernels/dora_linear.py``): the column scale
    g = magnitude / norm, and whether the output takes PEFT's dropout form (``_dora_store``)."""

    magnitude: torch.Tensor  # (N,), any float dtype
    norm: torch.Tensor  # (N,) fp32, detached
    dropout_form: bool = False


def _dora_args(dora: DoraScale | None, out: torch.Tensor, y: torch.Tensor | None) -> tuple[tuple, dict]:
    """(pointer args, constexprs) of the DoRA epilogue: y goes to ``y`` and z stays in ``out``, or
    y overwrites ``out`` in place when ``y`` is None (z not kept). Dummies for a LoRA launch."""
    if dora is None:
        return (out, out, out, 0, 0), {"DORA": 0, "STORE_Z": False}
    N = out.shape[1]
    assert dora.magnitude.shape == (N,) and dora.norm.shape == (N,) and dora.norm.dtype == torch.float32
    assert dora.magnitude.stride(0) == 1 and dora.norm.stride(0) == 1, "magnitude and norm must be contiguous"
    target = out if y is None else y
    assert target.shape == out.shape, f"y must be {tuple(out.shape)}, got {tuple(target.shape)}"
    return ((dora.magnitude, dora.norm, target, target.stride(0), target.stride(1)),
            {"DORA": 2 if dora.dropout_form else 1, "STORE_Z": y is not None})


# ----------------------------------------------------------------------------------------------
# shared tile loops
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rank_loop(
    s_ptr, b_ptr, offs_m64, offs_n64, mask_m, mask_n, R,
    stride_sm, stride_sr, stride_bn, stride_br, acc, scale,
    SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """acc + [scale ·] S[m-block, :] @ B[n-block, :]ᵀ. A low-precision S takes B in its dtype (an
    fp32 master copy is rounded on load, as casting it first would); an fp32 S (dS) — and a SCALED
    one — multiplies in fp32 (at DOT_PRECISION: TF32 when the activations are 16-bit)."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        s = tl.load(s_ptr + offs_m64[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if SCALED:
            s = s.to(tl.float32) * scale
        b = tl.load(b_ptr + offs_n64[None, :] * stride_bn + rr[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = mma(s, to_dtype(b, s.dtype, INTERPRET), acc, DOT_PRECISION, INTERPRET)
    return acc


@triton.jit
def _dora_store(
    z, rank, z_ptrs, y_ptr, mag_ptr, norm_ptr, bias_ptr, offs_m64, offs_n, mask_n, mask,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, DORA: tl.constexpr, INTERPRET: tl.constexpr,
):
    """DoRA's output from z = base + rank (fp32), with g = magnitude / norm per column:
    DORA=1: y = g ⊙ z (+ bias); DORA=2 (PEFT's dropout form, the base product x Wᵀ added later by
    cuBLAS): y = (g - 1) ⊙ z + rank (+ bias). STORE_Z also writes z (saved for d magnitude)."""
    if STORE_Z:
        tl.store(z_ptrs, to_dtype(z, z_ptrs.dtype.element_ty, INTERPRET), mask=mask)
    g = (tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
         / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0))
    if DORA == 1:
        y = z * g[None, :]
    else:
        y = z * (g - 1.0)[None, :] + rank
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, to_dtype(y, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _finish_rank(
    acc, out_ptr, bias_ptr, bits_ptr, mag_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, n0, N,
    stride_om, stride_on, stride_bits_m, stride_ym, stride_yn, scale,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr, DORA: tl.constexpr,
    STORE_Z: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """LoRA (DORA=0): out = scale · [mask ⊙] acc (+ bias) (+ out), formed in fp32 and rounded once.
    DoRA: z = scale · acc + out (out holds the base product), then ``_dora_store``."""
    acc = acc * scale
    if HAS_MASK:
        acc = tl.where(load_keep(bits_ptr, stride_bits_m, offs_m, mask_m, n0, N, BLOCK_N), acc, 0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    offs_m64 = offs_m.to(tl.int64)
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    if DORA:
        z = acc + tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        _dora_store(z, acc, out_ptrs, y_ptr, mag_ptr, norm_ptr, bias_ptr, offs_m64, offs_n, mask_n, mask,
                    stride_ym, stride_yn, HAS_BIAS, STORE_Z, DORA, INTERPRET)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, to_dtype(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------------------------
# 1. shrink: S = scaling · (mask ⊙ X) Aᵀ / (1-p), the mask drawn and stored packed
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "threshold"])  # one compile for every seed and p
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, bits_ptr,
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    stride_bits_m,
    scale, threshold, seed, seed_ptr,
    xd_ptr, stride_xdm, keep_scale,
    HAS_DROPOUT: tl.constexpr, STORE_DROPPED: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # R-tiles of one M-block are adjacent program ids, so for R > BLOCK_R the X tile is re-read
    # from L2, not HBM; the first R-tile alone stores the mask.
    if SEED_FROM_PTR:  # read at run time: a CUDA graph's replay sees the seed tensor's current value
        seed = tl.load(seed_ptr)
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_pid_r
    pid_r = pid % num_pid_r
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        x = tl.load(x_rows + kk.to(tl.int64)[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep, words = keep_bits(seed, offs_m, k0, K, threshold, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))  # a select, not a multiply: exact
            if pid_r == 0:
                offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                tl.store(bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits_m + offs_w[None, :], words,
                         mask=mask_m[:, None] & (offs_w < tl.cdiv(K, 32))[None, :])
                if STORE_DROPPED:  # DoRA's dropout form multiplies dropout(x) by W as well
                    tl.store(xd_ptr + offs_m.to(tl.int64)[:, None] * stride_xdm + kk[None, :],
                             to_dtype(x.to(tl.float32) * keep_scale, x.dtype, INTERPRET),
                             mask=mask_m[:, None] & mask_k[None, :])
        a = tl.load(a_cols + kk.to(tl.int64)[:, None] * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(x, to_dtype(a, x.dtype, INTERPRET), acc, DOT_PRECISION, INTERPRET)
    acc = acc * scale  # 1/(1-p) folded in: kept values are scaled by exactly scaling/(1-p)
    s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, to_dtype(acc, s_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_r[None, :])


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    dropped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S = scaling · (mask ⊙ x) @ lora_aᵀ / (1-p) in one pass over x; with ``dropped`` (an (M, K)
    buffer of x's dtype, contiguous rows, dropout_p > 0) that pass also writes dropout(x) into it.

    Args:
        x: (M, K), bf16/fp16/fp32, any strides.
        lora_a: (R, K), any float dtype (an fp32 master copy is rounded to x's dtype on load); for a
            q/k/v group the row-concatenation of the members' A.
        scaling: LoRA scaling (alpha / r). dropout_p, seed: the mask is drawn here from them; ``seed``
            a host int, or a one-element int64 tensor on x's device that the kernel reads (graph
            capture: each replay draws the mask of the seed the tensor then holds).
    Returns:
        s: (M, R) contiguous, x's dtype, fp32 accumulation;
        bits: the packed keep-mask (``bits_shape(M, K)`` int32) when ``dropout_p > 0``, else None.
    """
    _check_2d(("x", x), ("lora_a", lora_a))
    M, K = x.shape
    R = lora_a.shape[0]
    assert lora_a.shape[1] == K, f"lora_a must be (R, {K}), got {tuple(lora_a.shape)}"
    has_dropout = dropout_p > 0.0
    assert dropped is None or (has_dropout and dropped.shape == x.shape and dropped.dtype == x.dtype
                               and dropped.stride(1) == 1), "dropped: an (M, K) buffer like x, with dropout"
    s = _common.alloc((M, R), dtype=x.dtype, device=x.device)
    bits = _common.alloc(bits_shape(M, K), dtype=torch.int32, device=x.device) if has_dropout else None
    if M == 0 or R == 0 or K == 0:
        if bits is not None:
            bits.zero_()
        if dropped is not None:
            dropped.zero_()
        return s.zero_(), bits
    BLOCK_R = pow2_block(R, cap=256)
    if interpreting():
        BLOCK_M, BLOCK_K, num_warps, num_stages = 32, 32, 4, 1
    else:
        # Memory-bound on X: a wide K tile per load; fewer rows when the rank tile is wide, to keep
        # the (BLOCK_M, BLOCK_R) fp32 accumulator in registers, and twice the threads where the mask
        # (Philox, packing) or a wide rank tile would otherwise spill (offline compile: no spill).
        BLOCK_M = 64 if BLOCK_R <= 64 else 32
        BLOCK_K = 128 if BLOCK_R <= 64 else 64
        num_warps = 8 if has_dropout or BLOCK_R > 64 else 4
        num_stages = 3 if BLOCK_R <= 64 else 2
    bits_ptr, stride_bits = _bits_args(bits, s)
    seed_int, seed_ptr, seed_from_ptr = _common.seed_args(seed, x)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(R, BLOCK_R),)
    with device_ctx(x):
        _lora_shrink_kernel[grid](
            x, lora_a, s, bits_ptr,
            M, K, R,
            x.stride(0), x.stride(1),
            lora_a.stride(0), lora_a.stride(1),
            s.stride(0), s.stride(1),
            stride_bits,
            _keep_scale(scaling, dropout_p), dropout_threshold(dropout_p), seed_int, seed_ptr,
            dropped if dropped is not None else s, dropped.stride(0) if dropped is not None else 0,
            keep_scale(dropout_p),
            HAS_DROPOUT=has_dropout, STORE_DROPPED=dropped is not None, SEED_FROM_PTR=seed_from_ptr and has_dropout,
            DOT_PRECISION=dot_precision(x.dtype),
            INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
            num_warps=num_warps, num_stages=num_stages,
        )
    return s, bits


# ----------------------------------------------------------------------------------------------
# 2. rank term: out = scale · [mask ⊙] (S Bᵀ) (+ bias) (+ out)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_rank_kernel(
    s_ptr, b_ptr, bias_ptr, bits_ptr, out_ptr,
    M, N, R,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_om, stride_on,
    stride_bits_m,
    scale,
    mag_ptr, norm_ptr, y_ptr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr,
    DORA: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = _rank_loop(s_ptr, b_ptr, offs_m.to(tl.int64), offs_n.to(tl.int64), mask_m, mask_n, R,
                     stride_sm, stride_sr, stride_bn, stride_br, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                     1.0, False, DOT_PRECISION, INTERPRET, BLOCK_R)
    _finish_rank(acc, out_ptr, bias_ptr, bits_ptr, mag_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n,
                 pid_n * BLOCK_N, N, stride_om, stride_on, stride_bits_m, stride_ym, stride_yn, scale,
                 HAS_BIAS, HAS_MASK, ACCUMULATE, DORA, STORE_Z, INTERPRET, BLOCK_N)


def lora_rank(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
    accumulate: bool = False,
    dora: DoraScale | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = scale · [mask ⊙] (s @ lora_bᵀ) (+ bias) (+ out when ``accumulate``), one pass over out.

    With ``dora`` (needs ``accumulate``: ``out`` holds the base product): z = out + scale · s @ lora_bᵀ
    and DoRA's y from it (``_dora_store``); y is written to ``y`` with z kept in ``out``, or over
    ``out`` when ``y`` is None. Returns what holds y.

    Args:
        s: (M, R), low precision (S; then lora_b is rounded to its dtype on load) or fp32 (dS).
        lora_b: (N, R), any float dtype, any strides (dX's rank term passes ``lora_a.t()``).
        out: (M, N) to write (and read when ``accumulate``), any strides; None: a new contiguous
            tensor of ``out_dtype`` (default s's dtype).
        scale: a factor on the product (dX: scaling/(1-p)). bias: optional (N,), added in fp32.
        bits: the packed keep-mask of an (M, N) input, applied to the product (dX's rank term).
    Returns:
        out; the sum formed in fp32 and rounded once.
    """
    _check_2d(("s", s), ("lora_b", lora_b))
    M, R = s.shape
    N = lora_b.shape[0]
    assert lora_b.shape[1] == R, f"lora_b must be ({N}, {R}), got {tuple(lora_b.shape)}"
    if out is None:
        assert not accumulate, "accumulate needs an out"
        out = _common.alloc((M, N), dtype=out_dtype or s.dtype, device=s.device)
    assert tuple(out.shape) == (M, N), f"out must be ({M}, {N}), got {tuple(out.shape)}"
    if bias is not None:
        assert bias.dim() == 1 and bias.shape[0] == N and bias.stride(0) == 1, "bias must be contiguous (N,)"
    assert dora is None or (accumulate and bits is None), "the DoRA epilogue accumulates onto the base product"
    dora_ptrs, dora_meta = _dora_args(dora, out, y)
    if M == 0 or N == 0:
        return dora_ptrs[2]
    if interpreting():
        BLOCK_M, BLOCK_N, num_warps = 32, 64, 4
    else:
        # bandwidth-bound on out; the rank dot is tiny. Reading out and the mask bits as well: twice
        # the threads (4 warps spill 304 B/thread at an unaligned N: offline compile)
        BLOCK_M, BLOCK_N, num_warps = 64, 128, 8 if accumulate and bits is not None else 4
    bits_ptr, stride_bits = _bits_args(bits, out)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    with device_ctx(s):
        _lora_rank_kernel[grid](
            s, lora_b, bias if bias is not None else out, bits_ptr, out,
            M, N, R,
            s.stride(0), s.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            out.stride(0), out.stride(1),
            stride_bits,
            float(scale),
            *dora_ptrs,
            HAS_BIAS=bias is not None, HAS_MASK=bits is not None, ACCUMULATE=accumulate, **dora_meta,
            DOT_PRECISION=dot_precision(out.dtype), INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=pow2_block(R, cap=64),
            num_warps=num_warps,
        )
    return dora_ptrs[2]


# ----------------------------------------------------------------------------------------------
# 3. fused: out = a wᵀ + scale · [mask ⊙] (S Bᵀ) (+ bias) in one accumulator, the rank term first;
#    dX's kernel also takes dA's share of its row block (dA inside dX)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rank_first(
    s_ptr, b_ptr, bits_ptr, offs_m, offs_n, mask_m, mask_n, n0, N, R,
    stride_sm, stride_sr, stride_bn, stride_br, stride_bits_m, scale,
    HAS_MASK: tl.constexpr, SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The accumulator's first value: scale · [mask ⊙] (S Bᵀ) of the tile, i.e. the rank term as the
    GEMM's first R reduction steps, the mask applied in registers before the main loop adds a wᵀ.
    One BLOCK_M × BLOCK_N fp32 accumulator lives through the kernel: no second one for the rank."""
    acc = _rank_loop(s_ptr, b_ptr, offs_m.to(tl.int64), offs_n.to(tl.int64), mask_m, mask_n, R,
                     stride_sm, stride_sr, stride_bn, stride_br, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                     scale, SCALED, DOT_PRECISION, INTERPRET, BLOCK_R)
    if HAS_MASK:
        acc = tl.where(load_keep(bits_ptr, stride_bits_m, offs_m, mask_m, n0, N, BLOCK_N), acc, 0.0)
    return acc


@triton.jit
def _grad_a_part(
    x_ptr, s_ptr, bits_ptr, da_ptr, pid_m, offs_m, offs_n, mask_m, mask_n, n0, N, R,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_bits_m, stride_dap, stride_dar, stride_dak, da_scale,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dA inside dX: this row block's share of dA = da_scale · dSᵀ (mask ⊙ X) over the columns of the
    dX tile, stored in slot ``pid_m`` of the partials (summed in a fixed order afterwards). The
    X tile has the dX tile's (m, k) index; dS and the mask bits are what the tile reads anyway.
    A 16-bit X multiplies dS split into two 16-bit halves (hi + lo: near-fp32 dS, 16-bit MMAs)."""
    offs_m64 = offs_m.to(tl.int64)
    x = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_n.to(tl.int64)[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    if HAS_MASK:
        x = tl.where(load_keep(bits_ptr, stride_bits_m, offs_m, mask_m, n0, N, BLOCK_N), x, tl.zeros_like(x))
    xt = tl.trans(x)  # (BLOCK_N, BLOCK_M): the partial is stored transposed, BLOCK_N ≥ 64 rows for wgmma
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        ds = tl.load(s_ptr + offs_m64[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32) * da_scale
        part = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        if x.dtype == tl.float32:
            part = mma(xt, ds, part, DOT_PRECISION, INTERPRET)
        else:
            hi = to_dtype(ds, x.dtype, INTERPRET)
            part = mma(xt, hi, part, DOT_PRECISION, INTERPRET)
            part = mma(xt, to_dtype(ds - hi.to(tl.float32), x.dtype, INTERPRET), part, DOT_PRECISION, INTERPRET)
        tl.store(da_ptr + pid_m.to(tl.int64) * stride_dap + rr[None, :] * stride_dar
                 + offs_n.to(tl.int64)[:, None] * stride_dak, part, mask=mask_n[:, None] & mask_r[None, :])


@triton.jit
def _gemm_epilogue(
    acc, out_ptr, bias_ptr, mag_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n,
    stride_om, stride_on, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DORA: tl.constexpr, STORE_Z: tl.constexpr, INTERPRET: tl.constexpr,
):
    mask = mask_m[:, None] & mask_n[None, :]
    offs_m64 = offs_m.to(tl.int64)
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    if DORA:
        _dora_store(acc, acc, out_ptrs, y_ptr, mag_ptr, norm_ptr, bias_ptr, offs_m64, offs_n, mask_n, mask,
                    stride_ym, stride_yn, HAS_BIAS, STORE_Z, DORA, INTERPRET)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, to_dtype(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _lora_gemm_kernel(
    a_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, bits_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak,
    stride_wn, stride_wk,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_om, stride_on,
    stride_bits_m,
    scale,
    mag_ptr, norm_ptr, y_ptr, stride_ym, stride_yn,
    x_ptr, da_ptr, stride_xm, stride_xk, stride_dap, stride_dar, stride_dak, da_scale,
    M_BUCKET,  # the autotuner's key for M (a power of two): variable-length batches do not retune
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SCALED: tl.constexpr, DORA: tl.constexpr, STORE_Z: tl.constexpr,
    GRAD_A: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The plain path: pointer loads, one program per output tile (any strides, any device).
    tl.static_assert(DORA != 2, "DoRA's dropout form needs the rank term apart: it takes the epilogue variant")
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GRAD_A:
        _grad_a_part(x_ptr, s_ptr, bits_ptr, da_ptr, pid_m, offs_m, offs_n, mask_m, mask_n, pid_n * BLOCK_N, N, R,
                     stride_xm, stride_xk, stride_sm, stride_sr, stride_bits_m, stride_dap, stride_dar, stride_dak,
                     da_scale, HAS_MASK, DOT_PRECISION, INTERPRET, BLOCK_N, BLOCK_R)
    acc = _rank_first(s_ptr, b_ptr, bits_ptr, offs_m, offs_n, mask_m, mask_n, pid_n * BLOCK_N, N, R,
                      stride_sm, stride_sr, stride_bn, stride_br, stride_bits_m, scale,
                      HAS_MASK, SCALED, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_R)
    # 64-bit pointers advanced per step: no int32 overflow even for huge strides (e.g. x.t()).
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_PRECISION, INTERPRET)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    _gemm_epilogue(acc, out_ptr, bias_ptr, mag_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n,
                   stride_om, stride_on, stride_ym, stride_yn, HAS_BIAS, DORA, STORE_Z, INTERPRET)


@triton.jit
def _lora_gemm_tma_kernel(
    a_desc, w_desc, s_ptr, b_ptr, bias_ptr, bits_ptr, out_ptr,
    M, N, K, R,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_om, stride_on,
    stride_bits_m,
    scale,
    mag_ptr, norm_ptr, y_ptr, stride_ym, stride_yn,
    x_ptr, da_ptr, stride_xm, stride_xk, stride_dap, stride_dar, stride_dak, da_scale,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SCALED: tl.constexpr, DORA: tl.constexpr, STORE_Z: tl.constexpr,
    GRAD_A: tl.constexpr, W_NK: tl.constexpr, NUM_SMS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The Hopper path: a and W tiles by TMA descriptors (out-of-range rows and columns read as
    # zero), a persistent grid of NUM_SMS programs walking the output tiles in GROUP_M order.
    # W_NK: the descriptor covers W as (N, K) rows (forward); else as (K, N) rows (dX: W itself,
    # whose transpose is the GEMM's weight). Everything around the main loop is the plain path's.
    tl.static_assert(DORA != 2, "DoRA's dropout form needs the rank term apart: it takes the epilogue variant")
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if GRAD_A:
            _grad_a_part(x_ptr, s_ptr, bits_ptr, da_ptr, pid_m, offs_m, offs_n, mask_m, mask_n, pid_n * BLOCK_N, N,
                         R, stride_xm, stride_xk, stride_sm, stride_sr, stride_bits_m, stride_dap, stride_dar,
                         stride_dak, da_scale, HAS_MASK, DOT_PRECISION, INTERPRET, BLOCK_N, BLOCK_R)
        acc = _rank_first(s_ptr, b_ptr, bits_ptr, offs_m, offs_n, mask_m, mask_n, pid_n * BLOCK_N, N, R,
                          stride_sm, stride_sr, stride_bn, stride_br, stride_bits_m, scale,
                          HAS_MASK, SCALED, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_R)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            if W_NK:
                w = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))
            else:
                w = w_desc.load([k0, pid_n * BLOCK_N])
            acc = mma(a, w, acc, DOT_PRECISION, INTERPRET)
        _gemm_epilogue(acc, out_ptr, bias_ptr, mag_ptr, norm_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n,
                       stride_om, stride_on, stride_ym, stride_yn, HAS_BIAS, DORA, STORE_Z, INTERPRET)


def _gemm_configs(*, block_m: int | None = None) -> list:
    """Hopper tiles (as the Triton matmul tutorial's sm90 configs); the 16/32-row entries cover
    decode sizes where a 128-row tile would be mostly padding. ``block_m``: the host fixes the row
    block (dA inside dX: one partial per row block), so the configs leave it out. Not yet timed."""
    cfg = triton.Config
    tiles = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
             (64, 128, 64, 4, 4), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4)]
    if block_m is not None:
        # dA inside dX holds an X tile beside the accumulator: 8 warps, at most 128 columns (the
        # plain path 64: ``_prune_by_rows``)
        tiles = [(block_m, 128, 64, 4, 8), (block_m, 64, 64, 4, 8), (block_m, 64, 128, 3, 8)]
    out = []
    for bm, bn, bk, stages, warps in tiles:
        meta = {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        if block_m is None:
            meta["BLOCK_M"] = bm
        out.append(cfg(meta, num_stages=stages, num_warps=warps, pre_hook=_tma_blocks))
    return out


def _tma_blocks(nargs: dict) -> None:
    """Autotune pre-hook: a TMA launch's descriptors take the config's tile shapes."""
    a_desc, w_desc = nargs.get("a_desc"), nargs.get("w_desc")
    if a_desc is None or not hasattr(a_desc, "block_shape"):
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    a_desc.block_shape = [bm, bk]
    w_desc.block_shape = [bn, bk] if nargs["W_NK"] else [bk, bn]


def _prune_by_rows(configs: list, named_args: dict, **kwargs) -> list:
    """The configs worth timing for an M bucket: no row block taller than the bucket, and from
    1024 rows on only the 128/256-row Hopper tiles (the small ones are for decode); and none the
    offline compile found spilling (``_fits_registers``). What the offline report compiles for a
    launch is exactly this set (its gate covers what can be picked)."""
    bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 1 << 30))
    flags = {**named_args, **kwargs}

    def keep(c) -> bool:
        bm = c.kwargs.get("BLOCK_M")
        rows_ok = bm is None or (bm <= max(16, bucket) and (bucket < 1024 or bm >= 128))
        return rows_ok and _fits_registers(c, tma="W_NK" in flags, dora=bool(flags.get("DORA")),
                                           grad_a=bool(flags.get("GRAD_A")), block_m=flags.get("BLOCK_M"))

    return [c for c in configs if keep(c)] or configs[-1:]


def _fits_registers(c, *, tma: bool, dora: bool, grad_a: bool, block_m: int | None = None) -> bool:
    """Whether a tile stays within sm_90's 255 registers, by accumulator elements per warp (what
    the offline sm_90a compile of every config found, bench/NOTES.md): the TMA LoRA GEMM fits all
    its tiles; the plain path's pointer loads, DoRA's epilogue and dA's X tile cost registers, so
    there at most 2048 per warp at 8 warps (128×128) and 1024 at 4 (64×128 at 4 warps spills 384 B
    at an unaligned K), and dA inside dX needs 8 warps and, on the plain path, at most 1024
    (128×64)."""
    per_warp = c.kwargs.get("BLOCK_M", block_m or _GRAD_A_BLOCK_M) * c.kwargs["BLOCK_N"] // c.num_warps
    if grad_a:
        return c.num_warps == 8 and per_warp <= (2048 if tma else 1024)
    return (tma and not dora) or per_warp <= (2048 if c.num_warps == 8 else 1024)


#: the autotuner's key: M bucketed (M_BUCKET), and every constexpr that changes the kernel's code
_GEMM_KEY = ["M_BUCKET", "N", "K", "R", "HAS_BIAS", "HAS_MASK", "SCALED", "DORA", "STORE_Z", "GRAD_A"]
_PRUNE = {"early_config_prune": _prune_by_rows}


def _tuned(kernel, *, block_m: int | None = None, tma: bool = False):
    return triton.autotune(configs=_gemm_configs(block_m=block_m), key=[*_GEMM_KEY, "W_NK"] if tma else _GEMM_KEY,
                           prune_configs_by=_PRUNE)(kernel)


_GRAD_A_BLOCK_M = 128
_lora_gemm_kernel_tuned = _tuned(_lora_gemm_kernel)
_lora_gemm_tma_tuned = _tuned(_lora_gemm_tma_kernel, tma=True)
_lora_gemm_grad_a_tuned = _tuned(_lora_gemm_kernel, block_m=_GRAD_A_BLOCK_M)
_lora_gemm_grad_a_tma_tuned = _tuned(_lora_gemm_tma_kernel, block_m=_GRAD_A_BLOCK_M, tma=True)
# Interpreter: one small config, several K-steps and N-blocks at the test shapes (K/N ~ 40-100).
_INTERP_GEMM_META = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at least 16): the autotuner's key, so a batch of 8191 tokens
    reuses the tuning of 8192 instead of benchmarking every config again."""
    return max(16, triton.next_power_of_2(max(int(m), 1)))


def _tma_ok(a: torch.Tensor, weight: torch.Tensor) -> bool:
    """The TMA path's requirements: a Hopper-class target (the meta device stands for the offline
    report's sm_90a), 16-byte aligned bases and row strides, unit stride along the tile's rows,
    16-bit operands; and a Triton with host tensor descriptors (3.6 and 3.9 both have them)."""
    if _TensorDescriptor is None or (interpreting() and not _FORCE_TMA):
        return False
    if a.dtype not in (torch.bfloat16, torch.float16):
        return False
    if a.device.type == "cuda":
        if torch.cuda.get_device_capability(a.device)[0] < 9:
            return False
    elif a.device.type != "meta" and not _FORCE_TMA:
        return False
    e = a.element_size()

    def aligned(t: torch.Tensor, row: int, unit: int) -> bool:
        return t.stride(unit) == 1 and (t.stride(row) * e) % 16 == 0 and (t.data_ptr() % 16 == 0)

    return aligned(a, 0, 1) and (aligned(weight, 0, 1) or aligned(weight, 1, 0))


try:  # host-side TMA descriptors (triton ≥ 3.4; the GPU image's 3.6 and CI's 3.9 both have them)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - an older triton: the plain path only
    _TensorDescriptor = None
#: tests: take the TMA path in the interpreter too (triton's interpreter emulates descriptors)
_FORCE_TMA = False


def lora_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
    tune: bool = True,
    dora: DoraScale | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = a @ weightᵀ + scale · [mask ⊙] (s @ lora_bᵀ) (+ bias): one GEMM, one fp32 accumulator
    that starts as the rank term (its first reduction steps, the mask applied in registers) and
    then takes a @ weightᵀ (forward: a = x, weight = W; backward: a = dY, weight = Wᵀ, s = dS,
    lora_b = Aᵀ). With ``dora`` (not its dropout form): that sum (without bias) is DoRA's z, and the
    epilogue writes y (``_dora_store``) to ``y`` with z in the returned ``out``, or into ``out``
    itself when ``y`` is None.

    Args:
        a: (M, K) bf16/fp16/fp32, any strides. weight: (N, K), a's dtype, any strides.
        s: (M, R) (S in a's dtype, or fp32 dS); lora_b: (N, R), any float dtype, any strides.
        scale: on the rank term; bias: optional (N,); bits: the packed keep-mask of an (M, N)
            input, applied to the rank term. tune: autotune on CUDA (False: the first config).
    Returns:
        out: (M, N) contiguous, a's dtype; fp32 accumulation, one rounding.
    """
    out, _ = _gemm(a, weight, s, lora_b, scale=scale, bias=bias, bits=bits, tune=tune, dora=dora, y=y)
    return out


def lora_gemm_dx(
    dy: torch.Tensor,
    weight_t: torch.Tensor,
    ds: torch.Tensor,
    lora_a_t: torch.Tensor,
    x: torch.Tensor,
    *,
    scale: float,
    bits: torch.Tensor | None = None,
    tune: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dX = dY W + mask ⊙ (scale · dS A) by ``lora_gemm`` (weight_t = Wᵀ, lora_a_t = Aᵀ) and, from
    the same tiles, dA = scale · dSᵀ (mask ⊙ X) (fp32, (R, K)): each dX tile has the (m, k) index of
    an X tile and holds dS and the mask bits, so it adds its row block's share of dA
    (``_grad_a_part``); the shares are summed in a fixed order (deterministic). X is read once,
    inside a compute-bound GEMM, instead of by a pass of its own (``lora_grad_a``).

    ``grad_a_partial_bytes`` says what the shares take; the op layer uses this only under its cap.
    """
    out, da = _gemm(dy, weight_t, ds, lora_a_t, scale=scale, bits=bits, tune=tune, grad_a=(x, scale))
    return out, da


def grad_a_partial_bytes(M: int, K: int, R: int) -> int:
    """Bytes of ``lora_gemm_dx``'s dA partials (one fp32 (R, K) slot per row block)."""
    return 4 * triton.cdiv(M, _grad_a_block_m(M)) * R * K


def _grad_a_block_m(M: int) -> int:
    if interpreting():
        return _INTERP_GEMM_META["BLOCK_M"]
    return 64 if M <= 64 else _GRAD_A_BLOCK_M


def _gemm(a, weight, s, lora_b, *, scale, bits, tune, bias=None, dora=None, y=None, grad_a=None):
    _check_2d(("a", a), ("weight", weight), ("s", s), ("lora_b", lora_b))
    M, K = a.shape
    N, R = weight.shape[0], s.shape[1]
    assert weight.shape[1] == K and s.shape[0] == M and tuple(lora_b.shape) == (N, R), (
        f"shape mismatch: a {tuple(a.shape)}, weight {tuple(weight.shape)}, s {tuple(s.shape)}, "
        f"lora_b {tuple(lora_b.shape)}"
    )
    assert weight.dtype == a.dtype, f"weight dtype {weight.dtype} != a dtype {a.dtype}"
    assert dora is None or not dora.dropout_form, "DoRA's dropout form takes the epilogue variant"
    if bias is not None:
        assert bias.dim() == 1 and bias.shape[0] == N and bias.stride(0) == 1, "bias must be contiguous (N,)"
    out = _common.alloc((M, N), dtype=a.dtype, device=a.device)
    dora_ptrs, dora_meta = _dora_args(dora, out, y)
    da = da_part = None
    if grad_a is not None:
        x, da_scale = grad_a
        assert tuple(x.shape) == (M, N), f"x must be ({M}, {N}), got {tuple(x.shape)}"
        block_m = _grad_a_block_m(M)
        da_part = _common.alloc((triton.cdiv(M, block_m), R, N), dtype=torch.float32, device=a.device)
        grad_a_args = (x, da_part, x.stride(0), x.stride(1), da_part.stride(0), da_part.stride(1),
                       da_part.stride(2), float(da_scale))
    else:
        grad_a_args = (out, out, 0, 0, 0, 0, 0, 0.0)
    if M == 0 or N == 0:
        if da_part is not None:
            da = torch.zeros((R, N), dtype=torch.float32, device=a.device)
        return out, da
    bits_ptr, stride_bits = _bits_args(bits, out)
    tail = (
        s, lora_b, bias if bias is not None else out, bits_ptr, out,
        M, N, K, R,
    )
    rest = (
        s.stride(0), s.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        out.stride(0), out.stride(1),
        stride_bits,
        float(scale),
        *dora_ptrs,
        *grad_a_args,
        m_bucket(M),
    )
    # BLOCK_R 16 for every rank: the rank term loops over R in 16-wide steps (one compile per
    # kernel variant whatever the rank; the steps are a few percent of the main loop's)
    meta = dict(HAS_BIAS=bias is not None, HAS_MASK=bits is not None, SCALED=scale != 1.0, **dora_meta,
                GRAD_A=grad_a is not None, BLOCK_R=16, DOT_PRECISION=dot_precision(a.dtype),
                INTERPRET=interpreting())
    fixed_m = {"BLOCK_M": _grad_a_block_m(M)} if grad_a is not None else {}
    use_tma = _tma_ok(a, weight)
    with device_ctx(a):
        if interpreting() or not tune:
            if interpreting():
                cfg, launch = {**_INTERP_GEMM_META, **fixed_m}, {"num_warps": 4, "num_stages": 1}
            else:  # untuned: the first config (what FASTADAPT_AUTOTUNE=0 and gpu-check measure)
                flags = {**meta, **fixed_m, **({"W_NK": True} if use_tma else {})}  # as the autotuner prunes
                first = _prune_by_rows(_gemm_configs(block_m=fixed_m.get("BLOCK_M")), {"M_BUCKET": m_bucket(M)},
                                       **flags)[0]
                cfg = {**first.kwargs, **fixed_m}
                launch = {"num_warps": first.num_warps, "num_stages": first.num_stages}
            tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
            if use_tma:
                a_desc, w_desc, w_nk = _descriptors(a, weight, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
                n_sms = _common.num_sms(a.device)
                _lora_gemm_tma_kernel[(min(n_sms, tiles),)](a_desc, w_desc, *tail, *rest, **meta, W_NK=w_nk,
                                                           NUM_SMS=n_sms, **cfg, **launch)
            else:
                _lora_gemm_kernel[(tiles,)](a, weight, *tail, a.stride(0), a.stride(1), weight.stride(0),
                                            weight.stride(1), *rest, **meta, **cfg, **launch)
        elif use_tma:
            n_sms = _common.num_sms(a.device)
            a_desc, w_desc, w_nk = _descriptors(a, weight, 128, 128, 64)  # block shapes set per config

            def grid(META):
                return (min(n_sms, triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])),)
            kernel = _lora_gemm_grad_a_tma_tuned if grad_a is not None else _lora_gemm_tma_tuned
            kernel[grid](a_desc, w_desc, *tail, *rest, **meta, W_NK=w_nk, NUM_SMS=n_sms, **fixed_m)
        else:
            def grid(META):
                return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
            kernel = _lora_gemm_grad_a_tuned if grad_a is not None else _lora_gemm_kernel_tuned
            kernel[grid](a, weight, *tail, a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), *rest,
                         **meta, **fixed_m)
    if da_part is not None:
        da = _common.sum_partials(da_part)[0]
    return out, da


def _descriptors(a: torch.Tensor, weight: torch.Tensor, bm: int, bn: int, bk: int):
    """TMA descriptors of the GEMM's operands: a (M, K) by [bm, bk] tiles; the weight (N, K) as its
    own rows (W_NK) or, when it is the transposed view of a row-major (K, N) tensor, as that tensor."""
    a_desc = _TensorDescriptor.from_tensor(a, [bm, bk])
    if weight.stride(1) == 1:
        return a_desc, _TensorDescriptor.from_tensor(weight, [bn, bk]), True
    return a_desc, _TensorDescriptor.from_tensor(weight.t(), [bk, bn]), False


# ----------------------------------------------------------------------------------------------
# 4. backward over dY: dS = dY B, dB = dYᵀ S
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_dy_pass_kernel(
    dy_ptr, s_ptr, b_ptr, ds_part_ptr, db_part_ptr,
    M, N, R, rows_per_split,
    stride_dym, stride_dyn,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_dsp, stride_dsm,
    stride_dbp, stride_dbn,
    z_ptr, mag_ptr, norm_ptr, side_ptr, dm_part_ptr,
    stride_zm, stride_zn, stride_sdm, stride_sdn, stride_dmp,
    DORA: tl.constexpr, STORE_SIDE: tl.constexpr, RANK_WORK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program (row range, column block): each dY tile is read once and feeds both products; dS
    # gets this column block's share of its rows (a partial per column block), dB this row
    # range's share of its columns (a partial per row range, accumulated in registers).
    # DoRA (DORA=1|2, g = magnitude / norm): the products take dZ = g ⊙ dY; the same tile read gives
    # d magnitude's share, Σ_rows dY ⊙ Z / norm (a partial per row range), and STORE_SIDE writes
    # what dX's base GEMM reads: dZ (DORA=1) or (g - 1) ⊙ dY (DORA=2, PEFT's dropout form).
    # RANK_WORK=False: the DoRA part only (the two-pass plan then runs on dZ).
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    offs_n64 = offs_n.to(tl.int64)
    if RANK_WORK:
        b = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    if DORA:
        g = (tl.load(mag_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
             / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0))
        dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        offs_m64 = offs_m.to(tl.int64)
        tile = mask_m[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + offs_m64[:, None] * stride_dym + offs_n64[None, :] * stride_dyn, mask=tile, other=0.0)
        if DORA:
            dyf = dy.to(tl.float32)
            z = tl.load(z_ptr + offs_m64[:, None] * stride_zm + offs_n64[None, :] * stride_zn, mask=tile, other=0.0)
            dm += tl.sum(dyf * z.to(tl.float32), axis=0)
            dz = to_dtype(dyf * g[None, :], dy.dtype, INTERPRET)
            if STORE_SIDE:
                if DORA == 1:
                    side = dz
                else:
                    side = to_dtype(dyf * (g - 1.0)[None, :], dy.dtype, INTERPRET)
                tl.store(side_ptr + offs_m64[:, None] * stride_sdm + offs_n64[None, :] * stride_sdn, side, mask=tile)
            dy = dz
        if RANK_WORK:
            s = tl.load(s_ptr + offs_m64[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            ds = mma(dy, to_dtype(b, dy.dtype, INTERPRET), tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                     DOT_PRECISION, INTERPRET)
            tl.store(ds_part_ptr + pid_n.to(tl.int64) * stride_dsp + offs_m64[:, None] * stride_dsm
                     + offs_r[None, :], ds, mask=mask_m[:, None] & mask_r[None, :])
            db = mma(tl.trans(dy), s, db, DOT_PRECISION, INTERPRET)
    if RANK_WORK:
        tl.store(db_part_ptr + split.to(tl.int64) * stride_dbp + offs_n64[:, None] * stride_dbn + offs_r[None, :],
                 db, mask=mask_n[:, None] & mask_r[None, :])
    if DORA:
        tl.store(dm_part_ptr + split.to(tl.int64) * stride_dmp + offs_n,
                 dm / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0), mask=mask_n)


@triton.jit
def _lora_ds_kernel(
    dy_ptr, b_ptr, ds_ptr,
    M, N, R,
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_dsm, stride_dsr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dS = dY B for one (row block, rank tile), walking all of N: complete rows, no partials.
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_pid_r
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = (pid % num_pid_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    offs_m64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        mask_n = nn < N
        nn64 = nn.to(tl.int64)
        dy = tl.load(dy_ptr + offs_m64[:, None] * stride_dym + nn64[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + nn64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc = mma(dy, to_dtype(b, dy.dtype, INTERPRET), acc, DOT_PRECISION, INTERPRET)
    tl.store(ds_ptr + offs_m64[:, None] * stride_dsm + offs_r[None, :] * stride_dsr, acc,
             mask=mask_m[:, None] & mask_r[None, :])


def dy_pass_plan(M: int, N: int, R: int, *, dora: bool = False, fp32: bool = False) -> dict:
    """How ``lora_dy_pass`` splits the work (shape-only, so the offline report sees the real plan):
    ``one_pass`` with its blocks, row splits and partial-buffer bytes, or the two-pass plan."""
    if interpreting():
        block_m, block_n = 32, 32
    else:
        # Wide column blocks mean fewer dS partials (one per block); the (BLOCK_N, BLOCK_R) dB
        # accumulator and the (BLOCK_M, BLOCK_N) dY tile stay in registers — with DoRA's z tile and
        # epilogue, or fp32's FMA-emulated dots, at half the width (offline compile: no spill).
        block_m = 64
        block_n = 256 if R <= 16 and not (dora or fp32) else (128 if R <= 32 else 64)
    block_r = pow2_block(R, cap=64)
    if R <= ONE_PASS_MAX_RANK:
        n_blocks = triton.cdiv(N, block_n)
        splits, rows = split_rows(M, block_m, n_blocks)
        partial = 4 * R * (n_blocks * M + splits * N)
        if partial <= PARTIAL_BYTES_CAP:
            return {"one_pass": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": block_r, "splits": splits,
                    "rows_per_split": rows, "n_blocks": n_blocks, "partial_bytes": partial}
    return {"one_pass": False, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_R": block_r, "partial_bytes": 0}


def lora_dy_pass(dy: torch.Tensor, s: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ds = dy @ lora_b and db = dyᵀ @ s, both fp32 (see the module docstring for the two plans).

    Args:
        dy: (M, N), bf16/fp16/fp32, any strides.
        s: (M, R) saved from the forward (scaling and dropout already in it), dy's dtype.
        lora_b: (N, R), any float dtype (rounded to dy's dtype on load).
    Returns:
        (ds, db): ds (M, R) fp32 — scale it (and mask it) downstream; db (N, R) fp32 = grad of lora_b.
        Deterministic: partials are summed in a fixed order.
    """
    ds, db, _ = dy_pass(dy, s, lora_b)
    return ds, db


def dy_pass(
    dy: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    dora: DoraScale | None = None,
    z: torch.Tensor | None = None,
    side: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``lora_dy_pass``, and its DoRA twin when ``dora`` is given: the products then take
    dZ = g ⊙ dy (g = magnitude / norm), the third result is d magnitude = Σ_rows dy ⊙ z / norm
    (fp32, (N,); ``z`` (M, N) is the forward's saved z), and ``side`` (M, N), when given, receives
    dZ — or (g - 1) ⊙ dy in PEFT's dropout form — for dX's base GEMM. One read of dy and z."""
    _check_2d(("dy", dy), ("s", s), ("lora_b", lora_b))
    M, N = dy.shape
    R = s.shape[1]
    assert s.shape[0] == M and tuple(lora_b.shape) == (N, R), (
        f"shape mismatch: dy {tuple(dy.shape)}, s {tuple(s.shape)}, lora_b {tuple(lora_b.shape)}"
    )
    assert s.dtype == dy.dtype, f"s dtype {s.dtype} != dy dtype {dy.dtype}"
    assert dora is None or (z is not None and z.shape == dy.shape), "DoRA needs the forward's z, shaped like dy"
    assert side is None or (dora is not None and side.shape == dy.shape), "side is a DoRA output shaped like dy"
    dm = None if dora is None else torch.zeros((N,), device=dy.device, dtype=torch.float32)
    if M == 0 or N == 0 or R == 0:
        if side is not None:
            side.zero_()
        return (torch.zeros((M, R), device=dy.device, dtype=torch.float32),
                torch.zeros((N, R), device=dy.device, dtype=torch.float32), dm)
    plan = dy_pass_plan(M, N, R, dora=dora is not None, fp32=dy.dtype == torch.float32)
    common = dict(DOT_PRECISION=dot_precision(dy.dtype), INTERPRET=interpreting(),
                  num_warps=4 if interpreting() else 8, num_stages=1 if interpreting() else 3)
    with device_ctx(dy):
        if plan["one_pass"]:
            ds_part = _common.alloc((plan["n_blocks"], M, R), dtype=torch.float32, device=dy.device)
            db_part = _common.alloc((plan["splits"], N, R), dtype=torch.float32, device=dy.device)
            dm_part = _dy_pass_launch(dy, s, lora_b, ds_part, db_part, plan, common, dora, z, side, rank_work=True)
            ds, db = _common.sum_partials(ds_part, db_part)
            return ds, db, None if dm_part is None else _common.sum_partials(dm_part)[0]
        if dora is not None:
            # The two-pass plan reads its dY twice: give it dZ, written by the DoRA part alone.
            prep = dict(plan, BLOCK_N=128, n_blocks=triton.cdiv(N, 128))
            prep["splits"], prep["rows_per_split"] = split_rows(M, plan["BLOCK_M"], prep["n_blocks"])
            keep_dz = side is not None and not dora.dropout_form
            dz = side if keep_dz else _common.alloc((M, N), dtype=dy.dtype, device=dy.device)
            dm = _common.sum_partials(_dy_pass_launch(dy, s, lora_b, dz, dz, prep, common,
                                                      dora._replace(dropout_form=False), z, dz, rank_work=False))[0]
            if side is not None and dora.dropout_form:
                _dy_pass_launch(dy, s, lora_b, dz, dz, prep, common, dora, z, side, rank_work=False)
            dy = dz
        ds = _common.alloc((M, R), dtype=torch.float32, device=dy.device)
        grid = (triton.cdiv(M, plan["BLOCK_M"]) * triton.cdiv(R, plan["BLOCK_R"]),)
        _lora_ds_kernel[grid](
            dy, lora_b, ds,
            M, N, R,
            dy.stride(0), dy.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            ds.stride(0), ds.stride(1),
            BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_R=plan["BLOCK_R"], **common,
        )
    return ds, weight_grad(dy, s), dm


def _dy_pass_launch(dy, s, lora_b, ds_part, db_part, plan, common, dora, z, side, *, rank_work):
    """One ``_lora_dy_pass_kernel`` launch; returns DoRA's d-magnitude partials (None for LoRA)."""
    M, N = dy.shape
    dm_part = None
    dora_args: tuple = (dy, dy, dy, dy, dy, 0, 0, 0, 0, 0)  # LoRA: dummies, never read
    if dora is not None:
        dm_part = _common.alloc((plan["splits"], N), dtype=torch.float32, device=dy.device)
        out = side if side is not None else dy
        dora_args = (z, dora.magnitude, dora.norm, out, dm_part, z.stride(0), z.stride(1), out.stride(0),
                     out.stride(1), dm_part.stride(0))
    _lora_dy_pass_kernel[(plan["splits"], plan["n_blocks"])](
        dy, s, lora_b, ds_part, db_part,
        M, N, s.shape[1], plan["rows_per_split"],
        dy.stride(0), dy.stride(1),
        s.stride(0), s.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        ds_part.stride(0), ds_part.stride(1),
        db_part.stride(0), db_part.stride(1),
        *dora_args,
        DORA=0 if dora is None else (2 if dora.dropout_form else 1), STORE_SIDE=side is not None,
        RANK_WORK=rank_work,
        BLOCK_M=plan["BLOCK_M"], BLOCK_N=plan["BLOCK_N"], BLOCK_R=plan["BLOCK_R"], **common,
    )
    return dm_part


# ----------------------------------------------------------------------------------------------
# 5. dA = scale · dSᵀ (mask ⊙ X)
# ----------------------------------------------------------------------------------------------


def lora_grad_a(
    x: torch.Tensor,
    ds: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """da = scaling · dsᵀ @ (mask ⊙ x) / (1-p), from the forward's stored mask ``bits``.

    Args:
        x: (M, K) the forward's input, any strides. ds: (M, R) fp32 (from ``lora_dy_pass``), unscaled.
        scaling, dropout_p: exactly the forward's; bits: its packed mask (None when dropout_p == 0).
    Returns:
        da: (R, K) fp32 = grad of lora_a; deterministic (``_common.weight_grad``).
    """
    _check_2d(("x", x), ("ds", ds))
    assert ds.shape[0] == x.shape[0], f"ds must be ({x.shape[0]}, R), got {tuple(ds.shape)}"
    assert (bits is not None) == (dropout_p > 0), "bits go with dropout_p > 0"
    return weight_grad(ds, x, scale=_keep_scale(scaling, dropout_p), bits=bits)
