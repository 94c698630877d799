"""Fused bottleneck-adapter kernels (series adapter, LLM-Adapters semantics).

Math (``A(z) = up(act(down(dropout(z))))``, ``s`` the scaling)::

    hidden = drop(x) @ w_downᵀ                      (M, b)   pre-activation, rounded to x.dtype
    g      = act(hidden)
    out    = (x if residual is None else residual) + s · g @ w_upᵀ          (M, d_out)

    dg       = s · dout @ w_up                       (M, b)
    dh       = dg ⊙ act'(hidden)                     rounded to x.dtype
    dx       = mask ⊙ (dh @ w_down) / (1-p)  (+ dout when residual is None)  (M, d_in)
    dw_down  = dhᵀ @ (mask ⊙ x) / (1-p)              (b, d_in)   fp32
    dw_up    = s · doutᵀ @ g                         (d_out, b)  fp32
    ds       = Σ g ⊙ (dout @ w_up)                   fp32, only when the scaling is learned
    d_residual = dout (the op layer passes it through; nothing is computed here)

Layer 1 of fastadapt: Triton kernels and their launchers, math only (no ``torch.nn``, no
autograd, no op registration). Saved for backward: x, the small ``hidden`` (M × b, x.dtype) and,
with dropout, the mask — drawn once in the forward and stored packed, 1 bit per element of x
(``_common.keep_bits``); every later kernel reads the bits.

Dtypes: bf16, fp16 and fp32; x, the weights and the residual share one dtype (the op layer casts
fp32 master weights once per call, ``_common.cast_pair``); ``scaling`` is a 1-element fp32 tensor
read in-kernel (a learned scaling costs no host sync). Products accumulate in fp32; fp32
precision policy: ``_common.dot_precision``.

Two plans, chosen from the shape alone (so a shape always computes in the same order):

- **fused** (``b ≤ FUSED_MAX_R`` and at least ``FUSED_MIN_PROGRAMS`` row blocks, i.e. M ≥ 6144 at
  64 rows): one program per 64-row block — the smallest block Hopper's ``wgmma`` takes — keeps the
  64 × b intermediate on chip. Forward: read x, write hidden and out (x is read a second time for
  the residual add: the output tiles run in reverse column order, so the x tiles the down GEMM
  loaded last are the first re-read, from L2). Backward rows: read dout and hidden, write dh and
  dx. Each program reads both weights once (b·(d_in+d_out) elements): at M = 8192 that is 128 reads
  of 4 MiB in bf16 from L2 per kernel, against 256 at the 32-row blocks this replaced.
- **split** (small M, decode, or b > FUSED_MAX_R): the two GEMMs as two launches on 2-D grids
  (row blocks × bottleneck chunks, then row blocks × output columns), the M × b intermediate
  through memory (4 MiB at M = 8192, b = 256, mostly L2). Costs one more read of x (forward) and
  of dout (backward) than the fused plan, but fills the GPU where the fused plan's M/64 row
  blocks would leave most SMs idle (32 programs at M = 2048 on 132 SMs).

Weight gradients, both plans: one launch (``_common.weight_grad_pair``) computes dw_down and
dw_up tiles side by side, contracting over M in fp32 registers; deterministic (no atomics; split-M
partials only when the two gradients together have fewer than a wave of tiles). Why not inside
the row kernels: each row block would push b·(d_in+d_out) fp32 partials (8 MiB at d = 4096,
b = 256) — 16× the activation bytes it read.

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
    cast_pair,
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
    pow2_block,
    to_dtype,
    weight_grad_pair,
)
from ._common import dropout_bits as dropout_bits
from ._common import dropout_mask as dropout_mask

__all__ = ["ACTIVATIONS", "bottleneck_bwd", "bottleneck_fwd", "cast_pair", "dropout_bits", "dropout_mask", "plan"]

#: Rows per program of the fused kernels: one Hopper warpgroup MMA (wgmma) is 64 rows.
FUSED_BLOCK_M = 64
#: Widest bottleneck the fused kernels keep on chip: a 64 × 256 fp32 tile is 64 registers per
#: thread over 8 warps (no spill in the sm_90a compile, .ci/check_triton.py).
FUSED_MAX_R = 256
#: Fewest row blocks for which the fused plan runs (≈ 0.75 of a wave on a 132-SM H100); fewer
#: take the split plan, whose 2-D grids fill the GPU. Module-level so tests can force either plan.
FUSED_MIN_PROGRAMS = 96
#: Dtypes the fused plan takes. Not fp32: its FMA dots would hold the 64 × b tile in layouts that
#: need a 16 KiB stack frame per thread (sm_90a compile); fp32 always splits.
FUSED_DTYPES = (torch.bfloat16, torch.float16)
#: Bottleneck chunk of the split plan's first kernel: 64 gives 4 chunks at b = 256, so 32 row
#: blocks (M = 2048) still launch 128 programs.
SPLIT_BLOCK_R = 64

_NO_ACT = tl.constexpr(NO_ACTIVATION)  # as a jit-code global
# _rows_gemm's dropout modes (constexpr globals in jit code; launchers pass their .value)
_NO_MASK = tl.constexpr(0)
_DRAW_MASK = tl.constexpr(1)  # draw it here (Philox), store it packed when asked
_LOAD_MASK = tl.constexpr(2)  # read the stored bits


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _rows_gemm(
    a_ptr, stride_am, stride_ak, w_ptr, stride_wk, stride_wc, offs_m64, m_mask, offs_c, c_mask, K,
    bits_ptr, stride_bits_m, threshold, seed, store_bits,
    MASK: tl.constexpr, A_ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(BLOCK_M, BLOCK_C) fp32 = f(A[rows, :K]) @ W[:K, cols], W addressed through its strides.

    f: the dropout keep-mask (MASK: drawn here and stored packed when ``store_bits``, or loaded
    from the stored bits) or the activation A_ACTIVATION (rounded back to A's dtype, as a dot
    operand), or nothing."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_m64[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if A_ACTIVATION >= 0:
            a = to_dtype(activation(a.to(tl.float32), A_ACTIVATION), a.dtype, INTERPRET)
        if MASK == _DRAW_MASK:
            keep, words = keep_bits(seed, offs_m64, k0, K, threshold, BLOCK_K)
            a = tl.where(keep, a, tl.zeros_like(a))  # a select, not a multiply: exact
            if store_bits:
                offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                tl.store(bits_ptr + offs_m64[:, None] * stride_bits_m + offs_w[None, :], words,
                         mask=m_mask[:, None] & (offs_w < tl.cdiv(K, 32))[None, :])
        elif MASK == _LOAD_MASK:
            keep = load_keep(bits_ptr, stride_bits_m, offs_m64, m_mask, k0, K, BLOCK_K)
            a = tl.where(keep, a, tl.zeros_like(a))
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_c[None, :] * stride_wc,
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = mma(a, w, acc, DOT_PRECISION, INTERPRET)
    return acc


@triton.jit
def _store_hidden(
    acc, inv_keep, hid_ptr, stride_hm, stride_hr, offs_m64, m_mask, offs_r, r_mask,
    HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Store hidden (rounded once to its dtype: what backward reads) and return it."""
    if HAS_DROPOUT:
        acc = acc * inv_keep  # 1/(1-p) once, on the fp32 accumulator: the mask itself is exact
    h = to_dtype(acc, hid_ptr.dtype.element_ty, INTERPRET)
    tl.store(hid_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hr, h,
             mask=m_mask[:, None] & r_mask[None, :])
    return h


@triton.jit
def _store_dh(
    dg, scale, hid_ptr, stride_hm, stride_hr, dh_ptr, stride_dhm, stride_dhr, offs_m64, m_mask, offs_r, r_mask,
    ACTIVATION: tl.constexpr, NEED_DSCALE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dh = s · dg ⊙ act'(hidden), stored in dh's dtype and returned rounded; and this tile's
    Σ act(hidden) ⊙ dg (0 unless NEED_DSCALE; padded lanes hold dg = 0 and add nothing)."""
    mask = m_mask[:, None] & r_mask[None, :]
    h = tl.load(hid_ptr + offs_m64[:, None] * stride_hm + offs_r[None, :] * stride_hr, mask=mask,
                other=0.0).to(tl.float32)
    ds = 0.0
    if NEED_DSCALE:
        ds = tl.sum(tl.sum(activation(h, ACTIVATION) * dg, axis=1), axis=0)
    dh = to_dtype((scale * dg) * activation_grad(h, ACTIVATION), dh_ptr.dtype.element_ty, INTERPRET)
    tl.store(dh_ptr + offs_m64[:, None] * stride_dhm + offs_r[None, :] * stride_dhr, dh, mask=mask)
    return dh, ds


@triton.jit
def _store_rows(
    acc, scale, out_ptr, stride_om, stride_on, base_ptr, stride_bm, stride_bn, bits_ptr, stride_bits_m,
    offs_m64, m_mask, n0, N,
    HAS_BASE: tl.constexpr, MASKED: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[rows, n0:n0+BLOCK_N] = [keep ⊙] (scale · acc) [+ base], rounded once.
    Forward: base = the residual (or x), scale = s. dx: keep = the stored mask, scale = 1/(1-p),
    base = dout when the residual is x (the identity path's gradient)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (offs_n < N)[None, :]
    val = acc * scale
    if MASKED:
        keep = load_keep(bits_ptr, stride_bits_m, offs_m64, m_mask, n0, N, BLOCK_N)
        val = tl.where(keep, val, 0.0)
    if HAS_BASE:
        val += tl.load(base_ptr + offs_m64[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m64[:, None] * stride_om + offs_n[None, :] * stride_on,
             to_dtype(val, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _expand_rows(
    t, scale, w_ptr, stride_wr, stride_wn, offs_r, r_mask,
    out_ptr, stride_om, stride_on, base_ptr, stride_bm, stride_bn, bits_ptr, stride_bits_m,
    offs_m64, m_mask, N,
    HAS_BASE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The fused kernels' second GEMM: every output tile of these rows from the on-chip t
    (BLOCK_M × BLOCK_R). Columns run last to first: the first re-reads of the base (x or dout,
    read whole by the first GEMM) are the tiles loaded last, the likeliest still in L2."""
    num_n = tl.cdiv(N, BLOCK_N)
    for i in range(0, num_n):
        n0 = (num_n - 1 - i) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                    mask=r_mask[:, None] & (offs_n < N)[None, :], other=0.0)
        acc = mma(t, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, INTERPRET)
        _store_rows(acc, scale, out_ptr, stride_om, stride_on, base_ptr, stride_bm, stride_bn, bits_ptr,
                    stride_bits_m, offs_m64, m_mask, n0, N, HAS_BASE, MASKED, INTERPRET, BLOCK_N)


# ----------------------------------------------------------------------------- fused kernels


@triton.jit(do_not_specialize=["seed", "threshold"])  # one compile for every seed and p
def _bottleneck_fwd_kernel(
    x_ptr, wd_ptr, wu_ptr, base_ptr, scale_ptr, out_ptr, hid_ptr, bits_ptr,
    M, K, N, R,
    stride_xm, stride_xk,
    stride_wdr, stride_wdk,
    stride_wun, stride_wur,
    stride_bm, stride_bn,
    stride_om, stride_on,
    stride_hm, stride_hr,
    stride_bits_m,
    threshold, inv_keep, seed,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One row block: hidden = drop(x) @ w_downᵀ on chip, then out = base + s · act(hidden) @ w_upᵀ."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = _rows_gemm(x_ptr, stride_xm, stride_xk, wd_ptr, stride_wdk, stride_wdr, offs_m64, m_mask, offs_r, r_mask,
                     K, bits_ptr, stride_bits_m, threshold, seed, True,
                     _DRAW_MASK if HAS_DROPOUT else _NO_MASK, _NO_ACT, DOT_PRECISION, INTERPRET,
                     BLOCK_M, BLOCK_K, BLOCK_R)
    h = _store_hidden(acc, inv_keep, hid_ptr, stride_hm, stride_hr, offs_m64, m_mask, offs_r, r_mask,
                      HAS_DROPOUT, INTERPRET)
    # act of the rounded hidden (what backward sees), rounded again as the dot operand
    g = to_dtype(activation(h.to(tl.float32), ACTIVATION), x_ptr.dtype.element_ty, INTERPRET)
    scale = tl.load(scale_ptr).to(tl.float32)
    _expand_rows(g, scale, wu_ptr, stride_wur, stride_wun, offs_r, r_mask, out_ptr, stride_om, stride_on,
                 base_ptr, stride_bm, stride_bn, bits_ptr, stride_bits_m, offs_m64, m_mask, N,
                 True, False, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N)


@triton.jit
def _bottleneck_bwd_kernel(
    dout_ptr, hid_ptr, wd_ptr, wu_ptr, scale_ptr, dx_ptr, dh_ptr, dsp_ptr, bits_ptr,
    M, K, N, R,
    stride_dom, stride_don,
    stride_hm, stride_hr,
    stride_wdr, stride_wdk,
    stride_wun, stride_wur,
    stride_dxm, stride_dxk,
    stride_dhm, stride_dhr,
    stride_bits_m, inv_keep,
    ACTIVATION: tl.constexpr, ADD_DOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DSCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One row block: dh = s · (dout @ w_up) ⊙ act'(hidden) on chip (stored too, for dw_down), then
    dx = mask ⊙ (dh @ w_down) / (1-p) (+ dout), and this block's partial of ds. As in the forward,
    BLOCK_K is the first GEMM's reduction step (over d_out here) and BLOCK_N the output tile (of dx)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    dg = _rows_gemm(dout_ptr, stride_dom, stride_don, wu_ptr, stride_wun, stride_wur, offs_m64, m_mask, offs_r,
                    r_mask, N, bits_ptr, stride_bits_m, 0, 0, False,
                    _NO_MASK, _NO_ACT, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_K, BLOCK_R)
    scale = tl.load(scale_ptr).to(tl.float32)
    dh, ds = _store_dh(dg, scale, hid_ptr, stride_hm, stride_hr, dh_ptr, stride_dhm, stride_dhr, offs_m64, m_mask,
                       offs_r, r_mask, ACTIVATION, NEED_DSCALE, INTERPRET)
    _expand_rows(dh.to(dout_ptr.dtype.element_ty), inv_keep, wd_ptr, stride_wdr, stride_wdk, offs_r, r_mask,
                 dx_ptr, stride_dxm, stride_dxk, dout_ptr, stride_dom, stride_don, bits_ptr, stride_bits_m,
                 offs_m64, m_mask, K, ADD_DOUT, HAS_DROPOUT, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N)
    if NEED_DSCALE:
        tl.store(dsp_ptr + pid, ds)  # one partial per row block, summed in a fixed order


# ----------------------------------------------------------------------------- split kernels


@triton.jit
def _chunk_tile(pid, M, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """(rows, row mask, bottleneck columns, column mask) of program ``pid`` on a (row blocks ×
    bottleneck chunks) grid; the chunks of one row block are adjacent program ids, so their
    re-reads of that row block hit L2."""
    num_r = tl.cdiv(R, BLOCK_R)
    offs_m = (pid // num_r) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = (pid % num_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    return offs_m.to(tl.int64), offs_m < M, offs_r, offs_r < R


@triton.jit(do_not_specialize=["seed", "threshold"])
def _bottleneck_hidden_kernel(
    x_ptr, wd_ptr, hid_ptr, bits_ptr,
    M, K, R,
    stride_xm, stride_xk,
    stride_wdr, stride_wdk,
    stride_hm, stride_hr,
    stride_bits_m,
    threshold, inv_keep, seed,
    MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """hidden[row block, chunk] = drop(x) @ w_down[chunk]ᵀ; MASK = draw only with a single chunk
    (otherwise every chunk would draw the same mask again: it is loaded)."""
    offs_m64, m_mask, offs_r, r_mask = _chunk_tile(tl.program_id(0), M, R, BLOCK_M, BLOCK_R)
    acc = _rows_gemm(x_ptr, stride_xm, stride_xk, wd_ptr, stride_wdk, stride_wdr, offs_m64, m_mask, offs_r, r_mask,
                     K, bits_ptr, stride_bits_m, threshold, seed, True,
                     MASK, _NO_ACT, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_K, BLOCK_R)
    _store_hidden(acc, inv_keep, hid_ptr, stride_hm, stride_hr, offs_m64, m_mask, offs_r, r_mask, MASK != _NO_MASK,
                  INTERPRET)


@triton.jit
def _bottleneck_dh_kernel(
    dout_ptr, wu_ptr, scale_ptr, hid_ptr, dh_ptr, dsp_ptr,
    M, N, R,
    stride_dom, stride_don,
    stride_wun, stride_wur,
    stride_hm, stride_hr,
    stride_dhm, stride_dhr,
    ACTIVATION: tl.constexpr, NEED_DSCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dh[row block, chunk] = s · (dout @ w_up[:, chunk]) ⊙ act'(hidden), and its partial of ds."""
    pid = tl.program_id(0)
    offs_m64, m_mask, offs_r, r_mask = _chunk_tile(pid, M, R, BLOCK_M, BLOCK_R)
    dg = _rows_gemm(dout_ptr, stride_dom, stride_don, wu_ptr, stride_wun, stride_wur, offs_m64, m_mask, offs_r,
                    r_mask, N, dh_ptr, 0, 0, 0, False,
                    _NO_MASK, _NO_ACT, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_N, BLOCK_R)
    scale = tl.load(scale_ptr).to(tl.float32)
    _, ds = _store_dh(dg, scale, hid_ptr, stride_hm, stride_hr, dh_ptr, stride_dhm, stride_dhr, offs_m64, m_mask,
                      offs_r, r_mask, ACTIVATION, NEED_DSCALE, INTERPRET)
    if NEED_DSCALE:
        tl.store(dsp_ptr + pid, ds)


@triton.jit
def _bottleneck_expand_kernel(
    t_ptr, w_ptr, scale_ptr, base_ptr, out_ptr, bits_ptr,
    M, N, R,
    stride_tm, stride_tr,
    stride_wr, stride_wn,
    stride_bm, stride_bn,
    stride_om, stride_on,
    stride_bits_m, scale,
    T_ACTIVATION: tl.constexpr, SCALE_PTR: tl.constexpr, HAS_BASE: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[row block, column block] = [keep ⊙] (scale · f(T) @ W) [+ base]: the forward's
    out = base + s · act(hidden) @ w_upᵀ and the backward's dx = mask ⊙ (dh @ w_down)/(1-p) (+ dout).
    Column blocks of one row block are adjacent program ids (T's row block stays in L2)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = (pid % num_n) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    acc = _rows_gemm(t_ptr, stride_tm, stride_tr, w_ptr, stride_wr, stride_wn, offs_m64, m_mask, offs_n, offs_n < N,
                     R, bits_ptr, 0, 0, 0, False,
                     _NO_MASK, T_ACTIVATION, DOT_PRECISION, INTERPRET, BLOCK_M, BLOCK_R, BLOCK_N)
    if SCALE_PTR:
        scale = scale * tl.load(scale_ptr).to(tl.float32)
    _store_rows(acc, scale, out_ptr, stride_om, stride_on, base_ptr, stride_bm, stride_bn, bits_ptr, stride_bits_m,
                offs_m64, m_mask, n0, N, HAS_BASE, MASKED, INTERPRET, BLOCK_N)


# ----------------------------------------------------------------------------- host side


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


def _strides(*tensors: torch.Tensor) -> list[int]:
    """(row stride, column stride) of each 2-D tensor, flattened: the kernels' stride arguments."""
    return [st for t in tensors for st in t.stride()]


def plan(M: int, R: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """``"fused"`` or ``"split"`` for M rows, bottleneck b = R and x's dtype (shape and dtype only:
    see the module docstring)."""
    fused = dtype in FUSED_DTYPES and R <= FUSED_MAX_R and triton.cdiv(M, FUSED_BLOCK_M) >= FUSED_MIN_PROGRAMS
    return "fused" if fused else "split"


def _fused_config(R: int) -> dict:
    """Fused kernels: 64 rows (wgmma), the whole bottleneck on chip. 8 warps split the 64 × b
    accumulator (64 fp32 registers per thread at b = 256); 64-wide K/N steps keep the pipelined
    weight tiles (b × 64) within shared memory at 2 stages. Chosen from the sm_90a compile
    (registers, spills, shared memory: .ci/check_triton.py), not from timings."""
    block_r = pow2_block(R, cap=FUSED_MAX_R)
    warps = 8 if block_r >= 128 else 4
    return dict(BLOCK_M=FUSED_BLOCK_M, BLOCK_K=64, BLOCK_N=128, BLOCK_R=block_r, num_warps=warps,
                num_stages=1 if interpreting() else 2)


def _split_config(M: int, R: int, dtype: torch.dtype) -> dict:
    """Split kernels: row blocks of up to 64 (16 at decode sizes), bottleneck chunks and K steps of
    up to 64, 128-wide output columns (a 64 × 128 fp32 accumulator over 4 warps; fp32 operands:
    64-wide over 8 warps, their FMA-emulated dots spill at 4)."""
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=pow2_block(M, cap=64), BLOCK_K=64, BLOCK_R=pow2_block(R, cap=SPLIT_BLOCK_R),
                BLOCK_N=64 if fp32 else 128,
                num_warps=8 if fp32 else 4, num_stages=1 if interpreting() else (2 if fp32 else 3))


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
    """Series-adapter forward: ``out = (x if residual is None else residual) + s·A(x)``.

    ``A(z) = up(act(down(dropout(z))))`` (LLM-Adapters); one launch (fused plan) or two (split
    plan, three with dropout and b > SPLIT_BLOCK_R: the mask is drawn by its own launch first).

    Args:
        x: (M, d_in), bf16/fp16/fp32, any 2-D strides.
        w_down: (b, d_in), x's dtype. w_up: (d_out, b), x's dtype. Any b ≥ 1.
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
    fused = plan(M, R, x.dtype) == "fused"
    cfg = _fused_config(R) if fused else _split_config(M, R, x.dtype)
    chunks = 1 if fused else triton.cdiv(R, cfg["BLOCK_R"])
    out = _common.alloc((M, N), dtype=x.dtype, device=x.device)
    hidden = _common.alloc((M, R), dtype=x.dtype, device=x.device)
    bits = None
    if has_dropout:
        # drawn where x is read, unless several bottleneck chunks read one row block: then drawn
        # once, by its own launch, and loaded by each chunk
        bits = (_common.alloc(bits_shape(M, K), dtype=torch.int32, device=x.device) if chunks == 1 or M == 0
                else dropout_bits(seed, M, K, dropout_p, device=x.device))
    if M == 0:
        return out, hidden, bits
    inv_keep = keep_scale(dropout_p) if has_dropout else 1.0
    threshold = dropout_threshold(dropout_p)
    base = x if residual is None else residual
    # without dropout the mask pointer is a dummy: one of the kernel's own tensors (never read)
    bits_arg, stride_bits = (bits, bits.stride(0)) if bits is not None else (hidden, 0)
    precision = dot_precision(x.dtype)
    with device_ctx(x):
        if fused:
            _bottleneck_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
                x, w_down, w_up, base, scaling, out, hidden, bits_arg,
                M, K, N, R,
                *_strides(x, w_down, w_up, base, out, hidden), stride_bits,
                threshold, inv_keep, seed,
                ACTIVATION=act, HAS_DROPOUT=has_dropout, DOT_PRECISION=precision, INTERPRET=interpreting(),
                **cfg,
            )
            return out, hidden, bits
        mask_mode = (_NO_MASK if not has_dropout else _DRAW_MASK if chunks == 1 else _LOAD_MASK).value
        _bottleneck_hidden_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * chunks,)](
            x, w_down, hidden, bits_arg,
            M, K, R,
            *_strides(x, w_down, hidden), stride_bits,
            threshold, inv_keep, seed,
            MASK=mask_mode, DOT_PRECISION=precision, INTERPRET=interpreting(),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _launch_expand(hidden, w_up.t(), out, base=base, scaling=scaling, scale=1.0, t_activation=act, bits=None,
                       cfg=cfg)
    return out, hidden, bits


def _launch_expand(t, w, out, *, base, scaling, scale, t_activation, bits, cfg) -> None:
    """out = [keep ⊙] (scale · [scaling ·] f(t) @ w) [+ base]; t (M, R), w (R, N) any strides."""
    M, R = t.shape
    N = w.shape[1]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _bottleneck_expand_kernel[grid](
        t, w, scaling if scaling is not None else out, base if base is not None else out, out,
        bits if bits is not None else out,
        M, N, R,
        *_strides(t, w, base if base is not None else out, out),
        bits.stride(0) if bits is not None else 0, float(scale),
        T_ACTIVATION=t_activation, SCALE_PTR=scaling is not None, HAS_BASE=base is not None, MASKED=bits is not None,
        DOT_PRECISION=dot_precision(t.dtype), INTERPRET=interpreting(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


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

    Launches: the fused row kernel (or the split plan's dh and dx kernels), then one launch for
    both weight gradients (``_common.weight_grad_pair``); with a learned scaling, a sum of the ds
    partials. Deterministic: no atomics, every sum in a fixed order.
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
    dh = _common.alloc((M, R), dtype=x.dtype, device=x.device)
    add_dout = not has_residual
    bits_arg, stride_bits = (bits, bits.stride(0)) if bits is not None else (dx, 0)
    with device_ctx(x):
        if plan(M, R, x.dtype) == "fused":
            cfg = _fused_config(R)
            grid_m = triton.cdiv(M, cfg["BLOCK_M"])
            ds_partial = _common.alloc((grid_m,), dtype=torch.float32, device=x.device) if need_scaling_grad else dh
            _bottleneck_bwd_kernel[(grid_m,)](
                dout, hidden, w_down, w_up, scaling, dx, dh, ds_partial, bits_arg,
                M, K, N, R,
                *_strides(dout, hidden, w_down, w_up, dx, dh), stride_bits, inv_keep,
                ACTIVATION=act, ADD_DOUT=add_dout, HAS_DROPOUT=has_dropout, NEED_DSCALE=bool(need_scaling_grad),
                DOT_PRECISION=precision, INTERPRET=interpreting(),
                **cfg,
            )
        else:
            cfg = _split_config(M, R, x.dtype)
            programs = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(R, cfg["BLOCK_R"])
            ds_partial = (_common.alloc((programs,), dtype=torch.float32, device=x.device) if need_scaling_grad
                          else dh)
            _bottleneck_dh_kernel[(programs,)](
                dout, w_up, scaling, hidden, dh, ds_partial,
                M, N, R,
                *_strides(dout, w_up, hidden, dh),
                ACTIVATION=act, NEED_DSCALE=bool(need_scaling_grad), DOT_PRECISION=precision,
                INTERPRET=interpreting(),
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
            _launch_expand(dh, w_down, dx, base=dout if add_dout else None, scaling=None, scale=inv_keep,
                           t_activation=NO_ACTIVATION, bits=bits, cfg=cfg)
        dw_down, dw_up = weight_grad_pair(
            _common.WeightGrad(dh, x, scale=inv_keep, bits=bits),
            _common.WeightGrad(dout, hidden, scale_tensor=scaling, b_activation=act),
        )
    ds = ds_partial.sum().reshape(scaling.shape) if need_scaling_grad else None
    return dx, dw_down, dw_up, ds
