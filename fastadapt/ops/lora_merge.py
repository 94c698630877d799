"""``fa.ops.lora_merge``: fold a LoRA delta into its frozen weight in place, ``W += ±scaling · B A``.

Backends: ``"torch"`` (``reference.lora_merge_ref``: an fp32 copy of the weight, then one rounding)
and ``"cuda"`` (``csrc/lora_merge``: one read and one write of W, fp32 math, one rounding, a device
NaN/Inf flag; never an fp32 copy of the weight).
"""

from __future__ import annotations

import torch

from .. import _checks
from . import _native
from ._inputs import check_tensors
from ._library import native_op
from .dispatch import TORCH_BACKENDS, register_op, resolve_backend
from .reference import lora_delta, lora_merge_ref

__all__ = ["lora_delta", "lora_merge", "selected_backend"]


def _cuda_fake(weight, lora_a, lora_b, scaling, transposed=False, sign=1, check_only=False):
    return weight.new_empty((1,), dtype=torch.int32)


#: In place ``weight += sign · scaling · lora_b @ lora_a`` (weight (N, K), or (K, N) when
#: ``transposed``); returns an int32 (1,) device flag, 1 when any result is NaN/Inf.
#: ``check_only`` computes the flag without writing.
lora_merge_cuda_ = native_op(
    "lora_merge_cuda_",
    "(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scaling, bool transposed=False, int sign=1, "
    "bool check_only=False) -> Tensor",
    fake=_cuda_fake,
)


def _cuda_usable(device: torch.device) -> bool:
    return device.type == "cuda" and _native.native_available()


register_op("lora_merge", {"cuda": _cuda_usable})


def selected_backend(weight: torch.Tensor, backend: str = "auto") -> str:
    """The backend ``lora_merge`` would run for ``weight``."""
    if backend == "cuda":
        _native.require_native("lora_merge")
    return resolve_backend("lora_merge", backend, weight.device, available={"cuda": _cuda_usable})


@torch.no_grad()
def lora_merge(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scaling: float,
    fan_in_fan_out: bool = False,
    sign: int = 1,
    check_only: bool = False,
    backend: str = "auto",
) -> bool:
    """In place: ``weight += sign · scaling · lora_b @ lora_a``, formed in fp32, rounded once.

    Shapes: weight (N, K), or (K, N) for a ``Conv1D`` (``fan_in_fan_out``); lora_a (r, K); lora_b
    (N, r). Returns whether every result is finite. ``check_only=True`` only answers that and
    writes nothing (``fa.merge`` checks every module before it writes any); otherwise the result
    is written even when it is not finite, so check first when that must not happen.
    ``sign``: 1 merges, -1 unmerges. ``backend``: "auto" | "torch" | "cuda" ("reference" = "torch").
    """
    check_tensors(weight, lora_a=lora_a, lora_b=lora_b)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    n, k = weight.shape[::-1] if fan_in_fan_out else weight.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape (r, in_features) = (r, {k}), got {tuple(lora_a.shape)}")
    if lora_a.shape[0] < 1:
        raise ValueError(f"lora_a must have at least one row (rank r ≥ 1), got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, lora_a.shape[0]):
        raise ValueError(
            f"lora_b must have shape (out_features, r) = ({n}, {lora_a.shape[0]}), got {tuple(lora_b.shape)}"
        )
    _checks.finite_number("scaling", scaling)
    _checks.one_of("sign", sign, (1, -1))
    if selected_backend(weight, backend) in TORCH_BACKENDS:
        return lora_merge_ref(weight, lora_a, lora_b, scaling=scaling, fan_in_fan_out=fan_in_fan_out, sign=sign,
                              check_only=check_only)
    flag = lora_merge_cuda_(weight, lora_a.float(), lora_b.float(), float(scaling), fan_in_fan_out, sign, check_only)
    return not bool(flag.item())
