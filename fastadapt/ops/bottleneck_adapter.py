"""``fa.ops.bottleneck_adapter``: LLM-Adapters' series bottleneck adapter with its residual.

With ``A(z) = up(act(down(dropout(z))))`` and ``s`` the scaling (a number or a learned 1-element
tensor)::

    bottleneck_adapter(x, w_down, w_up) = (x if residual is None else residual) + s·A(x)

It serves both placements: input side ``W (x + s·A(x)) + c`` (the op, then the frozen linear) and
output side ``h + s·A(h)`` (the frozen linear, then the op on h).

Backends:
- ``"triton"``: ``kernels/fastadapt_kernels/bottleneck_adapter.py`` (at training sizes one kernel per 64-row block,
  the M × b intermediate on chip; two kernels on 2-D grids at small M), custom ops
  ``fastadapt::bottleneck_adapter_fwd/_bwd``. Saved for backward: x, the pre-activation ``hidden``
  (M × b), the weights in x's dtype (cast once per call from fp32 master copies) and, with dropout,
  the mask packed at 1 bit per element.
- ``"cuda"``: ``csrc/bottleneck_adapter`` (bf16/fp16, no dropout), ops
  ``fastadapt::bottleneck_adapter_cuda_fwd/_bwd`` (schemas and fakes below, kernels in csrc/).
- ``"torch"``: ``torch_backend.bottleneck_adapter`` — the reference's function, keeping x, one M × b
  tensor (the activation's output for tanh and relu, else the pre-activation) and the mask at 1 bit
  per element; ``"reference"``: plain autograd.
Both have fake impls and registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""

from __future__ import annotations

import torch

from .. import _checks, settings
from . import _native, torch_backend
from ._inputs import check_dropout_p, check_tensors, draw_seed
from ._library import SEEDED, custom_op, native_op, register_autograd
from .dispatch import BACKENDS, TORCH_BACKENDS, register_op, resolve_backend, triton_usable
from .reference import BOTTLENECK_ACTIVATIONS, bottleneck_adapter_ref

__all__ = ["ACTIVATIONS", "bottleneck_adapter", "selected_backend"]

ACTIVATIONS: tuple[str, ...] = tuple(BOTTLENECK_ACTIVATIONS)

_CUDA_DTYPES = (torch.bfloat16, torch.float16)


def cuda_usable(device: torch.device) -> bool:
    """The CUDA kernels can run on ``device`` (a call also needs bf16/fp16 and no dropout)."""
    return device.type == "cuda" and _native.native_available()


register_op("bottleneck_adapter", {"cuda": cuda_usable, "triton": triton_usable})


def _kernels():
    from fastadapt.kernels import bottleneck_adapter as kernels  # late: TRITON_INTERPRET is read then

    return kernels


def choose_backend(op: str, backend: str, x: torch.Tensor, dropout_p: float) -> str:
    """Backend for one call of the series or parallel adapter. ``cuda`` (explicit or forced by
    FASTADAPT_BACKEND) is checked first so that a missing extension or an input it cannot take
    gives an error that says why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" or (backend == "auto" and settings.backend_override() == "cuda"):
        _native.require_native(op)
        if x.device.type != "cuda":
            raise ValueError(f"backend='cuda' needs x on a CUDA device, got {x.device}")
        if x.dtype not in _CUDA_DTYPES:
            raise ValueError(f"backend='cuda' takes bfloat16 or float16 x, got {x.dtype}; use backend='triton'")
        if dropout_p > 0:
            raise ValueError(
                f"backend='cuda' has no dropout, got dropout_p={dropout_p}; use backend='triton' for training "
                "with dropout (or dropout 0)"
            )
        return "cuda"
    cuda_fits = x.dtype in _CUDA_DTYPES and dropout_p == 0
    available = {
        "cuda": lambda device: cuda_fits and cuda_usable(device),
        "triton": triton_usable,
    }
    return resolve_backend(op, backend, x.device, available=available, rows=x.numel() // max(x.shape[-1], 1))


def selected_backend(x: torch.Tensor, backend: str = "auto", *, dropout_p: float = 0.0) -> str:
    """The backend ``bottleneck_adapter`` would run for ``x``."""
    return choose_backend("bottleneck_adapter", backend, x, dropout_p)


def scaling_tensor(scaling: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(1,) fp32 on ``device``: a learned scaling stays in the graph (differentiable, no host sync)."""
    if isinstance(scaling, torch.Tensor):
        return scaling.reshape(1).to(torch.float32)
    return torch.full((1,), float(scaling), dtype=torch.float32, device=device)


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    *,
    activation: str,
    scaling: float | torch.Tensor,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``(x if residual is None else residual) + scaling · up(act(down(dropout(x))))``.

    Shapes: x (..., d_in); w_down (b, d_in); w_up (d_out, b); residual (..., d_out) or None (then
    d_out must equal d_in). Returns (..., d_out) in x's dtype. The adapter weights may be fp32
    (they are cast to x's dtype; activations are never upcast); products accumulate in fp32.
    ``activation``: "tanh" | "relu" | "gelu" (exact erf) | "silu". ``scaling``: a finite number or a
    1-element float tensor (a learned scaling: it gets a gradient). ``dropout_p`` drops the adapter
    input only (pass 0 in eval mode). Differentiable in x, w_down, w_up, a tensor scaling and the
    residual. ``backend``: "auto" | "torch" | "triton" | "cuda" (bf16/fp16, no dropout; needs the
    CUDA extension) | "reference" — see ``FASTADAPT_BACKEND``.
    """
    _validate(x, w_down, w_up, activation, scaling, residual, dropout_p)
    chosen = choose_backend("bottleneck_adapter", backend, x, dropout_p)
    if chosen in TORCH_BACKENDS:
        impl = torch_backend.bottleneck_adapter if chosen == "torch" else bottleneck_adapter_ref
        return impl(x, w_down, w_up, activation=activation, scaling=scaling, residual=residual, dropout_p=dropout_p)
    d_in, d_out = x.shape[-1], w_up.shape[0]
    lead = x.shape[:-1]
    s = scaling_tensor(scaling, x.device)
    res2d = None if residual is None else residual.to(x.dtype).reshape(-1, d_out)
    if chosen == "cuda":
        out = bottleneck_adapter_cuda_fwd(x.reshape(-1, d_in), w_down, w_up, s, res2d, activation)[0]
    else:
        out = bottleneck_adapter_fwd(x.reshape(-1, d_in), w_down, w_up, s, res2d, activation, float(dropout_p))[0]
    return out.reshape(*lead, d_out)


# -- Triton backend -------------------------------------------------------------------------------


def _lp_shape(w: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
    """Shape of the forward's low-precision copy of adapter weight ``w``: empty when ``w`` already
    has x's dtype (then ``w`` itself is used and saved)."""
    return tuple(w.shape) if w.dtype != x.dtype else (0,)


def _fwd_fake(x, w_down, w_up, scaling, residual, activation, dropout_p):
    (m, k), b, n = x.shape, w_down.shape[0], w_up.shape[0]
    bits = x.new_empty((m, (k + 31) // 32) if dropout_p > 0 else (0,), dtype=torch.int32)
    return (x.new_empty(m, n), x.new_empty(m, b), bits, x.new_empty(_lp_shape(w_down, x)),
            x.new_empty(_lp_shape(w_up, x)))


@custom_op("bottleneck_adapter_fwd", fake=_fwd_fake, tags=SEEDED)
def bottleneck_adapter_fwd(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, d_in) -> (out (M, d_out), hidden (M, b) pre-activation, the packed mask or empty,
    w_down and w_up in x's dtype or empty). Weights of another dtype (fp32 master copies) are cast
    once, in one launch, and the copies returned for backward: every program of the kernels
    then reads 16-bit weights (half the L2 traffic of converting fp32 in each one)."""
    seed = draw_seed(x.device) if dropout_p > 0 else 0
    kernels = _kernels()
    if w_down.dtype != x.dtype or w_up.dtype != x.dtype:
        wd, wu = kernels.cast_pair(w_down, w_up, x.dtype)
    else:
        wd, wu = w_down, w_up
    out, hidden, bits = kernels.bottleneck_fwd(
        x, wd, wu, scaling, activation=activation, residual=residual, dropout_p=dropout_p, seed=seed,
    )
    return (out, hidden, bits if bits is not None else x.new_empty(0, dtype=torch.int32),
            wd if wd is not w_down else x.new_empty(0), wu if wu is not w_up else x.new_empty(0))


def _bwd_fake(dout, x, hidden, w_down, w_up, scaling, bits, activation, dropout_p, has_residual, need_scaling_grad):
    f32 = torch.float32
    return (x.new_empty(x.shape), w_down.new_empty(w_down.shape, dtype=f32), w_up.new_empty(w_up.shape, dtype=f32),
            scaling.new_empty((1,) if need_scaling_grad else (0,), dtype=f32))


@custom_op("bottleneck_adapter_bwd", fake=_bwd_fake)
def bottleneck_adapter_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    hidden: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: torch.Tensor,
    bits: torch.Tensor,
    activation: str,
    dropout_p: float,
    has_residual: bool,
    need_scaling_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w_down, w_up in x's dtype (the forward's copies) -> (dx (M, d_in), d w_down, d w_up (fp32),
    d scaling: (1,) fp32, or empty without ``need_scaling_grad`` — nothing launched for it).
    dx excludes the residual's own gradient (dout) when ``has_residual``."""
    dx, dwd, dwu, ds = _kernels().bottleneck_bwd(
        dout, x, hidden, w_down, w_up, scaling, activation=activation,
        has_residual=has_residual, dropout_p=dropout_p, bits=bits if bits.numel() else None,
        need_scaling_grad=need_scaling_grad,
    )
    return dx, dwd, dwu, ds.reshape(1) if ds is not None else scaling.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, w_down, w_up, scaling, residual, activation, dropout_p = inputs
    _, hidden, bits, wd_lp, wu_lp = output
    ctx.save_for_backward(x, wd_lp if wd_lp.numel() else w_down, wu_lp if wu_lp.numel() else w_up, scaling,
                          hidden, bits)
    ctx.activation, ctx.dropout_p, ctx.has_residual = activation, dropout_p, residual is not None
    ctx.weight_dtypes = (w_down.dtype, w_up.dtype)


def _backward(ctx, dout, _dhidden, _dbits, _dwd_lp, _dwu_lp):
    x, w_down, w_up, scaling, hidden, bits = ctx.saved_tensors
    need_x, need_wd, need_wu, need_s, need_res = ctx.needs_input_grad[:5]
    dx, dwd, dwu, ds = bottleneck_adapter_bwd(
        dout, x, hidden, w_down, w_up, scaling, bits, ctx.activation, ctx.dropout_p, ctx.has_residual, bool(need_s)
    )
    dres = dout if ctx.has_residual and need_res else None
    wd_dtype, wu_dtype = ctx.weight_dtypes
    return (dx if need_x else None, dwd.to(wd_dtype) if need_wd else None, dwu.to(wu_dtype) if need_wu else None,
            ds if need_s else None, dres, None, None)


register_autograd(bottleneck_adapter_fwd, backward=_backward, setup_context=_setup_context)


# -- CUDA backend (kernels in csrc/bottleneck_adapter) ----------------------------------------------


def _cuda_fwd_fake(x, w_down, w_up, scaling, residual, activation):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty((*x.shape[:-1], w_up.shape[0])), x.new_empty((m, w_down.shape[0])),
            x.new_empty(_lp_shape(w_down, x)), x.new_empty(_lp_shape(w_up, x)))


#: ``out = (x if residual is None else residual) + s · act(x @ w_downᵀ) @ w_upᵀ``, the pre-activation
#: ``hidden`` (M, b) in x's dtype, and the weights cast to x's dtype for backward (empty when they
#: had it already). x bf16/fp16; residual in x's dtype; scaling (1,) fp32. fp32 accumulation.
bottleneck_adapter_cuda_fwd = native_op(
    "bottleneck_adapter_cuda_fwd",
    "(Tensor x, Tensor w_down, Tensor w_up, Tensor scaling, Tensor? residual, str activation) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    fake=_cuda_fwd_fake,
)


def _cuda_bwd_fake(dout, x, hidden, w_down, w_up, scaling, activation, has_residual):
    return (x.new_empty(x.shape), w_down.new_empty(w_down.shape, dtype=torch.float32),
            w_up.new_empty(w_up.shape, dtype=torch.float32), scaling.new_empty(scaling.shape, dtype=torch.float32))


#: -> (dx, dw_down fp32, dw_up fp32, dscaling fp32 shaped like scaling); dx excludes the residual's
#: own gradient (dout) when ``has_residual``.
bottleneck_adapter_cuda_bwd = native_op(
    "bottleneck_adapter_cuda_bwd",
    "(Tensor dout, Tensor x, Tensor hidden, Tensor w_down, Tensor w_up, Tensor scaling, str activation, "
    "bool has_residual) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_cuda_bwd_fake,
)


def _cuda_setup_context(ctx, inputs, output):
    x, w_down, w_up, scaling, residual, activation = inputs
    _, hidden, wd_lp, wu_lp = output
    ctx.save_for_backward(x, wd_lp if wd_lp.numel() else w_down, wu_lp if wu_lp.numel() else w_up, scaling, hidden)
    ctx.activation, ctx.has_residual = activation, residual is not None
    ctx.weight_dtypes = (w_down.dtype, w_up.dtype)


def _cuda_backward(ctx, dout, _dhidden, _dwd_lp, _dwu_lp):
    x, w_down, w_up, scaling, hidden = ctx.saved_tensors
    need_x, need_wd, need_wu, need_s, need_res = ctx.needs_input_grad[:5]
    dx, dwd, dwu, ds = bottleneck_adapter_cuda_bwd(
        dout.contiguous(), x, hidden, w_down, w_up, scaling, ctx.activation, ctx.has_residual
    )
    dres = dout if ctx.has_residual and need_res else None
    wd_dtype, wu_dtype = ctx.weight_dtypes
    return (dx if need_x else None, dwd.to(wd_dtype) if need_wd else None,
            dwu.to(wu_dtype) if need_wu else None, ds.reshape(scaling.shape) if need_s else None, dres, None)


register_autograd(bottleneck_adapter_cuda_fwd, backward=_cuda_backward, setup_context=_cuda_setup_context)


# -- validation -----------------------------------------------------------------------------------


def check_adapter(x, w_down, w_up, activation, scaling, dropout_p, d_in: int, d_out: int,
                  in_name: str, out_name: str) -> None:
    """The adapter's arguments: weights (b, d_in) and (d_out, b), activation, scaling, dropout."""
    if w_down.dim() != 2 or w_down.shape[1] != d_in or w_down.shape[0] < 1:
        raise ValueError(f"w_down must have shape (b, {in_name}) = (b, {d_in}) with b ≥ 1, got {tuple(w_down.shape)}")
    b = w_down.shape[0]
    if tuple(w_up.shape) != (d_out, b):
        raise ValueError(f"w_up must have shape ({out_name}, b) = ({d_out}, {b}), got {tuple(w_up.shape)}")
    _checks.one_of("activation", activation, ACTIVATIONS)
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise ValueError(
                f"scaling must be a number or a 1-element float tensor, got a {scaling.dtype} tensor of shape "
                f"{tuple(scaling.shape)}"
            )
        if scaling.device != x.device:
            raise ValueError(f"scaling is on {scaling.device} but x is on {x.device}; move both to one device")
    else:
        _checks.finite_number("scaling", scaling)
    check_dropout_p(dropout_p)


def _validate(x, w_down, w_up, activation, scaling, residual, dropout_p) -> None:
    check_tensors(x, w_down=w_down, w_up=w_up, residual=residual)
    d_in = x.shape[-1]
    if residual is None:
        check_adapter(x, w_down, w_up, activation, scaling, dropout_p, d_in, d_in, "d_in", "d_in")
        return
    d_out = w_up.shape[0] if w_up.dim() == 2 else -1
    check_adapter(x, w_down, w_up, activation, scaling, dropout_p, d_in, d_out, "d_in", "d_out")
    if tuple(residual.shape) != (*x.shape[:-1], d_out):
        raise ValueError(
            f"residual must have shape (..., d_out) = {(*x.shape[:-1], d_out)}, got {tuple(residual.shape)}"
        )
