"""``fa.ops.parallel_adapter``: LLM-Adapters' parallel adapter beside a frozen linear,
``y = x Wᵀ (+ bias) + s·up(act(down(dropout(x))))``.

Triton backend: the LoRA extra-K structure with the activation applied to S (custom ops
``fastadapt::parallel_adapter_fwd/_bwd``, LoRA kernels from ``kernels/fastadapt_kernels/lora_linear.py``)::

    forward   H, mask = drop(x) W_downᵀ         lora_shrink (one pass over x; the mask drawn once,
                                                kept packed), H saved (M × b)
              S = s · act(H)                    torch, M × b elementwise
              Y = x Wᵀ + S W_upᵀ (+ bias)        the frozen GEMM joined to the rank term (LoRA's
                                                variants: ops/lora_linear.py)
    backward  dS = dY W_up, dW_up = dYᵀ S        lora_dy_pass
              dH = s · dS ⊙ act'(H)             torch, M × b elementwise (ds = Σ dS ⊙ act(H))
              dX = dY W + mask ⊙ (dH W_down)/(1-p)   as LoRA's dX
              dW_down = dHᵀ (mask ⊙ x)/(1-p)    lora_grad_a (the stored mask)

S is recomputed from H in backward (M × b elementwise) instead of being saved too. The CUDA
backend runs the series kernel (``fa.ops.bottleneck_adapter``) with ``residual = x Wᵀ + bias``; the
torch backend runs ``torch_backend.parallel_adapter`` (x, act(H) or H, the mask bits: its docstring says which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import torch_backend
from ._inputs import autocast_inputs, check_linear, check_tensors, draw_kernel_seed
from ._library import SEEDED, custom_op, register_autograd
from .bottleneck_adapter import bottleneck_adapter, check_adapter, choose_backend, cuda_usable, scaling_tensor
from .dispatch import TORCH_BACKENDS, register_op, triton_usable
from .lora_linear import frozen_plus_rank, keep_scale, selected_variant
from .reference import BOTTLENECK_ACTIVATIONS, activation_grad, parallel_adapter_ref

__all__ = ["parallel_adapter", "selected_backend"]


def _kernels():
    from fastadapt.kernels import lora_linear as kernels  # late: TRITON_INTERPRET is read then

    return kernels


register_op("parallel_adapter", {"cuda": cuda_usable, "triton": triton_usable})


def selected_backend(x: torch.Tensor, backend: str = "auto", *, dropout_p: float = 0.0) -> str:
    """The backend ``parallel_adapter`` would run for ``x``."""
    return choose_backend("parallel_adapter", backend, x, dropout_p)


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
    require grad). Other arguments as in :func:`fastadapt.ops.bottleneck_adapter`; the CUDA backend
    runs the series kernel with ``residual = x Wᵀ + bias``.
    """
    check_tensors(x, weight=weight, w_down=w_down, w_up=w_up, bias=bias)
    n, k = check_linear(x, weight, bias)
    check_adapter(x, w_down, w_up, activation, scaling, dropout_p, k, n, "in_features", "out_features")
    chosen = selected_backend(x, backend, dropout_p=dropout_p)
    if chosen in TORCH_BACKENDS:
        impl = torch_backend.parallel_adapter if chosen == "torch" else parallel_adapter_ref
        return impl(x, weight, w_down, w_up, activation=activation, scaling=scaling, bias=bias, dropout_p=dropout_p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    if chosen == "cuda":
        base = F.linear(x, weight, bias)
        return bottleneck_adapter(
            x, w_down, w_up, activation=activation, scaling=scaling, residual=base, backend="cuda"
        )
    lead = x.shape[:-1]
    y, _, _ = parallel_adapter_fwd(
        x.reshape(-1, x.shape[-1]), weight, w_down, w_up, bias, scaling_tensor(scaling, x.device),
        activation, float(dropout_p),
    )
    return y.reshape(*lead, weight.shape[0])


def _s_from_h(h: torch.Tensor, scaling: torch.Tensor, activation: str) -> torch.Tensor:
    """S = s · act(H) (M × b), from the fp32 values, rounded once to H's dtype."""
    return (scaling * BOTTLENECK_ACTIVATIONS[activation](h.float())).to(h.dtype)


def _fwd_fake(x, weight, w_down, w_up, bias, scaling, activation, dropout_p):
    (m, k), n, b = x.shape, weight.shape[0], w_down.shape[0]
    bits = x.new_empty((m, (k + 31) // 32) if dropout_p > 0 else (0,), dtype=torch.int32)
    return x.new_empty(m, n), x.new_empty(m, b), bits


@custom_op("parallel_adapter_fwd", fake=_fwd_fake, tags=SEEDED)
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
    """x (M, K) -> (y (M, N), H (M, b) pre-activation (dropout applied), the packed mask or empty)."""
    seed = draw_kernel_seed(x.device) if dropout_p > 0 else 0
    h, bits = _kernels().lora_shrink(x, w_down, scaling=1.0, dropout_p=dropout_p, seed=seed)
    y = frozen_plus_rank(x, weight, _s_from_h(h, scaling, activation), w_up, bias=bias,
                         variant=selected_variant(x.shape[0], x.device, op="parallel_adapter"))
    return y, h, bits if bits is not None else x.new_empty(0, dtype=torch.int32)


def _bwd_fake(dy, x, weight, w_down, w_up, h, scaling, bits, activation, dropout_p, need_dx, need_scaling_grad):
    dx = dy.new_empty(x.shape) if need_dx else dy.new_empty(0)
    return (dx, w_down.new_empty(w_down.shape), w_up.new_empty(w_up.shape),
            scaling.new_empty((1,), dtype=torch.float32))


@custom_op("parallel_adapter_bwd", fake=_bwd_fake)
def parallel_adapter_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor,
    h: torch.Tensor,
    scaling: torch.Tensor,
    bits: torch.Tensor,
    activation: str,
    dropout_p: float,
    need_dx: bool,
    need_scaling_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K) or empty, d w_down, d w_up (parameters' dtypes), d scaling (1,) fp32)."""
    kernels = _kernels()
    mask = bits if bits.numel() else None
    s = _s_from_h(h, scaling, activation)
    dS, dwu = kernels.lora_dy_pass(dy, s, w_up)  # dS = dY W_up (fp32), dW_up = dYᵀ S
    hf = h.float()
    if need_scaling_grad:
        ds = (dS * BOTTLENECK_ACTIVATIONS[activation](hf)).sum().reshape(1)
    else:
        ds = torch.zeros(1, dtype=torch.float32, device=dy.device)
    dH = dS * activation_grad(hf, activation) * scaling  # fp32 (M, b)
    if need_dx:
        dx = frozen_plus_rank(dy, weight.t(), dH, w_down.t(), scale=keep_scale(dropout_p), bits=mask,
                              variant=selected_variant(dy.shape[0], dy.device, op="parallel_adapter"))
    else:
        dx = dy.new_empty(0)
    dwd = kernels.lora_grad_a(x, dH, scaling=1.0, dropout_p=dropout_p, bits=mask)
    return dx, dwd.to(w_down.dtype), dwu.to(w_up.dtype), ds


def _setup_context(ctx, inputs, output):
    x, weight, w_down, w_up, bias, scaling, activation, dropout_p = inputs
    _, h, bits = output
    ctx.save_for_backward(x, weight, w_down, w_up, h, scaling, bits)
    ctx.activation, ctx.dropout_p, ctx.has_bias = activation, dropout_p, bias is not None


def _backward(ctx, dy, _dh, _dbits):
    x, weight, w_down, w_up, h, scaling, bits = ctx.saved_tensors
    need_x, need_w, need_wd, need_wu, need_bias, need_s = ctx.needs_input_grad[:6]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, dwd, dwu, ds = parallel_adapter_bwd(
        dy, x, weight, w_down, w_up, h, scaling, bits, ctx.activation, ctx.dropout_p, bool(need_x), bool(need_s)
    )
    dweight = (dy.t() @ x).to(weight.dtype) if need_w else None  # the frozen path sees no dropout
    dbias = dy.sum(0).to(weight.dtype) if need_bias and ctx.has_bias else None
    return (dx if need_x else None, dweight, dwd if need_wd else None, dwu if need_wu else None, dbias,
            ds if need_s else None, None, None)


register_autograd(parallel_adapter_fwd, backward=_backward, setup_context=_setup_context)
