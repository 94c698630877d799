"""``fa.ops.lora_linear_4bit``: LoRA on a 4-bit frozen weight (QLoRA), with backend dispatch.

The frozen weight is bitsandbytes' 4-bit blockwise format (NF4 or FP4, with or without double
quantization), described by :class:`Weight4bit` (plain tensors: this layer never imports
bitsandbytes; ``fastadapt/modules/quantized.py`` builds it from a ``Linear4bit``)::

    y = (x_c deq(W)ᵀ + bias)  +  scaling · (dropout(x) Aᵀ) Bᵀ        x_c: x in the compute dtype

deq(W) = code[q] · absmax[block] (fp32, rounded once to the compute dtype) — bitsandbytes'
``dequantize_4bit`` values. The frozen product is formed in the layer's compute dtype and returned
in x's dtype, as ``Linear4bit`` does; the rank term is formed in x's dtype (A, B cast to it).

**torch backend** (the CPU path, the oracle): the frozen product is a lean autograd function that
saves only the packed weight (never an N×K dequantized copy) and dequantizes it again for dX, as
bitsandbytes' ``MatMul4Bit`` does; the rank term is ``torch_backend.lora_rank`` (x, S and the
dropout mask at 1 bit per element kept; no dropped copy of x, no byte mask), or plain autograd
with ``backend="reference"``.

**Triton backend** (custom ops ``fastadapt::lora_linear_4bit_fwd/_bwd``, fakes and autograd beside
them, so ``torch.compile(fullgraph=True)`` sees no graph break): everything in the compute dtype::

    forward   S, mask = shrink(X)                       LoRA's lora_shrink (one pass over X)
              Y = X deq(W)ᵀ + S Bᵀ (+ bias)             VARIANT (below)
    backward  dS, dB = dy pass                          LoRA's lora_dy_pass
              dX = dY deq(W) + mask ⊙ (s · dS A)        VARIANT, the same dequantizing load
              dA = s · dSᵀ (mask ⊙ X)                   LoRA's lora_grad_a

VARIANTS: ``"fused"`` — one Triton GEMM that dequantizes W's tiles as it loads them, the rank term
as extra reduction steps (``kernels/fastadapt_kernels/lora_linear_4bit.py``): the 4-bit weight is
read once per M-block, the dequantized copy never exists; the decode-size path. ``"dequantize"`` —
W dequantized into a temporary by one kernel, then LoRA's cuBLAS ``addmm`` variant: the
dequantization is paid once per call instead of once per M-block, and the GEMM is cuBLAS's; the
large-M path. Until a GPU record says otherwise, ``fused`` up to :data:`FUSED_MAX_ROWS` rows (the
offline report's predicted crossover, ``bench/NOTES.md``), ``dequantize`` above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _checks
from . import torch_backend, verification
from ._inputs import check_dropout_p, check_tensors, draw_kernel_seed
from ._library import SEEDED, custom_op, register_autograd
from .dispatch import TORCH_BACKENDS, register_op, resolve_backend, triton_usable
from .lora_linear import frozen_plus_rank, keep_scale

__all__ = ["Weight4bit", "dequantize_4bit", "frozen_4bit_linear", "lora_linear_4bit", "rank_term"]

VARIANTS = ("fused", "dequantize")
#: Rows up to which the fused dequantizing GEMM is used; above, dequantize + cuBLAS (a prediction:
#: bench/perf_model.py; a GPU verification record's ``variant`` replaces it).
FUSED_MAX_ROWS = 256
#: bitsandbytes' block sizes
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_AVAILABLE = {"triton": triton_usable}
register_op("lora_linear_4bit", _AVAILABLE)


@dataclass(frozen=True, eq=False)
class Weight4bit:
    """A frozen (N, K) weight in bitsandbytes' 4-bit blockwise layout.

    ``packed``: uint8, ⌈N·K/2⌉ codes two per byte (row-major element ``2i`` in the high nibble);
    ``code``: (16,) fp32 values (NF4's or FP4's table); ``absmax``: one fp32 scale per
    ``blocksize`` consecutive elements — or, double-quantized, uint8 codes with ``nested_absmax``
    (fp32, one per ``nested_blocksize`` blocks), ``nested_code`` (256,) fp32 and ``nested_offset``
    (a 0-d fp32 tensor): scale = nested_code[q] · nested_absmax[b // nested_blocksize] + offset.
    ``compute_dtype``: the dtype the frozen product is formed in (None: x's dtype)."""

    packed: torch.Tensor
    code: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    blocksize: int
    compute_dtype: torch.dtype | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n * k + 1) // 2:
            raise ValueError(f"packed must hold ⌈N·K/2⌉ = {(n * k + 1) // 2} uint8 bytes for a {n}x{k} weight, got "
                             f"{self.packed.numel()} {self.packed.dtype}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"code must be 16 fp32 values, got {self.code.numel()} {self.code.dtype}")
        _checks.one_of("blocksize", self.blocksize, BLOCKSIZES)
        blocks = -(-n * k // self.blocksize)
        want = torch.uint8 if self.nested else torch.float32
        if self.absmax.numel() != blocks or self.absmax.dtype != want:
            raise ValueError(f"absmax must hold {blocks} {want} scales (one per {self.blocksize} elements), got "
                             f"{self.absmax.numel()} {self.absmax.dtype}")
        if self.nested and (self.nested_code is None or self.nested_offset is None
                            or self.nested_absmax.numel() != -(-blocks // self.nested_blocksize)):
            raise ValueError("a double-quantized weight needs nested_code, nested_offset and one nested_absmax per "
                             f"{self.nested_blocksize} blocks")

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor, in a fixed order (for ``save_for_backward`` and custom ops)."""
        empty = self.absmax.new_empty(0, dtype=torch.float32)
        return (self.packed, self.code, self.absmax, *(empty if t is None else t.reshape(-1)
                for t in (self.nested_absmax, self.nested_code, self.nested_offset)))

    def kernel_args(self) -> dict:
        """Keyword arguments of the Triton launchers."""
        nested = (self.nested_absmax, self.nested_code, self.nested_offset.reshape(1), self.nested_blocksize) \
            if self.nested else None
        return {"shape": tuple(self.shape), "blocksize": self.blocksize, "nested": nested}

    @torch.no_grad()
    def scales(self) -> torch.Tensor:
        """One fp32 scale per block (bitsandbytes' order: code2[q]·absmax2, then + offset)."""
        if not self.nested:
            return self.absmax.reshape(-1)
        q = self.absmax.reshape(-1).long()
        outer = self.nested_absmax.reshape(-1).repeat_interleave(self.nested_blocksize)[: q.numel()]
        return self.nested_code[q] * outer + self.nested_offset

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """deq(W) (N, K) in ``dtype``: ``code[q] · scale`` in fp32, rounded once (what bitsandbytes'
        ``dequantize_4bit`` computes). One gather per byte from a 256-entry table of value pairs."""
        n, k = self.shape
        numel = n * k
        pairs = torch.stack((self.code.repeat_interleave(16), self.code.repeat(16)), dim=1)  # byte -> (hi, lo)
        vals = pairs[self.packed.reshape(-1).int()].reshape(-1)[:numel]
        scales = self.scales()
        full = numel - numel % self.blocksize
        head = vals[:full].view(-1, self.blocksize)
        head.mul_(scales[: head.shape[0], None])
        if full < numel:
            vals[full:].mul_(scales[-1])
        return vals.reshape(n, k).to(dtype)


def dequantize_4bit(weight: Weight4bit, dtype: torch.dtype = torch.float32, *, backend: str = "auto") -> torch.Tensor:
    """deq(W) (N, K) in ``dtype``, no gradient: torch, or the Triton kernel (one pass)."""
    if resolve_backend("lora_linear_4bit", backend, weight.packed.device, available=_AVAILABLE) == "triton":
        return _kernels().dequantize_4bit(weight.packed.reshape(-1), weight.code, weight.absmax.reshape(-1),
                                          dtype=dtype, **weight.kernel_args())
    return weight.dequantize(dtype)


def _compute_dtype(weight: Weight4bit, x: torch.Tensor) -> torch.dtype:
    return weight.compute_dtype or x.dtype


class _Frozen4bitLinear(torch.autograd.Function):
    """x deq(W)ᵀ + bias, saving the packed weight only (dX dequantizes it again)."""

    @staticmethod
    def forward(ctx, x, bias, shape, blocksize, nested_blocksize, *tensors):
        ctx.meta = (shape, blocksize, nested_blocksize)
        ctx.save_for_backward(*tensors)
        return F.linear(x, _rebuild(*tensors, *ctx.meta).dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        weight = _rebuild(*ctx.saved_tensors, *ctx.meta)
        need_x, need_bias = ctx.needs_input_grad[:2]
        dx = dy @ weight.dequantize(dy.dtype) if need_x else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if need_bias else None
        return (dx, dbias, None, None, None, *([None] * len(ctx.saved_tensors)))


def frozen_4bit_linear(x: torch.Tensor, weight: Weight4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x deq(W)ᵀ + bias`` formed in the compute dtype and returned in x's dtype (``Linear4bit``'s
    forward), differentiable in x (and bias), keeping no dequantized copy for backward."""
    dtype = _compute_dtype(weight, x)
    xc = x if x.dtype == dtype else x.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return _Frozen4bitLinear.apply(xc, b, tuple(weight.shape), weight.blocksize, weight.nested_blocksize,
                                   *weight.tensors()).to(x.dtype)


def rank_term(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *, scaling: float,
              dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """``scaling · (dropout(x) Aᵀ) Bᵀ`` in x's dtype (A, B cast to it): the LoRA term beside a frozen
    product computed elsewhere (a quantized base's own forward). Torch operations only: the lean
    torch backend's (``torch_backend.lora_rank``: x, S and a 1-bit mask kept, no dropped copy of x)
    or, with ``backend="reference"``, plain autograd (what PEFT keeps)."""
    if resolve_backend("lora_rank", backend, x.device, available={}) == "torch":
        return torch_backend.lora_rank(x, lora_a, lora_b, scaling=scaling, dropout_p=dropout_p)
    h = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    return F.linear(F.linear(h, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling


def lora_linear_4bit_ref(x: torch.Tensor, weight: Weight4bit, lora_a: torch.Tensor, lora_b: torch.Tensor, *,
                         scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                         backend: str = "torch") -> torch.Tensor:
    """The torch twin of :func:`lora_linear_4bit` (same signature; ``backend``: "torch", the lean
    rank term, or "reference", plain autograd)."""
    return frozen_4bit_linear(x, weight, bias) + rank_term(x, lora_a, lora_b, scaling=scaling, dropout_p=dropout_p,
                                                           backend=backend)


def lora_linear_4bit(
    x: torch.Tensor,
    weight: Weight4bit,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """QLoRA: ``y = x deq(W)ᵀ (+ bias) + scaling · (dropout(x) Aᵀ) Bᵀ`` (see the module docstring).

    Shapes: x (..., K); weight a :class:`Weight4bit` of shape (N, K); lora_a (r, K); lora_b (N, r);
    bias (N,) or None. Returns (..., N) in x's dtype. Differentiable in x, lora_a, lora_b (the
    4-bit weight is frozen). ``backend``: "auto" | "torch" | "triton" | "reference"."""
    _validate(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    rows = x.numel() // max(x.shape[-1], 1)
    chosen = resolve_backend("lora_linear_4bit", backend, x.device, available=_AVAILABLE, rows=rows)
    if chosen in TORCH_BACKENDS:
        return lora_linear_4bit_ref(x, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p,
                                    backend=chosen)
    dtype = _compute_dtype(weight, x)
    lead = x.shape[:-1]
    xc = x.reshape(-1, x.shape[-1]).to(dtype)
    packed, code, absmax, a2, c2, off = weight.tensors()
    y, _, _ = lora_linear_4bit_fwd(xc, packed, code, absmax, a2, c2, off, lora_a, lora_b,
                                   None if bias is None else bias.to(dtype), list(weight.shape), weight.blocksize,
                                   weight.nested_blocksize, float(scaling), float(dropout_p))
    return y.reshape(*lead, weight.shape[0]).to(x.dtype)


def selected_variant(m: int, device: torch.device) -> str:
    """``fused`` or ``dequantize`` for an M-row problem: a GPU record's choice, else by rows."""
    verdict = verification.find("lora_linear_4bit", "triton", device, m)
    variant = verdict.record.get("variant") if verdict.verified and verdict.record else None
    if variant in VARIANTS:
        return variant
    return "fused" if m <= FUSED_MAX_ROWS else "dequantize"


def _kernels():
    from fastadapt.kernels import lora_linear_4bit as kernels  # imported late: TRITON_INTERPRET is read then

    return kernels


def _lora_kernels():
    from fastadapt.kernels import lora_linear as kernels

    return kernels


def _rebuild(packed, code, absmax, a2, c2, off, shape, blocksize, nested_blocksize) -> Weight4bit:
    nested = a2.numel() > 0
    return Weight4bit(packed.reshape(-1), code, absmax.reshape(-1), (shape[0], shape[1]), blocksize, None,
                      a2 if nested else None, c2 if nested else None, off.reshape(()) if nested else None,
                      nested_blocksize)


def _frozen_plus_rank(a, weight: Weight4bit, s, b, *, trans_w: bool, bias=None, scale=1.0, bits=None):
    """a · op(deq(W)) + scale · [mask ⊙] (s bᵀ) (+ bias) by the selected variant."""
    if selected_variant(a.shape[0], a.device) == "fused":
        return _kernels().lora_gemm_4bit(a, weight.packed, weight.code, weight.absmax, s, b, trans_w=trans_w,
                                         scale=scale, bias=bias, bits=bits, **weight.kernel_args())
    w = _kernels().dequantize_4bit(weight.packed, weight.code, weight.absmax, dtype=a.dtype, **weight.kernel_args())
    # frozen_plus_rank multiplies by its argument's transpose
    return frozen_plus_rank(a, w.t() if trans_w else w, s, b, bias=bias, scale=scale, bits=bits, variant="addmm")


def _fwd_fake(x, packed, code, absmax, a2, c2, off, lora_a, lora_b, bias, shape, blocksize, nested_blocksize,
              scaling, dropout_p):
    m, k = x.shape
    bits = x.new_empty((m, (k + 31) // 32) if dropout_p > 0 else (0,), dtype=torch.int32)
    return x.new_empty(m, shape[0]), x.new_empty(m, lora_a.shape[0]), bits


@custom_op("lora_linear_4bit_fwd", fake=_fwd_fake, tags=SEEDED)
def lora_linear_4bit_fwd(
    x: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    a2: torch.Tensor,
    c2: torch.Tensor,
    off: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) in the compute dtype -> (y (M, N), s (M, r), the packed dropout mask or empty)."""
    weight = _rebuild(packed, code, absmax, a2, c2, off, shape, blocksize, nested_blocksize)
    seed = draw_kernel_seed(x.device) if dropout_p > 0 else 0
    s, bits = _lora_kernels().lora_shrink(x, lora_a, scaling=scaling, dropout_p=dropout_p, seed=seed)
    y = _frozen_plus_rank(x, weight, s, lora_b, trans_w=False, bias=bias)
    return y, s, bits if bits is not None else x.new_empty(0, dtype=torch.int32)


def _bwd_fake(dy, x, packed, code, absmax, a2, c2, off, lora_a, lora_b, s, bits, shape, blocksize,
              nested_blocksize, scaling, dropout_p, need_dx):
    dx = dy.new_empty(x.shape) if need_dx else dy.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


@custom_op("lora_linear_4bit_bwd", fake=_bwd_fake)
def lora_linear_4bit_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    code: torch.Tensor,
    absmax: torch.Tensor,
    a2: torch.Tensor,
    c2: torch.Tensor,
    off: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    bits: torch.Tensor,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K) or empty, d lora_a, d lora_b) in the parameters' dtypes."""
    kernels = _lora_kernels()
    weight = _rebuild(packed, code, absmax, a2, c2, off, shape, blocksize, nested_blocksize)
    mask = bits if bits.numel() else None
    ds, db = kernels.lora_dy_pass(dy, s, lora_b)
    dx = dy.new_empty(0)
    if need_dx:
        dx = _frozen_plus_rank(dy, weight, ds, lora_a.t(), trans_w=True, scale=scaling * keep_scale(dropout_p),
                               bits=mask)
    da = kernels.lora_grad_a(x, ds, scaling=scaling, dropout_p=dropout_p, bits=mask)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype)


def _setup_context(ctx, inputs, output):
    x, packed, code, absmax, a2, c2, off, lora_a, lora_b, bias, shape, blocksize, nested_blocksize, scaling, \
        dropout_p = inputs
    _, s, bits = output
    ctx.save_for_backward(x, packed, code, absmax, a2, c2, off, lora_a, lora_b, s, bits)
    ctx.meta = (list(shape), blocksize, nested_blocksize, scaling, dropout_p)
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _ds, _dbits):
    x, packed, code, absmax, a2, c2, off, lora_a, lora_b, s, bits = ctx.saved_tensors
    shape, blocksize, nested_blocksize, scaling, dropout_p = ctx.meta
    need_x = ctx.needs_input_grad[0]
    need_a, need_b, need_bias = ctx.needs_input_grad[7:10]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, da, db = lora_linear_4bit_bwd(dy, x, packed, code, absmax, a2, c2, off, lora_a, lora_b, s, bits, shape,
                                      blocksize, nested_blocksize, scaling, dropout_p, bool(need_x))
    dbias = dy.sum(0) if need_bias and ctx.has_bias else None
    return ((dx if need_x else None), None, None, None, None, None, None, (da if need_a else None),
            (db if need_b else None), dbias, None, None, None, None, None)


register_autograd(lora_linear_4bit_fwd, backward=_backward, setup_context=_setup_context)


# -- DoRA on a quantized base (torch; the frozen product is given) ----------------------------------


def dora_frozen(x: torch.Tensor, frozen: Callable[[torch.Tensor], torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, *, scaling: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """DoRA (PEFT's formulas, ``reference.dora_apply``) with the frozen product ``frozen(x) = x Wᵀ``
    (no bias) supplied by the caller — a quantized base's lean dequantizing matmul or its own
    forward — and ``norm`` its row norms ‖deq(W) + s·B A‖ (fp32, detached)::

        dropout 0:  y = g ⊙ (frozen(x) + s·(x Aᵀ) Bᵀ) (+ bias)
        dropout p:  y = frozen(x) (+ bias) + (g - 1) ⊙ frozen(x_d) + g ⊙ s·(x_d Aᵀ) Bᵀ"""
    base = frozen(x)
    dtype = base.dtype
    g = (magnitude / norm).to(dtype)
    if dropout_p == 0:
        out = (base + rank_term(x.to(dtype), lora_a, lora_b, scaling=scaling)) * g
    else:
        xd = F.dropout(x, dropout_p, training=True)
        out = base + (g - 1) * frozen(xd) + g * rank_term(xd.to(dtype), lora_a, lora_b, scaling=scaling)
    return out if bias is None else out + bias.to(dtype)


# -- validation -----------------------------------------------------------------------------------


def _validate(x, weight, lora_a, lora_b, scaling, bias, dropout_p) -> None:
    if not isinstance(weight, Weight4bit):
        raise TypeError(f"weight must be a fastadapt.ops.Weight4bit, got {type(weight).__name__}")
    check_tensors(x, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if weight.packed.device != x.device:
        raise ValueError(f"the 4-bit weight is on {weight.packed.device} but x is on {x.device}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension in_features = {k}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (out_features,) = ({n},), got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
        raise ValueError(f"lora_a must have shape (r, in_features) = (r, {k}), got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must have shape (out_features, r) = ({n}, {r}), got {tuple(lora_b.shape)}")
    _checks.finite_number("scaling", scaling)
    check_dropout_p(dropout_p)
