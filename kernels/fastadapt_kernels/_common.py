"""Helpers every Triton kernel file shares: interpreter switches, dot precision, the dropout mask,
activations, dtype casts and the split-M weight-gradient kernel.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): triton's interpreter computes ``tl.dot`` on the
raw bit patterns of bf16 operands (triton-lang/triton#11584) and truncates fp32 → bf16 casts where
the GPU rounds to nearest even. Kernels take one ``INTERPRET`` constexpr (from :func:`interpreting`)
and route every dot through :func:`mma` and every low-precision store through :func:`to_dtype`,
which emulate the GPU numerics there (fp32 dot operands — products of bf16/fp16 values are exact
in fp32 — and round-to-nearest-even casts). The GPU code is unchanged by the flag.

Dropout mask: drawn once, in the forward, and stored packed — 1 bit per element of x, as int32
words ``bits (M, ceil(K/32))`` with bit ``j`` of word ``w`` = ``keep[m, 32w + j]`` — so every later
kernel reads 4 bytes per 32 elements instead of recomputing Philox. :func:`keep_bits` draws it with
one Philox-4x32-10 call per 8 elements (``tl.randint4x`` at counter ``m * ceil(K/8) + k // 8``,
int64, from the LOGICAL index: the mask does not depend on x's strides), each element taking 16 of
the call's 128 bits: ``keep = u16 >= round(p · 2¹⁶)``. So the realised dropout probability is
``p`` rounded to 1/65536 (:func:`dropout_threshold`), and kept values are scaled by exactly
``1 / (1 - threshold/65536)`` (:func:`keep_scale`): the expectation is exact. Why stored and 8 per
call: a Philox call is ~60 integer instructions; one call per element (the first design, regenerated
in three kernels) made the shrink kernel integer-bound at several times its memory time, while the
packed mask costs M·K/8 bytes written once and read twice (4 MiB per pass at 8192 × 4096).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

#: Constexpr ids of the activations (names as in transformers' ACT2FN; "gelu" is the exact erf form).
ACTIVATIONS: dict[str, int] = {"tanh": 0, "relu": 1, "gelu": 2, "silu": 3}
#: No activation (``weight_grad``'s B operand as it is).
NO_ACTIVATION = -1
#: Weight-gradient kernel: split M until about this many programs are in flight (≈ 2 waves on a
#: 132-SM H100). Shape-only, so a shape always sums in the same order on every device.
WGRAD_TARGET_PROGRAMS = 264
#: ... and not at all once the output tiles alone make about a wave (128 of 132 SMs).
WGRAD_WAVE_TILES = 128


# ----------------------------------------------------------------------------- host helpers


def interpreting() -> bool:
    """Kernels run in triton's interpreter (``TRITON_INTERPRET=1``; read when triton decorates them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input_precision: ``"ieee"`` in the interpreter and for fp32 operands when
    ``torch.backends.cuda.matmul.allow_tf32`` is False (the switch torch's own fp32 matmuls
    follow), ``"tf32"`` otherwise (triton's default; it only matters for fp32 operands)."""
    if interpreting() or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def alloc(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher writes comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (cuda:1 in a
    process whose current device is cuda:0 would otherwise run on the wrong GPU)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def pow2_block(n: int, *, cap: int, floor: int = 16) -> int:
    """A tile size for a dimension of ``n``: a power of two ≥ ``floor`` (``tl.dot`` needs ≥ 16),
    at most ``cap``; padded lanes are masked."""
    return max(floor, min(triton.next_power_of_2(max(n, 1)), cap))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: SMs of the GPU the offline report (``.ci/check_triton.py``, meta tensors) compiles for: an H100 SXM.
OFFLINE_SMS = 132


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM); ``OFFLINE_SMS`` for ``meta``
    tensors (the offline report); 2 in the interpreter."""
    if device.type == "meta":
        return OFFLINE_SMS
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_dropout(dropout_p: float, seed: int | torch.Tensor) -> None:
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed as a tensor must hold one int64, got {seed.dtype} of shape {tuple(seed.shape)}")
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or a one-element int64 tensor, got {seed!r}")


def seed_args(seed: int | torch.Tensor, like: torch.Tensor) -> tuple:
    """(seed as an int, seed pointer, SEED_FROM_PTR) for a kernel that draws the mask: a host int is
    passed by value; a one-element int64 tensor on ``like``'s device is read by the kernel (a CUDA
    graph replays the read, so each replay draws the mask its seed tensor holds then)."""
    if isinstance(seed, torch.Tensor):
        assert seed.device == like.device, f"seed tensor on {seed.device}, expected {like.device}"
        return 0, seed, True
    return int(seed), like, False


def check_activation(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def dropout_threshold(dropout_p: float) -> int:
    """The 16-bit threshold of a dropout probability: an element is kept when its uniform u16 ≥ it."""
    return min(int(round(float(dropout_p) * 65536)), 65535)


def keep_scale(dropout_p: float) -> float:
    """The inverted-dropout scale of kept values, 1/(1-p) for the realised p (a multiple of 1/65536)."""
    return 65536.0 / (65536 - dropout_threshold(dropout_p))


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _halves(u):
    """(low, high) 16-bit halves of uint32 random words."""
    return u & 0xFFFF, u >> 16


@triton.jit
def keep_bits(seed, offs_m, k0, K, threshold, BLOCK_K: tl.constexpr):
    """The dropout keep-mask of rows ``offs_m`` × columns ``k0 .. k0+BLOCK_K`` (``k0`` a multiple of
    32; columns ≥ K are dropped) and its packed words ``(BLOCK_M, BLOCK_K // 32)`` int32;
    ``threshold`` from :func:`dropout_threshold`."""
    offs_q = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = offs_m.to(tl.int64)[:, None] * ((K + 7) // 8) + offs_q.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    a0, b0 = _halves(r0.to(tl.uint32, bitcast=True))
    a1, b1 = _halves(r1.to(tl.uint32, bitcast=True))
    a2, b2 = _halves(r2.to(tl.uint32, bitcast=True))
    a3, b3 = _halves(r3.to(tl.uint32, bitcast=True))
    # (BLOCK_M, BLOCK_K // 8, 2, 2, 2): column 8q + 4i + 2j + k takes half k of word 2i + j
    u = tl.join(tl.join(tl.join(a0, b0), tl.join(a1, b1)), tl.join(tl.join(a2, b2), tl.join(a3, b3)))
    u = tl.reshape(u, (offs_m.shape[0], BLOCK_K))
    cols = k0 + tl.arange(0, BLOCK_K)
    keep = (u >= threshold) & (cols < K)[None, :]
    lanes = tl.reshape(keep.to(tl.int32), (offs_m.shape[0], BLOCK_K // 32, 32))
    words = tl.sum(lanes << tl.arange(0, 32)[None, None, :], axis=2)
    return keep, words


@triton.jit
def load_keep(bits_ptr, stride_bits_m, offs_m, mask_m, k0, K, BLOCK_K: tl.constexpr):
    """The stored keep-mask of rows ``offs_m`` × columns ``k0 .. k0+BLOCK_K`` (``k0`` a multiple of 32)."""
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits_m + offs_w[None, :],
                    mask=mask_m[:, None] & (offs_w < tl.cdiv(K, 32))[None, :], other=0)
    lanes = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(lanes, (offs_m.shape[0], BLOCK_K)) != 0


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation. INTERPRET: dot fp32 copies (see the module docstring)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def to_dtype(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) rounding to nearest even. INTERPRET and bf16: round the fp32 bits first, so the
    interpreter's truncating cast is exact (the GPU rounds to nearest even itself)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row-blocks share each column-block while it is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def activation(h, ACTIVATION: tl.constexpr):
    """act(h) for fp32 h; act(0) == 0 for all four, so masked (zero) lanes stay zero."""
    if ACTIVATION == 0:
        # tanh via exp(-2|h|): no overflow, and portable (no libdevice across triton versions).
        t = tl.exp(-2.0 * tl.abs(h))
        y = (1.0 - t) / (1.0 + t)
        y = tl.where(h < 0.0, -y, y)
    elif ACTIVATION == 1:
        y = tl.maximum(h, 0.0)
    elif ACTIVATION == 2:
        y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:
        y = h / (1.0 + tl.exp(-h))
    return y


@triton.jit
def activation_grad(h, ACTIVATION: tl.constexpr):
    """act'(h) for fp32 h (relu'(0) = 0, as torch)."""
    if ACTIVATION == 0:
        t = tl.exp(-2.0 * tl.abs(h))
        y = (1.0 - t) / (1.0 + t)
        d = 1.0 - y * y
    elif ACTIVATION == 1:
        d = tl.where(h > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        d = cdf + h * pdf
    else:
        sig = 1.0 / (1.0 + tl.exp(-h))
        d = sig * (1.0 + h * (1.0 - sig))
    return d


# ----------------------------------------------------------------------------- dropout mask


def bits_shape(M: int, K: int) -> tuple[int, int]:
    """Shape of the packed keep-mask of an (M, K) input: int32 words, 32 columns each."""
    return M, triton.cdiv(K, 32)


@triton.jit(do_not_specialize=["seed", "threshold"])  # one compile for every seed and p
def _dropout_bits_kernel(bits_ptr, M, K, threshold, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    _, words = keep_bits(seed, offs_m, k0, K, threshold, BLOCK_K)
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    n_words = tl.cdiv(K, 32)
    tl.store(bits_ptr + offs_m.to(tl.int64)[:, None] * n_words + offs_w[None, :], words,
             mask=(offs_m < M)[:, None] & (offs_w < n_words)[None, :])


def dropout_bits(
    seed: int | torch.Tensor, M: int, K: int, dropout_p: float, *, device: torch.device | str
) -> torch.Tensor:
    """The packed keep-mask (``bits_shape(M, K)`` int32) that a forward with ``(seed, dropout_p)``
    draws for an (M, K) input — what the shrink kernels store, from the same :func:`keep_bits`."""
    check_dropout(dropout_p, seed)
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else seed  # a reference: the host sync is fine
    if M < 0 or K < 0:
        raise ValueError(f"M and K must be ≥ 0, got M={M}, K={K}")
    bits = alloc(bits_shape(M, K), dtype=torch.int32, device=torch.device(device))
    if bits.numel():
        BLOCK_M, BLOCK_K = 32, 64
        with device_ctx(bits):
            _dropout_bits_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))](
                bits, M, K, dropout_threshold(dropout_p), seed, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return bits


def unpack_bits(bits: torch.Tensor, K: int) -> torch.Tensor:
    """(M, K) bool keep-mask from packed words (torch; for tests and references)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    lanes = (bits.unsqueeze(-1) >> shifts) & 1
    return lanes.reshape(bits.shape[0], -1)[:, :K].bool()


def dropout_mask(
    seed: int | torch.Tensor, M: int, K: int, dropout_p: float, *, device: torch.device | str
) -> torch.Tensor:
    """The keep-mask (M, K) bool, True = kept, of a forward with ``(seed, dropout_p)``."""
    if dropout_p == 0.0:
        check_dropout(dropout_p, seed)
        return torch.ones((M, K), dtype=torch.bool, device=torch.device(device))
    return unpack_bits(dropout_bits(seed, M, K, dropout_p, device=device), K)


# ----------------------------------------------------------------------------- partial sums


@triton.jit
def _sum_partials_kernel(a_ptr, a_out_ptr, n_a, parts_a, b_ptr, b_out_ptr, n_b, parts_b, BLOCK: tl.constexpr):
    # One launch sums one or two (parts, n) fp32 buffers over their first dimension, in a fixed
    # order (deterministic).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start < n_a:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in range(parts_a):
            acc += tl.load(a_ptr + p * n_a + offs, mask=offs < n_a, other=0.0)
        tl.store(a_out_ptr + offs, acc, mask=offs < n_a)
    if start < n_b:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for p in range(parts_b):
            acc += tl.load(b_ptr + p * n_b + offs, mask=offs < n_b, other=0.0)
        tl.store(b_out_ptr + offs, acc, mask=offs < n_b)


def sum_partials(*partials: torch.Tensor) -> list[torch.Tensor]:
    """``[p.sum(0) for p in partials]`` for contiguous fp32 partial buffers, summed in a fixed order,
    two per launch (a single part is returned as it is, without a launch)."""
    outs: list[torch.Tensor | None] = [p[0] if p.shape[0] == 1 else None for p in partials]
    todo = [i for i, p in enumerate(partials) if p.shape[0] > 1]
    for pair in (todo[i : i + 2] for i in range(0, len(todo), 2)):
        parts = [partials[i] for i in pair]
        for i, p in zip(pair, parts):
            assert p.is_contiguous() and p.dtype == torch.float32, "partials must be contiguous fp32"
            outs[i] = alloc(tuple(p.shape[1:]), dtype=torch.float32, device=p.device)
        a, b = parts[0], parts[-1]
        a_out, b_out = outs[pair[0]], outs[pair[-1]]
        n_a, n_b = a[0].numel(), (b[0].numel() if len(pair) == 2 else 0)
        BLOCK = 1024
        with device_ctx(a):
            _sum_partials_kernel[(triton.cdiv(max(n_a, n_b), BLOCK),)](
                a, a_out, n_a, a.shape[0], b, b_out, n_b, b.shape[0] if len(pair) == 2 else 0, BLOCK=BLOCK)
    return outs


# ----------------------------------------------------------------------------- weight gradients


@triton.jit
def _weight_grad_tile(
    a_ptr, b_ptr, c_ptr, scale_ptr, pid, split,
    M, I, J, rows_per_split,  # noqa: E741
    stride_am, stride_ai,
    stride_bm, stride_bj,
    stride_cs, stride_ci, stride_cj,
    bits_ptr, stride_bits_m,
    scale,
    B_ACTIVATION: tl.constexpr, B_DROPOUT: tl.constexpr, SCALE_PTR: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Output tile ``pid`` of C[split] (I, J) = scale · f(A)ᵀ g(B) over this split's rows of M, fp32
    (see weight_grad)."""
    num_j = tl.cdiv(J, BLOCK_J)
    pid_i = pid // num_j
    pid_j = pid % num_j
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = offs_i < I
    j_mask = offs_j < J
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        offs_m64 = offs_m.to(tl.int64)
        a = tl.load(a_ptr + offs_m64[None, :] * stride_am + offs_i[:, None] * stride_ai,
                    mask=i_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_m64[:, None] * stride_bm + offs_j[None, :] * stride_bj,
                    mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        if B_ACTIVATION >= 0:
            b = to_dtype(activation(b.to(tl.float32), B_ACTIVATION), a.dtype, INTERPRET)
        if B_DROPOUT:
            keep = load_keep(bits_ptr, stride_bits_m, offs_m, m_mask, pid_j * BLOCK_J, J, BLOCK_J)
            b = tl.where(keep, b, tl.zeros_like(b))
        if a.dtype != b.dtype:  # fp32 A (a reduction's output) against a low-precision B
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = mma(a, b, acc, DOT_PRECISION, INTERPRET)
    acc = acc * scale
    if SCALE_PTR:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    tl.store(c_ptr + split * stride_cs + offs_i[:, None] * stride_ci + offs_j[None, :] * stride_cj,
             acc, mask=i_mask[:, None] & j_mask[None, :])


@triton.jit
def _weight_grad_kernel(
    a1_ptr, b1_ptr, c1_ptr, scale1_ptr, I1, J1,
    stride_a1m, stride_a1i, stride_b1m, stride_b1j, stride_c1s, stride_c1i, stride_c1j,
    bits1_ptr, stride_bits1_m, scale1,
    a2_ptr, b2_ptr, c2_ptr, scale2_ptr, I2, J2,
    stride_a2m, stride_a2i, stride_b2m, stride_b2j, stride_c2s, stride_c2i, stride_c2j,
    bits2_ptr, stride_bits2_m, scale2,
    M, rows_per_split, tiles1,
    B1_ACTIVATION: tl.constexpr, B1_DROPOUT: tl.constexpr, SCALE1_PTR: tl.constexpr,
    B2_ACTIVATION: tl.constexpr, B2_DROPOUT: tl.constexpr, SCALE2_PTR: tl.constexpr,
    PAIR: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_I1: tl.constexpr, BLOCK_J1: tl.constexpr, BLOCK_I2: tl.constexpr, BLOCK_J2: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One weight gradient (see weight_grad), or two contracting over the same M in one launch
    (PAIR, see weight_grad_pair): programs [0, tiles1) take tiles of the first, the rest of the
    second. Without PAIR the second problem's arguments are dummies and compile to nothing."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if not PAIR or pid < tiles1:
        _weight_grad_tile(a1_ptr, b1_ptr, c1_ptr, scale1_ptr, pid, split, M, I1, J1, rows_per_split,
                          stride_a1m, stride_a1i, stride_b1m, stride_b1j, stride_c1s, stride_c1i, stride_c1j,
                          bits1_ptr, stride_bits1_m, scale1, B1_ACTIVATION, B1_DROPOUT, SCALE1_PTR,
                          DOT_PRECISION, INTERPRET, BLOCK_I1, BLOCK_J1, BLOCK_M)
    else:
        _weight_grad_tile(a2_ptr, b2_ptr, c2_ptr, scale2_ptr, pid - tiles1, split, M, I2, J2, rows_per_split,
                          stride_a2m, stride_a2i, stride_b2m, stride_b2j, stride_c2s, stride_c2i, stride_c2j,
                          bits2_ptr, stride_bits2_m, scale2, B2_ACTIVATION, B2_DROPOUT, SCALE2_PTR,
                          DOT_PRECISION, INTERPRET, BLOCK_I2, BLOCK_J2, BLOCK_M)


def _weight_grad_blocks(I: int, J: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:  # noqa: E741
    """(BLOCK_I, BLOCK_J, BLOCK_M, num_warps, num_stages): spill-free on sm_90 (offline compile);
    larger output tiles mean fewer re-reads of A and B. BLOCK_J ≥ 32: a whole word of the mask."""
    # fp32 without TF32 takes FMA-emulated dots: twice the threads to hold them (4 warps spill)
    big, cfg = (128, (32, 8, 3)) if dtype != torch.float32 else (64, (32, 8, 2))
    return pow2_block(I, cap=big), pow2_block(J, cap=big, floor=32), *cfg


def split_rows(M: int, block_m: int, tiles: int) -> tuple[int, int]:
    """``(splits, rows_per_split)`` for a reduction over M: split M (in whole ``block_m`` blocks,
    at least 4 blocks per split) only as far as the ``tiles`` output tiles need to fill the GPU —
    not at all once they make a wave (``WGRAD_WAVE_TILES``): splitting a full wave adds partial
    sums and buys no parallelism. Shape-only: a shape always sums in the same order, on every
    device (bitwise reproducible)."""
    if tiles >= WGRAD_WAVE_TILES:
        splits = 1
    else:
        splits = max(1, min(triton.cdiv(M, 4 * block_m), WGRAD_TARGET_PROGRAMS // max(tiles, 1)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return triton.cdiv(M, rows_per_split), rows_per_split


@dataclasses.dataclass(frozen=True)
class WeightGrad:
    """One weight gradient, fp32 ``scale · [scale_tensor] · aᵀ (mask ⊙ act(b))``: arguments as in
    :func:`weight_grad`."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float = 1.0
    scale_tensor: torch.Tensor | None = None
    b_activation: int = NO_ACTIVATION
    bits: torch.Tensor | None = None

    @property
    def low_dtype(self) -> torch.dtype:
        """The multiply dtype's low-precision side (an fp32 ``a`` against a 16-bit ``b``: ``b``'s)."""
        return self.b.dtype if self.a.dtype == torch.float32 else self.a.dtype

    def args(self, c: torch.Tensor) -> tuple:
        """Its part of ``_weight_grad_kernel``'s arguments, writing partials ``c``."""
        bits = self.bits if self.bits is not None else c
        return (self.a, self.b, c, self.scale_tensor if self.scale_tensor is not None else c,
                self.a.shape[1], self.b.shape[1],
                self.a.stride(0), self.a.stride(1), self.b.stride(0), self.b.stride(1),
                c.stride(0), c.stride(1), c.stride(2),
                bits, self.bits.stride(0) if self.bits is not None else 0, float(self.scale))

    def constexprs(self, n: int) -> dict:
        return {f"B{n}_ACTIVATION": self.b_activation, f"B{n}_DROPOUT": self.bits is not None,
                f"SCALE{n}_PTR": self.scale_tensor is not None}


def _weight_grads(problems: list[WeightGrad]) -> list[torch.Tensor]:
    """One launch of ``_weight_grad_kernel`` for one or two problems over the same M rows; split-M
    partials (when the tiles are fewer than a wave) summed in a fixed order by one more launch."""
    M = problems[0].a.shape[0]
    blocks = [_weight_grad_blocks(p.a.shape[1], p.b.shape[1], p.low_dtype) for p in problems]
    _, _, BLOCK_M, num_warps, num_stages = blocks[0]
    if interpreting():
        BLOCK_M, num_stages = 32, 1
    tiles = [triton.cdiv(p.a.shape[1], bi) * triton.cdiv(p.b.shape[1], bj) for p, (bi, bj, *_) in zip(problems, blocks)]
    splits, rows_per_split = split_rows(max(M, 1), BLOCK_M, sum(tiles))
    cs = [alloc((splits, p.a.shape[1], p.b.shape[1]), dtype=torch.float32, device=p.a.device) for p in problems]
    if M == 0 or sum(tiles) == 0:
        return [c.zero_()[0] for c in cs]
    pair = len(problems) == 2
    second = problems[-1]
    with device_ctx(problems[0].a):
        _weight_grad_kernel[(sum(tiles), splits)](
            *problems[0].args(cs[0]), *second.args(cs[-1]),
            M, rows_per_split, tiles[0],
            **problems[0].constexprs(1), **second.constexprs(2),
            PAIR=pair, DOT_PRECISION=dot_precision(problems[0].low_dtype), INTERPRET=interpreting(),
            BLOCK_I1=blocks[0][0], BLOCK_J1=blocks[0][1], BLOCK_I2=blocks[-1][0], BLOCK_J2=blocks[-1][1],
            BLOCK_M=BLOCK_M, num_warps=num_warps, num_stages=num_stages,
        )
    return sum_partials(*cs)


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scale: float = 1.0,
    scale_tensor: torch.Tensor | None = None,
    b_activation: int = NO_ACTIVATION,
    bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 (I, J) = scale · [scale_tensor] · aᵀ g(b), contracting over M = a.shape[0].

    ``g(b) = mask ⊙ act(b)`` with ``act`` the activation ``b_activation`` (``NO_ACTIVATION``: none)
    and ``mask`` b's stored keep-mask ``bits`` (``bits_shape(M, J)``; None: no dropout; the 1/(1-p)
    goes into ``scale`` at the caller). ``a`` (M, I) and ``b`` (M, J) may have different dtypes (an
    fp32 ``a``: both are then multiplied in fp32). Deterministic: M is split by :func:`split_rows`
    into private fp32 partials, summed in a fixed order.
    """
    if a.shape[1] == 0 or b.shape[1] == 0:
        return torch.zeros((a.shape[1], b.shape[1]), dtype=torch.float32, device=a.device)
    return _weight_grads([WeightGrad(a, b, scale, scale_tensor, b_activation, bits)])[0]


def weight_grad_pair(first: WeightGrad, second: WeightGrad) -> tuple[torch.Tensor, torch.Tensor]:
    """Two weight gradients over the same M rows (e.g. an adapter's down and up projections) in one
    launch — their tiles side by side in one grid, so together they fill the GPU where each alone
    would need split-M partials — with :func:`weight_grad`'s fp32 (I, J) results."""
    assert second.a.shape[0] == first.a.shape[0] and first.low_dtype == second.low_dtype, \
        "weight_grad_pair: both problems must have the same rows and dtype"
    first_grad, second_grad = _weight_grads([first, second])
    return first_grad, second_grad


# ----------------------------------------------------------------------------- casts


@triton.jit
def _cast_pair_kernel(a_ptr, a_out_ptr, a_cols, stride_a0, stride_a1, n_a,
                      b_ptr, b_out_ptr, b_cols, stride_b0, stride_b1, n_b,
                      INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    # Two 2-D tensors (any strides) to contiguous copies in the outputs' dtype, one launch.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start < n_a:
        v = tl.load(a_ptr + (offs // a_cols) * stride_a0 + (offs % a_cols) * stride_a1, mask=offs < n_a)
        tl.store(a_out_ptr + offs, to_dtype(v, a_out_ptr.dtype.element_ty, INTERPRET), mask=offs < n_a)
    if start < n_b:
        v = tl.load(b_ptr + (offs // b_cols) * stride_b0 + (offs % b_cols) * stride_b1, mask=offs < n_b)
        tl.store(b_out_ptr + offs, to_dtype(v, b_out_ptr.dtype.element_ty, INTERPRET), mask=offs < n_b)


def cast_pair(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``dtype`` copies of two 2-D tensors in one launch (rounding to nearest even, as
    ``Tensor.to``) — e.g. an adapter's two fp32 master weights, cast once per call instead of
    being converted in every program that reads them."""
    outs = tuple(alloc(tuple(t.shape), dtype=dtype, device=t.device) for t in (a, b))
    n = max(a.numel(), b.numel())
    if n:
        BLOCK = 1024
        with device_ctx(a):
            _cast_pair_kernel[(triton.cdiv(n, BLOCK),)](
                a, outs[0], max(a.shape[1], 1), a.stride(0), a.stride(1), a.numel(),
                b, outs[1], max(b.shape[1], 1), b.stride(0), b.stride(1), b.numel(),
                INTERPRET=interpreting(), BLOCK=BLOCK)
    return outs
