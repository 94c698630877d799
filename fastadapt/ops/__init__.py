"""Functional ops (layer 3): ``fa.ops.lora_linear`` and friends, each with a plain-PyTorch twin in
``fastadapt.ops.reference``."""

from .bottleneck_adapter import bottleneck_adapter, parallel_adapter
from .lora_linear import lora_linear, lora_linear_group
from .reference import bottleneck_adapter_ref, lora_linear_ref, parallel_adapter_ref

__all__ = [
    "bottleneck_adapter",
    "bottleneck_adapter_ref",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_ref",
    "parallel_adapter",
    "parallel_adapter_ref",
]
