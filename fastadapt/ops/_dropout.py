"""The torch backend's dropout mask: drawn as ``F.dropout`` draws it, kept at 1 bit per element.

The mask is drawn by the call ``F.dropout`` makes on that device, from torch's generator for the
input's device: ``bernoulli_(1 - p)`` on a tensor like x on CPU (``F.dropout``'s CPU path),
``native_dropout`` elsewhere (its fused kernel is ``F.dropout`` there). So the masks are PEFT's
``nn.Dropout`` masks, call for call; ``torch.manual_seed`` reproduces them and
``torch.utils.checkpoint`` (which restores that generator) redraws the same mask on recomputation —
the properties the Triton path gets from ``_inputs.draw_seed``. Kept values are scaled as
``F.dropout`` scales them (the factor ``1 / (1 - p)`` formed by ``div_`` in x's dtype), so the
dropped input is ``F.dropout``'s, bit for bit.

Backward keeps :func:`pack` of the mask: 1 bit per element (uint8, 8 elements a byte in x's
logical row-major order, element i in bit i % 8) — never the bool mask nor the dropped input.
:func:`unpack` turns the bits straight into the scaled factor. Both are a few whole-tensor passes
(on a CPU numpy's ``packbits``/``unpackbits`` and a cast; elsewhere a matmul with the 8 powers of two
and a gather from a 256-row table): per-op overhead, not bytes, is what costs on a busy CPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

#: row v: the 8 bits of byte v, element i = bit i (the table :func:`unpack` gathers from)
_BYTE_BITS = (torch.arange(256)[:, None] >> torch.arange(8)) & 1


@functools.lru_cache(maxsize=64)
def _kept_factor(dtype: torch.dtype, p: float) -> float:
    """A kept element's factor ``1 / (1 - p)`` as ``F.dropout`` forms it in ``dtype`` (``div_`` of
    ones), as a Python number: exact in ``dtype``, so ``1 · f`` is that value and ``0 · f`` is 0. A
    number, not a cached tensor: nothing a caller could write into, nothing tied to a device, stream
    or graph memory pool."""
    return float(torch.ones(64, dtype=dtype, device="cpu").div_(1.0 - p)[0])


def draw(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask ``F.dropout(x, p)`` would draw now: 0/1 in x's dtype, shape and layout."""
    if x.device.type == "cpu":
        # laid out like x, as F.dropout's buffer: bernoulli_'s CPU kernel (the TensorIterator path)
        # fills memory in order, so a transposed or channels-last x gets another mask than a
        # contiguous buffer's
        return torch.empty_like(x).bernoulli_(1.0 - p)
    return torch.native_dropout(x, p, True)[1].to(x.dtype)


def scale_(keep: torch.Tensor, p: float) -> torch.Tensor:
    """``keep`` turned in place into ``F.dropout``'s factor, ``keep / (1 - p)``."""
    return keep.div_(1.0 - p)


def pack(keep: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (floating point, any layout: read in logical row-major order) -> uint8 (⌈n/8⌉,):
    1 bit per element."""
    if keep.device.type == "cpu":
        # numpy's packbits over the flags: ~11 µs at an adapter's input (256 × 576) where the matmul
        # form takes ~35 (bench/NOTES.md, issue 25's fourth run: such per-call costs add up per step)
        # (``.bool()``, not ``!= 0``: the same flags, a sixth of the time)
        return torch.from_numpy(np.packbits(keep.reshape(-1).bool().numpy(), bitorder="little"))
    return _pack_torch(keep)


def _pack_torch(keep: torch.Tensor) -> torch.Tensor:
    """:func:`pack` in torch operations, on any device."""
    flat = keep.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    # sums of distinct powers of two ≤ 255: exact
    powers = torch.tensor([1.0, 2, 4, 8, 16, 32, 64, 128], dtype=keep.dtype, device=keep.device)
    return (flat.view(-1, 8) @ powers).to(torch.uint8)


def unpack(bits: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, p: float) -> torch.Tensor:
    """The factor ``keep / (1 - p)`` in ``dtype`` and ``shape`` for the mask :func:`pack` packed."""
    if bits.device.type == "cpu":
        flags = torch.from_numpy(np.unpackbits(bits.numpy(), count=math.prod(shape), bitorder="little"))
        # 0 · f = 0 and 1 · f = f exactly: the table's values
        return flags.to(dtype).mul_(_kept_factor(dtype, p)).view(shape)
    return _unpack_torch(bits, shape, dtype, p)


def _unpack_torch(bits: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, p: float
                  ) -> torch.Tensor:
    """:func:`unpack` in torch operations, on any device: a gather from the 256-row table."""
    table = scale_(_BYTE_BITS.to(device=bits.device, dtype=dtype), p)
    return F.embedding(bits.to(torch.int64), table).view(-1)[:math.prod(shape)].view(shape)
