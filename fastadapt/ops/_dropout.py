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
:func:`unpack` turns the bits straight into the scaled factor. Both are a few whole-tensor
operations (a matmul with the 8 powers of two; a gather from a 256-row table): per-op overhead,
not bytes, is what costs on a busy CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: row v: the 8 bits of byte v, element i = bit i (the table :func:`unpack` gathers from)
_BYTE_BITS = (torch.arange(256)[:, None] >> torch.arange(8)) & 1


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
    flat = keep.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    powers = torch.tensor([1.0, 2, 4, 8, 16, 32, 64, 128], dtype=keep.dtype, device=keep.device)
    return (flat.view(-1, 8) @ powers).to(torch.uint8)  # sums of distinct powers of two ≤ 255: exact


def unpack(bits: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, p: float) -> torch.Tensor:
    """The factor ``keep / (1 - p)`` in ``dtype`` and ``shape`` for the mask :func:`pack` packed."""
    table = scale_(_BYTE_BITS.to(device=bits.device, dtype=dtype), p)
    n = 1
    for d in shape:
        n *= d
    return F.embedding(bits.to(torch.int64), table).view(-1)[:n].view(shape)
