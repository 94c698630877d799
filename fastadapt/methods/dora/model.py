"""DoRA in a model: LoRA's targets and swap with ``DoraLinear``; PEFT's format both ways (a LoRA
``adapter_config.json`` with ``use_dora: true``, tensors ``<module>.lora_magnitude_vector`` (out,)
beside ``lora_A`` / ``lora_B``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...modules import DoraLinear
from ..lora import model as lora
from .config import DoraConfig

PEFT_TYPE = lora.PEFT_TYPE
TRAINING_OPTIONS = lora.TRAINING_OPTIONS
read_config = lora.read_config
check_loaded = lora.check_loaded
targets = lora.targets


def build(layer: nn.Module, config: DoraConfig) -> DoraLinear:
    """One target's module, as ``apply`` builds it."""
    return lora.build(layer, config, DoraLinear)


def apply(model: nn.Module, config: DoraConfig) -> tuple[list[str], list]:
    # No shared-input groups: a group's one op computes LoRA outputs for all its members.
    return lora.swap_in(model, config, DoraLinear), []


def adapter_config(model: nn.Module, config: DoraConfig) -> dict[str, Any]:
    """PEFT's LoRA ``adapter_config.json`` with ``use_dora: true``."""
    return {**lora.adapter_config(model, config), "use_dora": True}
