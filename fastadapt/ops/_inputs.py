"""Input handling every functional op shares: validation at the public boundary, autocast,
and the Philox seed of a dropout mask."""

from __future__ import annotations

import torch

from .. import _checks
from ..distributed import is_dtensor

SHARDED_ERROR = (
    "{name} is a sharded DTensor: fused kernels never compute on a shard. Shard per decoder layer "
    "(fastadapt.distributed.shard_model), never a base_layer alone, so FSDP gathers the full weight "
    "before the layer's forward; or gather it first (DTensor.full_tensor())"
)


def check_tensors(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """``x`` and every non-None tensor in ``others``: a floating-point, unsharded tensor, and the
    others on x's device."""
    for name, t in {"x": x, **others}.items():
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
        raise ValueError(f"x must have at least 1 dimension (..., features), got shape {tuple(x.shape)}")


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """The frozen linear ``x Wᵀ + bias``: returns (out_features, in_features)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension in_features = {k}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (out_features,) = ({n},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under torch.autocast)")
    return n, k


def check_dropout_p(dropout_p: float) -> float:
    return _checks.probability("dropout_p", dropout_p)


def autocast_inputs(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Custom ops are not autocast: cast ``x`` and ``tensors`` as autocast would cast ``F.linear``'s
    inputs (unchanged outside autocast)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, *tensors))


def draw_seed(device: torch.device) -> int:
    """A Philox seed from torch's generator for ``device``, without a device sync. The generator's
    offset advances, so ``torch.manual_seed`` makes runs reproducible and ``torch.utils.checkpoint``
    (which restores the RNG state) regenerates the same mask on recomputation."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)  # consume like one philox call; restored by checkpoint's RNG stash
        return (gen.initial_seed() * 0x9E3779B97F4A7C15 + offset) % (2**62)
    return int(torch.randint(0, 2**62, (1,)).item())


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def draw_kernel_seed(device: torch.device) -> int | torch.Tensor:
    """The seed of a mask drawn by a kernel that takes it either way (``lora_shrink``): while a CUDA
    graph is being captured (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``), a
    one-element int64 tensor drawn on the device by torch's generator, which the kernel reads at run
    time — each replay draws a fresh seed, so a fresh mask, where a host int would be baked into the
    graph; else :func:`draw_seed`'s host int (no extra launch). Both follow ``torch.manual_seed`` and
    ``torch.utils.checkpoint``'s RNG restore."""
    if _capturing(device):
        return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)
    return draw_seed(device)
