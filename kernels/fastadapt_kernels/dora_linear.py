"""Fused DoRA linear kernels (Triton): LoRA's kernels plus the row norm, never an N×K temporary.

The op (wired up in ``fastadapt/ops/dora_linear.py``), as PEFT computes it (``tuners/lora/dora.py``)::

    norm = ‖W + s·B A‖ per output row (detached),  g = magnitude / norm
    p = 0:  y = g ⊙ (x Wᵀ + S Bᵀ) (+ bias)                         S = s · x Aᵀ
    p > 0:  y = x Wᵀ (+ bias) + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ (S Bᵀ)      S = s · x_d Aᵀ,  x_d = dropout(x)

(PEFT's dropout form needs the base product of the dropped input as well: a second GEMM.)
This module is layer 1; what it adds to LoRA's kernels (``kernels/fastadapt_kernels/lora_linear.py``):

``dora_norm``       norm (N,) fp32 from ‖W_n + s B_n A‖² = ‖W_n‖² + 2s B_n·(W_n Aᵀ) + s² B_n (A Aᵀ) B_nᵀ:
                    one pass over W (‖W_n‖² and W Aᵀ from the same tile loads), A Aᵀ (R×R) given.
``masked_scale_``   t ← scale · mask ⊙ t in place (dX of the dropout form).

and re-exports the LoRA launchers that take a ``DoraScale``: ``lora_rank`` / ``lora_gemm`` with the
DoRA epilogue (z = base + S Bᵀ kept for d magnitude, y = g ⊙ z + bias), ``dy_pass`` (dZ = g ⊙ dY
for dS and dB, d magnitude = Σ dY ⊙ Z / norm, and dX's GEMM input from the same read of dY),
``lora_shrink`` (which also writes x_d for the dropout form), ``lora_grad_a``, ``weight_grad``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import device_ctx, dot_precision, interpreting, load_keep, mma, pow2_block, to_dtype, weight_grad
from .lora_linear import DoraScale, dy_pass, lora_gemm, lora_grad_a, lora_rank, lora_shrink

__all__ = [
    "DoraScale",
    "dora_norm",
    "dy_pass",
    "lora_gemm",
    "lora_grad_a",
    "lora_rank",
    "lora_shrink",
    "masked_scale_",
    "weight_grad",
]


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, aat_ptr, norm_ptr,
    N, K, R,
    stride_wn, stride_wk,
    stride_ar, stride_ak,
    stride_bn, stride_br,
    scaling,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per BLOCK_N rows of W; each rank tile streams those rows once (one tile for
    # R ≤ BLOCK_R, the usual case), and ‖W_n‖² comes from the first stream's loads.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    wsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    quad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            w = tl.load(w_ptr + offs_n64[:, None] * stride_wn + kk.to(tl.int64)[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if r0 == 0:
                wf = w.to(tl.float32)
                wsq += tl.sum(wf * wf, axis=1)
            a = tl.load(a_ptr + rr.to(tl.int64)[None, :] * stride_ar + kk.to(tl.int64)[:, None] * stride_ak,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            wa = mma(w, to_dtype(a, w.dtype, INTERPRET), wa, DOT_PRECISION, INTERPRET)
        b = tl.load(b_ptr + offs_n64[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        cross += tl.sum(b * wa, axis=1)
        # B_n (A Aᵀ) B_nᵀ over this rank tile's columns of B (A Aᵀ is R×R, from L2)
        bq = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for j0 in range(0, R, BLOCK_R):
            jj = j0 + offs_r
            mask_j = jj < R
            bj = tl.load(b_ptr + offs_n64[:, None] * stride_bn + jj[None, :] * stride_br,
                         mask=mask_n[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
            aat = tl.load(aat_ptr + jj[:, None] * R + rr[None, :], mask=mask_j[:, None] & mask_r[None, :], other=0.0)
            bq = mma(bj, aat, bq, "ieee", INTERPRET)
        quad += tl.sum(bq * b, axis=1)
    norm2 = wsq + (2.0 * scaling) * cross + (scaling * scaling) * quad
    tl.store(norm_ptr + offs_n, tl.sqrt(tl.maximum(norm2, 0.0)), mask=mask_n)


def dora_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, aat: torch.Tensor, *,
              scaling: float) -> torch.Tensor:
    """‖W_n + scaling · B_n A‖ for every row n, fp32 (N,), without forming W + scaling · B A.

    Args:
        weight: (N, K), bf16/fp16/fp32, any strides (a Conv1D weight's ``.t()`` view too).
        lora_a: (R, K), any float dtype: rounded to the weight's dtype for W Aᵀ (as the shrink
            rounds it for x Aᵀ), fp32 accumulation.
        lora_b: (N, R), any float dtype, read in fp32.
        aat: (R, R) fp32 contiguous, A Aᵀ of the fp32 A (the caller's one small GEMM).
    Returns:
        norm (N,) fp32 contiguous.
    """
    N, K = weight.shape
    R = lora_a.shape[0]
    assert lora_a.shape[1] == K and tuple(lora_b.shape) == (N, R), (
        f"shape mismatch: weight {tuple(weight.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    assert tuple(aat.shape) == (R, R) and aat.dtype == torch.float32 and aat.is_contiguous(), "aat: (R, R) fp32"
    norm = _common.alloc((N,), dtype=torch.float32, device=weight.device)
    if N == 0:
        return norm
    if interpreting():
        BLOCK_N, BLOCK_K, num_warps, num_stages = 32, 32, 4, 1
    else:
        # Memory-bound on W: 32-row blocks give N/32 programs (128 at N=4096, about one per SM),
        # a wide K tile per load; the (BLOCK_N, BLOCK_R) fp32 W Aᵀ accumulator stays small — with
        # twice the threads from a 64-wide rank tile on (4 warps spill there: offline compile).
        BLOCK_N, BLOCK_K, num_stages = 32, 128, 3
        num_warps = 8 if R > 32 else 4
    with device_ctx(weight):
        _dora_norm_kernel[(triton.cdiv(N, BLOCK_N),)](
            weight, lora_a, lora_b, aat, norm,
            N, K, R,
            weight.stride(0), weight.stride(1),
            lora_a.stride(0), lora_a.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            float(scaling),
            DOT_PRECISION=dot_precision(weight.dtype), INTERPRET=interpreting(),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=pow2_block(R, cap=64),
            num_warps=num_warps, num_stages=num_stages,
        )
    return norm


@triton.jit
def _masked_scale_kernel(t_ptr, bits_ptr, M, K, stride_tm, stride_bits_m, scale, INTERPRET: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    ptrs = t_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + offs_k[None, :]
    t = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    keep = load_keep(bits_ptr, stride_bits_m, offs_m, mask_m, k0, K, BLOCK_K)
    tl.store(ptrs, to_dtype(tl.where(keep, t * scale, 0.0), t_ptr.dtype.element_ty, INTERPRET), mask=mask)


def masked_scale_(t: torch.Tensor, bits: torch.Tensor, scale: float) -> torch.Tensor:
    """In place: t ← scale · mask ⊙ t, with the packed keep-mask ``bits`` (``bits_shape(M, K)``) of
    an (M, K) input; t (M, K) with contiguous rows. One read and one write of t. Returns t."""
    M, K = t.shape
    assert t.stride(1) == 1 and bits.shape == _common.bits_shape(M, K), "t: (M, K) contiguous rows; bits of (M, K)"
    if t.numel() == 0:
        return t
    BLOCK_M, BLOCK_K = (32, 64) if interpreting() else (32, 256)  # elementwise: wide rows per load
    with device_ctx(t):
        _masked_scale_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))](
            t, bits, M, K, t.stride(0), bits.stride(0), float(scale), INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=4)
    return t
