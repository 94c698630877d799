"""Segmented adapter kernels (Triton): one batch whose tokens use different adapters.

The op (``fastadapt/ops/lora_mixed.py``) computes, for every token ``m`` whose adapter has slot ``i``
in a bank (``down`` (R, K) and ``up`` (R, N), slot ``i`` owning rows ``offsets[i] ..`` of which it
uses ``ranks[i]``)::

    S[m, :r_i] = act(x[m] down[off_i : off_i + r_i]ᵀ)            shrink
    out[m]    += s_i · S[m, :r_i] up[off_i : off_i + r_i]         expand (LoRA, parallel, series)
    out[m]     = g_i ⊙ (out[m] + s_i · S[m] up) (+ bias)          expand, DoRA (out holds x Wᵀ)

``act`` is the identity (LoRA, DoRA) or a bottleneck activation. Two forms of each kernel:

- **segmented** (many tokens per adapter; Punica's SGMV): tokens are grouped by slot through an
  index (``order``, no copy of x) and a block table ``blocks`` (nb, 3) int32 of ``(slot, start,
  end)`` into it, no block spanning two slots; a program takes one block of ``BLOCK_M`` tokens and
  runs ``tl.dot`` over its slot's rows;
- **decode** (one adapter id per token; Punica's BGMV): a program per token reads its slot from
  ``token_slot`` (-1: none, the program returns) and reduces with vector products — no sort.

No padding to the largest rank in the math: a program's rank loop stops at its own slot's rank, and
a shrink program whose rank block starts past it returns at once (rank blocks are sized by the
largest rank *used*; a slot of rank 8 next to one of rank 64 runs one block, not eight). The scaling
is applied in fp32 in the expand's epilogue (never rounded to 16 bits); S is stored in the compute
dtype, as in the single-adapter kernels. fp32 accumulation; an ``INTERPRET`` constexpr routes dots
and stores through ``_common`` (GPU numerics in the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import activation, device_ctx, dot_precision, interpreting, mma, pow2_block, to_dtype

__all__ = ["mixed_expand", "mixed_shrink", "segment_blocks"]

#: No activation (LoRA, DoRA): the shrink's S is the product itself.
IDENTITY = -1


def segment_blocks(groups: list[tuple[int, int]], block_m: int) -> list[tuple[int, int, int]]:
    """The block table of tokens grouped by slot: ``groups`` = [(slot, count)] in the order their
    tokens appear in ``order``; each group is cut into blocks of at most ``block_m`` tokens."""
    blocks, start = [], 0
    for slot, count in groups:
        for b0 in range(start, start + count, block_m):
            blocks.append((slot, b0, min(b0 + block_m, start + count)))
        start += count
    return blocks


# ----------------------------------------------------------------------------------------------
# shrink: S = act(x downᵀ), the slot's own rank
# ----------------------------------------------------------------------------------------------


@triton.jit
def _shrink_segmented_kernel(
    x_ptr, down_ptr, s_ptr, order_ptr, blocks_ptr, offsets_ptr, ranks_ptr,
    K, stride_xm, stride_xk, stride_dr, stride_dk, stride_sm, stride_sr,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    blk = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    slot = tl.load(blocks_ptr + blk * 3)
    rank = tl.load(ranks_ptr + slot)
    if r0 < rank:  # rank blocks past this slot's rank do no work
        start = tl.load(blocks_ptr + blk * 3 + 1)
        end = tl.load(blocks_ptr + blk * 3 + 2)
        off = tl.load(offsets_ptr + slot)
        idx = start + tl.arange(0, BLOCK_M)
        mask_m = idx < end
        rows = tl.load(order_ptr + idx, mask=mask_m, other=0).to(tl.int64)
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        drow = (off + rr).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            d = tl.load(down_ptr + drow[None, :] * stride_dr + kk[:, None] * stride_dk,
                        mask=mask_r[None, :] & mask_k[:, None], other=0.0)
            acc = mma(x, to_dtype(d, x.dtype, INTERPRET), acc, DOT_PRECISION, INTERPRET)
        if ACTIVATION >= 0:
            acc = activation(acc, ACTIVATION)
        tl.store(s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr,
                 to_dtype(acc, s_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _shrink_decode_kernel(
    x_ptr, down_ptr, s_ptr, token_slot_ptr, offsets_ptr, ranks_ptr,
    K, stride_xm, stride_xk, stride_dr, stride_dk, stride_sm, stride_sr,
    ACTIVATION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    r0 = tl.program_id(1) * BLOCK_R
    slot = tl.load(token_slot_ptr + m)
    if slot >= 0:
        rank = tl.load(ranks_ptr + slot)
        if r0 < rank:
            off = tl.load(offsets_ptr + slot)
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < rank
            drow = (off + rr).to(tl.int64)
            acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mask_k = kk < K
                x = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=mask_k, other=0.0)
                d = tl.load(down_ptr + drow[:, None] * stride_dr + kk[None, :] * stride_dk,
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                # products of x's dtype rounded as a dot would take them, summed in fp32
                xd = to_dtype(d, x.dtype, INTERPRET).to(tl.float32) * x.to(tl.float32)[None, :]
                acc += tl.sum(xd, axis=1)
            if ACTIVATION >= 0:
                acc = activation(acc, ACTIVATION)
            tl.store(s_ptr + m * stride_sm + rr * stride_sr, to_dtype(acc, s_ptr.dtype.element_ty, INTERPRET),
                     mask=mask_r)


# ----------------------------------------------------------------------------------------------
# expand: out += s · S up (DoRA: out = g ⊙ (out + s · S up) + bias)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _epilogue(acc, out_ptrs, mask, slot, offs_n, mask_n, scalings_ptr, g_ptr, bias_ptr, stride_gn_slot,
              DORA: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """out = out + s·acc, or DoRA's g ⊙ (out + s·acc) (+ bias); formed in fp32, rounded once."""
    scale = tl.load(scalings_ptr + slot).to(tl.float32)
    z = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scale
    if DORA:
        g = tl.load(g_ptr + slot.to(tl.int64) * stride_gn_slot + offs_n, mask=mask_n, other=1.0).to(tl.float32)
        z = z * g
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptrs, to_dtype(z, out_ptrs.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _expand_segmented_kernel(
    s_ptr, up_ptr, out_ptr, order_ptr, blocks_ptr, offsets_ptr, ranks_ptr, scalings_ptr, g_ptr, bias_ptr,
    N, stride_sm, stride_sr, stride_ur, stride_un, stride_om, stride_on, stride_g,
    DORA: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    blk = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(blocks_ptr + blk * 3)
    start = tl.load(blocks_ptr + blk * 3 + 1)
    end = tl.load(blocks_ptr + blk * 3 + 2)
    rank = tl.load(ranks_ptr + slot)
    off = tl.load(offsets_ptr + slot)
    idx = start + tl.arange(0, BLOCK_M)
    mask_m = idx < end
    rows = tl.load(order_ptr + idx, mask=mask_m, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # the slot's own rank only
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < rank
        s = tl.load(s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        u = tl.load(up_ptr + (off + rr).to(tl.int64)[:, None] * stride_ur + offs_n[None, :] * stride_un,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = mma(s, to_dtype(u, s.dtype, INTERPRET), acc, DOT_PRECISION, INTERPRET)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    _epilogue(acc, out_ptrs, mask_m[:, None] & mask_n[None, :], slot, offs_n, mask_n, scalings_ptr, g_ptr, bias_ptr,
              stride_g, DORA, HAS_BIAS, INTERPRET)


@triton.jit
def _expand_decode_kernel(
    s_ptr, up_ptr, out_ptr, token_slot_ptr, offsets_ptr, ranks_ptr, scalings_ptr, g_ptr, bias_ptr,
    N, stride_sm, stride_sr, stride_ur, stride_un, stride_om, stride_on, stride_g,
    DORA: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(token_slot_ptr + m)
    if slot >= 0:
        rank = tl.load(ranks_ptr + slot)
        off = tl.load(offsets_ptr + slot)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < rank
            s = tl.load(s_ptr + m * stride_sm + rr * stride_sr, mask=mask_r, other=0.0)
            u = tl.load(up_ptr + (off + rr).to(tl.int64)[:, None] * stride_ur + offs_n[None, :] * stride_un,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc += tl.sum(s.to(tl.float32)[:, None] * to_dtype(u, s.dtype, INTERPRET).to(tl.float32), axis=0)
        out_ptrs = out_ptr + m * stride_om + offs_n.to(tl.int64) * stride_on
        _epilogue(acc, out_ptrs, mask_n, slot, offs_n, mask_n, scalings_ptr, g_ptr, bias_ptr, stride_g, DORA,
                  HAS_BIAS, INTERPRET)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

#: Tokens per program of the segmented kernels: one MMA tile of rows. Decode-sized segments (a few
#: tokens per adapter) waste rows of it, which is why decode takes the per-token form.
SEGMENT_BLOCK_M = 16 if interpreting() else 64


def _int32(values, device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32).to(device)


def mixed_shrink(
    x: torch.Tensor,
    down: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    *,
    max_rank: int,
    order: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
    token_slot: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """S (M, max_rank) in x's dtype: ``S[m, :r] = act(x[m] down[off : off + r]ᵀ)`` for every token
    with a slot (other rows and columns past a token's rank are not written).

    Args:
        x: (M, K), any strides. down: (R, K) bank rows. offsets, ranks: (n,) int32 per slot.
        max_rank: the largest rank among the slots used (sizes S and the rank grid).
        order, blocks: the segmented form (tokens grouped by slot, ``segment_blocks``), or
        token_slot: (M,) int32, -1 for none: the decode form.
        activation: None, or a bottleneck activation (tanh, relu, gelu, silu).
    """
    M, K = x.shape
    s = _common.alloc((M, max(max_rank, 1)), dtype=x.dtype, device=x.device)
    act = IDENTITY if activation is None else _common.check_activation(activation)
    BLOCK_R = pow2_block(max_rank, cap=64)
    BLOCK_K = 32 if interpreting() else 128
    if M == 0 or max_rank == 0 or K == 0:
        return s
    with device_ctx(x):
        if token_slot is not None:
            _shrink_decode_kernel[(M, triton.cdiv(max_rank, BLOCK_R))](
                x, down, s, token_slot, offsets, ranks, K, x.stride(0), x.stride(1), down.stride(0), down.stride(1),
                s.stride(0), s.stride(1), ACTIVATION=act, INTERPRET=interpreting(), BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
                num_warps=4)
        elif blocks.shape[0]:
            _shrink_segmented_kernel[(blocks.shape[0], triton.cdiv(max_rank, BLOCK_R))](
                x, down, s, order, blocks, offsets, ranks, K, x.stride(0), x.stride(1), down.stride(0),
                down.stride(1), s.stride(0), s.stride(1), ACTIVATION=act, DOT_PRECISION=dot_precision(x.dtype),
                INTERPRET=interpreting(), BLOCK_M=SEGMENT_BLOCK_M, BLOCK_K=32 if interpreting() else 64,
                BLOCK_R=BLOCK_R, num_warps=4, num_stages=1 if interpreting() else 3)
    return s


def mixed_expand(
    s: torch.Tensor,
    up: torch.Tensor,
    out: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    *,
    order: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
    token_slot: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place on ``out`` (M, N) for every token with a slot: ``out[m] += s_i · S[m, :r] up[off :
    off + r]``, or with ``g`` (n, N) fp32 DoRA's ``g_i ⊙ (out[m] + s_i · S[m] up) (+ bias)`` (``out``
    then holds x Wᵀ without bias). ``scalings`` (n,) fp32. Forms as in :func:`mixed_shrink`."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    BLOCK_R = 16 if interpreting() else 32
    dora = g is not None
    g_arg = g if dora else scalings
    bias_arg = bias if bias is not None else scalings
    with device_ctx(out):
        if token_slot is not None:
            BLOCK_N = 64 if interpreting() else 128
            _expand_decode_kernel[(M, triton.cdiv(N, BLOCK_N))](
                s, up, out, token_slot, offsets, ranks, scalings, g_arg, bias_arg, N, s.stride(0), s.stride(1),
                up.stride(0), up.stride(1), out.stride(0), out.stride(1), g.stride(0) if dora else 0,
                DORA=dora, HAS_BIAS=bias is not None, INTERPRET=interpreting(), BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
                num_warps=4)
        elif blocks.shape[0]:
            BLOCK_N = 32 if interpreting() else 128
            _expand_segmented_kernel[(blocks.shape[0], triton.cdiv(N, BLOCK_N))](
                s, up, out, order, blocks, offsets, ranks, scalings, g_arg, bias_arg, N, s.stride(0), s.stride(1),
                up.stride(0), up.stride(1), out.stride(0), out.stride(1), g.stride(0) if dora else 0,
                DORA=dora, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(s.dtype),
                INTERPRET=interpreting(), BLOCK_M=SEGMENT_BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, num_warps=4,
                num_stages=1 if interpreting() else 2)
    return out
