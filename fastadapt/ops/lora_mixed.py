"""``fa.ops.lora_mixed`` / ``fa.ops.bottleneck_mixed``: one batch whose rows use different adapters.

Every row of a batch names one adapter (or none: the base model). The adapters of one layer come in
*sources* (:class:`SlotBank`): a compact bank of slots — slot ``i`` owns rows
``[offsets[i], offsets[i] + capacity_i)`` of ``down`` (its A, or its bottleneck down projection)
and of ``up`` (Bᵀ, or the up projection transposed), of which it uses the first ``ranks[i]`` (the
rest are zero) — and per slot a scaling, and for DoRA a magnitude and row norms. A layer has at most
two sources: the active adapter (its parameters) and the bank of the others. :class:`SlotRows` says
which slot of a source each batch row uses; it is built once per forward and shared by every layer
with the same slot layout, so rows are grouped by adapter once per forward, not per layer.

The term each row gets (``act`` the identity for LoRA/DoRA, the bottleneck activation otherwise)::

    term(x)_row = s_slot · act(x_row down_slotᵀ) up_slot        (only the slot's own rank)

    lora_mixed        y = x Wᵀ (+ bias) + term(x)              LoRA, parallel adapters
                      y = g_row ⊙ (x Wᵀ + term(x)) (+ bias)     DoRA, g = magnitude / norm per slot
    bottleneck_mixed  y = (residual or x) + term(x)             series adapters (input / output side)

A row whose adapter has no slot at this layer (another target set) or that names the base model
gets the base output: nothing is added for it (g = 1 for DoRA).

Torch backend (``reference.lora_mixed_ref`` is the row-by-row oracle), batched, never a Python loop
over adapters:

- *decode form* (one token per row, or whenever it is the cheaper): ``S = x downᵀ`` against every
  slot's rows at once, ``S ⊙ C`` with ``C`` (rows × bank rows) holding the row's scaling on its own
  slot's columns and 0 elsewhere, ``y += S up``. Three launches per source, the bank read once, at
  its own ranks (decode is bound by reading the adapter weights; a padded layout would read more);
- *segment form* (many tokens per row): rows grouped per slot and padded to the longest group,
  each slot's rows padded to the largest capacity present, two ``bmm`` and one ``index_add_``.

Triton backend: ``kernels/fastadapt_kernels/lora_mixed.py``'s segmented shrink/expand (rows sorted
by slot; each program loops to its slot's own rank: no padded FLOPs), with the DoRA scale and the
bottleneck activation in the kernels. ``auto`` takes it only with a GPU verification record.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import verification
from ._library import custom_op
from .dispatch import TORCH_BACKENDS, register_op, resolve_backend, triton_usable
from .reference import BOTTLENECK_ACTIVATIONS

__all__ = ["SlotBank", "SlotRows", "bottleneck_mixed", "lora_mixed", "selected_backend"]

_AVAILABLE = {"triton": triton_usable}
register_op("lora_mixed", _AVAILABLE)
register_op("bottleneck_mixed", _AVAILABLE)


@dataclass(frozen=True, eq=False)
class SlotBank:
    """The adapters of one source at one layer (see the module docstring). Tensors on one device,
    ``down``/``up`` in the compute dtype:

    - ``down`` (R, K) and ``up`` (R, N): slot ``i`` owns rows ``offsets[i] .. offsets[i] + capacities[i]``;
      rows past ``ranks[i]`` are zero. ``R`` may exceed the rows the slots own (spare rows: zero);
    - ``scalings`` (n,) fp32 tensor (a learned bottleneck scaling stays a parameter: differentiable);
    - ``magnitude`` / ``norm`` (n, N) fp32, both or neither: DoRA's g = magnitude / norm.

    Host-side tuples (``offsets``, ``capacities``, ``ranks``) say the layout without a device sync;
    ``scalings_host`` holds the scalings as numbers when they are fixed (None for learned ones), so
    rows of layers with equal layouts and scalings share one column mask per forward."""

    down: torch.Tensor
    up: torch.Tensor
    scalings: torch.Tensor
    offsets: tuple[int, ...]
    capacities: tuple[int, ...]
    ranks: tuple[int, ...]
    scalings_host: tuple[float, ...] | None = None
    magnitude: torch.Tensor | None = None
    norm: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return len(self.offsets)

    @property
    def layout(self) -> tuple:
        """What row plans derived for one source also hold for another: slots, places, ranks."""
        return (self.offsets, self.capacities, self.ranks, self.down.shape[0])

    @functools.cached_property
    def column_slot(self) -> torch.Tensor:
        """(R,) int64: the slot whose own rank holds each row of ``down`` / ``up``, -1 for padding."""
        col = torch.full((self.down.shape[0],), -1, dtype=torch.int64)
        for i, (off, r) in enumerate(zip(self.offsets, self.ranks)):
            col[off:off + r] = i
        return col.to(self.down.device)


@dataclass(eq=False)
class SlotRows:
    """Which slot of one source each of ``B`` batch rows uses (-1: none at this layer), and what the
    torch path derives from it, derived once per forward and layout and reused by every layer that
    shares them (``cache``)."""

    slot: tuple[int, ...]
    device: torch.device
    cache: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.slot)

    @functools.cached_property
    def used(self) -> tuple[int, ...]:
        """The slots some row uses, ascending."""
        return tuple(sorted({s for s in self.slot if s >= 0}))

    def _memo(self, key, make):
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = make()
        return value

    def slot_tensor(self) -> torch.Tensor:
        return self._memo("slot", lambda: torch.tensor(self.slot, dtype=torch.int64, device=self.device))

    def column_scale(self, bank: SlotBank) -> torch.Tensor:
        """(B, R) fp32: row b's scaling on the own-rank columns of its slot, 0 elsewhere (fp32: a
        scaling is never rounded to the activations' 16 bits)."""
        def make():
            hit = self.slot_tensor()[:, None] == bank.column_slot[None, :]
            col = bank.scalings.float().index_select(0, bank.column_slot.clamp_min(0))
            return hit.float() * col[None, :]
        if bank.scalings_host is None:  # a learned (or compiled) scaling: per call
            return make()
        return self._memo(("columns", bank.layout, bank.scalings_host), make)

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(index (P, L) int64, valid (P, L) bool, L)`` for the P used slots: the batch rows of each,
        padded to the longest group with row 0 (masked out by ``valid``)."""
        def make():
            groups = [[b for b, s in enumerate(self.slot) if s == u] for u in self.used]
            longest = max((len(g) for g in groups), default=0)
            index = torch.zeros((len(groups), longest), dtype=torch.int64)
            valid = torch.zeros((len(groups), longest), dtype=torch.bool)
            for p, g in enumerate(groups):
                index[p, :len(g)] = torch.tensor(g, dtype=torch.int64)
                valid[p, :len(g)] = True
            return index.to(self.device), valid.to(self.device), longest
        return self._memo("segments", make)


def selected_backend(device: torch.device, backend: str = "auto", *, rows: int | None = None,
                     op: str = "lora_mixed") -> str:
    """The backend ``op`` (``lora_mixed`` | ``bottleneck_mixed``) runs on ``device`` for ``rows`` rows."""
    return resolve_backend(op, backend, device, available=_AVAILABLE, rows=rows)


def lora_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    sources: Sequence[SlotBank],
    rows: Sequence[SlotRows],
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x Wᵀ (+ bias) + term(x)`` per row (see the module docstring); DoRA (``g_row ⊙ (x Wᵀ +
    term) + bias``) when the sources carry magnitude and norm; a parallel adapter with ``activation``.

    Shapes: x (B, T, K) or (B, K), one adapter per leading row (all T tokens of a row share it);
    weight (N, K) frozen; each source's ``down`` (R, K), ``up`` (R, N); ``rows[i]`` belongs to
    ``sources[i]`` and has B rows. Returns x's shape with N last, in x's dtype. Differentiable
    through the torch backend (the Triton one is inference-only: it runs without gradients).
    """
    x3 = _check(x, sources, rows, weight.shape[1], weight.shape[0], weight=weight, bias=bias, activation=activation)
    dora = _is_dora(sources)
    chosen = _backend(x3, "lora_mixed", backend, rows)
    if chosen == "torch":
        y = F.linear(x3, weight, None if dora else bias)
        y = _add_terms(y, x3, sources, rows, activation)
        if dora:
            y = _dora_scale(y, sources, rows)
            if bias is not None:
                y = y + bias.to(y.dtype) if torch.is_grad_enabled() else y.add_(bias.to(y.dtype))
        return y.reshape(*x.shape[:-1], weight.shape[0])
    y = F.linear(x3, weight, None if dora else bias).reshape(-1, weight.shape[0])
    y = _triton_terms(y, x3, sources, rows, activation, bias if dora else None)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def bottleneck_mixed(
    x: torch.Tensor,
    sources: Sequence[SlotBank],
    rows: Sequence[SlotRows],
    *,
    activation: str,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``(residual or x) + term(x)`` per row: series bottleneck adapters of several adapters in one
    batch (input side: then the frozen linear; output side: on its output). Shapes as in
    :func:`lora_mixed`, ``residual`` like the result (d_out = each source's ``up`` width)."""
    n_out = sources[0].up.shape[1] if sources else x.shape[-1]
    x3 = _check(x, sources, rows, x.shape[-1], n_out, activation=activation, required_activation=True)
    base = x3 if residual is None else residual.reshape(x3.shape[0], x3.shape[1], -1)
    if residual is None and n_out != x.shape[-1]:
        raise ValueError(f"without residual the adapter must map d_in to d_in = {x.shape[-1]}, got d_out {n_out}")
    chosen = _backend(x3, "bottleneck_mixed", backend, rows)
    if chosen == "torch":
        out = _add_terms(base.clone() if not torch.is_grad_enabled() else base, x3, sources, rows, activation)
        return out.reshape(*x.shape[:-1], n_out)
    out = _triton_terms(base.reshape(-1, n_out).clone(), x3, sources, rows, activation, None)
    return out.reshape(*x.shape[:-1], n_out)


# -- torch backend -----------------------------------------------------------------------------------


def _add_terms(y: torch.Tensor, x: torch.Tensor, sources: Sequence[SlotBank], rows: Sequence[SlotRows],
               activation: str | None) -> torch.Tensor:
    """``y`` (B, T, N) plus every source's term: in place without gradients, else out of place."""
    for bank, slots in zip(sources, rows):
        if not slots.used:
            continue
        if _decode_cheaper(bank, slots, x.shape[1]):
            y = _term_decode(y, x, bank, slots, activation)
        else:
            y = _term_segments(y, x, bank, slots, activation)
    return y


def _decode_cheaper(bank: SlotBank, slots: SlotRows, tokens: int) -> bool:
    """Whether every row against every slot (B·R rank columns) costs less than the used slots' rows
    padded to the longest group and the largest capacity (P·L·cap, plus gathering the slots)."""
    if tokens == 1:
        return True
    _, _, longest = slots.segments()
    cap = max(bank.capacities[u] for u in slots.used)
    return slots.rows * bank.down.shape[0] * tokens <= len(slots.used) * cap * (longest * tokens + 1)


def _activate(s: torch.Tensor, activation: str | None) -> torch.Tensor:
    return s if activation is None else BOTTLENECK_ACTIVATIONS[activation](s)


def _scaled(s: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s ⊙ scale`` (fp32 ``scale``): in place for fp32 without gradients; 16-bit ``s`` is scaled in
    fp32 and rounded once, as the single-adapter ops apply their scaling."""
    if s.dtype != torch.float32:
        return (s.float() * scale).to(s.dtype)
    return s * scale if torch.is_grad_enabled() else s.mul_(scale)


def _term_decode(y, x, bank: SlotBank, slots: SlotRows, activation):
    """Every row against every slot's rows at once; the column mask keeps the row's own slot."""
    b, t, n = y.shape
    s = _scaled(_activate(x @ bank.down.t(), activation), slots.column_scale(bank)[:, None, :])
    if torch.is_grad_enabled():
        return torch.addmm(y.reshape(b * t, n), s.reshape(b * t, -1), bank.up).view(b, t, n)
    y.view(b * t, n).addmm_(s.view(b * t, -1), bank.up)
    return y


def _term_segments(y, x, bank: SlotBank, slots: SlotRows, activation):
    """The used slots' rows, grouped and padded: two bmm over (slots, rows, capacity)."""
    b, t, n = y.shape
    index, valid, longest = slots.segments()
    used = torch.tensor(slots.used, dtype=torch.int64)
    cap = max(bank.capacities[u] for u in slots.used)
    if bank.slots == 1:  # the active adapter alone: its rows as they are, no gather of weights
        down, up = bank.down[None, :cap], bank.up[None, :cap]
    else:
        rows = _gather_rows(bank, slots.used, cap)
        down = bank.down.index_select(0, rows.flatten()).view(len(slots.used), cap, -1)
        up = bank.up.index_select(0, rows.flatten()).view(len(slots.used), cap, -1)
    p = len(slots.used)
    xs = x.index_select(0, index.flatten()).view(p, longest * t, x.shape[-1])
    s = _activate(torch.bmm(xs, down.transpose(1, 2)), activation)
    scal = bank.scalings.float().index_select(0, used.to(s.device))
    row_scale = (valid.float() * scal[:, None])[:, :, None, None]  # padding rows: 0
    s = _scaled(s.view(p, longest, t, -1), row_scale).view(p, longest * t, -1)
    out = torch.bmm(s, up).view(p * longest, t, n)
    if torch.is_grad_enabled():
        return y.index_add(0, index.flatten(), out)
    return y.index_add_(0, index.flatten(), out)


@functools.lru_cache(maxsize=256)
def _gather_rows_host(offsets: tuple, capacities: tuple, total: int, used: tuple, cap: int) -> torch.Tensor:
    rows = torch.full((len(used), cap), total, dtype=torch.int64)  # past the end: a zero row
    for p, u in enumerate(used):
        rows[p, :capacities[u]] = torch.arange(offsets[u], offsets[u] + capacities[u])
    return rows


def _gather_rows(bank: SlotBank, used: tuple[int, ...], cap: int) -> torch.Tensor:
    """(P, cap) rows of ``down``/``up`` holding each used slot, padded with a zero row (the bank's
    spare last row: banks keep one)."""
    total = bank.down.shape[0] - 1
    if any(bank.offsets[u] + bank.capacities[u] > total for u in used):
        raise AssertionError("a bank gathered by slot must keep a zero row at its end")
    return _gather_rows_host(bank.offsets, bank.capacities, total, used, cap).to(bank.down.device)


def _dora_scale(y: torch.Tensor, sources: Sequence[SlotBank], rows: Sequence[SlotRows]) -> torch.Tensor:
    """``y ⊙ g_row`` with g = magnitude / norm of the row's slot (1 for rows without one)."""
    n = y.shape[-1]
    tables = [y.new_ones((1, n))]
    index = torch.zeros(rows[0].rows, dtype=torch.int64)
    start = 1
    for bank, slots in zip(sources, rows):
        tables.append((bank.magnitude / bank.norm).to(y.dtype))
        for b, s in enumerate(slots.slot):
            if s >= 0:
                index[b] = start + s
        start += bank.slots
    g = torch.cat(tables).index_select(0, index.to(y.device))
    return y * g[:, None, :] if torch.is_grad_enabled() else y.mul_(g[:, None, :])


# -- validation and dispatch ---------------------------------------------------------------------------


def _is_dora(sources: Sequence[SlotBank]) -> bool:
    kinds = {s.magnitude is not None for s in sources}
    if len(kinds) > 1:
        raise ValueError("sources must all carry DoRA magnitudes and norms, or none")
    return kinds == {True}


def _check(x, sources, rows, k: int, n: int, *, weight=None, bias=None, activation=None,
           required_activation: bool = False) -> torch.Tensor:
    """Validate at the boundary; returns x as (B, T, K)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() not in (2, 3):
        raise ValueError(f"x must be a floating-point (B, K) or (B, T, K) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension {k}, got shape {tuple(x.shape)}")
    if len(sources) != len(rows):
        raise ValueError(f"sources and rows must have one length, got {len(sources)} and {len(rows)}")
    if weight is not None and (weight.dim() != 2 or weight.dtype != x.dtype or weight.device != x.device):
        raise ValueError(f"weight must be (N, K) in x's dtype {x.dtype} on {x.device}, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if required_activation or activation is not None:
        if activation not in BOTTLENECK_ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(BOTTLENECK_ACTIVATIONS)}, got {activation!r}")
    for i, (bank, slots) in enumerate(zip(sources, rows)):
        if not isinstance(bank, SlotBank) or not isinstance(slots, SlotRows):
            raise TypeError(f"sources[{i}] must be a SlotBank and rows[{i}] a SlotRows")
        if slots.rows != x.shape[0]:
            raise ValueError(f"rows[{i}] names an adapter for {slots.rows} rows, but x has {x.shape[0]} rows "
                             f"(shape {tuple(x.shape)})")
        if bank.down.shape[1] != k or bank.up.shape[1] != n or bank.down.shape[0] != bank.up.shape[0]:
            raise ValueError(f"sources[{i}] must have down (R, {k}) and up (R, {n}), got {tuple(bank.down.shape)} "
                             f"and {tuple(bank.up.shape)}")
        if bank.down.dtype != x.dtype or bank.up.dtype != x.dtype or bank.down.device != x.device:
            raise ValueError(f"sources[{i}] must hold x's dtype {x.dtype} on {x.device}, got {bank.down.dtype} on "
                             f"{bank.down.device}")
        if slots.used and slots.used[-1] >= bank.slots:  # ``used`` is ascending
            raise ValueError(f"rows[{i}] uses slot {slots.used[-1]}, but sources[{i}] has {bank.slots} slots")
    return x if x.dim() == 3 else x[:, None, :]


def _backend(x: torch.Tensor, op: str, backend: str, rows: Sequence[SlotRows] = ()) -> str:
    m = x.shape[0] * x.shape[1]
    if rows:  # decided once per forward: every layer of one forward shares its row plans (``SlotRows.cache``)
        chosen = rows[0]._memo(("backend", op, backend, m),
                               lambda: selected_backend(x.device, backend, rows=m, op=op))
    else:
        chosen = selected_backend(x.device, backend, rows=m, op=op)
    if chosen in TORCH_BACKENDS:  # "reference" too: this op's torch path is plain autograd already
        return "torch"
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{op}: the {chosen} backend computes no gradients; run it under torch.no_grad() "
                           "(mixed batches are for inference) or pass backend='torch'")
    return chosen


# -- Triton backend --------------------------------------------------------------------------------------


def _kernels():
    from fastadapt.kernels import lora_mixed as kernels  # imported late: TRITON_INTERPRET is read then

    return kernels


def _triton_terms(y: torch.Tensor, x: torch.Tensor, sources: Sequence[SlotBank], rows: Sequence[SlotRows],
                  activation: str | None, dora_bias: torch.Tensor | None) -> torch.Tensor:
    """``y`` (M, N) with every source's term (DoRA's epilogue with ``g`` when the sources carry it):
    the decode form for at most ``DECODE_MAX_ROWS`` tokens, the segmented form above."""
    b, t, k = x.shape
    x2 = x.reshape(b * t, k)
    decode = b * t <= verification.DECODE_MAX_ROWS
    for bank, slots in zip(sources, rows):
        if not slots.used:
            continue
        index, table = _launch_plan(slots, t, decode)
        offsets, ranks = _layout_tensors(slots, bank)
        g = (bank.magnitude.float() / bank.norm.float()).contiguous() if bank.magnitude is not None else None
        max_rank = max(bank.ranks[u] for u in slots.used)
        empty = x2.new_empty(0)
        s = mixed_shrink_op(x2, bank.down, offsets, ranks, index, table, max_rank, decode, activation or "")
        y = mixed_expand_op(s, bank.up, y, offsets, ranks, bank.scalings.float(), index, table, decode,
                            empty if g is None else g, empty if dora_bias is None else dora_bias)
    if dora_bias is not None:  # rows without any adapter here: the base output plus the bias (g = 1)
        bare = [i for i in range(b) if all(r.slot[i] < 0 for r in rows)]
        if bare:
            tokens = (torch.tensor(bare)[:, None] * t + torch.arange(t)[None, :]).flatten().to(y.device)
            y = y.index_add(0, tokens, dora_bias.to(y.dtype).expand(len(tokens), -1))
    return y


def _launch_plan(slots: SlotRows, tokens: int, decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, table)``: decode — (per-token slot (M,) int32, empty); segmented — (tokens grouped
    by slot (M_used,) int32, the block table (nb, 3) int32). Once per forward and layout."""
    def make():
        kernels = _kernels()
        slot_of_token = [s for s in slots.slot for _ in range(tokens)]
        if decode:
            return (torch.tensor(slot_of_token, dtype=torch.int32).to(slots.device),
                    torch.zeros((0, 3), dtype=torch.int32, device=slots.device))
        order, groups = [], []
        for u in slots.used:
            members = [m for m, s in enumerate(slot_of_token) if s == u]
            order += members
            groups.append((u, len(members)))
        table = kernels.segment_blocks(groups, kernels.SEGMENT_BLOCK_M)
        return (torch.tensor(order, dtype=torch.int32).to(slots.device),
                torch.tensor(table, dtype=torch.int32).reshape(-1, 3).to(slots.device))
    return slots._memo(("triton-plan", tokens, decode), make)


def _layout_tensors(slots: SlotRows, bank: SlotBank) -> tuple[torch.Tensor, torch.Tensor]:
    return slots._memo(("triton-layout", bank.layout), lambda: (
        torch.tensor(bank.offsets, dtype=torch.int32).to(slots.device),
        torch.tensor(bank.ranks, dtype=torch.int32).to(slots.device)))


def _shrink_fake(x, down, offsets, ranks, index, table, max_rank, decode, activation):
    return x.new_empty(x.shape[0], max(max_rank, 1))


@custom_op("mixed_shrink", fake=_shrink_fake)
def mixed_shrink_op(x: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
                    index: torch.Tensor, table: torch.Tensor, max_rank: int, decode: bool,
                    activation: str) -> torch.Tensor:
    """S (M, max_rank): ``act(x down_slotᵀ)`` per token at its slot's own rank (``kernels.mixed_shrink``)."""
    plan = {"token_slot": index} if decode else {"order": index, "blocks": table}
    return _kernels().mixed_shrink(x, down, offsets, ranks, max_rank=max_rank, activation=activation or None, **plan)


def _expand_fake(s, up, out, offsets, ranks, scalings, index, table, decode, g, bias):
    return out.new_empty(out.shape)


@custom_op("mixed_expand", fake=_expand_fake)
def mixed_expand_op(s: torch.Tensor, up: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor,
                    ranks: torch.Tensor, scalings: torch.Tensor, index: torch.Tensor, table: torch.Tensor,
                    decode: bool, g: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A copy of ``out`` (M, N) plus every token's ``s_slot · S up_slot`` (DoRA with ``g``: its
    epilogue; ``g`` / ``bias`` empty for none) (``kernels.mixed_expand``)."""
    plan = {"token_slot": index} if decode else {"order": index, "blocks": table}
    return _kernels().mixed_expand(s, up, out.clone(), offsets, ranks, scalings, g=g if g.numel() else None,
                                   bias=bias if bias.numel() else None, **plan)
