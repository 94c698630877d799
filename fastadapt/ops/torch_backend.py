"""The torch backend (``backend="torch"``, what ``auto`` runs until a GPU verification record exists):
the functions of :mod:`.reference`, written in torch operations, keeping less for backward than
plain autograd (and PEFT) does.

Each op is a pair of custom ops (``fastadapt::<op>_torch_fwd`` / ``_bwd``, fakes beside them,
registered autograd), as the Triton path's are: what backward keeps is what ``setup_context``
saves, under ``torch.compile`` too (inside a traced autograd function the partitioner re-decides
what to keep — it kept the unpacked float mask — and inductor misordered an in-place
``bernoulli_`` against its reader), and ``fullgraph=True`` sees no graph break.

Each forward runs the reference's operations in the reference's order, casts made explicit (the
ops see no autocast), so the outputs are the reference's bit for bit on this device — under
autocast too, the reference run under the same autocast (``tests/ops/test_torch_backend.py``; against
PEFT, whose layer orders the same products differently, agreement is to rounding, not bits); each
backward computes the gradients plain autograd computes, from fewer saved tensors:

- **Dropout** (:mod:`._dropout`): the mask is drawn as ``F.dropout`` draws it (from torch's
  generator for x's device: ``torch.manual_seed`` and ``torch.utils.checkpoint`` behave, and the
  masks are PEFT's, call for call) and kept at 1 bit per element; the dropped input is rebuilt from
  x and the bits in backward. Never a dropped copy of x, never a byte mask (autograd keeps both,
  per adapter).
- **Inputs as given**: x itself is saved, never a cast or dropped copy of it, so adapters that read
  one input (q/k/v, gate/up, each with its own mask) keep one x between them; under autocast the
  frozen weight is saved as the parameter, not as the low-precision copy autocast makes each step
  (both are cast again in backward: an elementwise pass, no memory kept).
- **Recomputed, not kept**: the bottleneck adapters keep one M × b tensor: act(H) for tanh and relu
  (whose gradient autograd forms from the output), else the pre-activation H, act(H) recomputed in
  backward (and, for a learned scaling, the up-projection).

What each op keeps is listed beside it. No value derived from a parameter is cached across calls
(the only cached value, the dropout factor 1 / (1 - p) per dtype and p, is a constant).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import _dropout
from ._library import SEEDED, custom_op, eager_or_registered, with_eager_autograd
from .reference import BOTTLENECK_ACTIVATIONS

__all__ = ["bottleneck_adapter", "dora_linear", "lora_linear", "lora_rank", "parallel_adapter"]

_SixTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the reference's products run in: the autocast dtype under autocast (which leaves
    float64 alone), else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _requires_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, t itself without the call when it has that dtype (a no-op ``.to`` still costs
    ~1 µs of argument parsing; the ops make a dozen a call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else _as(t, dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (M, F), a view where the layout allows."""
    return t.reshape(-1, t.shape[-1])


def _none(t: torch.Tensor | None) -> torch.Tensor | None:
    """Custom ops return tensors, not None: an empty tensor stands for "none"."""
    return t if t is not None and t.numel() else None


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _bits_shape(x: torch.Tensor, dropout_p: float, keep_bits: bool) -> tuple[int, ...]:
    return ((x.numel() + 7) // 8,) if dropout_p > 0 and keep_bits else (0,)


def _drop(x: torch.Tensor, dropout_p: float, keep_bits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.dropout(x, p), the mask packed at 1 bit per element, or empty)``; x itself when p = 0."""
    if dropout_p == 0:
        return x, _empty(x, torch.uint8)
    keep = _dropout.draw(x, dropout_p)
    bits = _dropout.pack(keep) if keep_bits else _empty(x, torch.uint8)
    # the product in the mask's own buffer (a product commutes bit for bit): one M × K temporary
    # fewer, and on a CPU each fresh one costs its page faults
    return _dropout.scale_(keep, dropout_p).mul_(x), bits


def _factor(bits: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, dropout_p: float) -> torch.Tensor | None:
    """The forward's dropout factor (mask / (1 - p)) in x's shape and ``dtype``; None without dropout."""
    return _dropout.unpack(bits, x.shape, dtype, dropout_p) if bits.numel() else None


def _times(t: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``t · factor``: the dropped input rebuilt from x, or a gradient through the dropout."""
    return t if factor is None else t * factor


def _times_(t: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """:func:`_times` in t's own buffer: t is a temporary of the op, never an input or a saved tensor."""
    return t if factor is None else t.mul_(factor)


def _dropped(x: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """The dropped input ``x · factor`` rebuilt in factor's buffer: the factor's last use."""
    return x if factor is None else factor.mul_(x)


def _plus_product(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``t + a @ b`` (2-D; t fresh, overwritten): the product formed in a's dtype and cast to t's
    before the sum, as autograd sums a cast product's gradient into an input's."""
    if t.dtype == a.dtype:
        return t.addmm_(a, b)
    return t + (a @ b).to(t.dtype)


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """The gradient of a (N,) vector broadcast over t's rows: the sum over every other dimension."""
    return _rows(t).sum(0)


def _grad_or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else _empty(like)


def _no_autocast(x: torch.Tensor):
    """The ops cast explicitly; autocast state at the call (the ops see it) must not recast. (Entering
    ``torch.autocast`` costs ~10 µs of Python: only when autocast is on.)"""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# -- LoRA: saved x, S (M × r), the mask bits (M·K/8 bytes), the parameters -------------------------


def _lora_fwd_fake(x, weight, lora_a, lora_b, bias, scaling, dropout_p, dtype, keep_bits):
    lead = x.shape[:-1]
    return (x.new_empty((*lead, weight.shape[0]), dtype=dtype), x.new_empty((*lead, lora_a.shape[0]), dtype=dtype),
            x.new_empty(_bits_shape(x, dropout_p, keep_bits), dtype=torch.uint8))


@custom_op("lora_linear_torch_fwd", fake=_lora_fwd_fake, tags=SEEDED)
def lora_linear_torch_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          bias: torch.Tensor | None, scaling: float, dropout_p: float, dtype: torch.dtype,
                          keep_bits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.lora_linear_ref``'s operations in ``dtype`` -> (y, S = scaling · drop(x) Aᵀ, the
    packed mask or empty)."""
    with _no_autocast(x):
        y = F.linear(_as(x, dtype), _as(weight, dtype), _cast(bias, dtype))
        xd, bits = _drop(x, dropout_p, keep_bits)
        s = F.linear(_as(xd, dtype), _as(lora_a, dtype)) * scaling
        _rows(y).addmm_(_rows(s), _as(lora_b, dtype).t())  # y is fresh: the reference's addmm, in place
    return y, s, bits


def _lora_bwd_fake(dy, x, weight, lora_a, lora_b, s, bits, scaling, dropout_p, need_x, need_w, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x), weight.new_empty(weight.shape) if need_w else _empty(weight),
            lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape),
            dy.new_empty(weight.shape[:1]) if need_bias else _empty(dy))


@custom_op("lora_linear_torch_bwd", fake=_lora_bwd_fake)
def lora_linear_torch_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, s: torch.Tensor, bits: torch.Tensor, scaling: float, dropout_p: float,
                          need_x: bool, need_w: bool, need_bias: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx or empty, d weight or empty, d lora_a, d lora_b (the parameters' dtypes), d bias in the
    compute dtype or empty): plain autograd's gradients of :func:`lora_linear_torch_fwd`."""
    with _no_autocast(x):
        dtype = s.dtype
        g = _rows(_as(dy, dtype))
        db = _as(g.t() @ _rows(s), lora_b.dtype)
        ds = (g @ _as(lora_b, dtype)) * scaling  # dS of the unscaled product
        factor = _factor(bits, x, x.dtype, dropout_p)
        dx = dw = None
        if need_x:  # the rank term through the dropout, then the frozen product's dX onto it
            dx_rank = _times_(_as(ds @ _as(lora_a, dtype), x.dtype).view(x.shape), factor)
            dx = _plus_product(_rows(dx_rank), g, _as(weight, dtype)).view(x.shape)
        da = _as(ds.t() @ _rows(_as(_dropped(x, factor), dtype)), lora_a.dtype)
        if need_w:
            dw = _as(g.t() @ _rows(_as(x, dtype)), weight.dtype)  # the base product sees no dropout
        dbias = g.sum(0) if need_bias else None
    return _grad_or_empty(dx, x), _grad_or_empty(dw, weight), da, db, _grad_or_empty(dbias, dy)


_lora_linear_bwd = eager_or_registered(lora_linear_torch_bwd)


def _lora_setup(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p, _, _ = inputs
    _, s, bits = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, bits)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for S, the bits, the product
    ctx.scaling, ctx.dropout_p, ctx.bias_dtype = scaling, dropout_p, None if bias is None else bias.dtype


def _lora_backward(ctx, dy, _ds, _dbits):
    if dy is None:  # the output took no part in the loss (grads are not materialized)
        return (None,) * len(ctx.needs_input_grad)
    x, weight, lora_a, lora_b, s, bits = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    need_bias = bool(need_bias and ctx.bias_dtype is not None)
    dx, dw, da, db, dbias = _lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, bits, ctx.scaling, ctx.dropout_p,
                                             bool(need_x), bool(need_w), need_bias)
    return (_none(dx), _none(dw), da if need_a else None, db if need_b else None,
            dbias.to(ctx.bias_dtype) if need_bias else None, None, None, None, None)


_lora_linear_eager = with_eager_autograd(lora_linear_torch_fwd, backward=_lora_backward, setup_context=_lora_setup)


def lora_linear(x, weight, lora_a, lora_b, *, scaling: float, bias=None, dropout_p: float = 0.0) -> torch.Tensor:
    """``reference.lora_linear_ref`` (same arguments, already validated), keeping x, S and the mask
    bits for backward."""
    keep = _requires_grad(x, weight, lora_a, lora_b, bias)
    return _lora_linear_eager(x, weight, lora_a, lora_b, bias, float(scaling), float(dropout_p),
                              compute_dtype(x), keep)[0]


# -- the LoRA term alone, beside a frozen product formed elsewhere (a quantized base) -------------
#
# ``scaling · (drop(x) Aᵀ) Bᵀ`` (``lora_linear_4bit.rank_term``'s, PEFT's bnb layers'), products in
# the compute dtype: saved x, S = drop(x) Aᵀ (M × r), the mask bits, the parameters.


def _rank_fwd_fake(x, lora_a, lora_b, scaling, dropout_p, dtype, keep_bits):
    lead = x.shape[:-1]
    return (x.new_empty((*lead, lora_b.shape[0]), dtype=dtype), x.new_empty((*lead, lora_a.shape[0]), dtype=dtype),
            x.new_empty(_bits_shape(x, dropout_p, keep_bits), dtype=torch.uint8))


@custom_op("lora_rank_torch_fwd", fake=_rank_fwd_fake, tags=SEEDED)
def lora_rank_torch_fwd(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout_p: float,
                        dtype: torch.dtype, keep_bits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (scaling · (drop(x) Aᵀ) Bᵀ, S = drop(x) Aᵀ, the packed mask or empty), in ``dtype``."""
    with _no_autocast(x):
        xd, bits = _drop(x, dropout_p, keep_bits)
        s = F.linear(_as(xd, dtype), _as(lora_a, dtype))
        return F.linear(s, _as(lora_b, dtype)) * scaling, s, bits


def _rank_bwd_fake(dy, x, lora_a, lora_b, s, bits, scaling, dropout_p, need_x):
    return x.new_empty(x.shape) if need_x else _empty(x), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


@custom_op("lora_rank_torch_bwd", fake=_rank_bwd_fake)
def lora_rank_torch_bwd(dy: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        s: torch.Tensor, bits: torch.Tensor, scaling: float, dropout_p: float, need_x: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx or empty, d lora_a, d lora_b) in the parameters' dtypes: plain autograd's gradients."""
    with _no_autocast(x):
        dtype = s.dtype
        g = _rows(_as(dy, dtype) * scaling)
        db = _as(g.t() @ _rows(s), lora_b.dtype)
        ds = g @ _as(lora_b, dtype)
        factor = _factor(bits, x, x.dtype, dropout_p)
        dx = _times_(_as(ds @ _as(lora_a, dtype), x.dtype).view(x.shape), factor) if need_x else None
        da = _as(ds.t() @ _rows(_as(_dropped(x, factor), dtype)), lora_a.dtype)
    return _grad_or_empty(dx, x), da, db


_lora_rank_bwd = eager_or_registered(lora_rank_torch_bwd)


def _rank_setup(ctx, inputs, output):
    x, lora_a, lora_b, scaling, dropout_p, _, _ = inputs
    ctx.save_for_backward(x, lora_a, lora_b, *output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for S, the bits, the product
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _rank_backward(ctx, dy, _ds, _dbits):
    if dy is None:  # the output took no part in the loss (grads are not materialized)
        return (None,) * len(ctx.needs_input_grad)
    x, lora_a, lora_b, s, bits = ctx.saved_tensors
    need_x, need_a, need_b = ctx.needs_input_grad[:3]
    dx, da, db = _lora_rank_bwd(dy, x, lora_a, lora_b, s, bits, ctx.scaling, ctx.dropout_p, bool(need_x))
    return _none(dx), da if need_a else None, db if need_b else None, None, None, None, None


_lora_rank_eager = with_eager_autograd(lora_rank_torch_fwd, backward=_rank_backward, setup_context=_rank_setup)


def lora_rank(x, lora_a, lora_b, *, scaling: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``lora_linear_4bit.rank_term``'s function (in x's dtype, or the autocast dtype; A, B cast to
    it), keeping x, S and the mask bits for backward."""
    keep = _requires_grad(x, lora_a, lora_b)
    return _lora_rank_eager(x, lora_a, lora_b, float(scaling), float(dropout_p), compute_dtype(x), keep)[0]


# -- DoRA: saved x, S, the norms, one M × N product (or none), the mask bits, the parameters -------
#
# The M × N product is what d magnitude needs (Σ_rows dY ⊙ the product g scales): z = x Wᵀ + s·S Bᵀ
# at p = 0, the frozen product of the dropped input x_d Wᵀ with dropout (the rank term is rebuilt
# from S). Autograd keeps that product and the rank term besides (PEFT too), plus, with dropout, the
# dropped input and its mask. ``recompute`` keeps no M × N product and forms it again in backward
# (one more GEMM of the frozen layer's size).


def _dora_fwd_fake(x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p, dtype, keep_product,
                   keep_bits):
    lead, n = x.shape[:-1], weight.shape[0]
    return (x.new_empty((*lead, n), dtype=dtype), x.new_empty((*lead, lora_a.shape[0]), dtype=dtype),
            x.new_empty((*lead, n) if keep_product else (0,), dtype=dtype),
            x.new_empty(_bits_shape(x, dropout_p, keep_bits), dtype=torch.uint8))


@custom_op("dora_linear_torch_fwd", fake=_dora_fwd_fake, tags=SEEDED)
def dora_linear_torch_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None, scaling: float,
                          dropout_p: float, dtype: torch.dtype, keep_product: bool, keep_bits: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.dora_apply``'s operations in ``dtype`` -> (y, S, the M × N product or empty, the
    packed mask or empty)."""
    with _no_autocast(x):
        g = (magnitude / norm).to(dtype)
        y = F.linear(x.to(dtype), weight.to(dtype))
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        if dropout_p == 0:
            s = F.linear(x.to(dtype), a)
            z = _rows(y).addmm_(_rows(s), b.t(), alpha=scaling).view(y.shape)  # y is fresh: in place
            out = z * g
            out = out if bias is None else out + bias.to(dtype)
            return out, s, z if keep_product else _empty(z), _empty(x, torch.uint8)
        base = y if bias is None else y + bias.to(dtype)
        xd, bits = _drop(x, dropout_p, keep_bits)
        s = F.linear(xd.to(dtype), a)
        lora = F.linear(s, b)
        base_d = F.linear(xd.to(dtype), weight.to(dtype))  # PEFT's dropout form: the frozen product of x_d
        out = base + ((g - 1) * base_d + g * lora * scaling)
    return out, s, base_d if keep_product else _empty(base_d), bits


def _dora_bwd_fake(dy, x, weight, lora_a, lora_b, magnitude, norm, s, product, bits, scaling, dropout_p, need_x,
                   need_w, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x), weight.new_empty(weight.shape) if need_w else _empty(weight),
            lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), magnitude.new_empty(magnitude.shape),
            dy.new_empty(weight.shape[:1]) if need_bias else _empty(dy))


@custom_op("dora_linear_torch_bwd", fake=_dora_bwd_fake)
def dora_linear_torch_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, s: torch.Tensor,
                          product: torch.Tensor, bits: torch.Tensor, scaling: float, dropout_p: float, need_x: bool,
                          need_w: bool, need_bias: bool) -> _SixTensors:
    """-> (dx or empty, d weight or empty, d lora_a, d lora_b, d magnitude, d bias (compute dtype) or
    empty); ``product`` empty: formed again here."""
    with _no_autocast(x):
        dtype = s.dtype
        g32 = magnitude / norm
        g = g32.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad = dy.to(dtype)
        g2 = _rows(grad)
        s2 = _rows(s)
        dx = dw = None
        if dropout_p == 0:  # out = z ⊙ g, z = addmm(x Wᵀ, S, Bᵀ, alpha=scaling), S = x Aᵀ
            z = product if product.numel() else _rows(F.linear(x.to(dtype), weight.to(dtype))).addmm_(
                s2, b.t(), alpha=scaling).view(grad.shape)
            dz = _rows(grad * g)
            dg = _sum_rows(grad * z)
            ds = (dz @ b) * scaling
            db = (dz.t() @ s2) * scaling
            x_c = _rows(x.to(dtype))
            da = ds.t() @ x_c
            if need_x:
                dx = _plus_product((ds @ a).to(x.dtype), dz, weight.to(dtype)).view(x.shape)
            if need_w:
                dw = (dz.t() @ x_c).to(weight.dtype)
        else:  # out = x Wᵀ (+ bias) + (g - 1) ⊙ x_d Wᵀ + g ⊙ (S Bᵀ) · scaling, S = x_d Aᵀ
            factor = _factor(bits, x, x.dtype, dropout_p)
            xd_c = _rows(_times(x, factor).to(dtype))
            w_c = weight.to(dtype)
            base_d = product if product.numel() else (xd_c @ w_c.t()).view(grad.shape)
            lora = s @ b.t()
            grad_scaled = grad * scaling
            dg = _sum_rows(grad * base_d) + _sum_rows(grad_scaled * lora)
            dlora = _rows(grad_scaled * g)
            ds = dlora @ b
            db = dlora.t() @ s2
            da = ds.t() @ xd_c
            dbase_d = _rows(grad * (g - 1))
            if need_x:
                dxd = _plus_product((ds @ a).to(x.dtype), dbase_d, w_c).view(x.shape)
                dx = _plus_product(_rows(_times_(dxd, factor)), g2, w_c).view(x.shape)
            if need_w:
                dw = (g2.t() @ _rows(x.to(dtype))).to(weight.dtype) + (dbase_d.t() @ xd_c).to(weight.dtype)
        dm = (dg.to(g32.dtype) / norm).to(magnitude.dtype)
        dbias = _sum_rows(grad) if need_bias else None
    return (_grad_or_empty(dx, x), _grad_or_empty(dw, weight), da.to(lora_a.dtype), db.to(lora_b.dtype), dm,
            _grad_or_empty(dbias, dy))


_dora_linear_bwd = eager_or_registered(dora_linear_torch_bwd)


def _dora_setup(ctx, inputs, output):
    x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p, _, _, _ = inputs
    _, s, product, bits = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, norm, s, product, bits)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for S, the bits, the product
    ctx.scaling, ctx.dropout_p, ctx.bias_dtype = scaling, dropout_p, None if bias is None else bias.dtype


def _dora_backward(ctx, dy, _ds, _dproduct, _dbits):
    if dy is None:  # the output took no part in the loss (grads are not materialized)
        return (None,) * len(ctx.needs_input_grad)
    x, weight, lora_a, lora_b, magnitude, norm, s, product, bits = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_m, _, need_bias = ctx.needs_input_grad[:7]
    need_bias = bool(need_bias and ctx.bias_dtype is not None)
    dx, dw, da, db, dm, dbias = _dora_linear_bwd(dy, x, weight, lora_a, lora_b, magnitude, norm, s, product, bits,
                                                 ctx.scaling, ctx.dropout_p, bool(need_x), bool(need_w), need_bias)
    return (_none(dx), _none(dw), da if need_a else None, db if need_b else None, dm if need_m else None, None,
            dbias.to(ctx.bias_dtype) if need_bias else None, None, None, None, None, None)


_dora_linear_eager = with_eager_autograd(dora_linear_torch_fwd, backward=_dora_backward, setup_context=_dora_setup)


def dora_linear(x, weight, lora_a, lora_b, magnitude, norm, *, scaling: float, bias=None, dropout_p: float = 0.0,
                recompute: bool = False) -> torch.Tensor:
    """``reference.dora_apply`` (same arguments, already validated; ``norm`` the detached row norms),
    keeping x, S, one M × N product (``recompute``: none) and the mask bits for backward."""
    keep = _requires_grad(x, weight, lora_a, lora_b, magnitude, bias)
    return _dora_linear_eager(x, weight, lora_a, lora_b, magnitude, norm, bias, float(scaling), float(dropout_p),
                              compute_dtype(x), keep and not recompute, keep)[0]


# -- series and parallel bottleneck adapters: saved x, act(H) or H (M × b), the mask bits, the weights


#: act'(h) · grad as autograd computes it for each activation (tanh and relu from their output: they
#: get h = None, backward keeps no H for them)
_ACTIVATION_GRAD = {
    "tanh": lambda grad, h, out: torch.ops.aten.tanh_backward(grad, out),
    "relu": lambda grad, h, out: torch.ops.aten.threshold_backward(grad, out, 0),
    "gelu": lambda grad, h, out: torch.ops.aten.gelu_backward(grad, h),
    "silu": lambda grad, h, out: torch.ops.aten.silu_backward(grad, h),
}
#: the activations whose gradient needs only their output: backward keeps act(H), not H
_FROM_OUTPUT = frozenset({"tanh", "relu"})


def _scale(t: torch.Tensor, scaling_t: torch.Tensor | None, scaling: float) -> torch.Tensor:
    if scaling_t is not None:
        return t * scaling_t.reshape(()).to(t.dtype)  # a learned (1,) scaling: no fp32 promotion of t
    return t * scaling


def _bottleneck_fwd_fake(x, w_down, w_up, scaling_t, residual, weight, bias, scaling, activation, dropout_p, dtype,
                         keep_bits):
    lead = x.shape[:-1]
    out_dtype = dtype if weight is not None else (residual.dtype if residual is not None else x.dtype)
    return (x.new_empty((*lead, w_up.shape[0]), dtype=out_dtype), x.new_empty((*lead, w_down.shape[0]), dtype=dtype),
            x.new_empty(_bits_shape(x, dropout_p, keep_bits), dtype=torch.uint8))


@custom_op("bottleneck_torch_fwd", fake=_bottleneck_fwd_fake, tags=SEEDED)
def bottleneck_torch_fwd(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, scaling_t: torch.Tensor | None,
                         residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         scaling: float, activation: str, dropout_p: float, dtype: torch.dtype, keep_bits: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reference.bottleneck_adapter_ref`` (``weight`` None) or ``parallel_adapter_ref`` (the frozen
    product x Wᵀ + bias as the residual, the adapter on x cast to ``dtype``), products in ``dtype``
    -> (out, act(H) for an activation in ``_FROM_OUTPUT`` else the pre-activation H, the packed mask
    or empty)."""
    with _no_autocast(x):
        if weight is not None:
            residual = F.linear(_as(x, dtype), _as(weight, dtype), _cast(bias, dtype))
            x_in = _as(x, dtype)
        else:
            x_in = x
        xd, bits = _drop(x_in, dropout_p, keep_bits)
        h = F.linear(_as(xd, dtype), _as(w_down, dtype))
        act = BOTTLENECK_ACTIVATIONS[activation](h)
        a = _scale(F.linear(act, _as(w_up, dtype)), scaling_t, scaling)
        base = x if residual is None else residual
        out = base + _as(a, base.dtype)
    return out, act if activation in _FROM_OUTPUT else h, bits


def _bottleneck_bwd_fake(dout, x, w_down, w_up, scaling_t, weight, kept, bits, scaling, activation, dropout_p, in_dtype,
                         has_residual, need_x, need_s, need_w, need_bias):
    return (x.new_empty(x.shape) if need_x else _empty(x), w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape),
            scaling_t.new_empty(scaling_t.shape) if need_s and scaling_t is not None else _empty(kept),
            weight.new_empty(weight.shape) if need_w and weight is not None else _empty(kept),
            dout.new_empty(dout.shape[-1:]) if need_bias else _empty(dout))


@custom_op("bottleneck_torch_bwd", fake=_bottleneck_bwd_fake)
def bottleneck_torch_bwd(dout: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
                         scaling_t: torch.Tensor | None, weight: torch.Tensor | None, kept: torch.Tensor,
                         bits: torch.Tensor, scaling: float, activation: str, dropout_p: float, in_dtype: torch.dtype,
                         has_residual: bool, need_x: bool, need_s: bool, need_w: bool, need_bias: bool
                         ) -> _SixTensors:
    """-> (dx (the residual's own gradient excluded) or empty, d w_down, d w_up, d scaling or empty,
    d weight or empty, d bias (compute dtype) or empty); ``kept``: the forward's M × b tensor, act(H)
    for an activation in ``_FROM_OUTPUT`` (its gradient needs no H), else H."""
    with _no_autocast(x):
        dtype = kept.dtype
        from_output = activation in _FROM_OUTPUT
        h = None if from_output else kept
        act = kept if from_output else BOTTLENECK_ACTIVATIONS[activation](h)
        wu = _as(w_up, dtype)
        da = _as(dout, dtype)
        ds = dw = dx = dbias = None
        if need_s and scaling_t is not None:
            ds = (da * F.linear(act, wu)).sum().to(scaling_t.dtype).reshape(scaling_t.shape)
        da = _rows(_scale(da, scaling_t, scaling))
        dwu = _as(da.t() @ _rows(act), w_up.dtype)
        dh = _rows(_ACTIVATION_GRAD[activation](_rows(da @ wu).view(kept.shape), h, act))
        factor = _factor(bits, x, in_dtype, dropout_p)
        g2 = _rows(dout)
        if need_x:
            dx = _rows(_as(_times_(_as(dh @ _as(w_down, dtype), in_dtype).view(x.shape), factor), x.dtype))
            if weight is not None:  # the frozen product's dX
                dx = _plus_product(dx, g2, weight.to(g2.dtype))
            elif not has_residual:  # out = x + ...
                dx = dx + g2
            dx = dx.view(x.shape)
        dwd = _as(dh.t() @ _rows(_as(_dropped(_as(x, in_dtype), factor), dtype)), w_down.dtype)
        if weight is not None and need_w:
            dw = (g2.t() @ _rows(x.to(g2.dtype))).to(weight.dtype)
        if need_bias:
            dbias = g2.sum(0)
    return (_grad_or_empty(dx, x), dwd, dwu, _grad_or_empty(ds, kept), _grad_or_empty(dw, kept),
            _grad_or_empty(dbias, dout))


_bottleneck_bwd = eager_or_registered(bottleneck_torch_bwd)


def _bottleneck_setup(ctx, inputs, output):
    x, w_down, w_up, scaling_t, residual, weight, bias, scaling, activation, dropout_p, dtype, _ = inputs
    _, kept, bits = output
    ctx.save_for_backward(x, w_down, w_up, scaling_t, weight, kept, bits)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for S, the bits, the product
    ctx.scaling, ctx.activation, ctx.dropout_p = scaling, activation, dropout_p
    ctx.in_dtype = x.dtype if weight is None else dtype  # the dtype the adapter read x in
    ctx.has_residual, ctx.bias_dtype = residual is not None, None if bias is None else bias.dtype


def _bottleneck_backward(ctx, dout, _dkept, _dbits):
    if dout is None:  # the output took no part in the loss (grads are not materialized)
        return (None,) * len(ctx.needs_input_grad)
    x, w_down, w_up, scaling_t, weight, kept, bits = ctx.saved_tensors
    need_x, need_wd, need_wu, need_s, need_res, need_w, need_bias = ctx.needs_input_grad[:7]
    need_bias = bool(need_bias and ctx.bias_dtype is not None)
    dx, dwd, dwu, ds, dw, dbias = _bottleneck_bwd(
        dout, x, w_down, w_up, scaling_t, weight, kept, bits, ctx.scaling, ctx.activation, ctx.dropout_p, ctx.in_dtype,
        ctx.has_residual, bool(need_x), bool(need_s), bool(need_w), need_bias)
    return (_none(dx), dwd if need_wd else None, dwu if need_wu else None, _none(ds),
            dout if ctx.has_residual and need_res else None, _none(dw),
            dbias.to(ctx.bias_dtype) if need_bias else None, None, None, None, None, None)


_bottleneck_eager = with_eager_autograd(bottleneck_torch_fwd, backward=_bottleneck_backward,
                                        setup_context=_bottleneck_setup)


def _bottleneck(x, w_down, w_up, scaling, activation, dropout_p, *, residual=None, weight=None, bias=None):
    scaling_t = scaling if isinstance(scaling, torch.Tensor) else None
    keep = _requires_grad(x, w_down, w_up, scaling_t, residual, weight, bias)
    return _bottleneck_eager(x, w_down, w_up, scaling_t, residual, weight, bias,
                             0.0 if scaling_t is not None else float(scaling), activation, float(dropout_p),
                             compute_dtype(x), keep)[0]


def bottleneck_adapter(x, w_down, w_up, *, activation: str, scaling, residual=None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """``reference.bottleneck_adapter_ref`` (same arguments, already validated), keeping x, act(H) or H and the
    mask bits for backward."""
    return _bottleneck(x, w_down, w_up, scaling, activation, dropout_p, residual=residual)


def parallel_adapter(x, weight, w_down, w_up, *, activation: str, scaling, bias=None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """``reference.parallel_adapter_ref`` (same arguments, already validated), keeping x, act(H) or H and the
    mask bits for backward (and, under autocast, the frozen weight as the parameter)."""
    return _bottleneck(x, w_down, w_up, scaling, activation, dropout_p, weight=weight, bias=bias)
