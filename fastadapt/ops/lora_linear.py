"""``fa.ops.lora_linear``: a frozen linear plus its LoRA term, with backend dispatch."""

from __future__ import annotations

import math

import torch

from ._dispatch import resolve_backend
from .reference import lora_linear_ref

_AVAILABLE = {"torch": lambda device: True}
_AUTO_ORDER: tuple[str, ...] = ("torch",)


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
    Differentiable in x, lora_a, lora_b (and weight/bias when they require grad).
    ``dropout_p`` applies to the input of the LoRA path only; pass 0 in eval mode.
    ``backend``: "auto" | "torch" | "triton" | "cuda" (see ``FASTADAPT_BACKEND``).
    """
    _validate_lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p)
    chosen = resolve_backend(
        "lora_linear", backend, x.device, available=_AVAILABLE, auto_order=_AUTO_ORDER
    )
    if chosen == "torch":
        return lora_linear_ref(
            x, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=dropout_p
        )
    raise AssertionError(f"unhandled backend {chosen}")


def _validate_lora_linear(x, weight, lora_a, lora_b, scaling, bias, dropout_p) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension in_features = {k}, got shape {tuple(x.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(
            f"lora_a must have shape (r, in_features) = (r, {k}), got {tuple(lora_a.shape)}"
        )
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_b must have shape (out_features, r) = ({n}, {r}), got {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape (out_features,) = ({n},), got {tuple(bias.shape)}")
    tensors = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move both to one device")
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"weight dtype {weight.dtype} must match x dtype {x.dtype} (or run under torch.autocast)"
        )
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
