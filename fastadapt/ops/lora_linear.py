"""``fa.ops.lora_linear``: a frozen linear plus its LoRA term, with backend dispatch.

The Triton backend is two custom ops (``fastadapt::lora_linear_fwd`` / ``_bwd``, with fake impls
and registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break):

forward   S = scaling · drop(X) Aᵀ   (one pass over X)
          Y = X Wᵀ + S Bᵀ (+ bias)   (cuBLAS base + fused epilogue, or one extra-K Triton GEMM)
backward  dS = dY B, dB = dYᵀ S      (one pass over dY)
          dX = dY W + mask ⊙ (scaling · dS A)/(1-p)
          dA = scaling · dSᵀ (mask ⊙ X)/(1-p)

Saved for backward: X (the graph holds it anyway), S (M × r) and the Philox seed: no dropout mask
and no dropped copy of X. The seed is drawn from torch's generator for X's device, so
``torch.manual_seed`` makes runs reproducible and ``torch.utils.checkpoint`` (which restores the RNG
state) regenerates the same mask on recomputation.
"""

from __future__ import annotations

import torch

from .. import _checks
from ._inputs import autocast_inputs, check_dropout_p, check_linear, check_tensors, draw_seed, seed_tensor
from ._library import custom_op, register_autograd
from .dispatch import resolve_backend, triton_usable
from .reference import lora_linear_ref

_AVAILABLE = {"triton": triton_usable}


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x Wᵀ (+ bias) + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Shapes: x (..., K), weight (N, K) (frozen), lora_a (r, K), lora_b (N, r), bias (N,) or None;
    returns (..., N) in x's dtype (or the autocast dtype). Adapter weights may be fp32: they are cast
    to the activation dtype, activations are never upcast; matmuls accumulate in fp32.
    fp32 inputs on the Triton backend follow torch's TF32 switch
    (``torch.backends.cuda.matmul.allow_tf32``): TF32 when it is on, full fp32 when off.
    Differentiable in x, lora_a, lora_b (and weight/bias when they require grad).
    ``dropout_p`` applies to the input of the LoRA path only; pass 0 in eval mode.
    ``backend``: "auto" | "torch" | "triton" (see ``FASTADAPT_BACKEND``).
    """
    _validate_lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    chosen = selected_backend(x.device, backend)
    if chosen == "torch":
        return lora_linear_ref(x, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    lead = x.shape[:-1]
    y, _, _ = torch.ops.fastadapt.lora_linear_fwd(
        x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, bias, float(scaling), float(dropout_p)
    )
    return y.reshape(*lead, weight.shape[0])


def selected_backend(device: torch.device, backend: str = "auto") -> str:
    """The backend ``lora_linear`` would run on ``device``."""
    return resolve_backend("lora_linear", backend, device, available=_AVAILABLE)


# -- Triton backend: custom ops -------------------------------------------------------------------

# When the extra-K Triton GEMM beats cuBLAS + epilogue is a per-shape measurement still owed to a GPU
# session; until then the base product always runs on cuBLAS (never slower than the baseline).
FUSED_GEMM_SHAPES: set[tuple[int, int, int]] = set()


def _use_fused_gemm(m: int, n: int, k: int) -> bool:
    return (m, n, k) in FUSED_GEMM_SHAPES


def _kernels():
    from fastadapt.kernels import lora_linear as kernels  # imported late: TRITON_INTERPRET is read then

    return kernels


def _fwd_fake(x, weight, lora_a, lora_b, bias, scaling, dropout_p):
    m, n, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    return x.new_empty(m, n), x.new_empty(m, r), torch.empty((), dtype=torch.int64)


@custom_op("lora_linear_fwd", fake=_fwd_fake)
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N), s (M, r), seed (int64 scalar on CPU))."""
    kernels = _kernels()
    seed = draw_seed(x.device) if dropout_p > 0 else 0
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    s = kernels.lora_shrink(x, a, scaling=scaling, dropout_p=dropout_p, seed=seed)
    m, k = x.shape
    n = weight.shape[0]
    if _use_fused_gemm(m, n, k):
        y = kernels.lora_expand(x, weight, s, b, bias)
    else:
        y = kernels.lora_add_epilogue(x @ weight.t(), s, b, bias)
    return y, s, seed_tensor(seed)


def _bwd_fake(dy, x, weight, lora_a, lora_b, s, seed, scaling, dropout_p, need_dx):
    dx = dy.new_empty(x.shape) if need_dx else dy.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


@custom_op("lora_linear_bwd", fake=_bwd_fake)
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K) or empty, d lora_a (r, K), d lora_b (N, r)) in the parameters' dtypes."""
    kernels = _kernels()
    seed_value = int(seed.item())  # a CPU scalar: no device sync
    a, b = lora_a.to(dy.dtype), lora_b.to(dy.dtype)
    ds, db = kernels.lora_dy_pass(dy, s, b)
    if need_dx:
        m, n = dy.shape
        k = weight.shape[1]
        if _use_fused_gemm(m, n, k):
            dx = kernels.lora_dx(dy, weight, ds, a, scaling=scaling, dropout_p=dropout_p, seed=seed_value)
        else:
            dx = kernels.lora_dx_epilogue(dy @ weight, ds, a, scaling=scaling, dropout_p=dropout_p, seed=seed_value)
    else:
        dx = dy.new_empty(0)
    da = kernels.lora_grad_a(x, ds, scaling=scaling, dropout_p=dropout_p, seed=seed_value)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p = inputs
    _, s, seed = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, seed)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None


def _backward(ctx, dy, _ds, _dseed):
    x, weight, lora_a, lora_b, s, seed = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, da, db = torch.ops.fastadapt.lora_linear_bwd(
        dy, x, weight, lora_a, lora_b, s, seed, ctx.scaling, ctx.dropout_p, bool(need_x)
    )
    dweight = (dy.t() @ x).to(weight.dtype) if need_w else None  # the base product sees no dropout
    dbias = dy.sum(0).to(weight.dtype) if need_bias and ctx.has_bias else None
    return (dx if need_x else None), dweight, (da if need_a else None), (db if need_b else None), dbias, None, None


register_autograd(lora_linear_fwd, backward=_backward, setup_context=_setup_context)


# -- shared-input groups (q/k/v, gate/up): one pass over X for all the members' S ------------------


def lora_linear_group(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    *,
    scaling: float,
    biases: list[torch.Tensor | None] | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """``[lora_linear(x, weights[i], lora_as[i], lora_bs[i], ...)]`` for layers that read the same x.

    On the Triton backend S for every member comes from one pass over X (the A's concatenated),
    the backward reads X once for every dA, and dX is one sum of the members' dY W plus one rank
    epilogue. The members then share one dropout mask per call (each still drops with
    probability ``dropout_p``); the torch backend draws one mask per member.
    """
    biases = list(biases) if biases is not None else [None] * len(weights)
    if not (len(weights) == len(lora_as) == len(lora_bs) == len(biases)) or not weights:
        raise ValueError(
            f"weights, lora_as, lora_bs and biases must be non-empty lists of one length, got "
            f"{len(weights)}, {len(lora_as)}, {len(lora_bs)}, {len(biases)}"
        )
    for w, a, b, c in zip(weights, lora_as, lora_bs, biases):
        _validate_lora_linear(x, w, a, b, scaling, c, dropout_p)
    chosen = selected_backend(x.device, backend)
    if chosen == "torch":
        return [
            lora_linear_ref(x, w, a, b, scaling=scaling, bias=c, dropout_p=dropout_p)
            for w, a, b, c in zip(weights, lora_as, lora_bs, biases)
        ]
    x_in = x
    cast = []
    for w, c in zip(weights, biases):
        x_in, w, c = autocast_inputs(x, w, c)
        cast.append((w, c))
    lead = x.shape[:-1]
    ys, _, _ = torch.ops.fastadapt.lora_linear_group_fwd(
        x_in.reshape(-1, x.shape[-1]),
        [w for w, _ in cast],
        list(lora_as),
        list(lora_bs),
        [x.new_empty(0) if c is None else c for _, c in cast],  # empty = no bias (no Optional lists)
        float(scaling),
        float(dropout_p),
    )
    return [y.reshape(*lead, w.shape[0]) for y, (w, _) in zip(ys, cast)]


def _rank_slices(lora_as: list[torch.Tensor]) -> list[slice]:
    out, start = [], 0
    for a in lora_as:
        out.append(slice(start, start + a.shape[0]))
        start += a.shape[0]
    return out


def _group_fwd_fake(x, weights, lora_as, lora_bs, biases, scaling, dropout_p):
    m = x.shape[0]
    r = sum(a.shape[0] for a in lora_as)
    return [x.new_empty(m, w.shape[0]) for w in weights], x.new_empty(m, r), torch.empty((), dtype=torch.int64)


@custom_op("lora_linear_group_fwd", fake=_group_fwd_fake)
def lora_linear_group_fwd(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    biases: list[torch.Tensor],
    scaling: float,
    dropout_p: float,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """x (M, K) -> (ys [(M, N_i)], s_cat (M, Σr_i), seed)."""
    kernels = _kernels()
    seed = draw_seed(x.device) if dropout_p > 0 else 0
    a_cat = torch.cat([a.to(x.dtype) for a in lora_as])
    s_cat = kernels.lora_shrink(x, a_cat, scaling=scaling, dropout_p=dropout_p, seed=seed)
    ys = [
        kernels.lora_add_epilogue(x @ w.t(), s_cat[:, sl], b.to(x.dtype), c if c.numel() else None)
        for w, b, c, sl in zip(weights, lora_bs, biases, _rank_slices(lora_as))
    ]
    return ys, s_cat, seed_tensor(seed)


def _group_bwd_fake(dys, x, weights, lora_as, lora_bs, s_cat, seed, scaling, dropout_p, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, [a.new_empty(a.shape) for a in lora_as], [b.new_empty(b.shape) for b in lora_bs]


@custom_op("lora_linear_group_bwd", fake=_group_bwd_fake)
def lora_linear_group_bwd(
    dys: list[torch.Tensor],
    x: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    s_cat: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """-> (dx (M, K) or empty, [d lora_a_i], [d lora_b_i]); ``dys[i]`` may be empty (no gradient)."""
    kernels = _kernels()
    seed_value = int(seed.item())
    m, k = x.shape
    slices = _rank_slices(lora_as)
    ds_parts, dbs = [], []
    for dy, b, sl in zip(dys, lora_bs, slices):
        if dy.numel() == 0:
            ds_parts.append(torch.zeros(m, sl.stop - sl.start, device=x.device, dtype=torch.float32))
            dbs.append(torch.zeros_like(b))
            continue
        ds, db = kernels.lora_dy_pass(dy, s_cat[:, sl], b.to(dy.dtype))
        ds_parts.append(ds)
        dbs.append(db.to(b.dtype))
    ds_cat = torch.cat(ds_parts, dim=1)
    a_cat = torch.cat([a.to(x.dtype) for a in lora_as])
    if need_dx:
        dx = torch.zeros(m, k, device=x.device, dtype=x.dtype)
        for dy, w in zip(dys, weights):
            if dy.numel():
                dx.addmm_(dy, w)
        kernels.lora_dx_epilogue(dx, ds_cat, a_cat, scaling=scaling, dropout_p=dropout_p, seed=seed_value)
    else:
        dx = x.new_empty(0)
    da_cat = kernels.lora_grad_a(x, ds_cat, scaling=scaling, dropout_p=dropout_p, seed=seed_value)
    das = [da_cat[sl].to(a.dtype, copy=True) for a, sl in zip(lora_as, slices)]  # outputs must not alias
    return dx, das, dbs


def _group_setup_context(ctx, inputs, output):
    x, weights, lora_as, lora_bs, biases, scaling, dropout_p = inputs
    _, s_cat, seed = output
    n = len(weights)
    ctx.n = n
    ctx.save_for_backward(x, s_cat, seed, *weights, *lora_as, *lora_bs)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _group_backward(ctx, dys, _ds, _dseed):
    x, s_cat, seed, *rest = ctx.saved_tensors
    n = ctx.n
    weights, lora_as, lora_bs = rest[:n], rest[n : 2 * n], rest[2 * n :]
    dys = [x.new_empty(0) if dy is None else (dy if dy.stride(-1) == 1 else dy.contiguous()) for dy in dys]
    need_x = ctx.needs_input_grad[0]
    dx, das, dbs = torch.ops.fastadapt.lora_linear_group_bwd(
        dys, x, list(weights), list(lora_as), list(lora_bs), s_cat, seed, ctx.scaling, ctx.dropout_p, bool(need_x)
    )
    # Frozen base weights and biases get no gradient here; LoraLinear never trains them.
    return (dx if need_x else None), [None] * n, das, dbs, [None] * n, None, None


register_autograd(lora_linear_group_fwd, backward=_group_backward, setup_context=_group_setup_context)


# -- validation -----------------------------------------------------------------------------------


def _validate_lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p) -> None:
    check_tensors(x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    n, k = check_linear(x, weight, bias)
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, in_features) = (r, {k}), got {tuple(lora_a.shape)}")
    if lora_a.shape[0] < 1:
        raise ValueError(f"lora_a must have at least one row (rank r ≥ 1), got shape {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_b must have shape (out_features, r) = ({n}, {r}), got {tuple(lora_b.shape)}")
    _checks.finite_number("scaling", scaling)
    check_dropout_p(dropout_p)
