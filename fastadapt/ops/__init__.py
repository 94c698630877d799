"""Functional ops (layer 3): ``fa.ops.lora_linear`` and friends, each with a plain-PyTorch twin in
``fastadapt.ops.reference``."""

from .lora_linear import lora_linear, lora_linear_group
from .reference import lora_linear_ref

__all__ = ["lora_linear", "lora_linear_group", "lora_linear_ref"]
