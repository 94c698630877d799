"""Plain-PyTorch twins of every fused op, with the same signatures.

They are the CPU backend, the oracle for kernel tests and a baseline in ``bench/``. They compute in
the activation dtype (fp32 adapter weights are cast down, never the activations up), which is
what "cuBLAS base + addmm of the LoRA term" costs on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_linear_ref(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, *, scaling: float,
                    bias: Tensor | None = None, dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """``y = x Wᵀ (+ bias) + scaling · (dropout(x) Aᵀ) Bᵀ``.

    x (..., K); weight (N, K); lora_a (r, K); lora_b (N, r); returns (..., N) in the compute dtype
    (x's dtype, or the autocast dtype). ``backend`` is accepted for signature parity and ignored.
    """
    del backend
    y = F.linear(x, weight, bias)
    compute_dtype = y.dtype
    h = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    s = F.linear(h, lora_a.to(compute_dtype)) * scaling
    y2d = y.reshape(-1, y.shape[-1])
    out = torch.addmm(y2d, s.reshape(-1, s.shape[-1]), lora_b.to(compute_dtype).t())
    return out.reshape(y.shape)


@torch.no_grad()
def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, *, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """``scaling · B A`` in fp32, laid out like the base weight: (out, in), or (in, out) for a
    ``Conv1D`` (``fan_in_fan_out``)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return delta.t() if fan_in_fan_out else delta


@torch.no_grad()
def lora_merge_ref(weight: Tensor, lora_a: Tensor, lora_b: Tensor, *, scaling: float, fan_in_fan_out: bool = False,
                   sign: int = 1, check_only: bool = False, backend: str | None = None) -> bool:
    """In place: ``weight += sign · scaling · B A``, the sum formed in fp32 and rounded once to the
    weight's dtype. Returns whether every result is finite; ``check_only`` writes nothing.
    ``backend`` is accepted for signature parity and ignored."""
    del backend
    delta = lora_delta(lora_a, lora_b, scaling, fan_in_fan_out=fan_in_fan_out)
    merged = (weight.float() + sign * delta).to(weight.dtype)
    finite = bool(torch.isfinite(merged).all())
    if not check_only:
        weight.copy_(merged)
    return finite


@torch.no_grad()
def dora_weight_sq(weight: Tensor) -> Tensor:
    """‖W_n‖² per output row of a (N, K) weight, fp32 (float64 for a float64 weight) (N,)."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=_norm_dtype(weight)).square()


def _norm_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


@torch.no_grad()
def dora_norm_ref(weight: Tensor, lora_a: Tensor, lora_b: Tensor, *, scaling: float,
                  backend: str | None = None) -> Tensor:
    """DoRA's row norms ``‖W_n + scaling · B_n A‖`` (fp32 (N,) — float64 for a float64 weight — with no
    gradient: PEFT detaches them),
    from ``‖W_n‖² + 2·scaling·B_n·(W_n Aᵀ) + scaling²·B_n (A Aᵀ) B_nᵀ``: one (N, r) product with W
    and r×r work, never the (N, K) sum. weight (N, K); lora_a (r, K); lora_b (N, r).
    ``backend`` is ignored."""
    del backend
    acc = _norm_dtype(weight)
    wa = F.linear(weight, lora_a.to(weight.dtype)).to(acc)  # (N, r), A rounded like x Aᵀ rounds it
    wsq = dora_weight_sq(weight)
    a = lora_a.to(acc)
    b = lora_b.to(acc)
    norm2 = wsq + (2.0 * scaling) * (b * wa).sum(1) + (scaling * scaling) * ((b @ (a @ a.t())) * b).sum(1)
    return norm2.clamp_min(0.0).sqrt()


def dora_apply(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, norm: Tensor, *,
               scaling: float, bias: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """DoRA's output for given row norms (see ``dora_linear_ref``); the torch backend of
    ``fa.ops.dora_linear`` with its norms. Saved for backward by autograd (dropout 0): x, S,
    z = x Wᵀ + s·S Bᵀ (M×N) and g: no weight-sized tensor."""
    g = magnitude / norm  # (N,), differentiable in magnitude only
    y = F.linear(x, weight)
    dtype = y.dtype
    g = g.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    if dropout_p == 0:
        s = F.linear(x.to(dtype), a)
        z = torch.addmm(y.reshape(-1, y.shape[-1]), s.reshape(-1, s.shape[-1]), b.t(), alpha=scaling)
        out = z.reshape(y.shape) * g
        return out if bias is None else out + bias.to(dtype)
    # PEFT's dropout form: the base product of the dropped input too (a second GEMM)
    base = y if bias is None else y + bias.to(dtype)
    xd = F.dropout(x, dropout_p, training=True)
    lora = F.linear(F.linear(xd.to(dtype), a), b)
    return base + ((g - 1) * F.linear(xd, weight) + g * lora * scaling)


def dora_linear_ref(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, *,
                    scaling: float, bias: Tensor | None = None, dropout_p: float = 0.0,
                    backend: str | None = None) -> Tensor:
    """DoRA as PEFT computes it (``tuners/lora/dora.py``), with ``g = magnitude / ‖W + scaling·B A‖``
    (row norms, detached):

    - ``dropout_p == 0``: ``y = g ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) (+ bias)``;
    - ``dropout_p > 0`` (x_d = dropout(x)): ``y = x Wᵀ (+ bias) + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ scaling · (x_d Aᵀ) Bᵀ``.

    x (..., K); weight (N, K); lora_a (r, K); lora_b (N, r); magnitude (N,); returns (..., N) in the
    compute dtype. ``backend`` is accepted for signature parity and ignored.
    """
    del backend
    norm = dora_norm_ref(weight, lora_a.detach(), lora_b.detach(), scaling=scaling)
    return dora_apply(x, weight, lora_a, lora_b, magnitude, norm, scaling=scaling, bias=bias, dropout_p=dropout_p)


@torch.no_grad()
def dora_merge_ref(weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, *, scaling: float,
                   norm: Tensor, fan_in_fan_out: bool = False, sign: int = 1, check_only: bool = False,
                   backend: str | None = None) -> bool:
    """In place, in fp32 with one rounding to the weight's dtype, with ``g = magnitude / norm`` per
    output row (``norm``: of the unmerged weight): ``sign=1`` merges, ``W ← g ⊙ (W + scaling · B A)``;
    ``sign=-1`` unmerges, ``W ← W / g - scaling · B A``. Rows of an (N, K) weight, columns of a
    Conv1D's (K, N) (``fan_in_fan_out``). Returns whether every result is finite; ``check_only``
    writes nothing. ``backend`` is ignored."""
    del backend
    delta = lora_delta(lora_a, lora_b, scaling, fan_in_fan_out=fan_in_fan_out)
    g = magnitude.float() / norm.float()
    g = g[None, :] if fan_in_fan_out else g[:, None]
    merged = (g * (weight.float() + delta) if sign == 1 else weight.float() / g - delta).to(weight.dtype)
    finite = bool(torch.isfinite(merged).all())
    if not check_only:
        weight.copy_(merged)
    return finite


#: Bottleneck-adapter activations, as transformers' ACT2FN names them ("gelu" is the exact erf form).
BOTTLENECK_ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation_grad(h: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(h), for the fp32 backward of the fused ops (relu'(0) = 0 and exact gelu, as torch and
    the kernels' ``_common.activation_grad``)."""
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


def _bottleneck_term(
    x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str, scaling, dropout_p: float
) -> torch.Tensor:
    """``s · up(act(down(dropout(x))))`` in x's dtype (or the autocast dtype)."""
    z = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    h = F.linear(z, w_down.to(x.dtype))
    a = F.linear(BOTTLENECK_ACTIVATIONS[activation](h), w_up.to(h.dtype))
    if isinstance(scaling, torch.Tensor):
        return a * scaling.reshape(()).to(a.dtype)  # a learned (1,) scaling: no fp32 promotion of a
    return a * scaling


def bottleneck_adapter_ref(x: Tensor, w_down: Tensor, w_up: Tensor, *, activation: str, scaling: float | Tensor,
                           residual: Tensor | None = None, dropout_p: float = 0.0,
                           backend: str | None = None) -> Tensor:
    """``(x if residual is None else residual) + scaling · up(act(down(dropout(x))))``.

    x (..., d_in); w_down (b, d_in); w_up (d_out, b); residual (..., d_out) or None (then
    d_out == d_in). ``scaling`` is a number or a 1-element tensor (a learned scaling).
    ``backend`` is accepted for signature parity and ignored.
    """
    del backend
    a = _bottleneck_term(x, w_down, w_up, activation, scaling, dropout_p)
    base = x if residual is None else residual
    return base + a.to(base.dtype)


def parallel_adapter_ref(x: Tensor, weight: Tensor, w_down: Tensor, w_up: Tensor, *, activation: str,
                         scaling: float | Tensor, bias: Tensor | None = None, dropout_p: float = 0.0,
                         backend: str | None = None) -> Tensor:
    """``y = x Wᵀ (+ bias) + scaling · up(act(down(dropout(x))))`` (LLM-Adapters' parallel adapter).

    x (..., K); weight (N, K); w_down (b, K); w_up (N, b); returns (..., N) in the compute dtype.
    """
    del backend
    y = F.linear(x, weight, bias)
    return y + _bottleneck_term(x.to(y.dtype), w_down, w_up, activation, scaling, dropout_p).to(y.dtype)


def _mixed_row_term(x_row: Tensor, bank, slot: int, activation: str | None) -> Tensor:
    """One row's adapter term ``s · act(x down_slotᵀ) up_slot`` at the slot's own rank."""
    off, rank = bank.offsets[slot], bank.ranks[slot]
    h = F.linear(x_row, bank.down[off:off + rank])
    if activation is not None:
        h = BOTTLENECK_ACTIVATIONS[activation](h)
    return (h @ bank.up[off:off + rank]) * bank.scalings[slot].to(h.dtype)


def lora_mixed_ref(x: Tensor, weight: Tensor, sources, rows, *, bias: Tensor | None = None,
                   activation: str | None = None, backend: str | None = None) -> Tensor:
    """Row by row, each row with its own adapter alone: ``y = x Wᵀ (+ bias) + term`` (LoRA, parallel
    adapter with ``activation``), or DoRA's ``g ⊙ (x Wᵀ + term) (+ bias)`` when the sources carry
    ``magnitude``/``norm``. The oracle of ``fa.ops.lora_mixed`` (same signature; ``backend`` ignored)."""
    del backend
    out = []
    for b in range(x.shape[0]):
        y = F.linear(x[b], weight)
        hit = [(bank, slots.slot[b]) for bank, slots in zip(sources, rows) if slots.slot[b] >= 0]
        for bank, slot in hit:
            y = y + _mixed_row_term(x[b], bank, slot, activation)
            if bank.magnitude is not None:
                y = y * (bank.magnitude[slot] / bank.norm[slot]).to(y.dtype)
        out.append(y if bias is None else y + bias.to(y.dtype))
    return torch.stack(out)


def bottleneck_mixed_ref(x: Tensor, sources, rows, *, activation: str, residual: Tensor | None = None,
                         backend: str | None = None) -> Tensor:
    """Row by row: ``(residual or x) + term(x)``; the oracle of ``fa.ops.bottleneck_mixed``."""
    del backend
    base = x if residual is None else residual
    out = []
    for b in range(x.shape[0]):
        y = base[b]
        for bank, slots in zip(sources, rows):
            if slots.slot[b] >= 0:
                y = y + _mixed_row_term(x[b], bank, slots.slot[b], activation).to(y.dtype)
        out.append(y)
    return torch.stack(out)
