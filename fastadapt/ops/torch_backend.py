"""The torch backend (``backend="torch"``, what ``auto`` runs until a GPU verification record exists):
the functions of :mod:`.reference`, as custom autograd functions written in torch operations that
keep less for backward than plain autograd (and PEFT) does.

Each forward runs the reference's operations in the reference's order (so the outputs are the
reference's, bit for bit where the operations are the same), and each backward computes the
gradients plain autograd would, from fewer saved tensors:

- **Dropout** (:mod:`._dropout`): the mask is drawn as ``F.dropout`` draws it (from torch's
  generator for x's device: ``torch.manual_seed`` and ``torch.utils.checkpoint`` behave, and the
  masks are PEFT's, call for call) and kept at 1 bit per element; the dropped input is rebuilt from
  x and the bits in backward. Never a dropped copy of x, never a byte mask (autograd keeps both,
  per adapter: ``F.dropout``'s mask or scaled mask, and the dropped input for the adapter's first
  product).
- **Inputs as given**: x itself is saved, never a cast or dropped copy of it, so adapters that read
  one input (q/k/v, gate/up, each with its own mask) keep one x between them, and under autocast
  the frozen weight is saved as the parameter, not as the low-precision copy autocast makes each
  step (both are cast again in backward: an elementwise pass, no memory kept).
- **Recomputed, not kept**: the bottleneck adapters keep the pre-activation H (M × b) and recompute
  act(H) (and, for a learned scaling, the up-projection) in backward.

What each function keeps is listed in its docstring. No value cached across calls is read here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dropout
from .reference import BOTTLENECK_ACTIVATIONS

__all__ = ["bottleneck_adapter", "dora_linear", "lora_linear", "parallel_adapter"]


def _requires_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (M, F), a view where the layout allows."""
    return t.reshape(-1, t.shape[-1])


def _drop(x: torch.Tensor, dropout_p: float, keep_bits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(F.dropout(x, p), the mask packed at 1 bit per element or None)``; x itself when p = 0."""
    if dropout_p == 0:
        return x, None
    keep = _dropout.draw(x, dropout_p)
    bits = _dropout.pack(keep) if keep_bits else None
    return x * _dropout.scale_(keep, dropout_p), bits


def _factor(bits: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype, dropout_p: float) -> torch.Tensor | None:
    """The forward's dropout factor (mask / (1 - p)) in x's shape and ``dtype``; None without dropout."""
    return None if bits is None else _dropout.unpack(bits, x.shape, dtype, dropout_p)


def _times(t: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``t · factor``: the dropped input rebuilt from x, or a gradient through the dropout."""
    return t if factor is None else t * factor


def _plus_product(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``t + a @ b`` (2-D; t fresh, overwritten): the product formed in a's dtype and cast to t's
    before the sum, as autograd sums a cast product's gradient into an input's."""
    if t.dtype == a.dtype:
        return t.addmm_(a, b)
    return t + (a @ b).to(t.dtype)


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """The gradient of a (N,) vector broadcast over t's rows: the sum over every other dimension."""
    return _rows(t).sum(0)


# -- LoRA -----------------------------------------------------------------------------------------


def _lora_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, keep_bits):
    """``reference.lora_linear_ref``'s operations -> (y, S = scaling · drop(x) Aᵀ, packed mask)."""
    y = F.linear(x, weight, bias)  # under autocast, in the autocast dtype: the compute dtype
    dtype = y.dtype
    xd, bits = _drop(x, dropout_p, keep_bits)
    s = F.linear(xd.to(dtype), lora_a.to(dtype)) * scaling
    _rows(y).addmm_(_rows(s), lora_b.to(dtype).t())  # y is fresh: the reference's addmm, in place
    return y, s, bits


class _LoraLinear(torch.autograd.Function):
    """Saved: x (the caller's tensor), S (M × r), the mask bits (M·K/8 bytes), the parameters."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scaling: float, dropout_p: float):
        y, s, bits = _lora_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, keep_bits=True)
        ctx.save_for_backward(x, weight, lora_a, lora_b, s, bits)
        ctx.scaling, ctx.dropout_p, ctx.bias_dtype = scaling, dropout_p, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, s, bits = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dtype = s.dtype
        g = _rows(grad.to(dtype))
        s2 = _rows(s)
        b_c = lora_b.to(dtype)
        db = (s2.t() @ g).t().to(lora_b.dtype) if need_b else None  # addmm's gradient of Bᵀ, transposed
        ds = (g @ b_c) * ctx.scaling  # dS of the unscaled product
        da = dx = dw = dbias = None
        factor = _factor(bits, x, x.dtype, ctx.dropout_p) if need_a or need_x else None
        if need_a:
            da = (ds.t() @ _rows(_times(x, factor).to(dtype))).to(lora_a.dtype)
        if need_x:  # the rank term through the dropout, then the frozen product's dX onto it
            dx_rank = _times((ds @ lora_a.to(dtype)).to(x.dtype).view(x.shape), factor)
            dx = _plus_product(_rows(dx_rank), g, weight.to(dtype)).view(x.shape)
        if need_w:
            dw = (g.t() @ _rows(x.to(dtype))).to(weight.dtype)  # the base product sees no dropout
        if need_bias and ctx.bias_dtype is not None:
            dbias = g.sum(0).to(ctx.bias_dtype)
        return dx, dw, da, db, dbias, None, None


def lora_linear(x, weight, lora_a, lora_b, *, scaling: float, bias=None, dropout_p: float = 0.0) -> torch.Tensor:
    """``reference.lora_linear_ref`` (same arguments, arguments already validated), keeping x, S and
    the mask bits for backward."""
    if _requires_grad(x, weight, lora_a, lora_b, bias):
        return _LoraLinear.apply(x, weight, lora_a, lora_b, bias, float(scaling), float(dropout_p))
    return _lora_forward(x, weight, lora_a, lora_b, bias, scaling, dropout_p, keep_bits=False)[0]


# -- DoRA -----------------------------------------------------------------------------------------


def _dora_forward(x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p, keep_bits):
    """``reference.dora_apply``'s operations -> (y, g = magnitude / norm (fp32), S, the M × N product
    backward needs (z = x Wᵀ + s·S Bᵀ at p = 0; x_d Wᵀ with dropout), packed mask)."""
    g32 = magnitude / norm
    y = F.linear(x, weight)
    dtype = y.dtype
    g = g32.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    if dropout_p == 0:
        s = F.linear(x.to(dtype), a)
        z = _rows(y).addmm_(_rows(s), b.t(), alpha=scaling).view(y.shape)  # y is fresh: in place
        out = z * g
        return (out if bias is None else out + bias.to(dtype)), g32, s, z, None
    base = y if bias is None else y + bias.to(dtype)
    xd, bits = _drop(x, dropout_p, keep_bits)
    s = F.linear(xd.to(dtype), a)
    lora = F.linear(s, b)
    base_d = F.linear(xd, weight)  # PEFT's dropout form: the frozen product of the dropped input
    return base + ((g - 1) * base_d + g * lora * scaling), g32, s, base_d, bits


class _DoraLinear(torch.autograd.Function):
    """Saved: x, S (M × r), the norms (N), one M × N product, the mask bits, the parameters.

    The M × N product is what d magnitude needs (Σ_rows dY ⊙ the product g scales): z at p = 0, and
    with dropout the frozen product of the dropped input x_d Wᵀ (the rank term is rebuilt from S).
    Autograd keeps that product and the rank term besides (PEFT too), plus, with dropout, the
    dropped input and its mask. ``recompute`` keeps no M × N product and recomputes it in backward
    (one more GEMM of the frozen layer's size)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, norm, bias, scaling: float, dropout_p: float,
                recompute: bool):
        y, _, s, product, bits = _dora_forward(x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p,
                                               keep_bits=True)
        ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, norm, s, None if recompute else product, bits)
        ctx.scaling, ctx.dropout_p, ctx.recompute = scaling, dropout_p, recompute
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, magnitude, norm, s, product, bits = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_m, _, need_bias = ctx.needs_input_grad[:7]
        scaling, p = ctx.scaling, ctx.dropout_p
        dtype = s.dtype
        g32 = magnitude / norm
        g = g32.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad = grad.to(dtype)
        s2 = _rows(s)
        dx = dw = dbias = None
        if need_bias and ctx.bias_dtype is not None:
            dbias = _sum_rows(grad).to(ctx.bias_dtype)
        if p == 0:  # out = z ⊙ g, z = addmm(x Wᵀ, S, Bᵀ, alpha=scaling), S = x Aᵀ
            z = product
            if z is None:  # recomputed as the forward formed it
                z = _rows(F.linear(x.to(dtype), weight.to(dtype))).addmm_(s2, b.t(), alpha=scaling).view(grad.shape)
            dz = _rows(grad * g)
            dg = _sum_rows(grad * z)
            ds = (dz @ b) * scaling
            db = ((s2.t() @ dz) * scaling).t() if need_b else None
            x_c = _rows(x.to(dtype)) if need_a or need_w else None
            da = ds.t() @ x_c if need_a else None
            if need_x:
                dx = _plus_product((ds @ a).to(x.dtype), dz, weight.to(dtype)).view(x.shape)
            if need_w:
                dw = (dz.t() @ x_c).to(weight.dtype)
        else:  # out = x Wᵀ (+ bias) + (g - 1) ⊙ x_d Wᵀ + g ⊙ (S Bᵀ) · scaling, S = x_d Aᵀ
            factor = _factor(bits, x, x.dtype, p)
            xd_c = _rows(_times(x, factor).to(dtype))
            w_c = weight.to(dtype)
            lora = s @ b.t()
            base_d = product if product is not None else F.linear(xd_c, w_c).view(grad.shape)
            grad_scaled = grad * scaling
            dg = _sum_rows(grad * base_d) + _sum_rows(grad_scaled * lora)
            dlora = _rows(grad_scaled * g)
            ds = dlora @ b
            db = dlora.t() @ s2 if need_b else None
            da = ds.t() @ xd_c if need_a else None
            dbase_d = _rows(grad * (g - 1))
            g2 = _rows(grad)
            if need_x:
                dxd = _plus_product((ds @ a).to(x.dtype), dbase_d, w_c).view(x.shape)
                dx = _plus_product(_rows(_times(dxd, factor)), g2, w_c).view(x.shape)
            if need_w:
                dw = (g2.t() @ _rows(x.to(dtype))).to(weight.dtype) + (dbase_d.t() @ xd_c).to(weight.dtype)
        dm = (dg.to(g32.dtype) / norm).to(magnitude.dtype) if need_m else None
        da = da.to(lora_a.dtype) if need_a else None
        db = db.to(lora_b.dtype) if need_b else None
        return dx, dw, da, db, dm, None, dbias, None, None, None


def dora_linear(x, weight, lora_a, lora_b, magnitude, norm, *, scaling: float, bias=None, dropout_p: float = 0.0,
                recompute: bool = False) -> torch.Tensor:
    """``reference.dora_apply`` (same arguments, already validated; ``norm`` the detached row norms),
    keeping x, S, one M × N product and the mask bits for backward (``recompute``: no M × N product,
    one more frozen-size GEMM in backward; see :class:`_DoraLinear`)."""
    if _requires_grad(x, weight, lora_a, lora_b, magnitude, bias):
        return _DoraLinear.apply(x, weight, lora_a, lora_b, magnitude, norm, bias, float(scaling), float(dropout_p),
                                 bool(recompute))
    return _dora_forward(x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p, keep_bits=False)[0]


# -- series and parallel bottleneck adapters -------------------------------------------------------


#: act'(h) · grad as autograd computes it for each activation (tanh and relu from their output)
_ACTIVATION_GRAD = {
    "tanh": lambda grad, h, out: torch.ops.aten.tanh_backward(grad, out),
    "relu": lambda grad, h, out: torch.ops.aten.threshold_backward(grad, out, 0),
    "gelu": lambda grad, h, out: torch.ops.aten.gelu_backward(grad, h),
    "silu": lambda grad, h, out: torch.ops.aten.silu_backward(grad, h),
}


def _scale(t: torch.Tensor, scaling_t: torch.Tensor | None, scaling: float) -> torch.Tensor:
    if scaling_t is not None:
        return t * scaling_t.reshape(()).to(t.dtype)  # a learned (1,) scaling: no fp32 promotion of t
    return t * scaling


def _bottleneck_forward(x, w_down, w_up, scaling_t, scaling, residual, weight, bias, activation, dropout_p,
                        keep_bits):
    """``reference.bottleneck_adapter_ref`` (``weight`` None) or ``parallel_adapter_ref`` (the frozen
    product x Wᵀ + bias as the residual, the adapter on x cast to its dtype) -> (out, the
    pre-activation H, the packed mask)."""
    if weight is not None:
        residual = F.linear(x, weight, bias)
        x_in = x.to(residual.dtype)
    else:
        x_in = x
    xd, bits = _drop(x_in, dropout_p, keep_bits)
    h = F.linear(xd, w_down.to(x_in.dtype))
    a = _scale(F.linear(BOTTLENECK_ACTIVATIONS[activation](h), w_up.to(h.dtype)), scaling_t, scaling)
    base = x if residual is None else residual
    return base + a.to(base.dtype), h, bits


class _Bottleneck(torch.autograd.Function):
    """Saved: x (the caller's tensor), H (M × b), the mask bits, the weights (the frozen one of a
    parallel adapter as the parameter) and a learned scaling; act(H), and the up-projection a
    learned scaling's gradient needs, are recomputed."""

    @staticmethod
    def forward(ctx, x, w_down, w_up, scaling_t, residual, weight, bias, scaling: float, activation: str,
                dropout_p: float):
        out, h, bits = _bottleneck_forward(x, w_down, w_up, scaling_t, scaling, residual, weight, bias, activation,
                                           dropout_p, keep_bits=True)
        ctx.save_for_backward(x, w_down, w_up, scaling_t, weight, h, bits)
        ctx.scaling, ctx.activation, ctx.dropout_p = scaling, activation, dropout_p
        ctx.has_residual, ctx.out_dtype = residual is not None, out.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w_down, w_up, scaling_t, weight, h, bits = ctx.saved_tensors
        need_x, need_wd, need_wu, need_s, need_res, need_w, need_bias = ctx.needs_input_grad[:7]
        dtype = h.dtype
        in_dtype = x.dtype if weight is None else ctx.out_dtype  # the dtype the adapter read x in
        act = BOTTLENECK_ACTIVATIONS[ctx.activation](h)
        wu = w_up.to(dtype)
        da = grad.to(dtype)
        ds = None
        if need_s and scaling_t is not None:
            ds = (da * F.linear(act, wu)).sum().to(scaling_t.dtype).reshape(scaling_t.shape)
        da = _rows(_scale(da, scaling_t, ctx.scaling))
        dwu = (da.t() @ _rows(act)).to(w_up.dtype) if need_wu else None
        dh = _rows(_ACTIVATION_GRAD[ctx.activation](_rows(da @ wu).view(h.shape), h, act))
        dwd = dx = dw = dbias = None
        factor = _factor(bits, x, in_dtype, ctx.dropout_p) if need_wd or need_x else None
        if need_wd:
            dwd = (dh.t() @ _rows(_times(x.to(in_dtype), factor).to(dtype))).to(w_down.dtype)
        g2 = _rows(grad)
        if need_x:
            dx = _rows(_times((dh @ w_down.to(dtype)).to(in_dtype).view(x.shape), factor).to(x.dtype))
            if weight is not None:  # the frozen product's dX
                dx = _plus_product(dx, g2, weight.to(g2.dtype))
            elif not ctx.has_residual:  # out = x + ...
                dx = dx + g2
            dx = dx.view(x.shape)
        if weight is not None and need_w:
            dw = (g2.t() @ _rows(x.to(g2.dtype))).to(weight.dtype)
        if need_bias and ctx.bias_dtype is not None:
            dbias = g2.sum(0).to(ctx.bias_dtype)
        dres = grad if ctx.has_residual and need_res else None
        return dx, dwd, dwu, ds, dres, dw, dbias, None, None, None


def _bottleneck(x, w_down, w_up, scaling, activation, dropout_p, *, residual=None, weight=None, bias=None):
    scaling_t = scaling if isinstance(scaling, torch.Tensor) else None
    scaling_f = 0.0 if scaling_t is not None else float(scaling)
    if _requires_grad(x, w_down, w_up, scaling_t, residual, weight, bias):
        return _Bottleneck.apply(x, w_down, w_up, scaling_t, residual, weight, bias, scaling_f, activation,
                                 float(dropout_p))
    return _bottleneck_forward(x, w_down, w_up, scaling_t, scaling_f, residual, weight, bias, activation, dropout_p,
                               keep_bits=False)[0]


def bottleneck_adapter(x, w_down, w_up, *, activation: str, scaling, residual=None,
                       dropout_p: float = 0.0) -> torch.Tensor:
    """``reference.bottleneck_adapter_ref`` (same arguments, already validated), keeping x, H and the
    mask bits for backward."""
    return _bottleneck(x, w_down, w_up, scaling, activation, dropout_p, residual=residual)


def parallel_adapter(x, weight, w_down, w_up, *, activation: str, scaling, bias=None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """``reference.parallel_adapter_ref`` (same arguments, already validated), keeping x, H and the
    mask bits for backward (and, under autocast, the frozen weight as the parameter)."""
    return _bottleneck(x, w_down, w_up, scaling, activation, dropout_p, weight=weight, bias=bias)
