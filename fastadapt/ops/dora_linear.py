"""``fa.ops.dora_linear``: a frozen linear with DoRA (weight-decomposed LoRA), with backend dispatch.

PEFT's DoRA (``tuners/lora/dora.py``), with ``g = magnitude / ‖W + s·B A‖`` (row norms, detached)::

    dropout 0:  y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) (+ bias)
    dropout p:  y = x Wᵀ (+ bias) + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ,   x_d = dropout(x)

PEFT's dropout form needs the frozen product of x_d besides that of x: a second GEMM forward and a
second one in dX (fwd + bwd ≈ 2× the frozen layer), matched exactly here; dropout 0 costs one GEMM.

**Row norms** (``dora_norm``) from ``‖W_n‖² + 2s·B_n·(W_n Aᵀ) + s²·B_n (A Aᵀ) B_nᵀ``: one pass over W
(N×r and r×r work), never PEFT's N×K ``W + s·B A`` (nor its K×K identity); the Triton kernel gets
‖W_n‖² from the loads that W Aᵀ makes anyway. The training path (grad mode on) computes them on
every forward, as PEFT does: one pass over W per layer and forward. Without gradients (evaluation,
decode) they are reused while W, A and B provably did not change (``_cache.InferenceCache``: A and
B compared with exact copies, W by identity and version; every update path and what sees it is
listed there), which saves that pass per layer and decode step.

**Triton backend**: custom ops ``fastadapt::dora_norm``, ``dora_linear_fwd``, ``dora_linear_bwd``
(fakes and registered autograd: no graph break under ``torch.compile(fullgraph=True)``), built on
LoRA's kernels (``kernels/fastadapt_kernels/dora_linear.py``)::

    forward, p = 0   S = s·x Aᵀ                            lora_shrink
                     P = x Wᵀ                              cuBLAS
                     z = P + S Bᵀ; y = g ⊙ z (+ bias)      one epilogue pass (z kept in P's buffer)
    forward, p > 0   S, mask, x_d                          the shrink also writes x_d (freed after)
                     z = x_d Wᵀ + S Bᵀ                     cuBLAS + the epilogue, which writes
                     y = (g-1) ⊙ z + S Bᵀ (+ bias)           into y; then y += x Wᵀ (addmm_, beta=1)
    backward         dZ = g ⊙ dY; dS = dZ B; dB = dZᵀ S;   one pass over dY and z, which also
                     d magnitude = Σ_rows dY ⊙ z / norm     writes dX's GEMM input (dZ; p > 0: (g-1) ⊙ dY)
                     p = 0: dX = dZ W + s·dS A              LoRA's frozen_plus_rank
                     p > 0: T = (g-1)⊙dY W + s·dS A; dX = dY W + mask ⊙ T/(1-p)   (+ one masked pass)
                     dA = s/(1-p)·dSᵀ (mask ⊙ x)           lora_grad_a

``FASTADAPT_LORA_VARIANT`` picks how the rank term joins the frozen GEMM: the forward runs
``epilogue`` (cuBLAS, then the pass above) or ``fused`` (one Triton GEMM whose epilogue is DoRA's);
``addmm`` — LoRA's default — runs the forward as ``epilogue``, because g scales the base product too
and so cannot ride in cuBLAS's beta=1 accumulation. dX uses the variant as LoRA does.

Saved for backward: x (the graph holds it anyway), S (M×r), the packed mask (1 bit per element),
z (M×N in x's dtype — what d magnitude needs; PEFT keeps two M×N tensors, x Wᵀ and the LoRA
product) and the norms (N). Temporaries: dZ (or (g-1) ⊙ dY), M×N, in the backward; x_d (M×K) in
the dropout form's forward. Never an N×K one.

The torch backend is ``torch_backend.dora_linear`` with the norms above: ``reference.dora_apply``'s
function keeping x, S, one M×N product (z at p = 0, x_d Wᵀ with dropout: what d magnitude needs)
and the mask at 1 bit per element; ``FASTADAPT_DORA_RECOMPUTE=1`` keeps no M×N product and
recomputes it in backward. ``backend="reference"`` runs ``reference.dora_apply`` (plain autograd).
"""

from __future__ import annotations

import torch

from .. import _checks, settings
from . import torch_backend
from ._cache import InferenceCache
from ._inputs import autocast_inputs, check_tensors, draw_kernel_seed
from ._library import SEEDED, custom_op, register_autograd
from .dispatch import TORCH_BACKENDS, register_op, resolve_backend, triton_usable
from .lora_linear import _validate as _validate_lora
from .lora_linear import dx_and_grad_a, frozen_plus_rank, keep_scale, selected_variant
from .reference import dora_apply, dora_merge_ref, dora_norm_ref

__all__ = ["dora_linear", "dora_merge", "dora_norm", "selected_backend"]

_AVAILABLE = {"triton": triton_usable}
register_op("dora_linear", _AVAILABLE)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """DoRA: ``y = g ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) (+ bias)`` with ``g = magnitude / ‖W + scaling·B A‖``
    (per output row, the norm detached as in PEFT); with ``dropout_p > 0`` PEFT's dropout form (see
    the module docstring).

    Shapes: x (..., K), weight (N, K) (frozen), lora_a (r, K), lora_b (N, r), magnitude (N,), bias
    (N,) or None; returns (..., N) in x's dtype (or the autocast dtype). Adapter weights and the
    magnitude may be fp32 (cast to the activation dtype; activations are never upcast); the norms
    are formed in fp32. Differentiable in x, lora_a, lora_b, magnitude (and weight/bias when they
    require grad). ``dropout_p``: pass 0 in eval mode. ``backend``: "auto" | "torch" | "triton" | "reference".
    """
    chosen = _checked_backend(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout_p, backend)
    # training (grad mode on): computed afresh; without gradients: reused while provably fresh (_cache)
    norm = _norms.get(lambda: dora_norm(weight, lora_a, lora_b, scaling=scaling, backend=chosen),
                      frozen=(weight,), watched=(lora_a, lora_b), extra=(float(scaling), chosen))
    if chosen == "torch":
        return torch_backend.dora_linear(x, weight, lora_a, lora_b, magnitude, norm, scaling=scaling, bias=bias,
                                         dropout_p=dropout_p, recompute=settings.flag("FASTADAPT_DORA_RECOMPUTE"))
    if chosen == "reference":
        return dora_apply(x, weight, lora_a, lora_b, magnitude, norm, scaling=scaling, bias=bias,
                          dropout_p=dropout_p)
    x, weight, bias = autocast_inputs(x, weight, bias)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, magnitude, bias))
    lead = x.shape[:-1]
    y, _, _, _ = dora_linear_fwd(x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, magnitude, norm, bias,
                                 float(scaling), float(dropout_p), grad)
    return y.reshape(*lead, weight.shape[0])


def selected_backend(device: torch.device, backend: str = "auto", *, rows: int | None = None) -> str:
    """The backend ``dora_linear`` would run on ``device`` for an input of ``rows`` rows."""
    return resolve_backend("dora_linear", backend, device, available=_AVAILABLE, rows=rows)


def _checked_backend(x, weight, lora_a, lora_b, magnitude, scaling, bias, dropout_p, backend: str) -> str:
    _validate_lora(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    _check_magnitude(magnitude, weight, x)
    return selected_backend(x.device, backend, rows=x.numel() // max(x.shape[-1], 1))


def _check_magnitude(magnitude, weight, x) -> None:
    check_tensors(x, magnitude=magnitude)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude must have shape (out_features,) = ({weight.shape[0]},), got "
                         f"{tuple(magnitude.shape)}")


# -- row norms ------------------------------------------------------------------------------------


#: the no-grad path's row norms (decode: one pass over W saved per layer and token)
_norms = InferenceCache()


def dora_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *, scaling: float,
              backend: str = "auto") -> torch.Tensor:
    """DoRA's row norms ``‖W_n + scaling · B_n A‖``: fp32 (N,), no gradient, never an (N, K)
    temporary (see the module docstring); computed afresh on every call. weight (N, K), lora_a
    (r, K), lora_b (N, r). ``backend`` as for ``dora_linear`` (the Triton kernel reads W once)."""
    chosen = selected_backend(weight.device, backend)
    w, a, b = weight.detach(), lora_a.detach(), lora_b.detach()
    with torch.autocast(w.device.type, enabled=False):  # fp32 norms whatever the autocast dtype
        if chosen in TORCH_BACKENDS:
            return dora_norm_ref(w, a, b, scaling=scaling)
        return dora_norm_triton(w, a, b, float(scaling))


def _kernels():
    from fastadapt.kernels import dora_linear as kernels  # imported late: TRITON_INTERPRET is read then

    return kernels


def _norm_fake(weight, lora_a, lora_b, scaling):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


@custom_op("dora_norm", fake=_norm_fake)
def dora_norm_triton(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(N,) fp32 row norms of ``W + scaling · B A`` (one pass over W; A Aᵀ by one small GEMM)."""
    a32 = lora_a.float()
    return _kernels().dora_norm(weight, lora_a, lora_b, (a32 @ a32.t()).contiguous(), scaling=scaling)


# -- Triton backend: forward and backward ----------------------------------------------------------


def _forward_variant(m: int, device: torch.device, dropout: bool) -> str:
    # g scales the base product as well: an addmm_ onto a precomputed rank term cannot apply it.
    # PEFT's dropout form needs the rank term apart from the base product, which the fused GEMM's
    # one accumulator does not keep (a second one spilled at every tile): the epilogue takes it.
    fused = selected_variant(m, device, op="dora_linear") == "fused" and not dropout
    return "fused" if fused else "epilogue"


def _fwd_fake(x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p, save_z):
    m, k = x.shape
    n = weight.shape[0]
    bits = x.new_empty((m, (k + 31) // 32) if dropout_p > 0 else (0,), dtype=torch.int32)
    return x.new_empty(m, n), x.new_empty((m, n) if save_z else (0,)), x.new_empty(m, lora_a.shape[0]), bits


@custom_op("dora_linear_fwd", fake=_fwd_fake, tags=SEEDED)
def dora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    save_z: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> (y (M, N), z (M, N) or empty, s (M, r), the packed dropout mask or empty)."""
    kernels = _kernels()
    m, k = x.shape
    n = weight.shape[0]
    dropout = dropout_p > 0
    seed = draw_kernel_seed(x.device) if dropout else 0
    x_d = x.new_empty((m, k)) if dropout else None
    s, bits = kernels.lora_shrink(x, lora_a, scaling=scaling, dropout_p=dropout_p, seed=seed, dropped=x_d)
    a = x_d if dropout else x
    dora = kernels.DoraScale(magnitude.contiguous(), norm, dropout)
    y = x.new_empty((m, n)) if save_z or dropout else None  # else y overwrites the base product
    if _forward_variant(m, x.device, dropout) == "fused":
        z = kernels.lora_gemm(a, weight, s, lora_b, bias=bias, dora=dora, y=y, tune=settings.flag("FASTADAPT_AUTOTUNE"))
    else:
        z = a @ weight.t()
        kernels.lora_rank(s, lora_b, out=z, bias=bias, accumulate=True, dora=dora, y=y)
    if dropout:
        y.addmm_(x, weight.t())  # PEFT's dropout form: the frozen product of the undropped x as well
    if y is None:
        return z, x.new_empty(0), s, _no_bits(x)
    return y, z if save_z else x.new_empty(0), s, bits if bits is not None else _no_bits(x)


def _no_bits(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0, dtype=torch.int32)


def _bwd_fake(dy, x, weight, lora_a, lora_b, magnitude, norm, s, bits, z, scaling, dropout_p, need_dx, need_dw):
    dx = dy.new_empty(x.shape) if need_dx else dy.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), magnitude.new_empty(magnitude.shape), dw


@custom_op("dora_linear_bwd", fake=_bwd_fake)
def dora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    s: torch.Tensor,
    bits: torch.Tensor,
    z: torch.Tensor,
    scaling: float,
    dropout_p: float,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx or empty, d lora_a, d lora_b, d magnitude, d weight or empty), the parameters' dtypes."""
    kernels = _kernels()
    dropout = dropout_p > 0
    mask = bits if bits.numel() else None
    m, n = dy.shape
    side = dy.new_empty((m, n)) if need_dx or need_dw else None  # dZ, or (g - 1) ⊙ dY with dropout
    dora = kernels.DoraScale(magnitude.contiguous(), norm, dropout)
    ds, db, dm = kernels.dy_pass(dy, s, lora_b, dora=dora, z=z, side=side)
    keep = keep_scale(dropout_p)
    dx = da = dy.new_empty(0)
    if need_dx and not dropout:  # dX = dZ W + s·dS A, and dA inside it where the variant allows
        dx, da = dx_and_grad_a(side, weight, ds, lora_a, x, scaling=scaling, dropout_p=0.0, bits=None,
                               variant=selected_variant(m, dy.device, op="dora_linear"), need_dx=True)
    elif need_dx:
        dx = frozen_plus_rank(side, weight.t(), ds, lora_a.t(), scale=scaling,
                              variant=selected_variant(m, dy.device, op="dora_linear"))
        dx = kernels.masked_scale_(dx, mask, keep).addmm_(dy, weight)
    dw = weight.new_empty(0)
    if need_dw:  # the base product sees dZ (dropout: dY on x, (g - 1) ⊙ dY on x_d)
        dw = side.t() @ x if not dropout else (dy.t() @ x).float() + kernels.weight_grad(side, x, scale=keep, bits=mask)
        dw = dw.to(weight.dtype)
    if not da.numel():
        da = kernels.lora_grad_a(x, ds, scaling=scaling, dropout_p=dropout_p, bits=mask)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dm.to(magnitude.dtype), dw


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, magnitude, norm, bias, scaling, dropout_p, _ = inputs
    _, z, s, bits = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, norm, s, bits, z)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None


def _backward(ctx, dy, _dz, _ds, _dbits):
    x, weight, lora_a, lora_b, magnitude, norm, s, bits, z = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_m, _, need_bias = ctx.needs_input_grad[:7]
    dy = dy.contiguous() if dy.stride(-1) != 1 else dy
    dx, da, db, dm, dw = dora_linear_bwd(dy, x, weight, lora_a, lora_b, magnitude, norm, s, bits, z, ctx.scaling,
                                         ctx.dropout_p, bool(need_x), bool(need_w))
    dbias = dy.sum(0).to(weight.dtype) if need_bias and ctx.has_bias else None
    return ((dx if need_x else None), (dw if need_w else None), (da if need_a else None), (db if need_b else None),
            (dm if need_m else None), None, dbias, None, None, None)


register_autograd(dora_linear_fwd, backward=_backward, setup_context=_setup_context)


# -- merge ----------------------------------------------------------------------------------------


@torch.no_grad()
def dora_merge(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    scaling: float,
    norm: torch.Tensor,
    fan_in_fan_out: bool = False,
    sign: int = 1,
    check_only: bool = False,
) -> bool:
    """In place, fp32 math and one rounding: ``sign=1`` folds DoRA into the weight,
    ``W ← g ⊙ (W + scaling · B A)`` with ``g = magnitude / norm`` per output row (``norm``: the row
    norms of the unmerged weight, ``dora_norm``); ``sign=-1`` takes it out again,
    ``W ← W / g - scaling · B A`` (needs the same ``norm``). Shapes as ``lora_merge`` plus
    magnitude and norm (N,). Returns whether every result is finite; ``check_only`` writes nothing."""
    check_tensors(weight, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude, norm=norm)
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    for name, t in (("magnitude", magnitude), ("norm", norm)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape (out_features,) = ({n},), got {tuple(t.shape)}")
    _checks.one_of("sign", sign, (1, -1))
    return dora_merge_ref(weight, lora_a, lora_b, magnitude, scaling=scaling, norm=norm,
                          fan_in_fan_out=fan_in_fan_out, sign=sign, check_only=check_only)
