"""Pieces shared by the adapter modules."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .quantized import base_forward, dequantized_weight, quantized_kind


def conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D`` (weight stored (in, out)), if transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_supported_linear(module: nn.Module) -> bool:
    """A plain linear layer: ``nn.Linear``, a subclass whose forward is still the linear map
    ``x Wᵀ + b`` (Falcon's ``FalconLinear`` computes ``x @ W.T + b``), or ``Conv1D``.

    Subclasses whose forward computes something else from their weight (quantized layers, ...) are
    not: wrapping them would give wrong numbers. A subclass's forward is checked once per module on
    a small random input (its own generator: the global RNG is untouched; hooks are not run).
    bitsandbytes' ``Linear4bit`` and ``Linear8bitLt`` are supported as quantized bases
    (``modules/quantized.py``).
    """
    if quantized_kind(module) is not None:
        return True
    if isinstance(module, nn.Linear):
        if type(module).forward is nn.Linear.forward:
            return True
        verdict = _LINEAR_FORWARD.get(module)
        if verdict is None:
            verdict = _LINEAR_FORWARD[module] = _forward_is_linear_map(module)
        return verdict
    conv1d = conv1d_type()
    return conv1d is not None and type(module) is conv1d


#: nn.Linear subclass instances -> whether their forward is the linear map (see is_supported_linear)
_LINEAR_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _forward_is_linear_map(module: nn.Linear) -> bool:
    w = module.weight
    if not w.is_floating_point() or w.device.type == "meta" or w.dim() != 2:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, module.in_features, generator=g).to(device=w.device, dtype=w.dtype)
    try:
        y = type(module).forward(module, x)
    except Exception:  # a forward that needs more than an input tensor is not the linear map
        return False
    want = torch.nn.functional.linear(x, w, module.bias)
    if not isinstance(y, torch.Tensor) or y.shape != want.shape or y.dtype != want.dtype:
        return False
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(((y.float() - want.float()).abs() <= tol * (1 + want.float().abs())).all())


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a supported linear layer."""
    if not is_supported_linear(module):
        raise TypeError(
            f"unsupported module type {type(module).__module__}.{type(module).__name__}: fastadapt "
            "adapts torch.nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt layers"
        )
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
    return in_features, out_features, True


class AdapterWeight(nn.Module):
    """Holds one adapter matrix as ``.weight`` (so state-dict keys read ``lora_A.weight`` like PEFT),
    without being an ``nn.Linear`` that other tools would mistake for a layer to wrap."""

    def __init__(
        self, out_features: int, in_features: int, *, device=None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


class AdapterModule(nn.Module):
    """Base of the modules ``patch`` swaps in: an adapter around a frozen ``base_layer``
    (``nn.Linear``, or GPT-2's ``Conv1D`` whose weight is stored transposed: ``fan_in_fan_out``)."""

    base_layer: nn.Module
    #: whether the active adapter adapts this module (False: wrapped only for other named adapters)
    active: bool = True
    #: what routes a forward through the adapter slots (named adapters, mixed batches): ``fastadapt.mixed``
    router = None

    def _wrap(self, base_layer: nn.Module, device, dtype: torch.dtype) -> dict:
        """Keep ``base_layer`` and its dimensions; returns the factory kwargs of the adapter's own
        parameters (on the base weight's device unless ``device`` is given)."""
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        return {"device": device if device is not None else base_layer.weight.device, "dtype": dtype}

    @property
    def quantized(self) -> str | None:
        """``"4bit"`` / ``"8bit"`` while the base is a bitsandbytes quantized layer
        (``modules/quantized.py``), else None."""
        return quantized_kind(self.base_layer)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` (a quantized base through ``quantized.base_forward``)."""
        return self.base_layer(x) if self.quantized is None else base_forward(self.base_layer, x)

    def base_weight_nk(self) -> torch.Tensor:
        """The frozen weight as (out_features, in_features) — a view for ``Conv1D``; for a quantized
        base its dequantized values, fp32 (a fresh tensor)."""
        if self.quantized is not None:
            return dequantized_weight(self.base_layer)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w
