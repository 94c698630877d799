"""``fa.ops.bottleneck_adapter`` and ``fa.ops.parallel_adapter``: LLM-Adapters' bottleneck adapters.

With ``A(z) = up(act(down(dropout(z))))`` and ``s`` the scaling (a number or a learned 1-element
tensor):

``bottleneck_adapter(x, w_down, w_up)`` = ``(x if residual is None else residual) + s·A(x)``
    the series adapter; serves both placements: input side ``W (x + s·A(x)) + c`` (the op, then
    the frozen linear) and output side ``h + s·A(h)`` (the frozen linear, then the op on h).
    Triton backend: ``kernels/bottleneck_adapter.py`` (one kernel per row block, the M × b
    intermediate stays on chip); CUDA backend: ``torch.ops.fastadapt_cuda.bottleneck_adapter_*``
    (bf16/fp16, no dropout). Saved for backward: x, the pre-activation ``hidden`` (M × b) and
    the Philox seed (no mask).

``parallel_adapter(x, weight, w_down, w_up)`` = ``x Wᵀ (+ bias) + s·A(x)``
    the LoRA extra-K structure with the activation applied to S (Triton backend)::

        forward   H = drop(x) W_downᵀ               lora_shrink (one pass over x), saved (M × b)
                  S = s · act(H)                    torch, M × b elementwise
                  Y = x Wᵀ + S W_upᵀ (+ bias)        cuBLAS + lora_add_epilogue
        backward  dS = dY W_up, dW_up = dYᵀ S        lora_dy_pass (one pass over dY)
                  dH = s · dS ⊙ act'(H)             torch, M × b elementwise (ds = Σ dS ⊙ act(H))
                  dX = dY W + mask ⊙ (dH W_down)/(1-p)   cuBLAS + lora_dx_epilogue
                  dW_down = dHᵀ (mask ⊙ x)/(1-p)    lora_grad_a (mask regenerated)

    S is recomputed from H in backward (M × b elementwise) instead of being saved too. The CUDA
    backend runs it as the series kernel with ``residual = x Wᵀ + c`` (same math).

Both are custom ops (``fastadapt::bottleneck_adapter_fwd/_bwd``, ``fastadapt::parallel_adapter_fwd/_bwd``)
with fake impls and registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import settings
from ..distributed import is_dtensor
from ._dispatch import BACKENDS, resolve_backend, triton_usable
from .lora_linear import SHARDED_ERROR, _autocast_inputs, draw_seed
from .reference import BOTTLENECK_ACTIVATIONS, bottleneck_adapter_ref, parallel_adapter_ref

__all__ = ["ACTIVATIONS", "bottleneck_adapter", "parallel_adapter", "selected_backend"]

ACTIVATIONS: tuple[str, ...] = tuple(BOTTLENECK_ACTIVATIONS)

# Auto picks Triton on CUDA only once a GPU session has shown the kernels correct and at least as
# fast as the torch path (bench/test_bench_bottleneck_adapter.py). Until then: FASTADAPT_BACKEND=triton.
TRITON_VERIFIED_ON_GPU = False

_CUDA_DTYPES = (torch.bfloat16, torch.float16)


def _kernels():
    from fastadapt.kernels import bottleneck_adapter as kernels  # late: TRITON_INTERPRET is read then

    return kernels


def _lora_kernels():
    from fastadapt.kernels import lora_linear as kernels

    return kernels


def _native_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from .. import _native

    return _native.native_available()


def _auto_order(cuda_fits: bool) -> tuple[str, ...]:
    from .. import _native

    order = []
    if cuda_fits and _native.VERIFIED_ON_GPU:
        order.append("cuda")
    if TRITON_VERIFIED_ON_GPU:
        order.append("triton")
    return (*order, "torch")


def _choose(op: str, backend: str, x: torch.Tensor, dropout_p: float) -> str:
    """Backend for this call. ``cuda`` (explicit or forced by FASTADAPT_BACKEND) is checked first so
    that a missing extension or an input it cannot take gives an error that says why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    wants_cuda = backend == "cuda" or (backend == "auto" and settings.backend_override() == "cuda")
    if wants_cuda:
        from .. import _native

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
        "torch": lambda device: True,
        "triton": triton_usable,
        "cuda": lambda device: cuda_fits and _native_ok(device),
    }
    return resolve_backend(op, backend, x.device, available=available, auto_order=_auto_order(cuda_fits))


def selected_backend(x: torch.Tensor, backend: str = "auto", *, dropout_p: float = 0.0) -> str:
    """The backend ``bottleneck_adapter`` / ``parallel_adapter`` would run for ``x``."""
    return _choose("bottleneck_adapter", backend, x, dropout_p)


def _scaling_tensor(scaling: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(1,) fp32 on ``device``: a learned scaling stays in the graph (differentiable, no host sync)."""
    if isinstance(scaling, torch.Tensor):
        return scaling.reshape(1).to(torch.float32)
    return torch.full((1,), float(scaling), dtype=torch.float32, device=device)


# -- public ops ---------------------------------------------------------------------------------


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
    CUDA extension) — see ``FASTADAPT_BACKEND``.
    """
    _validate_bottleneck(x, w_down, w_up, activation, scaling, residual, dropout_p)
    chosen = _choose("bottleneck_adapter", backend, x, dropout_p)
    if chosen == "torch":
        return bottleneck_adapter_ref(
            x, w_down, w_up, activation=activation, scaling=scaling, residual=residual, dropout_p=dropout_p
        )
    d_in, d_out = x.shape[-1], w_up.shape[0]
    lead = x.shape[:-1]
    res2d = None if residual is None else residual.to(x.dtype).reshape(-1, d_out)
    out, _, _ = torch.ops.fastadapt.bottleneck_adapter_fwd(
        x.reshape(-1, d_in), w_down, w_up, _scaling_tensor(scaling, x.device), res2d,
        activation, float(dropout_p), chosen,
    )
    return out.reshape(*lead, d_out)


def parallel_adapter(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    *,
    activation: str,
    scaling: float | torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x Wᵀ (+ bias) + scaling · up(act(down(dropout(x))))`` (LLM-Adapters' parallel adapter).

    Shapes: x (..., K); weight (N, K) frozen; w_down (b, K); w_up (N, b); bias (N,) or None;
    returns (..., N) in x's dtype (or the autocast dtype). Adapter weights may be fp32 (cast to the
    compute dtype). Differentiable in x, w_down, w_up and a tensor scaling (and weight/bias when they
    require grad). Other arguments as in :func:`bottleneck_adapter`; the CUDA backend runs the
    series kernel with ``residual = x Wᵀ + bias``.
    """
    _validate_parallel(x, weight, w_down, w_up, activation, scaling, bias, dropout_p)
    chosen = _choose("parallel_adapter", backend, x, dropout_p)
    if chosen == "torch":
        return parallel_adapter_ref(
            x, weight, w_down, w_up, activation=activation, scaling=scaling, bias=bias, dropout_p=dropout_p
        )
    x, weight, bias = _autocast_inputs(x, weight, bias)
    if chosen == "cuda":
        base = F.linear(x, weight, bias)
        return bottleneck_adapter(
            x, w_down, w_up, activation=activation, scaling=scaling, residual=base, backend="cuda"
        )
    lead = x.shape[:-1]
    y, _, _ = torch.ops.fastadapt.parallel_adapter_fwd(
        x.reshape(-1, x.shape[-1]), weight, w_down, w_up, bias, _scaling_tensor(scaling, x.device),
        activation, float(dropout_p),
    )
    return y.reshape(*lead, weight.shape[0])


# -- custom ops: series (bottleneck with residual) ------------------------------------------------


@torch.library.custom_op("fastadapt::bottleneck_adapter_fwd", mutates_args=())
def bottleneck_adapter_fwd(
    x: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: torch.Tensor,
    residual: torch.Tensor | None,
    activation: str,
    dropout_p: float,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, d_in) -> (out (M, d_out), hidden (M, b) pre-activation, seed (int64 scalar on CPU)).
    ``impl``: "triton" or "cuda" (the extension; no dropout)."""
    seed = draw_seed(x.device) if dropout_p > 0 else 0
    wd, wu = w_down.to(x.dtype), w_up.to(x.dtype)
    if impl == "cuda":
        out, hidden = torch.ops.fastadapt_cuda.bottleneck_adapter_fwd(x, wd, wu, scaling, residual, activation)
    else:
        out, hidden = _kernels().bottleneck_fwd(
            x, wd, wu, scaling, activation=activation, residual=residual, dropout_p=dropout_p, seed=seed
        )
    return out, hidden, torch.tensor(seed, dtype=torch.int64)


@bottleneck_adapter_fwd.register_fake
def _(x, w_down, w_up, scaling, residual, activation, dropout_p, impl):
    m, b, n = x.shape[0], w_down.shape[0], w_up.shape[0]
    return x.new_empty(m, n), x.new_empty(m, b), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("fastadapt::bottleneck_adapter_bwd", mutates_args=())
def bottleneck_adapter_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    hidden: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    scaling: torch.Tensor,
    seed: torch.Tensor,
    activation: str,
    dropout_p: float,
    has_residual: bool,
    need_scaling_grad: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, d_in), d w_down, d w_up (in the parameters' dtypes), d scaling (1,) fp32).
    dx excludes the residual's own gradient (dout) when ``has_residual``."""
    wd, wu = w_down.to(x.dtype), w_up.to(x.dtype)
    if impl == "cuda":
        dx, dwd, dwu, ds = torch.ops.fastadapt_cuda.bottleneck_adapter_bwd(
            dout.contiguous(), x, hidden, wd, wu, scaling, activation, has_residual
        )
    else:
        dx, dwd, dwu, ds = _kernels().bottleneck_bwd(
            dout, x, hidden, wd, wu, scaling, activation=activation, has_residual=has_residual,
            dropout_p=dropout_p, seed=int(seed.item()),  # a CPU scalar: no device sync
            need_scaling_grad=need_scaling_grad,
        )
    if ds is None:
        ds = torch.zeros(1, dtype=torch.float32, device=x.device)
    return dx, dwd.to(w_down.dtype), dwu.to(w_up.dtype), ds.reshape(1).float()


@bottleneck_adapter_bwd.register_fake
def _(dout, x, hidden, w_down, w_up, scaling, seed, activation, dropout_p, has_residual, need_scaling_grad, impl):
    return (x.new_empty(x.shape), w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape),
            scaling.new_empty((1,), dtype=torch.float32))


def _bn_setup_context(ctx, inputs, output):
    x, w_down, w_up, scaling, residual, activation, dropout_p, impl = inputs
    _, hidden, seed = output
    ctx.save_for_backward(x, w_down, w_up, scaling, hidden, seed)
    ctx.activation, ctx.dropout_p, ctx.impl, ctx.has_residual = activation, dropout_p, impl, residual is not None


def _bn_backward(ctx, dout, _dhidden, _dseed):
    x, w_down, w_up, scaling, hidden, seed = ctx.saved_tensors
    need_x, need_wd, need_wu, need_s, need_res = ctx.needs_input_grad[:5]
    dx, dwd, dwu, ds = torch.ops.fastadapt.bottleneck_adapter_bwd(
        dout, x, hidden, w_down, w_up, scaling, seed, ctx.activation, ctx.dropout_p, ctx.has_residual,
        bool(need_s), ctx.impl,
    )
    dres = dout if ctx.has_residual and need_res else None
    return (dx if need_x else None, dwd if need_wd else None, dwu if need_wu else None,
            ds if need_s else None, dres, None, None, None)


bottleneck_adapter_fwd.register_autograd(_bn_backward, setup_context=_bn_setup_context)


# -- custom ops: parallel (extra-K LoRA structure with an activation on S) -------------------------


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    return BOTTLENECK_ACTIVATIONS[activation](h)


def _act_grad(h: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(h) for fp32 h (relu'(0) = 0, gelu exact), matching the Triton kernels' _activation_grad."""
    if activation == "tanh":
        t = torch.tanh(h)
        return 1.0 - t * t
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + h * pdf
    sig = torch.sigmoid(h)
    return sig * (1.0 + h * (1.0 - sig))


def _s_from_h(h: torch.Tensor, scaling: torch.Tensor, activation: str) -> torch.Tensor:
    """S = s · act(H) (M × b), from the fp32 values, rounded once to H's dtype."""
    return (scaling * _act(h.float(), activation)).to(h.dtype)


@torch.library.custom_op("fastadapt::parallel_adapter_fwd", mutates_args=())
def parallel_adapter_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: torch.Tensor,
    activation: str,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N), H (M, b) pre-activation (dropout applied), seed)."""
    kernels = _lora_kernels()
    seed = draw_seed(x.device) if dropout_p > 0 else 0
    wd, wu = w_down.to(x.dtype), w_up.to(x.dtype)
    h = kernels.lora_shrink(x, wd, scaling=1.0, dropout_p=dropout_p, seed=seed)
    s = _s_from_h(h, scaling, activation)
    y = kernels.lora_add_epilogue(x @ weight.t(), s, wu, bias)
    return y, h, torch.tensor(seed, dtype=torch.int64)


@parallel_adapter_fwd.register_fake
def _(x, weight, w_down, w_up, bias, scaling, activation, dropout_p):
    m, n, b = x.shape[0], weight.shape[0], w_down.shape[0]
    return x.new_empty(m, n), x.new_empty(m, b), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("fastadapt::parallel_adapter_bwd", mutates_args=())
def parallel_adapter_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    h: torch.Tensor,
    scaling: torch.Tensor,
    seed: torch.Tensor,
    activation: str,
    dropout_p: float,
    need_dx: bool,
    need_scaling_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K) or empty, d w_down, d w_up (parameters' dtypes), d scaling (1,) fp32)."""
    kernels = _lora_kernels()
    seed_value = int(seed.item())  # a CPU scalar: no device sync
    wd, wu = w_down.to(dy.dtype), w_up.to(dy.dtype)
    s = _s_from_h(h, scaling, activation)
    dS, dwu = kernels.lora_dy_pass(dy, s, wu)  # dS = dY W_up (fp32), dW_up = dYᵀ S
    hf = h.float()
    if need_scaling_grad:
        ds = (dS * _act(hf, activation)).sum().reshape(1)
    else:
        ds = torch.zeros(1, dtype=torch.float32, device=dy.device)
    dH = dS * _act_grad(hf, activation) * scaling  # fp32 (M, b)
    if need_dx:
        dx = kernels.lora_dx_epilogue(dy @ weight, dH, wd, scaling=1.0, dropout_p=dropout_p, seed=seed_value)
    else:
        dx = dy.new_empty(0)
    dwd = kernels.lora_grad_a(x, dH, scaling=1.0, dropout_p=dropout_p, seed=seed_value)
    return dx, dwd.to(w_down.dtype), dwu.to(w_up.dtype), ds


@parallel_adapter_bwd.register_fake
def _(dy, x, weight, w_down, w_up, h, scaling, seed, activation, dropout_p, need_dx, need_scaling_grad):
    dx = dy.new_empty(x.shape) if need_dx else dy.new_empty(0)
    return (dx, w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape),
            scaling.new_empty((1,), dtype=torch.float32))


def _par_setup_context(ctx, inputs, output):
    x, weight, w_down, w_up, bias, scaling, activation, dropout_p = inputs
    _, h, seed = output
    ctx.save_for_backward(x, weight, w_down, w_up, h, scaling, seed)
    ctx.activation, ctx.dropout_p, ctx.has_bias = activation, dropout_p, bias is not None


def _par_backward(ctx, dy, _dh, _dseed):
    x, weight, w_down, w_up, h, scaling, seed = ctx.saved_tensors
    need_x, need_w, need_wd, need_wu, need_bias, need_s = ctx.needs_input_grad[:6]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dwd, dwu, ds = torch.ops.fastadapt.parallel_adapter_bwd(
        dy, x, weight, w_down, w_up, h, scaling, seed, ctx.activation, ctx.dropout_p, bool(need_x), bool(need_s)
    )
    dweight = (dy.t() @ x).to(weight.dtype) if need_w else None  # the frozen path sees no dropout
    dbias = dy.sum(0).to(weight.dtype) if need_bias and ctx.has_bias else None
    return (dx if need_x else None, dweight, dwd if need_wd else None, dwu if need_wu else None, dbias,
            ds if need_s else None, None, None)


parallel_adapter_fwd.register_autograd(_par_backward, setup_context=_par_setup_context)


# -- validation -----------------------------------------------------------------------------------


def _check_common(x, w_down, w_up, activation, scaling, dropout_p, extra: dict) -> None:
    tensors = {"x": x, "w_down": w_down, "w_up": w_up, **extra}
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if is_dtensor(t):
            raise RuntimeError(SHARDED_ERROR.format(name=name))
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t is not x and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move both to one device")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., d_in), got shape {tuple(x.shape)}")
    if not isinstance(activation, str) or activation not in BOTTLENECK_ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(BOTTLENECK_ACTIVATIONS)}, got {activation!r}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise ValueError(
                f"scaling must be a number or a 1-element float tensor, got a {scaling.dtype} tensor of shape "
                f"{tuple(scaling.shape)}"
            )
        if scaling.device != x.device:
            raise ValueError(f"scaling is on {scaling.device} but x is on {x.device}; move both to one device")
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number or a 1-element float tensor, got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _check_adapter_shapes(d_in: int, d_out: int, w_down, w_up, in_name: str, out_name: str) -> None:
    if w_down.dim() != 2 or w_down.shape[1] != d_in or w_down.shape[0] < 1:
        raise ValueError(f"w_down must have shape (b, {in_name}) = (b, {d_in}) with b ≥ 1, got {tuple(w_down.shape)}")
    b = w_down.shape[0]
    if tuple(w_up.shape) != (d_out, b):
        raise ValueError(f"w_up must have shape ({out_name}, b) = ({d_out}, {b}), got {tuple(w_up.shape)}")


def _validate_bottleneck(x, w_down, w_up, activation, scaling, residual, dropout_p) -> None:
    _check_common(x, w_down, w_up, activation, scaling, dropout_p, {"residual": residual})
    d_in = x.shape[-1]
    if residual is None:
        _check_adapter_shapes(d_in, d_in, w_down, w_up, "d_in", "d_in")
        return
    d_out = w_up.shape[0] if w_up.dim() == 2 else -1
    _check_adapter_shapes(d_in, d_out, w_down, w_up, "d_in", "d_out")
    if tuple(residual.shape) != (*x.shape[:-1], d_out):
        raise ValueError(
            f"residual must have shape (..., d_out) = {(*x.shape[:-1], d_out)}, got {tuple(residual.shape)}"
        )


def _validate_parallel(x, weight, w_down, w_up, activation, scaling, bias, dropout_p) -> None:
    _check_common(x, w_down, w_up, activation, scaling, dropout_p, {"weight": weight, "bias": bias})
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension in_features = {k}, got shape {tuple(x.shape)}")
    _check_adapter_shapes(k, n, w_down, w_up, "in_features", "out_features")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (out_features,) = ({n},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under torch.autocast)")
