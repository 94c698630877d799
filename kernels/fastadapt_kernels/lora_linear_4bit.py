"""LoRA on a 4-bit frozen weight (bitsandbytes' NF4/FP4 layout): the frozen GEMM dequantizes the
weight's blocks while it loads them, and takes the rank term as extra reduction steps.

The weight W (N, K) is stored as bitsandbytes stores it: the row-major (N, K) values flattened,
each a 4-bit code, two per byte (element ``2i`` in the high nibble of byte ``i``), in blocks of
``BLOCKSIZE`` consecutive elements of the flat order; element ``f`` is ``code[q_f] · absmax[f //
BLOCKSIZE]`` (``code``: 16 fp32 values, NF4's or FP4's table). With double quantization
(``NESTED``) the block scales are themselves 8-bit: ``absmax[b] = code2[q2_b] · absmax2[b //
NESTED_BLOCKSIZE] + offset``. The product is formed in fp32 and rounded once to the compute dtype:
the values bitsandbytes' ``dequantize_4bit`` gives, then ``.to(compute dtype)``.

``lora_gemm_4bit`` (one launcher, two orientations; the op is ``fastadapt/ops/lora_linear_4bit.py``):

    forward   out = a · deq(W)ᵀ + scale · [mask ⊙] (s · bᵀ) (+ bias)       a = x (M, K), out (M, N)
    backward  out = a · deq(W)  + scale · [mask ⊙] (s · bᵀ)                a = dY (M, N), out (M, K)
                                                                          (s = dS, b = Aᵀ, the mask)

Both read a [BLOCK_N, BLOCK_K] tile of W (rows n, columns k); the forward multiplies by its
transpose. Loads: ``ALIGNED`` (K even, K a multiple of BLOCKSIZE, as every LLM layer): the tile's
bytes as a [BLOCK_N, BLOCK_K/2] block, contiguous along k, split into nibbles and interleaved
(``tl.interleave``), with one scale per row and BLOCKSIZE-wide part of the tile (one per row when
BLOCK_K ≤ BLOCKSIZE). Otherwise a gather per element (byte, nibble and block from the flat index):
any K, any BLOCKSIZE; the interpreter tests cover both.

The rest of the op (the shrink S, dS/dB over dY, dA) is LoRA's kernels (``lora_linear.py``):
nothing about them depends on how W is stored. Not timed on a GPU yet; the offline report
(``.ci/check_triton.py``) compiles it for sm_90a and ``bench/perf_model.py`` predicts it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import device_ctx, dot_precision, interpreting, load_keep, mma, pow2_block, swizzle, to_dtype
from .lora_linear import _bits_args, _rank_loop

__all__ = ["dequantize_4bit", "lora_gemm_4bit"]


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask,
                  NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scales of the blocks ``blocks`` (any shape): absmax[b], or with double quantization
    code2[q2_b] · absmax2[b // NESTED_BLOCKSIZE] + offset (bitsandbytes' order of operations)."""
    if NESTED:
        q2 = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(code2_ptr + q2, mask=mask, other=0.0)
        a2 = tl.load(absmax2_ptr + blocks // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scales = c2 * a2 + tl.load(offset_ptr)
    else:
        scales = tl.load(absmax_ptr + blocks, mask=mask, other=0.0).to(tl.float32)
    return scales  # one return: the compiler types every return of a function alike


@triton.jit
def _dequant_tile(
    packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    offs_n, k0, N, K,
    COMPUTE: tl.constexpr, ALIGNED: tl.constexpr, NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_K] dequantized, [BLOCK_N, BLOCK_K] in COMPUTE; zero outside W."""
    mask_n = offs_n < N
    row0 = offs_n.to(tl.int64) * K  # flat index of each row's first element
    if ALIGNED:
        # K even and a multiple of BLOCKSIZE: a row's bytes start on a byte and a block boundary
        HALF: tl.constexpr = BLOCK_K // 2
        offs_h = tl.arange(0, HALF)
        mask_h = (k0 + 2 * offs_h) < K
        m2 = mask_n[:, None] & mask_h[None, :]
        byte = tl.load(packed_ptr + (row0 // 2 + k0 // 2)[:, None] + offs_h[None, :], mask=m2, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 15))
        vals = tl.interleave(hi, lo)  # element 2i is the high nibble: [BLOCK_N, BLOCK_K]
        PARTS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
        offs_p = tl.arange(0, PARTS)
        blocks = ((row0 + k0) // BLOCKSIZE)[:, None] + offs_p[None, :]
        mask_p = mask_n[:, None] & ((k0 + offs_p * BLOCKSIZE) < K)[None, :]
        scales = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, mask_p, NESTED, NESTED_BLOCKSIZE)
        vals = tl.reshape(vals, (offs_n.shape[0], PARTS, BLOCK_K // PARTS)) * scales[:, :, None]
        vals = tl.reshape(vals, (offs_n.shape[0], BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k < K)[None, :]
        flat = row0[:, None] + offs_k.to(tl.int64)[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        q = (byte >> ((1 - (flat % 2)) * 4).to(tl.int32)) & 15
        scales = _block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                               NESTED, NESTED_BLOCKSIZE)
        vals = tl.where(mask, tl.load(code_ptr + q) * scales, 0.0)
    return to_dtype(vals, COMPUTE, INTERPRET)


@triton.jit
def _lora_gemm_4bit_kernel(
    a_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, s_ptr, b_ptr, bias_ptr, bits_ptr,
    out_ptr,
    M, N_OUT, RED, R, WN, WK,
    stride_am, stride_ak,
    stride_sm, stride_sr,
    stride_bn, stride_br,
    stride_om, stride_on,
    stride_bits_m,
    scale,
    TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SCALED: tl.constexpr,
    ALIGNED: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N_OUT] = a[M, RED] · op(deq(W)) + rank term. TRANS_W=0 (forward): op(W) = Wᵀ, RED = K,
    N_OUT = N; the W tile is rows = output columns, k = reduction. TRANS_W=1 (dX): op(W) = W,
    RED = N, N_OUT = K; rows = reduction, k = output columns. WN, WK: W's (N, K)."""
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N_OUT, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns
    offs_k = tl.arange(0, BLOCK_K)  # reduction
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    compute: tl.constexpr = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a_ptr + offs_m64[:, None] * stride_am + offs_k[None, :] * stride_ak
    for k0 in range(0, RED, BLOCK_K):
        mask_k = (k0 + offs_k) < RED
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if TRANS_W:
            # the tile W[k0 : k0+BLOCK_K, n-block]: W's rows are the reduction here
            w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                              k0 + offs_k, pid_n * BLOCK_N, WN, WK, compute, ALIGNED, NESTED, BLOCKSIZE,
                              NESTED_BLOCKSIZE, BLOCK_N, INTERPRET)
        else:
            w = tl.trans(_dequant_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                       offs_n, k0, WN, WK, compute, ALIGNED, NESTED, BLOCKSIZE,
                                       NESTED_BLOCKSIZE, BLOCK_K, INTERPRET))
        acc = mma(a, w, acc, DOT_PRECISION, INTERPRET)
        a_ptrs += BLOCK_K * stride_ak
    if HAS_MASK:
        # the mask is elementwise on the rank term alone: its own accumulator
        rank = _rank_loop(s_ptr, b_ptr, offs_m64, offs_n64, mask_m, mask_n, R, stride_sm, stride_sr,
                          stride_bn, stride_br, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), scale,
                          SCALED, DOT_PRECISION, INTERPRET, BLOCK_R)
        acc += tl.where(load_keep(bits_ptr, stride_bits_m, offs_m, mask_m, pid_n * BLOCK_N, N_OUT, BLOCK_N),
                        rank, 0.0)
    else:
        # no mask: the rank is R more reduction steps into the same accumulator
        acc = _rank_loop(s_ptr, b_ptr, offs_m64, offs_n64, mask_m, mask_n, R, stride_sm, stride_sr,
                         stride_bn, stride_br, acc, scale, SCALED, DOT_PRECISION, INTERPRET, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n64[None, :] * stride_on
    tl.store(out_ptrs, to_dtype(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_n[None, :])


def gemm_4bit_config(M: int, *, trans_w: bool) -> dict:
    """Tiles of ``lora_gemm_4bit`` for an M-row problem (the offline report compiles these).

    Decode sizes (M ≤ 16): a 16-row tile (``mma.sync``; a 64-row wgmma tile would be 3/4 padding)
    and narrow 64-column output blocks, so that a 4096-wide layer gives 64 programs each streaming
    its own slice of the 4-bit weight. Larger M: 128×128 with a 64-deep reduction step — one
    BLOCKSIZE-64 scale per tile row — each weight tile dequantized once per 128-row block of M."""
    if M <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128 if not trans_w else 64, "GROUP_M": 1,
                "num_warps": 4, "num_stages": 4}
    if M <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


# Interpreter: small tiles, several steps and blocks at the test shapes (K/N ~ 40-200).
_INTERP_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}


def lora_gemm_4bit(
    a: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    s: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    shape: tuple[int, int],
    blocksize: int,
    trans_w: bool = False,
    nested: tuple[torch.Tensor, torch.Tensor, float, int] | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """out = a · deq(W)ᵀ (``trans_w=False``) or a · deq(W) (``trans_w=True``)
    + scale · [mask ⊙] (s · lora_bᵀ) (+ bias), fp32 accumulation, one rounding to a's dtype.

    Args:
        a: (M, K) (forward) or (M, N) (``trans_w``), bf16/fp16/fp32, any strides: the compute dtype.
        packed: uint8, ⌈N·K/2⌉ bytes (any shape, contiguous); code: (16,) fp32; absmax: (⌈N·K /
            blocksize⌉,) fp32, or uint8 with ``nested = (absmax2 fp32, code2 (256,) fp32, offset,
            nested_blocksize)``. shape: W's (N, K). blocksize: elements per scale.
        s: (M, R); lora_b: (N_out, R) (forward: B; backward: Aᵀ, a view is fine).
        scale: on the rank term; bias: optional (N_out,) contiguous; bits: the packed keep-mask of an
            (M, N_out) input, applied to the rank term. config: tiles (default ``gemm_4bit_config``).
    Returns:
        out: (M, N) or (M, K), contiguous, a's dtype.
    """
    n, k = shape
    M, red = a.shape
    n_out = k if trans_w else n
    assert red == (n if trans_w else k), f"a has {red} columns; W is {tuple(shape)}, trans_w={trans_w}"
    R = s.shape[1]
    assert s.shape[0] == M and tuple(lora_b.shape) == (n_out, R), (
        f"shape mismatch: s {tuple(s.shape)}, lora_b {tuple(lora_b.shape)}, out ({M}, {n_out})")
    assert packed.dtype == torch.uint8 and packed.is_contiguous() and packed.numel() == (n * k + 1) // 2
    assert code.dtype == torch.float32 and code.numel() == 16
    n_blocks = triton.cdiv(n * k, blocksize)
    assert absmax.numel() == n_blocks and absmax.dtype == (torch.uint8 if nested is not None else torch.float32)
    if bias is not None:
        assert bias.dim() == 1 and bias.shape[0] == n_out and bias.stride(0) == 1, "bias must be contiguous (N_out,)"
    out = _common.alloc((M, n_out), dtype=a.dtype, device=a.device)
    if M == 0 or n_out == 0:
        return out
    absmax2, code2, offset, nested_blocksize = nested if nested is not None else (absmax, code, code, 256)
    cfg = dict(config or (_INTERP_META if interpreting() else gemm_4bit_config(M, trans_w=trans_w)))
    launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
    aligned = k % 2 == 0 and k % blocksize == 0
    bits_ptr, stride_bits = _bits_args(bits, out)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    with device_ctx(a):
        _lora_gemm_4bit_kernel[grid](
            a, packed, code, absmax, absmax2, code2, offset, s, lora_b, bias if bias is not None else out, bits_ptr,
            out,
            M, n_out, red, R, n, k,
            a.stride(0), a.stride(1),
            s.stride(0), s.stride(1),
            lora_b.stride(0), lora_b.stride(1),
            out.stride(0), out.stride(1),
            stride_bits,
            float(scale),
            TRANS_W=trans_w, HAS_BIAS=bias is not None, HAS_MASK=bits is not None, SCALED=scale != 1.0,
            ALIGNED=aligned, NESTED=nested is not None, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize,
            DOT_PRECISION=dot_precision(a.dtype), INTERPRET=interpreting(), BLOCK_R=pow2_block(R, cap=64),
            **cfg, **launch,
        )
    return out


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N, K,
    ALIGNED: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _dequant_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, N, K,
                      out_ptr.dtype.element_ty, ALIGNED, NESTED, BLOCKSIZE, NESTED_BLOCKSIZE, BLOCK_K, INTERPRET)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], w,
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


def dequantize_4bit(
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    *,
    shape: tuple[int, int],
    blocksize: int,
    dtype: torch.dtype,
    nested: tuple[torch.Tensor, torch.Tensor, float, int] | None = None,
) -> torch.Tensor:
    """deq(W) (N, K) contiguous in ``dtype`` (arguments as ``lora_gemm_4bit``): the same tile
    loads as the GEMM, written out. What a dequantize-then-cuBLAS path runs at large M."""
    n, k = shape
    out = _common.alloc((n, k), dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    absmax2, code2, offset, nested_blocksize = nested if nested is not None else (absmax, code, code, 256)
    block_n, block_k = (16, 32) if interpreting() else (32, 256)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    with device_ctx(packed):
        _dequantize_4bit_kernel[grid](
            packed, code, absmax, absmax2, code2, offset, out, n, k,
            ALIGNED=k % 2 == 0 and k % blocksize == 0, NESTED=nested is not None, BLOCKSIZE=blocksize,
            NESTED_BLOCKSIZE=nested_blocksize, INTERPRET=interpreting(), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4,
        )
    return out
