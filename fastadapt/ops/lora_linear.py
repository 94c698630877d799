"""``fa.ops.lora_linear``: a frozen linear plus its LoRA term, with backend dispatch.

The Triton backend is two custom ops (``fastadapt::lora_linear_fwd`` / ``_bwd``, with fake impls and
registered autograd, so ``torch.compile(fullgraph=True)`` sees no graph break)::

    forward   S, mask = shrink(X)                 one pass over X; the dropout mask drawn once, kept
                                                  packed (1 bit per element)
              Y = X Wᵀ + S Bᵀ (+ bias)            the base GEMM joined to the rank term, by VARIANT
    backward  dS = dY B, dB = dYᵀ S              one pass over dY
              dX = dY W + mask ⊙ (s · dS A)       by VARIANT            (s = scaling / (1-p))
              dA = s · dSᵀ (mask ⊙ X)             one pass over X

VARIANTS of joining the rank term to a frozen GEMM (forward Y and backward dX alike):
``"addmm"`` — the rank term written first into the output, then cuBLAS accumulates the base
product onto it (``addmm_``, beta=1): the extra read rides inside a compute-bound GEMM; the cuBLAS
GEMM is never slower than the frozen layer's own. ``"epilogue"`` — cuBLAS first, then the rank
term added by a read-modify-write pass. ``"fused"`` — one Triton GEMM with the rank as extra
reduction steps: no extra pass at all, but as fast as cuBLAS only if the Triton GEMM is. Which
wins is measured per shape on a GPU (``bench/``); until then ``addmm``.

Saved for backward: X (the graph holds it anyway), S (M × r) and the packed mask (M·K/8 bytes):
never a byte mask, never a dropped copy of X. The seed comes from torch's generator for X's
device, so ``torch.manual_seed`` makes runs reproducible and ``torch.utils.checkpoint`` (which
restores the RNG state) redraws the same mask on recomputation.

The torch backend (what ``auto`` runs without a GPU verification record) trains through
``torch_backend.lora_linear``: the reference's function in torch operations, keeping x, S and the
mask at 1 bit per element (drawn as ``F.dropout`` draws it) — no dropped copy, no byte mask.
Without gradients (inference, decode) it runs as three launches — base GEMM, rank projection,
``addmm_`` with the scaling as alpha — on A and B cast to the activation dtype per call (no
cache: ``_cache``'s module docstring says why). ``backend="reference"`` runs
``reference.lora_linear_ref`` (plain autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks, settings
from . import torch_backend, verification
from ._inputs import autocast_inputs, check_dropout_p, check_linear, check_tensors, draw_kernel_seed
from ._library import SEEDED, custom_op, register_autograd
from .dispatch import decide, register_op, triton_usable
from .reference import lora_linear_ref

VARIANTS = ("addmm", "epilogue", "fused")
#: Until a GPU run records a faster variant: the one whose base product is cuBLAS's.
DEFAULT_VARIANT = "addmm"

_AVAILABLE = {"triton": triton_usable}
register_op("lora_linear", _AVAILABLE)
register_op("lora_linear_group", _AVAILABLE)


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
    ``backend``: "auto" | "torch" | "triton" | "reference" (see ``FASTADAPT_BACKEND``).
    """
    chosen = _checked_backend(x, weight, lora_a, lora_b, scaling, bias, dropout_p, backend)
    if chosen == "torch":
        return _torch_path(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    if chosen == "reference":
        return lora_linear_ref(x, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    lead = x.shape[:-1]
    y, _, _ = lora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, bias, float(scaling),
                              float(dropout_p))
    return y.reshape(*lead, weight.shape[0])


def selected_backend(device: torch.device, backend: str = "auto", *, rows: int | None = None,
                     op: str = "lora_linear") -> str:
    """The backend ``lora_linear`` (or ``op``: ``lora_linear_group``) would run on ``device`` for an
    input of ``rows`` rows."""
    return decide(op, backend, device, available=_AVAILABLE, rows=rows).backend


def selected_variant(m: int, device: torch.device, *, op: str = "lora_linear") -> str:
    """How the Triton path joins the rank term to the frozen GEMM for an M-row problem:
    ``FASTADAPT_LORA_VARIANT`` if set, else the variant the GPU verification record of ``op`` for
    this device and shape class measured fastest, else ``addmm``."""
    forced = settings.lora_variant()
    if forced is not None:
        return _checks.one_of("FASTADAPT_LORA_VARIANT", forced, VARIANTS)
    verdict = verification.find(op, "triton", device, m)
    variant = verdict.record.get("variant") if verdict.verified and verdict.record else None
    return variant if variant in VARIANTS else DEFAULT_VARIANT


# -- torch backend --------------------------------------------------------------------------------


def _low_precision(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, cast on every call: checking a cached copy for freshness reads as much as
    casting does (``_cache``'s module docstring; bench/NOTES.md, "Caches")."""
    return t if t.dtype == dtype else t.detach().to(dtype)


def _torch_path(x, weight, lora_a, lora_b, scaling, bias, dropout_p):
    grad = torch.is_grad_enabled() and (
        lora_a.requires_grad or lora_b.requires_grad or x.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad))
    if grad or dropout_p > 0 or torch.compiler.is_compiling():  # the training path: no cache is read
        return torch_backend.lora_linear(x, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p)
    # No gradient (inference, decode): the base GEMM, the rank projection, addmm_ with the scaling
    # as alpha, on A and B cast to the activation dtype.
    y = F.linear(x, weight, bias)
    dtype = y.dtype
    s = F.linear(x if x.dtype is dtype else x.to(dtype), _low_precision(lora_a, dtype))
    b = _low_precision(lora_b, dtype).t()
    if y.dim() == 2:
        return y.addmm_(s, b, alpha=scaling)
    y.view(-1, y.shape[-1]).addmm_(s.view(-1, s.shape[-1]), b, alpha=scaling)
    return y


# -- Triton backend: custom ops -------------------------------------------------------------------


def _kernels():
    from fastadapt.kernels import lora_linear as kernels  # imported late: TRITON_INTERPRET is read then

    return kernels


def _no_bits(x: torch.Tensor) -> torch.Tensor:
    """The op's mask output when there is no dropout (custom ops return tensors, not None)."""
    return x.new_empty(0, dtype=torch.int32)


def _bits_or_none(bits: torch.Tensor) -> torch.Tensor | None:
    return bits if bits.numel() else None


def keep_scale(dropout_p: float) -> float:
    """1/(1-p) for the realised dropout probability of the stored mask (a multiple of 1/65536): the
    kernels' own rule (``kernels/fastadapt_kernels/_common.py``), for the ops that pass it to them."""
    return _kernels().keep_scale(dropout_p)


def frozen_plus_rank(a, weight, s, b, *, bias=None, scale=1.0, bits=None, variant: str) -> torch.Tensor:
    """``a @ weightᵀ + scale · [mask ⊙] (s @ bᵀ) (+ bias)`` by ``variant`` (see the module docstring):
    forward Y (a = X, weight = W) and backward dX (a = dY, weight = Wᵀ, s = dS, b = Aᵀ)."""
    kernels = _kernels()
    if variant == "fused":
        return kernels.lora_gemm(a, weight, s, b, scale=scale, bias=bias, bits=bits,
                                 tune=settings.flag("FASTADAPT_AUTOTUNE"))
    if variant == "epilogue":
        out = a @ weight.t()
        return kernels.lora_rank(s, b, out=out, scale=scale, bias=bias, bits=bits, accumulate=True)
    out = kernels.lora_rank(s, b, out_dtype=a.dtype, scale=scale, bias=bias, bits=bits)
    return out.addmm_(a, weight.t())


def _fwd_fake(x, weight, lora_a, lora_b, bias, scaling, dropout_p):
    m, k = x.shape
    bits = x.new_empty((m, (k + 31) // 32) if dropout_p > 0 else (0,), dtype=torch.int32)
    return x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_a.shape[0]), bits


@custom_op("lora_linear_fwd", fake=_fwd_fake, tags=SEEDED)
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N), s (M, r), the packed dropout mask (M, ⌈K/32⌉) int32 or empty)."""
    seed = draw_kernel_seed(x.device) if dropout_p > 0 else 0
    s, bits = _kernels().lora_shrink(x, lora_a, scaling=scaling, dropout_p=dropout_p, seed=seed)
    y = frozen_plus_rank(x, weight, s, lora_b, bias=bias, variant=selected_variant(x.shape[0], x.device))
    return y, s, bits if bits is not None else _no_bits(x)


def _bwd_fake(dy, x, weight, lora_a, lora_b, s, bits, scaling, dropout_p, need_dx):
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
    bits: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K) or empty, d lora_a (r, K), d lora_b (N, r)) in the parameters' dtypes."""
    kernels = _kernels()
    mask = _bits_or_none(bits)
    ds, db = kernels.lora_dy_pass(dy, s, lora_b)
    dx, da = dx_and_grad_a(dy, weight, ds, lora_a, x, scaling=scaling, dropout_p=dropout_p, bits=mask,
                           variant=selected_variant(dy.shape[0], dy.device), need_dx=need_dx)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype)


def grad_a_inside_dx(variant: str, m: int, k: int, r: int) -> bool:
    """Where dA is computed: inside dX's GEMM when we own it (``fused``) and its per-row-block
    partials stay under the temporaries' cap; else by its own pass over X (``lora_grad_a``). For
    ``addmm`` / ``epilogue`` (cuBLAS dX) the model puts it in its own pass: inside the rank kernel
    it would write one (r, K) partial per 128-row block where the pass splits M only to fill the
    GPU (bench/NOTES.md, "dA placement")."""
    return variant == "fused" and _kernels().grad_a_partial_bytes(m, k, r) <= _kernels().PARTIAL_BYTES_CAP


def dx_and_grad_a(dy, weight, ds, lora_a, x, *, scaling, dropout_p, bits, variant: str, need_dx: bool):
    """(dX or empty, dA fp32) for the backward: dX = dY W + mask ⊙ (s · dS A) by ``variant``, dA =
    s · dSᵀ (mask ⊙ X) inside it or by its own pass (:func:`grad_a_inside_dx`); s = scaling / (1-p).
    ``dy``/``weight`` may be one member's of a group whose other members add their dY W later."""
    kernels = _kernels()
    scale = scaling * keep_scale(dropout_p)
    m, k = x.shape
    if need_dx and grad_a_inside_dx(variant, m, k, ds.shape[1]):
        return kernels.lora_gemm_dx(dy, weight.t(), ds, lora_a.t(), x, scale=scale, bits=bits,
                                    tune=settings.flag("FASTADAPT_AUTOTUNE"))
    dx = (frozen_plus_rank(dy, weight.t(), ds, lora_a.t(), scale=scale, bits=bits, variant=variant) if need_dx
          else dy.new_empty(0))
    return dx, kernels.lora_grad_a(x, ds, scaling=scaling, dropout_p=dropout_p, bits=bits)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p = inputs
    _, s, bits = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, s, bits)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None


def _backward(ctx, dy, _ds, _dbits):
    x, weight, lora_a, lora_b, s, bits = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, da, db = lora_linear_bwd(dy, x, weight, lora_a, lora_b, s, bits, ctx.scaling, ctx.dropout_p, bool(need_x))
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
    the backward reads X once for every dA, and dX is one rank term plus each member's dY W
    accumulated onto it by cuBLAS. The members then share one dropout mask per call (each still
    drops with probability ``dropout_p``); the torch backend draws one mask per member.
    """
    biases = list(biases) if biases is not None else [None] * len(weights)
    if not (len(weights) == len(lora_as) == len(lora_bs) == len(biases)) or not weights:
        raise ValueError(
            f"weights, lora_as, lora_bs and biases must be non-empty lists of one length, got "
            f"{len(weights)}, {len(lora_as)}, {len(lora_bs)}, {len(biases)}"
        )
    chosen = {_checked_backend(x, w, a, b, scaling, c, dropout_p, backend, op="lora_linear_group")
              for w, a, b, c in zip(weights, lora_as, lora_bs, biases)}
    if chosen == {"torch"}:  # one call per member: each draws its own mask, as PEFT's do
        return [_torch_path(x, w, a, b, scaling, c, dropout_p) for w, a, b, c in zip(weights, lora_as, lora_bs, biases)]
    if chosen == {"reference"}:
        return [lora_linear_ref(x, w, a, b, scaling=scaling, bias=c, dropout_p=dropout_p)
                for w, a, b, c in zip(weights, lora_as, lora_bs, biases)]
    x_in = x
    cast = []
    for w, c in zip(weights, biases):
        x_in, w, c = autocast_inputs(x, w, c)
        cast.append((w, c))
    lead = x.shape[:-1]
    ys, _, _ = lora_linear_group_fwd(
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
    m, k = x.shape
    r = sum(a.shape[0] for a in lora_as)
    bits = x.new_empty((m, (k + 31) // 32) if dropout_p > 0 else (0,), dtype=torch.int32)
    return [x.new_empty(m, w.shape[0]) for w in weights], x.new_empty(m, r), bits


@custom_op("lora_linear_group_fwd", fake=_group_fwd_fake, tags=SEEDED)
def lora_linear_group_fwd(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    lora_as: list[torch.Tensor],
    lora_bs: list[torch.Tensor],
    biases: list[torch.Tensor],
    scaling: float,
    dropout_p: float,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """x (M, K) -> (ys [(M, N_i)], s_cat (M, Σr_i), the shared packed mask or empty)."""
    seed = draw_kernel_seed(x.device) if dropout_p > 0 else 0
    s_cat, bits = _kernels().lora_shrink(x, torch.cat(list(lora_as)), scaling=scaling, dropout_p=dropout_p,
                                         seed=seed)
    variant = selected_variant(x.shape[0], x.device, op="lora_linear_group")
    ys = [
        frozen_plus_rank(x, w, s_cat[:, sl], b, bias=c if c.numel() else None, variant=variant)
        for w, b, c, sl in zip(weights, lora_bs, biases, _rank_slices(lora_as))
    ]
    return ys, s_cat, bits if bits is not None else _no_bits(x)


def _group_bwd_fake(dys, x, weights, lora_as, lora_bs, s_cat, bits, scaling, dropout_p, need_dx):
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
    bits: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """-> (dx (M, K) or empty, [d lora_a_i], [d lora_b_i]); ``dys[i]`` may be empty (no gradient)."""
    kernels = _kernels()
    mask = _bits_or_none(bits)
    m, k = x.shape
    slices = _rank_slices(lora_as)
    ds_parts, dbs = [], []
    for dy, b, sl in zip(dys, lora_bs, slices):
        if dy.numel() == 0:
            ds_parts.append(torch.zeros(m, sl.stop - sl.start, device=x.device, dtype=torch.float32))
            dbs.append(torch.zeros_like(b))
            continue
        ds, db = kernels.lora_dy_pass(dy, s_cat[:, sl], b)
        ds_parts.append(ds)
        dbs.append(db.to(b.dtype))
    ds_cat = torch.cat(ds_parts, dim=1)
    a_cat = torch.cat(list(lora_as))
    live = [(dy, w) for dy, w in zip(dys, weights) if dy.numel()]
    if need_dx and live:
        (dy0, w0), rest = live[0], live[1:]
        dx, da_cat = dx_and_grad_a(dy0, w0, ds_cat, a_cat, x, scaling=scaling, dropout_p=dropout_p, bits=mask,
                                   variant=selected_variant(m, dy0.device, op="lora_linear_group"), need_dx=True)
        for dy, w in rest:
            dx.addmm_(dy, w)  # cuBLAS, beta=1: the other members' dY W onto the same dX
    else:
        dx = x.new_zeros(x.shape) if need_dx else x.new_empty(0)
        da_cat = kernels.lora_grad_a(x, ds_cat, scaling=scaling, dropout_p=dropout_p, bits=mask)
    das = [da_cat[sl].to(a.dtype, copy=True) for a, sl in zip(lora_as, slices)]  # outputs must not alias
    return dx, das, dbs


def _group_setup_context(ctx, inputs, output):
    x, weights, lora_as, lora_bs, biases, scaling, dropout_p = inputs
    _, s_cat, bits = output
    ctx.n = len(weights)
    ctx.save_for_backward(x, s_cat, bits, *weights, *lora_as, *lora_bs)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _group_backward(ctx, dys, _ds, _dbits):
    x, s_cat, bits, *rest = ctx.saved_tensors
    n = ctx.n
    weights, lora_as, lora_bs = rest[:n], rest[n : 2 * n], rest[2 * n :]
    dys = [x.new_empty(0) if dy is None else (dy if dy.stride(-1) == 1 else dy.contiguous()) for dy in dys]
    need_x = ctx.needs_input_grad[0]
    dx, das, dbs = lora_linear_group_bwd(
        dys, x, list(weights), list(lora_as), list(lora_bs), s_cat, bits, ctx.scaling, ctx.dropout_p, bool(need_x)
    )
    # Frozen base weights and biases get no gradient here; LoraLinear never trains them.
    return (dx if need_x else None), [None] * n, das, dbs, [None] * n, None, None


register_autograd(lora_linear_group_fwd, backward=_group_backward, setup_context=_group_setup_context)


# -- validation -----------------------------------------------------------------------------------


#: Argument metadata -> the backend that runs it, for argument sets that passed validation: a
#: repeated call (every decode step) pays a tuple and a dict lookup instead of the checks and the
#: dispatch (whose environment switches are part of the key). Capped against unbounded growth.
_CHECKED: dict[tuple, str] = {}


def _meta(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def _checked_backend(x, weight, lora_a, lora_b, scaling, bias, dropout_p, backend: str,
                     op: str = "lora_linear") -> str:
    """Validate the arguments (once per argument metadata) and pick the backend."""
    try:
        key = (op, backend, settings.backend_override(), settings.triton_interpret(), verification.generation(),
               type(x), x.dtype, x.device, x.dim(), x.numel() <= verification.DECODE_MAX_ROWS * x.shape[-1],
               x.shape[-1], _meta(weight), _meta(lora_a), _meta(lora_b), _meta(bias), type(scaling),
               scaling, type(dropout_p), dropout_p, torch.is_autocast_enabled(x.device.type))
    except (AttributeError, IndexError, TypeError, RuntimeError):
        key = None  # not even tensors: the checks below say what is wrong
    chosen = _CHECKED.get(key) if key is not None else None
    if chosen is not None:
        return chosen
    _validate(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    chosen = selected_backend(x.device, backend, rows=x.numel() // max(x.shape[-1], 1), op=op)
    if key is not None and len(_CHECKED) < 4096:
        _CHECKED[key] = chosen
    return chosen


def _validate(x, weight, lora_a, lora_b, scaling, bias, dropout_p) -> None:
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
