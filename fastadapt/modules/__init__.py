"""Adapter ``nn.Module``s (layer 4): they own parameters and call one functional op each."""

from .base import AdapterWeight, is_supported_linear, linear_dims
from .bottleneck import BottleneckLinear
from .dora import DoraLinear
from .lora import LoraLinear

__all__ = ["AdapterWeight", "BottleneckLinear", "DoraLinear", "LoraLinear", "is_supported_linear", "linear_dims"]
