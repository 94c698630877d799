"""Fused bottleneck-adapter kernels (series adapter, LLM-Adapters semantics).

Math (``A(z) = up(act(down(dropout(z))))``, ``s`` the scaling)::

    hidden = drop(x) @ w_downᵀ                      (M, b)   pre-activation
    g      = act(hidden)
    out    = (x if residual is None else residual) + s · g @ w_upᵀ          (M, d_out)

    dg       = s · dout @ w_up                       (M, b)
    dh       = dg ⊙ act'(hidden)
    dx       = mask ⊙ (dh @ w_down) / (1-p)  (+ dout when residual is None)  (M, d_in)
    dw_down  = dhᵀ @ (mask ⊙ x) / (1-p)              (b, d_in)   fp32
    dw_up    = s · doutᵀ @ g                         (d_out, b)  fp32
    ds       = Σ g ⊙ (dout @ w_up)                   fp32, only when the scaling is learned
    d_residual = dout (the op layer passes it through; nothing is computed here)

Layer 1 of fastadapt: Triton kernels and their launchers, math only (no ``torch.nn``, no
autograd, no op registration). Only ``x`` and the small ``hidden`` (M × b, x.dtype) need to be
saved for backward, with the dropout mask: drawn once in the forward and stored packed, 1 bit per
element of x (``_common.keep_bits``).

Dtypes: bf16, fp16 and fp32 (x, weights and residual share one dtype; ``scaling`` is a
1-element fp32 tensor read in-kernel, so a learned scaling costs no host sync). Products
accumulate in fp32. fp32 precision policy: ``_common.dot_precision`` (IEEE fp32 in the
interpreter and when ``torch.backends.cuda.matmul.allow_tf32`` is False, TF32 otherwise).

Forward: one program per row block reads x (and the residual) and writes out once; the
M_blk × b intermediate stays on chip. When residual is None the residual add re-reads the
x row block (d_in wide, too large to keep on chip at d=4096): that second read hits L2.

Backward: three launches plus deterministic sums (see ``bottleneck_bwd``):
  1. row-block kernel: reads dout, hidden and x once each, keeps dg/dh on chip, writes dx, the
     small dh (M × b) and a per-block partial of ds (when residual is None, dx's identity term
     re-reads the dout row block, from L2);
  2./3. ``_common.weight_grad``, for dw_down and for dw_up: a GEMM contracting over M whose
     (b × d) output tiles stay in fp32 registers across the whole M loop.
Why not reduce dw_down / dw_up inside the row-block kernel (fp32 atomics or per-block
partials)? Each row block would then push b·(d_in+d_out) fp32 values: at the target shape
(d=4096, b=256) 8 MiB per block of 32 rows, 32× the bytes of the x rows it read (as atomics),
or that much memory per block (as partials). Contracting over M in separate kernels costs
one more read of x and of dout (2 × M·d·2 bytes) instead, and is deterministic: no atomics;
split-M partials (bounded, shape-only split count) are summed in a fixed order.

Interpreter (TRITON_INTERPRET=1, CPU): the INTERPRET constexpr makes the kernels emulate the GPU
numerics there (``_common.mma``/``_common.to_dtype``). GPU code is unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    ACTIVATIONS,
    NO_ACTIVATION,
    activation,
    activation_grad,
    bits_shape,
    check_activation,
    check_dropout,
    device_ctx,
    dot_precision,
    dropout_threshold,
    interpreting,
    keep_bits,
    keep_scale,
    load_keep,
    mma,
    to_dtype,
    weight_grad,
)
from ._common import dropout_bits as dropout_bits
from ._common import dropout_mask as dropout_mask

__all__ = ["ACTIVATIONS", "bottleneck_bwd", "bottleneck_fwd", "dropout_bits", "dropout_mask"]

# Largest bottleneck kept on chip as one BLOCK_M × next_pow2(b) fp32 tile (b ≤ 256 covers the
# paper's sizes). Larger b loops over _CHUNK_R-wide chunks, round-tripping hidden / dh through
# their (L2-resident) output buffers. 128, not 256: 256-wide chunks spill 0.3–0.6 KiB/thread
# (sm_90 cubin, see _row_blocks). Module-level so tests can force the chunked path.
_MAX_BLOCK_R = 256
_CHUNK_R = 128
# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _down_tile(
    x_ptr, wd_ptr, bits_ptr, offs_m64, m_mask, offs_r, r_mask, K,
    stride_xm, stride_xk, stride_wdr, stride_wdk, stride_bits_m,
    threshold, inv_keep, seed, store_bits,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """hidden tile (BLOCK_M, BLOCK_R) = drop(x) @ w_downᵀ in fp32; with dropout the mask is drawn
    here (and stored packed when ``store_bits``: the first rank chunk)."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            keep, words = keep_bits(seed, offs_m64, k0, K, threshold, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
            if store_bits:
                offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                tl.store(bits_ptr + offs_m64[:, None] * stride_bits_m + offs_w[None, :], words,
                         mask=m_mask[:, None] & (offs_w < tl.cdiv(K, 32))[None, :])
        wd = tl.load(
            wd_ptr + offs_r[None, :] * stride_wdr + offs_k[:, None] * stride_wdk,
            mask=r_mask[None, :] & k_mask[:, None], other=0.0,
        )
        acc = mma(x, wd, acc, DOT_PRECISION, INTERPRET)
    if HAS_DROPOUT:
        # 1/(1-p) applied once to the fp32 accumulator (exact mask, one rounding less)
        acc = acc * inv_keep
    return acc


@triton.jit
def _store_out(
    acc, scale, x_ptr, res_ptr, out_ptr, offs_m64, m_mask, n0, N,
    stride_xm, stride_xk, stride_resm, stride_resn, stride_om, stride_on,
    HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (offs_n < N)[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m64[:, None] * stride_resm + offs_n[None, :] * stride_resn,
                      mask=mask, other=0.0)
    else:
        # N == K: the residual is x itself (second read of this row block, from L2)
        res = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_n[None, :] * stride_xk,
                      mask=mask, other=0.0)
    out = res.to(tl.float32) + scale * acc
    tl.store(out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on,
             to_dtype(out, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["seed", "threshold"])  # one compile for every seed and p
def _bottleneck_fwd_kernel(
    x_ptr, wd_ptr, wu_ptr, res_ptr, scale_ptr, out_ptr, hid_ptr, bits_ptr,
    M, K, N, R,
    stride_xm, stride_xk,
    stride_wdr, stride_wdk,
    stride_wun, stride_wur,
    stride_resm, stride_resn,
    stride_om, stride_on,
    stride_hm, stride_hr,
    stride_bits_m,
    threshold, inv_keep, seed,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    R_CHUNKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    dtype = x_ptr.dtype.element_ty

    if R_CHUNKED:
        # b > _MAX_BLOCK_R: _CHUNK_R-wide hidden chunks go through the hidden output (written
        # anyway, read back from L2 by this same program) instead of an on-chip tile that spills.
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            acc = _down_tile(x_ptr, wd_ptr, bits_ptr, offs_m64, m_mask, offs_r, r_mask, K,
                             stride_xm, stride_xk, stride_wdr, stride_wdk, stride_bits_m, threshold, inv_keep,
                             seed, r0 == 0,
                             HAS_DROPOUT, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_K, BLOCK_R)
            tl.store(hid_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                     to_dtype(acc, hid_ptr.dtype.element_ty, INTERPRET), mask=m_mask[:, None] & r_mask[None, :])
        # make this program's hidden stores visible to all its threads before reading back
        tl.debug_barrier()
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < R
                # .cg: read from L2, where the stores above landed (never a stale L1 line)
                h = tl.load(hid_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                            mask=m_mask[:, None] & r_mask[None, :], other=0.0, cache_modifier=".cg")
                g = to_dtype(activation(h.to(tl.float32), ACTIVATION), dtype, INTERPRET)
                wu = tl.load(wu_ptr + offs_r[:, None] * stride_wur + offs_n[None, :] * stride_wun,
                             mask=r_mask[:, None] & n_mask[None, :], other=0.0)
                acc_o = mma(g, wu, acc_o, DOT_PRECISION, INTERPRET)
            _store_out(acc_o, scale, x_ptr, res_ptr, out_ptr, offs_m64, m_mask, n0, N,
                       stride_xm, stride_xk, stride_resm, stride_resn, stride_om, stride_on,
                       HAS_RESIDUAL, INTERPRET, BLOCK_N)
    else:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = _down_tile(x_ptr, wd_ptr, bits_ptr, offs_m64, m_mask, offs_r, r_mask, K,
                         stride_xm, stride_xk, stride_wdr, stride_wdk, stride_bits_m, threshold, inv_keep, seed, True,
                         HAS_DROPOUT, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_K, BLOCK_R)
        tl.store(hid_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                 to_dtype(acc, hid_ptr.dtype.element_ty, INTERPRET), mask=m_mask[:, None] & r_mask[None, :])
        # act on the fp32 accumulator; rounded to the input dtype only as a dot operand
        g = to_dtype(activation(acc, ACTIVATION), dtype, INTERPRET)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            wu = tl.load(wu_ptr + offs_r[:, None] * stride_wur + offs_n[None, :] * stride_wun,
                         mask=r_mask[:, None] & (offs_n < N)[None, :], other=0.0)
            acc_o = mma(g, wu, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, INTERPRET)
            _store_out(acc_o, scale, x_ptr, res_ptr, out_ptr, offs_m64, m_mask, n0, N,
                       stride_xm, stride_xk, stride_resm, stride_resn, stride_om, stride_on,
                       HAS_RESIDUAL, INTERPRET, BLOCK_N)


@triton.jit
def _dh_tile(
    dout_ptr, wu_ptr, hid_ptr, offs_m64, m_mask, offs_r, r_mask, N, scale,
    stride_dom, stride_don, stride_wun, stride_wur, stride_hm, stride_hr,
    ACTIVATION: tl.constexpr, NEED_DSCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dh tile = s · (dout @ w_up) ⊙ act'(hidden) in fp32, and per-row Σ g ⊙ (dout @ w_up)."""
    dgu = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        do = tl.load(dout_ptr + offs_m64[:, None] * stride_dom + offs_n[None, :] * stride_don,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        wu = tl.load(wu_ptr + offs_n[:, None] * stride_wun + offs_r[None, :] * stride_wur,
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        dgu = mma(do, wu, dgu, DOT_PRECISION, INTERPRET)
    h = tl.load(hid_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    if NEED_DSCALE:
        # padded rows / columns: dgu == 0 there (masked loads), so they add nothing
        ds_rows = tl.sum(activation(h, ACTIVATION) * dgu, axis=1)
    else:
        ds_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dh = (scale * dgu) * activation_grad(h, ACTIVATION)
    return dh, ds_rows


@triton.jit
def _store_dx(
    acc, dout_ptr, dx_ptr, bits_ptr, offs_m64, m_mask, k0, K,
    stride_dom, stride_don, stride_dxm, stride_dxk, stride_bits_m, inv_keep,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = m_mask[:, None] & (offs_k < K)[None, :]
    if HAS_DROPOUT:
        keep = load_keep(bits_ptr, stride_bits_m, offs_m64, m_mask, k0, K, BLOCK_K)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    if not HAS_RESIDUAL:
        # out = x + s·A(x): the identity path's gradient (N == K; this dout row block is in L2)
        acc += tl.load(dout_ptr + offs_m64[:, None] * stride_dom + offs_k[None, :] * stride_don,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs_m64[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _bottleneck_bwd_rows_kernel(
    dout_ptr, x_ptr, hid_ptr, wd_ptr, wu_ptr, scale_ptr, dx_ptr, dh_ptr, dsp_ptr, bits_ptr,
    M, K, N, R,
    stride_dom, stride_don,
    stride_xm, stride_xk,
    stride_hm, stride_hr,
    stride_wdr, stride_wdk,
    stride_wun, stride_wur,
    stride_dxm, stride_dxk,
    stride_dhm, stride_dhr,
    stride_bits_m, inv_keep,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NEED_DSCALE: tl.constexpr, R_CHUNKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    dtype = x_ptr.dtype.element_ty

    if R_CHUNKED:
        ds_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            dh, ds_part = _dh_tile(dout_ptr, wu_ptr, hid_ptr, offs_m64, m_mask, offs_r, r_mask, N, scale,
                                   stride_dom, stride_don, stride_wun, stride_wur, stride_hm, stride_hr,
                                   ACTIVATION, NEED_DSCALE, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_R)
            ds_rows += ds_part
            tl.store(dh_ptr + offs_m64[:, None] * stride_dhm + offs_r[None, :] * stride_dhr,
                     to_dtype(dh, dh_ptr.dtype.element_ty, INTERPRET), mask=m_mask[:, None] & r_mask[None, :])
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < R
                dh = tl.load(dh_ptr + offs_m64[:, None] * stride_dhm + offs_r[None, :] * stride_dhr,
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0, cache_modifier=".cg")
                wd = tl.load(wd_ptr + offs_r[:, None] * stride_wdr + offs_k[None, :] * stride_wdk,
                             mask=r_mask[:, None] & k_mask[None, :], other=0.0)
                acc = mma(dh, wd, acc, DOT_PRECISION, INTERPRET)
            _store_dx(acc, dout_ptr, dx_ptr, bits_ptr, offs_m64, m_mask, k0, K,
                      stride_dom, stride_don, stride_dxm, stride_dxk, stride_bits_m, inv_keep,
                      HAS_RESIDUAL, HAS_DROPOUT, INTERPRET, BLOCK_K)
    else:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        dh, ds_rows = _dh_tile(dout_ptr, wu_ptr, hid_ptr, offs_m64, m_mask, offs_r, r_mask, N, scale,
                               stride_dom, stride_don, stride_wun, stride_wur, stride_hm, stride_hr,
                               ACTIVATION, NEED_DSCALE, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_R)
        dh_lp = to_dtype(dh, dh_ptr.dtype.element_ty, INTERPRET)
        tl.store(dh_ptr + offs_m64[:, None] * stride_dhm + offs_r[None, :] * stride_dhr,
                 dh_lp, mask=m_mask[:, None] & r_mask[None, :])
        dh_lp = dh_lp.to(dtype)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            wd = tl.load(wd_ptr + offs_r[:, None] * stride_wdr + offs_k[None, :] * stride_wdk,
                         mask=r_mask[:, None] & (offs_k < K)[None, :], other=0.0)
            acc = mma(dh_lp, wd, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), DOT_PRECISION, INTERPRET)
            _store_dx(acc, dout_ptr, dx_ptr, bits_ptr, offs_m64, m_mask, k0, K,
                      stride_dom, stride_don, stride_dxm, stride_dxk, stride_bits_m, inv_keep,
                      HAS_RESIDUAL, HAS_DROPOUT, INTERPRET, BLOCK_K)
    if NEED_DSCALE:
        # one partial per row block, summed in a fixed order by the launcher (deterministic)
        tl.store(dsp_ptr + pid, tl.sum(ds_rows, axis=0))


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_2d(name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_doc} = {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} must have x's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on x's device {like.device}, got {t.device}")


def _check_common(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, scaling: torch.Tensor):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (M, d_in), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if not isinstance(w_down, torch.Tensor) or w_down.dim() != 2:
        raise ValueError(f"w_down must be a 2-D tensor (b, d_in), got {getattr(w_down, 'shape', None)}")
    if not isinstance(w_up, torch.Tensor) or w_up.dim() != 2:
        raise ValueError(f"w_up must be a 2-D tensor (d_out, b), got {getattr(w_up, 'shape', None)}")
    M, K = x.shape
    R = w_down.shape[0]
    if R < 1:
        raise ValueError(f"w_down must have b ≥ 1 rows (the bottleneck), got shape {tuple(w_down.shape)}")
    N = w_up.shape[0]
    _check_2d("w_down", w_down, (R, K), x, "(b, d_in)")
    _check_2d("w_up", w_up, (N, R), x, "(d_out, b)")
    if not isinstance(scaling, torch.Tensor) or scaling.numel() != 1 or scaling.dtype != torch.float32:
        raise ValueError(
            "scaling must be a 1-element float32 tensor, got "
            + (f"{scaling.dtype} with {scaling.numel()} elements" if isinstance(scaling, torch.Tensor)
               else type(scaling).__name__)
        )
    if scaling.device != x.device:
        raise ValueError(f"scaling must be on x's device {x.device}, got {scaling.device}")
    return M, K, N, R


def _row_blocks(M: int, R: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, num_warps, chunked) for the row-block kernels.

    Chosen from resource usage, not timings (no GPU in the session that wrote them): sm_90
    cubins compiled offline with triton 3.9 (num_stages=2), registers/spills read with
    cuobjdump. These configs spill ≤ 32 B/thread for every activation, with and without
    dropout; e.g. b=256 at BLOCK_M=64 spills 0.4–1 KiB/thread, BLOCK_M=32 none. Retune on GPU.
    """
    chunked = R > _MAX_BLOCK_R
    # tl.dot needs every dim ≥ 16: pad b to a power of two ≥ 16, masked
    block_r = _CHUNK_R if chunked else max(16, triton.next_power_of_2(R))
    if block_r <= 64:
        block_m, num_warps = 64, (4 if dtype != torch.float32 else 8)
    elif block_r <= 128 and not chunked:
        block_m, num_warps = 64, 8
    else:
        block_m, num_warps = 32, 8
    block_m = min(block_m, max(16, triton.next_power_of_2(M)))  # decode-sized M
    return block_m, 32, 32, block_r, num_warps, chunked


# ----------------------------------------------------------------------------- launchers


def bottleneck_fwd(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: torch.Tensor,
    *,
    activation: str,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused series-adapter forward: ``out = (x if residual is None else residual) + s·A(x)``.

    ``A(z) = up(act(down(dropout(z))))`` (LLM-Adapters), computed in one kernel per row block.

    Args:
        x: (M, d_in), bf16/fp16/fp32, any 2-D strides.
        w_down: (b, d_in), x's dtype. w_up: (d_out, b), x's dtype. Any b ≥ 1 (padded to a
            power of two ≥ 16 on chip; b > 256 loops over 256-wide chunks).
        scaling: 1-element fp32 tensor on x's device (read in-kernel: no host sync).
        activation: "tanh" | "relu" | "gelu" (exact erf) | "silu".
        residual: (M, d_out), x's dtype, or None (then d_out must equal d_in and x is the residual).
        dropout_p, seed: dropout on the adapter input only; the mask is drawn here from them
            (``dropout_mask(seed, M, d_in, p)``).

    Returns:
        out (M, d_out) in x.dtype, contiguous;
        hidden (M, b) = drop(x) @ w_downᵀ (pre-activation, fp32-accumulated, stored in x.dtype);
        bits: the packed keep-mask (``bits_shape(M, d_in)`` int32) when dropout_p > 0, else None:
        with x, everything backward needs.
    """
    act = check_activation(activation)
    check_dropout(dropout_p, seed)
    M, K, N, R = _check_common(x, w_down, w_up, scaling)
    if residual is None:
        if N != K:
            raise ValueError(f"w_up must have d_out == d_in = {K} when residual is None, got d_out = {N}")
    else:
        _check_2d("residual", residual, (M, N), x, "(M, d_out)")

    has_dropout = dropout_p > 0.0
    out = _common.alloc((M, N), dtype=x.dtype, device=x.device)
    hidden = _common.alloc((M, R), dtype=x.dtype, device=x.device)
    bits = _common.alloc(bits_shape(M, K), dtype=torch.int32, device=x.device) if has_dropout else None
    if M == 0:
        return out, hidden, bits
    inv_keep = keep_scale(dropout_p) if has_dropout else 1.0
    BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, num_warps, chunked = _row_blocks(M, R, x.dtype)
    res = x if residual is None else residual
    with device_ctx(x):
        _bottleneck_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x, w_down, w_up, res, scaling, out, hidden, bits if bits is not None else out,
            M, K, N, R,
            x.stride(0), x.stride(1),
            w_down.stride(0), w_down.stride(1),
            w_up.stride(0), w_up.stride(1),
            res.stride(0), res.stride(1),
            out.stride(0), out.stride(1),
            hidden.stride(0), hidden.stride(1),
            bits.stride(0) if bits is not None else 0,
            dropout_threshold(dropout_p), inv_keep, seed,
            ACTIVATION=act, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout,
            R_CHUNKED=chunked, DOT_PRECISION=dot_precision(x.dtype),
            INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
            num_warps=num_warps, num_stages=2,
        )
    return out, hidden, bits


def bottleneck_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    hidden: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: torch.Tensor,
    *,
    activation: str,
    has_residual: bool,
    dropout_p: float = 0.0,
    bits: torch.Tensor | None = None,
    need_scaling_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of ``bottleneck_fwd`` (same activation and dropout_p; ``bits``: its stored mask).

    Args:
        dout: (M, d_out), x's dtype, any 2-D strides. x: (M, d_in) as in forward.
        hidden: (M, b) from ``bottleneck_fwd``. w_down (b, d_in), w_up (d_out, b), scaling as in forward.
        bits: the packed mask ``bottleneck_fwd`` returned (None when dropout_p == 0).
        has_residual: whether forward got a residual; if not, dout also flows to dx (identity path).
            d_residual is dout itself and is not returned.
        need_scaling_grad: compute ds (a learned scaling).

    Returns:
        dx (M, d_in) x.dtype = mask ⊙ (dh @ w_down)/(1-p) (+ dout when not has_residual);
        dw_down (b, d_in) fp32 = dhᵀ @ (mask ⊙ x)/(1-p);
        dw_up (d_out, b) fp32 = s · doutᵀ @ act(hidden);
        dscaling: fp32 tensor of scaling's shape = Σ act(hidden) ⊙ (dout @ w_up), or None;
        with dh = s · (dout @ w_up) ⊙ act'(hidden).

    Launches: the row-block kernel (dx, dh (M × b, x.dtype) and ds partials), then the
    M-contracting weight-gradient kernel for dw_down and for dw_up. All reductions are
    deterministic (no atomics): see the module docstring for why weight gradients are not
    reduced inside the row-block kernel.
    """
    act = check_activation(activation)
    check_dropout(dropout_p, 0)
    if (bits is not None) != (dropout_p > 0):
        raise ValueError(f"bits must be given exactly when dropout_p > 0 (dropout_p={dropout_p})")
    M, K, N, R = _check_common(x, w_down, w_up, scaling)
    _check_2d("dout", dout, (M, N), x, "(M, d_out)")
    if bits is not None and tuple(bits.shape) != bits_shape(M, K):
        raise ValueError(f"bits must have shape {bits_shape(M, K)} (the packed mask of x), got {tuple(bits.shape)}")
    _check_2d("hidden", hidden, (M, R), x, "(M, b)")
    if not has_residual and N != K:
        raise ValueError(f"w_up must have d_out == d_in = {K} when has_residual is False, got d_out = {N}")

    dx = _common.alloc((M, K), dtype=x.dtype, device=x.device)
    if M == 0:
        dw_down = torch.zeros((R, K), dtype=torch.float32, device=x.device)
        dw_up = torch.zeros((N, R), dtype=torch.float32, device=x.device)
        ds = torch.zeros(scaling.shape, dtype=torch.float32, device=x.device) if need_scaling_grad else None
        return dx, dw_down, dw_up, ds
    has_dropout = dropout_p > 0.0
    inv_keep = keep_scale(dropout_p) if has_dropout else 1.0
    precision = dot_precision(x.dtype)
    BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, num_warps, chunked = _row_blocks(M, R, x.dtype)
    grid_m = triton.cdiv(M, BLOCK_M)
    dh = _common.alloc((M, R), dtype=x.dtype, device=x.device)
    ds_partial = _common.alloc((grid_m,), dtype=torch.float32, device=x.device) if need_scaling_grad else dh
    with device_ctx(x):
        _bottleneck_bwd_rows_kernel[(grid_m,)](
            dout, x, hidden, w_down, w_up, scaling, dx, dh, ds_partial, bits if bits is not None else dx,
            M, K, N, R,
            dout.stride(0), dout.stride(1),
            x.stride(0), x.stride(1),
            hidden.stride(0), hidden.stride(1),
            w_down.stride(0), w_down.stride(1),
            w_up.stride(0), w_up.stride(1),
            dx.stride(0), dx.stride(1),
            dh.stride(0), dh.stride(1),
            bits.stride(0) if bits is not None else 0, inv_keep,
            ACTIVATION=act, HAS_RESIDUAL=bool(has_residual), HAS_DROPOUT=has_dropout,
            NEED_DSCALE=bool(need_scaling_grad), R_CHUNKED=chunked,
            DOT_PRECISION=precision, INTERPRET=interpreting(),
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
            num_warps=num_warps, num_stages=2,
        )
        dw_down = weight_grad(dh, x, scale=inv_keep, b_activation=NO_ACTIVATION, bits=bits)
        dw_up = weight_grad(dout, hidden, scale_tensor=scaling, b_activation=act)
    ds = ds_partial.sum().reshape(scaling.shape) if need_scaling_grad else None
    return dx, dw_down, dw_up, ds
