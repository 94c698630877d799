"""Functional ops (layer 3): ``fa.ops.lora_linear`` and friends, one file each, every one with a
plain-PyTorch twin of the same signature in ``fastadapt.ops.reference``."""

from ._cache import invalidate as invalidate_caches
from .bottleneck_adapter import bottleneck_adapter
from .dora_linear import dora_linear, dora_merge, dora_norm
from .lora_linear import lora_linear, lora_linear_group
from .lora_linear_4bit import Weight4bit, lora_linear_4bit
from .lora_merge import lora_delta, lora_merge
from .lora_mixed import bottleneck_mixed, lora_mixed
from .parallel_adapter import parallel_adapter
from .reference import (
    bottleneck_adapter_ref,
    bottleneck_mixed_ref,
    dora_linear_ref,
    dora_merge_ref,
    dora_norm_ref,
    lora_linear_ref,
    lora_merge_ref,
    lora_mixed_ref,
    parallel_adapter_ref,
)

__all__ = [
    "Weight4bit",
    "bottleneck_adapter",
    "bottleneck_adapter_ref",
    "bottleneck_mixed",
    "bottleneck_mixed_ref",
    "dora_linear",
    "dora_linear_ref",
    "dora_merge",
    "dora_merge_ref",
    "dora_norm",
    "dora_norm_ref",
    "invalidate_caches",
    "lora_delta",
    "lora_linear",
    "lora_linear_group",
    "lora_linear_4bit",
    "lora_linear_ref",
    "lora_merge",
    "lora_merge_ref",
    "lora_mixed",
    "lora_mixed_ref",
    "parallel_adapter",
    "parallel_adapter_ref",
]
