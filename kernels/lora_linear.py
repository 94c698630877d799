"""Fused LoRA linear kernels (Triton): forward split at S, one-pass backward, Philox dropout.

The op (wired up in ``fastadapt/ops/lora_linear.py``) is::

    y = x Wᵀ (+ bias) + S Bᵀ,        S = scaling · dropout(x) Aᵀ

with x (M, K), W (N, K) frozen, A (R, K), B (N, R). This module holds layer 1 only: the
``@triton.jit`` kernels and one launcher per kernel. Launchers take 2-D tensors (the op layer
flattens leading dims), read every input through its strides (non-contiguous ``x`` and transposed
``weight`` views are never copied), allocate contiguous outputs, and validate nothing beyond
internal asserts (the op layer validates user input).

Forward
    ``lora_shrink``        S = scaling · (mask ⊙ x / (1-p)) Aᵀ, one pass over X (a whole q/k/v
                           group when A is the concatenation of the group's A's).
    ``lora_expand``        y = x Wᵀ + S Bᵀ (+ bias): one GEMM whose last K-steps are the rank.
    ``lora_add_epilogue``  y += S Bᵀ (+ bias) in place, after cuBLAS computed y = x Wᵀ.
Backward
    ``lora_dy_pass``       one pass over dY: dS = dY B (M, R) and dB = dYᵀ S (N, R), both fp32.
    ``lora_dx``            dX = dY W + mask ⊙ (scaling · dS A) / (1-p): one GEMM + epilogue.
    ``lora_dx_epilogue``   the same rank term added in place to a cuBLAS dX = dY W.
    ``lora_grad_a``        dA = scaling · dSᵀ (mask ⊙ x / (1-p)), fp32, mask regenerated.
    ``dropout_mask``       the mask itself (tests, reference backend).

Dropout mask (never stored)
    keep[m, k] = tl.rand(seed, m*K + k) >= p, with the offset computed in int64 from the
    LOGICAL (m, k) index, never from memory strides: every kernel above regenerates the same mask
    bit for bit from (seed, p, M, K), whatever the layout of x. Kernels apply the mask as a select
    (exact) and fold 1/(1-p) into the fp32 scale of the accumulator, so kept values are scaled by
    exactly scaling/(1-p) and dropped ones are exactly zero. With dropout_p == 0 the RNG code is
    compiled out (HAS_DROPOUT constexpr).

Numerics policy
    * Accumulation is always fp32. Outputs: ``lora_shrink``/``lora_expand``/``lora_add_epilogue``/
      ``lora_dx``/``lora_dx_epilogue`` write x's dtype (one rounding at the end);
      ``lora_dy_pass`` and ``lora_grad_a`` return fp32 (they are reductions feeding fp32 grads).
    * bf16/fp16 operands use the tensor cores natively. The fp32-operand rank products in the
      backward (dS A in ``lora_dx``, dSᵀ X in ``lora_grad_a``; dS is fp32) run at the launcher's
      fp32 precision below.
    * fp32 operands: the launcher picks ``tl.dot(..., input_precision=...)``: ``"ieee"`` under the
      interpreter (TRITON_INTERPRET=1) and when ``torch.backends.cuda.matmul.allow_tf32`` is
      False (``_common.dot_precision``: a user who disabled TF32 in torch gets full fp32 here too);
      ``"tf32"`` otherwise, i.e. the same contract as a cuBLAS fp32 matmul.
      For bf16/fp16 inputs the kernels pass ``"tf32"`` on GPU (Triton's default; it only affects
      the fp32-operand rank products, whose operands are bf16-exact or fp32 dS).
    * ``lora_dy_pass``'s dB reduction over M is deterministic by default (per-M-block partial
      buffer + ``sum(0)``); ``deterministic=False`` uses fp32 ``tl.atomic_add`` instead (no
      partial buffer, run-to-run bit differences). ``lora_grad_a`` always reduces
      deterministically (``_common.weight_grad``: a shape-only M-split into fp32 partials).

Interpreter: the ``INTERPRET`` constexpr routes dots and low-precision stores through
``_common.mma``/``_common.to_dtype``, which emulate the GPU numerics there (see ``kernels/_common.py``).

Rank sizes: R from 1 up (a concatenated q/k/v group is R = 3r, e.g. 768). Rank tiles are padded to a
power of two >= 16 with masked loads. The shrink kernel tiles R > 256 over the grid, with the R
tiles of one M-block on adjacent program ids so the repeated X reads hit L2; ``lora_dy_pass``
does the same past R = 128 (dY re-read from L2); the GEMM kernels loop over R inside the program.

Block sizes: the GEMM kernels (``lora_expand``, ``lora_dx``) are autotuned on CUDA over
Hopper-style tiles (128x128x64 / 128x256x64, 3-4 stages, 4/8 warps, GROUP_M=8 swizzle). The
memory-bound kernels use fixed heuristics. NOTE: none of these choices has been measured on a GPU
yet (this module was written on a CPU-only machine); they are starting points for tuning.
Under the interpreter every kernel runs one small fixed config (autotune is slow there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    device_ctx,
    dot_precision,
    interpreting,
    keep_mask,
    mma,
    pow2_block,
    swizzle,
    to_dtype,
    weight_grad,
)
from ._common import dropout_mask as dropout_mask

__all__ = [
    "lora_shrink",
    "dropout_mask",
    "lora_expand",
    "lora_add_epilogue",
    "lora_dy_pass",
    "lora_dx",
    "lora_dx_epilogue",
    "lora_grad_a",
]


# ----------------------------------------------------------------------------------------------
# launcher helpers
# ----------------------------------------------------------------------------------------------


def _dropout_scale(scaling: float, dropout_p: float) -> float:
    assert 0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}"
    return float(scaling) / (1.0 - float(dropout_p))


def _check_2d(name: str, t: torch.Tensor) -> None:
    assert t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}"


def _gemm_configs() -> list:
    # Hopper-style tiles (as in the Triton matmul tutorial for sm90); BLOCK_M=16/32 entries cover
    # decode sizes (M <= 16) where a 128-row tile would be mostly padding. Not yet measured here.
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ]


# Interpreter: one small config. Several K-steps and N-blocks at the test shapes (K/N ~ 40-100)
# so the masked tails and the GROUP_M swizzle are exercised.
_INTERP_GEMM_META = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def _launch_gemm(kernel, tuned, args: tuple, meta: dict, M: int, cols: int, anchor: torch.Tensor) -> None:
    """One (M, cols) output GEMM: autotuned on CUDA, the fixed interpreter config on CPU."""
    with device_ctx(anchor):
        if interpreting():
            cfg = _INTERP_GEMM_META
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]),)
            kernel[grid](*args, **meta, **cfg, num_warps=4, num_stages=1)
        else:
            tuned[lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(cols, META["BLOCK_N"]),)](
                *args, **meta)


# ----------------------------------------------------------------------------------------------
# shared jit helpers
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# 1. shrink: S = scaling · dropout(X) Aᵀ
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr,
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_sm, stride_sr,
    scale, p, seed,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # R-tiles of one M-block are adjacent program ids, so for R > BLOCK_R the X tile is re-read
    # from L2, not HBM.
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_pid_r
    pid_r = pid % num_pid_r

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    a_cols = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_rows + kk.to(tl.int64)[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            # select, not multiply: exact; 1/(1-p) is folded into `scale`
            x = tl.where(keep_mask(seed, offs_m, kk, K, p), x, tl.zeros_like(x))
        a = tl.load(a_cols + kk.to(tl.int64)[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = mma(x, a, acc, DOT_PRECISION, INTERPRET)

    acc = acc * scale
    s_ptrs = s_ptr + offs_m.to(tl.int64)[:, None] * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, to_dtype(acc, s_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_r[None, :])


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """S = scaling · (mask ⊙ x / (1-p)) @ lora_aᵀ in one pass over x.

    Args:
        x: (M, K), bf16/fp16/fp32, any strides.
        lora_a: (R, K), x's dtype (for a q/k/v group: the row-concatenation of the A's).
        scaling: LoRA scaling (alpha / r).
        dropout_p: dropout probability in [0, 1); mask = tl.rand(seed, m*K + k) >= p.
        seed: Philox seed (non-negative int < 2**63), reused in backward.
    Returns:
        s: (M, R) contiguous, x's dtype; fp32 accumulation.
    """
    _check_2d("x", x)
    _check_2d("lora_a", lora_a)
    M, K = x.shape
    R = lora_a.shape[0]
    assert lora_a.shape[1] == K, f"lora_a must be (R, {K}), got {tuple(lora_a.shape)}"
    assert lora_a.dtype == x.dtype, f"lora_a dtype {lora_a.dtype} != x dtype {x.dtype}"
    scale = _dropout_scale(scaling, dropout_p)
    s = _common.alloc((M, R), dtype=x.dtype, device=x.device)
    if M == 0 or R == 0:
        return s
    if K == 0:
        return s.zero_()

    interp = interpreting()
    BLOCK_R = pow2_block(R, cap=256)
    if interp:
        BLOCK_M, BLOCK_K, num_warps, num_stages = 32, 32, 4, 1
    else:
        # Memory-bound on X: a wide K tile per load; fewer rows when the rank tile is wide to
        # keep the (BLOCK_M, BLOCK_R) fp32 accumulator in registers. Untuned.
        BLOCK_M = 64 if BLOCK_R <= 64 else 32
        BLOCK_K = 128 if BLOCK_R <= 64 else 64
        num_warps, num_stages = 4, 3
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(R, BLOCK_R),)
    with device_ctx(x):
        _lora_shrink_kernel[grid](
            x, lora_a, s,
            M, K, R,
            x.stride(0), x.stride(1),
            lora_a.stride(0), lora_a.stride(1),
            s.stride(0), s.stride(1),
            scale, float(dropout_p), int(seed),
            HAS_DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
            num_warps=num_warps, num_stages=num_stages,
        )
    return s


# ----------------------------------------------------------------------------------------------
# 3. expand: Y = X Wᵀ + S Bᵀ (+ bias), the rank as the last K-steps of the same GEMM
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_expand_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # 64-bit pointers advanced per step: no int32 overflow even for huge strides (e.g. x.t()).
    x_ptrs = x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n64[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(x, w, acc, DOT_PRECISION, INTERPRET)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # The rank: R more K-steps into the same accumulator (S already carries scaling and dropout).
    offs_r = tl.arange(0, BLOCK_R)
    s_rows = s_ptr + offs_m64[:, None] * stride_sm
    b_cols = b_ptr + offs_n64[None, :] * stride_bn
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        s = tl.load(s_rows + rr[None, :] * stride_sr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_cols + rr[:, None] * stride_br, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = mma(s, b, acc, DOT_PRECISION, INTERPRET)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n64[None, :] * stride_yn
    tl.store(y_ptrs, to_dtype(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_n[None, :])


_lora_expand_kernel_tuned = triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R"])(
    _lora_expand_kernel
)


def lora_expand(
    x: torch.Tensor,
    weight: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ weightᵀ + s @ lora_bᵀ (+ bias): one GEMM, the rank as its last K-steps.

    Args:
        x: (M, K), bf16/fp16/fp32, any strides.
        weight: (N, K), x's dtype, any strides (a transposed view is fine).
        s: (M, R), x's dtype (from ``lora_shrink``: scaling and dropout already applied).
        lora_b: (N, R), x's dtype.
        bias: optional (N,), any float dtype (added in fp32).
    Returns:
        y: (M, N) contiguous, x's dtype; fp32 accumulation.
    """
    for name, t in (("x", x), ("weight", weight), ("s", s), ("lora_b", lora_b)):
        _check_2d(name, t)
    M, K = x.shape
    N = weight.shape[0]
    R = s.shape[1]
    assert weight.shape[1] == K and s.shape[0] == M and tuple(lora_b.shape) == (N, R), (
        f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, s {tuple(s.shape)}, "
        f"lora_b {tuple(lora_b.shape)}"
    )
    assert weight.dtype == s.dtype == lora_b.dtype == x.dtype, "x, weight, s, lora_b must share a dtype"
    if bias is not None:
        assert bias.dim() == 1 and bias.shape[0] == N, f"bias must be ({N},), got {tuple(bias.shape)}"
        assert bias.stride(0) == 1, "bias must be contiguous (the kernel reads it at unit stride)"
    y = _common.alloc((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    args = (
        x, weight, s, lora_b, bias if bias is not None else y, y,
        M, N, K, R,
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        s.stride(0), s.stride(1),
        lora_b.stride(0), lora_b.stride(1),
        y.stride(0), y.stride(1),
    )
    meta = dict(
        HAS_BIAS=bias is not None, BLOCK_R=pow2_block(R, cap=64),
        DOT_PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(),
    )
    _launch_gemm(_lora_expand_kernel, _lora_expand_kernel_tuned, args, meta, M, N, x)
    return y


# ----------------------------------------------------------------------------------------------
# 4. epilogue: Y += S Bᵀ (+ bias) in place, after cuBLAS computed Y = X Wᵀ
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_add_epilogue_kernel(
    y_ptr, s_ptr, b_ptr, bias_ptr,
    M, N, R,
    stride_ym, stride_yn,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        s = tl.load(s_ptr + offs_m64[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n64[None, :] * stride_bn + rr[:, None] * stride_br,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = mma(s, b, acc, DOT_PRECISION, INTERPRET)

    mask = mask_m[:, None] & mask_n[None, :]
    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n64[None, :] * stride_yn
    acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptrs, to_dtype(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


def lora_add_epilogue(
    y: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: y += s @ lora_bᵀ (+ bias). One read and one write of y.

    Args:
        y: (M, N), any float dtype, any strides (typically cuBLAS's x @ weightᵀ); modified.
        s: (M, R); lora_b: (N, R), same dtype as s.
        bias: optional (N,).
    Returns:
        y (the same tensor). The sum is formed in fp32 and rounded once to y's dtype.
    """
    for name, t in (("y", y), ("s", s), ("lora_b", lora_b)):
        _check_2d(name, t)
    M, N = y.shape
    R = s.shape[1]
    assert s.shape[0] == M and tuple(lora_b.shape) == (N, R), (
        f"shape mismatch: y {tuple(y.shape)}, s {tuple(s.shape)}, lora_b {tuple(lora_b.shape)}"
    )
    assert s.dtype == lora_b.dtype, f"s dtype {s.dtype} != lora_b dtype {lora_b.dtype}"
    if bias is not None:
        assert bias.dim() == 1 and bias.shape[0] == N, f"bias must be ({N},), got {tuple(bias.shape)}"
        assert bias.stride(0) == 1, "bias must be contiguous (the kernel reads it at unit stride)"
    if M == 0 or N == 0:
        return y
    if interpreting():
        BLOCK_M, BLOCK_N, num_warps = 32, 64, 4
    else:
        # Bandwidth-bound on Y (read + write); the rank dot is tiny. Untuned.
        BLOCK_M, BLOCK_N, num_warps = 64, 128, 4
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    with device_ctx(y):
        _lora_add_epilogue_kernel[grid](
            y, s, lora_b, bias if bias is not None else y,
            M, N, R,
            y.stride(0), y.stride(1),
            s.stride(0), s.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            HAS_BIAS=bias is not None,
            DOT_PRECISION=dot_precision(s.dtype), INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=pow2_block(R, cap=64),
            num_warps=num_warps,
        )
    return y


# ----------------------------------------------------------------------------------------------
# 5. backward, one pass over dY: dS = dY B, dB = dYᵀ S
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_dy_pass_kernel(
    dy_ptr, s_ptr, b_ptr, ds_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_dsm, stride_dsr,
    stride_dbp, stride_dbn, stride_dbr,
    USE_ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program = one M-block x one R-tile; it walks all of N, so its dS rows are complete
    # (no reduction) and each dY tile feeds both products while in registers.
    pid = tl.program_id(0)
    num_pid_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_pid_r
    pid_r = pid % num_pid_r
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_r = offs_r < R
    offs_m64 = offs_m.to(tl.int64)

    s = tl.load(s_ptr + offs_m64[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    dy_rows = dy_ptr + offs_m64[:, None] * stride_dym
    # deterministic: this M-block's private slice of the partial buffer; atomic: one shared slice
    if USE_ATOMIC:
        db_base = db_ptr
    else:
        db_base = db_ptr + pid_m.to(tl.int64) * stride_dbp
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + offs_n
        mask_n = nn < N
        nn64 = nn.to(tl.int64)
        dy = tl.load(dy_rows + nn64[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + nn64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        ds = mma(dy, b, ds, DOT_PRECISION, INTERPRET)
        db = mma(tl.trans(dy), s, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_PRECISION, INTERPRET)
        db_ptrs = db_base + nn64[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
        db_mask = mask_n[:, None] & mask_r[None, :]
        if USE_ATOMIC:
            tl.atomic_add(db_ptrs, db, mask=db_mask)
        else:
            tl.store(db_ptrs, db, mask=db_mask)

    tl.store(ds_ptr + offs_m64[:, None] * stride_dsm + offs_r[None, :] * stride_dsr, ds,
             mask=mask_m[:, None] & mask_r[None, :])


def lora_dy_pass(
    dy: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over dY: ds = dy @ lora_b and db = dyᵀ @ s.

    Args:
        dy: (M, N), bf16/fp16/fp32, any strides.
        s: (M, R) saved from the forward (scaling/dropout already in it), dy's dtype.
        lora_b: (N, R), dy's dtype.
        deterministic: True (default): each M-block writes its dB partial to a private slice of a
            (cdiv(M, BLOCK_M), N, R) fp32 buffer, summed afterwards in a fixed order (bitwise
            reproducible; extra memory M·N·R·4/BLOCK_M bytes, none when M <= BLOCK_M).
            False: fp32 atomic adds into one (N, R) buffer (no extra memory, not reproducible).
    Returns:
        (ds, db): ds (M, R) fp32 — multiply by scaling (and the dropout mask/(1-p)) downstream,
        ``lora_dx``/``lora_grad_a`` do; db (N, R) fp32 = grad of lora_b.
    """
    for name, t in (("dy", dy), ("s", s), ("lora_b", lora_b)):
        _check_2d(name, t)
    M, N = dy.shape
    R = s.shape[1]
    assert s.shape[0] == M and tuple(lora_b.shape) == (N, R), (
        f"shape mismatch: dy {tuple(dy.shape)}, s {tuple(s.shape)}, lora_b {tuple(lora_b.shape)}"
    )
    assert s.dtype == lora_b.dtype == dy.dtype, "dy, s, lora_b must share a dtype"
    ds = _common.alloc((M, R), dtype=torch.float32, device=dy.device)
    if M == 0 or N == 0 or R == 0:
        return ds.zero_(), torch.zeros((N, R), device=dy.device, dtype=torch.float32)

    BLOCK_R = pow2_block(R, cap=128)
    if interpreting():
        BLOCK_M, BLOCK_N, num_warps, num_stages = 32, 32, 4, 1
    else:
        # BLOCK_M=128 halves the partial buffer vs 64; dS (128 x BLOCK_R) stays in registers.
        BLOCK_M = 128 if BLOCK_R <= 64 else 64
        BLOCK_N, num_warps, num_stages = 64, 8, 3
    num_m = triton.cdiv(M, BLOCK_M)
    use_atomic = not deterministic
    if use_atomic:
        db = torch.zeros((N, R), device=dy.device, dtype=torch.float32)
        partial = db.unsqueeze(0)
    elif num_m == 1:
        db = _common.alloc((N, R), dtype=torch.float32, device=dy.device)
        partial = db.unsqueeze(0)
    else:
        partial = _common.alloc((num_m, N, R), dtype=torch.float32, device=dy.device)
    grid = (num_m * triton.cdiv(R, BLOCK_R),)
    with device_ctx(dy):
        _lora_dy_pass_kernel[grid](
            dy, s, lora_b, ds, partial,
            M, N, R,
            dy.stride(0), dy.stride(1),
            s.stride(0), s.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            ds.stride(0), ds.stride(1),
            partial.stride(0), partial.stride(1), partial.stride(2),
            USE_ATOMIC=use_atomic,
            DOT_PRECISION=dot_precision(dy.dtype), INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
            num_warps=num_warps, num_stages=num_stages,
        )
    if not use_atomic and num_m > 1:
        db = partial.sum(0)
    return ds, db


# ----------------------------------------------------------------------------------------------
# 6. dX = dY W + mask ⊙ (scaling · dS A) / (1-p)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rank_term(
    ds_ptr, a_ptr, offs_m64, offs_k64, mask_m, mask_k, R,
    stride_dsm, stride_dsr, stride_ar, stride_ak, scale, acc,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """acc += (scale · dS[m-block, :]) @ A[:, k-block] in fp32 (dS is fp32; A is upcast, exact)."""
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        ds = tl.load(ds_ptr + offs_m64[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_ar + offs_k64[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = mma(ds.to(tl.float32) * scale, a.to(tl.float32), acc, DOT_PRECISION, INTERPRET)
    return acc


@triton.jit
def _lora_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn,
    stride_wn, stride_wk,
    stride_dsm, stride_dsr,
    stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    scale, p, seed,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile (BLOCK_M, BLOCK_N) of dX (M, K); the reduction runs over the N axis of dY/W,
    # in steps of BLOCK_K. (Meta-parameter names are shared with _lora_expand_kernel so both use
    # the same autotune configs: BLOCK_N = output columns, BLOCK_K = reduction step.)
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_red = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_m64 = offs_m.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dy_ptrs = dy_ptr + offs_m64[:, None] * stride_dym + offs_red[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_k64[None, :] * stride_wk + offs_red[:, None] * stride_wn
    for n0 in range(0, N, BLOCK_K):
        mask_n = (n0 + offs_red) < N
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = mma(dy, w, acc, DOT_PRECISION, INTERPRET)
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn

    if HAS_DROPOUT:
        # The mask is elementwise on the (M, K) result: the rank term needs its own accumulator.
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        lora = _rank_term(ds_ptr, a_ptr, offs_m64, offs_k64, mask_m, mask_k, R,
                          stride_dsm, stride_dsr, stride_ar, stride_ak, scale, lora,
                          DOT_PRECISION, INTERPRET, BLOCK_R)
        acc += tl.where(keep_mask(seed, offs_m, offs_k, K, p), lora, 0.0)
    else:
        # p == 0: the rank is just R more reduction steps into the same accumulator.
        acc = _rank_term(ds_ptr, a_ptr, offs_m64, offs_k64, mask_m, mask_k, R,
                         stride_dsm, stride_dsr, stride_ar, stride_ak, scale, acc,
                         DOT_PRECISION, INTERPRET, BLOCK_R)

    dx_ptrs = dx_ptr + offs_m64[:, None] * stride_dxm + offs_k64[None, :] * stride_dxk
    tl.store(dx_ptrs, to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_k[None, :])


_lora_dx_kernel_tuned = triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R"])(_lora_dx_kernel)


def lora_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    ds: torch.Tensor,
    lora_a: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """dx = dy @ weight + mask ⊙ (scaling · ds @ lora_a) / (1-p): one GEMM with an epilogue.

    Args:
        dy: (M, N), bf16/fp16/fp32, any strides.
        weight: (N, K), dy's dtype, any strides.
        ds: (M, R), fp32 (from ``lora_dy_pass``) or dy's dtype; NOT yet scaled.
        lora_a: (R, K), dy's dtype.
        scaling, dropout_p, seed: exactly the forward's (the mask is regenerated from them).
    Returns:
        dx: (M, K) contiguous, dy's dtype; fp32 accumulation.
    """
    for name, t in (("dy", dy), ("weight", weight), ("ds", ds), ("lora_a", lora_a)):
        _check_2d(name, t)
    M, N = dy.shape
    K = weight.shape[1]
    R = ds.shape[1]
    assert weight.shape[0] == N and ds.shape[0] == M and tuple(lora_a.shape) == (R, K), (
        f"shape mismatch: dy {tuple(dy.shape)}, weight {tuple(weight.shape)}, ds {tuple(ds.shape)}, "
        f"lora_a {tuple(lora_a.shape)}"
    )
    assert weight.dtype == dy.dtype, f"weight dtype {weight.dtype} != dy dtype {dy.dtype}"
    scale = _dropout_scale(scaling, dropout_p)
    dx = _common.alloc((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0 or K == 0:
        return dx
    args = (
        dy, weight, ds, lora_a, dx,
        M, N, K, R,
        dy.stride(0), dy.stride(1),
        weight.stride(0), weight.stride(1),
        ds.stride(0), ds.stride(1),
        lora_a.stride(0), lora_a.stride(1),
        dx.stride(0), dx.stride(1),
        scale, float(dropout_p), int(seed),
    )
    meta = dict(
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=pow2_block(R, cap=32),
        DOT_PRECISION=dot_precision(dy.dtype), INTERPRET=interpreting(),
    )
    _launch_gemm(_lora_dx_kernel, _lora_dx_kernel_tuned, args, meta, M, K, dy)
    return dx


@triton.jit
def _lora_dx_epilogue_kernel(
    dx_ptr, ds_ptr, a_ptr,
    M, K, R,
    stride_dxm, stride_dxk,
    stride_dsm, stride_dsr,
    stride_ar, stride_ak,
    scale, p, seed,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_m64 = offs_m.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)

    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    lora = _rank_term(ds_ptr, a_ptr, offs_m64, offs_k64, mask_m, mask_k, R,
                      stride_dsm, stride_dsr, stride_ar, stride_ak, scale, lora,
                      DOT_PRECISION, INTERPRET, BLOCK_R)
    if HAS_DROPOUT:
        lora = tl.where(keep_mask(seed, offs_m, offs_k, K, p), lora, 0.0)
    mask = mask_m[:, None] & mask_k[None, :]
    dx_ptrs = dx_ptr + offs_m64[:, None] * stride_dxm + offs_k64[None, :] * stride_dxk
    acc = tl.load(dx_ptrs, mask=mask, other=0.0).to(tl.float32) + lora
    tl.store(dx_ptrs, to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


def lora_dx_epilogue(
    dx: torch.Tensor,
    ds: torch.Tensor,
    lora_a: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """In place: dx += mask ⊙ (scaling · ds @ lora_a) / (1-p), after cuBLAS computed dx = dy @ W.

    Args:
        dx: (M, K), any float dtype, any strides; modified (one read, one write).
        ds: (M, R) fp32 or lora_a's dtype, not yet scaled; lora_a: (R, K).
        scaling, dropout_p, seed: exactly the forward's.
    Returns:
        dx (the same tensor); the sum is formed in fp32 and rounded once.
    """
    for name, t in (("dx", dx), ("ds", ds), ("lora_a", lora_a)):
        _check_2d(name, t)
    M, K = dx.shape
    R = ds.shape[1]
    assert ds.shape[0] == M and tuple(lora_a.shape) == (R, K), (
        f"shape mismatch: dx {tuple(dx.shape)}, ds {tuple(ds.shape)}, lora_a {tuple(lora_a.shape)}"
    )
    scale = _dropout_scale(scaling, dropout_p)
    if M == 0 or K == 0:
        return dx
    if interpreting():
        BLOCK_M, BLOCK_K, num_warps = 32, 64, 4
    else:
        BLOCK_M, BLOCK_K, num_warps = 64, 128, 4  # bandwidth-bound on dX; untuned
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(K, BLOCK_K),)
    with device_ctx(dx):
        _lora_dx_epilogue_kernel[grid](
            dx, ds, lora_a,
            M, K, R,
            dx.stride(0), dx.stride(1),
            ds.stride(0), ds.stride(1),
            lora_a.stride(0), lora_a.stride(1),
            scale, float(dropout_p), int(seed),
            HAS_DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=dot_precision(dx.dtype), INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=pow2_block(R, cap=32),
            num_warps=num_warps,
        )
    return dx


# ----------------------------------------------------------------------------------------------
# 7. dA = scaling · dSᵀ (mask ⊙ X) / (1-p)
# ----------------------------------------------------------------------------------------------


def lora_grad_a(
    x: torch.Tensor,
    ds: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """da = scaling · dsᵀ @ (mask ⊙ x / (1-p)), the mask regenerated from (seed, dropout_p).

    Args:
        x: (M, K) the forward's input, bf16/fp16/fp32, any strides.
        ds: (M, R) fp32 (from ``lora_dy_pass``) or x's dtype, not yet scaled.
        scaling, dropout_p, seed: exactly the forward's.
    Returns:
        da: (R, K) fp32 = grad of lora_a. The reduction over M is split into a fixed number of
        row ranges (enough programs to fill the GPU), each written to a private fp32 partial,
        then summed in a fixed order: deterministic.
    """
    _check_2d("x", x)
    _check_2d("ds", ds)
    assert ds.shape[0] == x.shape[0], f"ds must be ({x.shape[0]}, R), got {tuple(ds.shape)}"
    scale = _dropout_scale(scaling, dropout_p)
    return weight_grad(ds, x, scale=scale, dropout_p=dropout_p, seed=seed)
