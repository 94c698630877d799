"""LoRA's options, its defaults and its LLM-Adapters preset."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ... import _checks
from ...architectures import lookup, model_type
from ..registry import Preset
from ..targets import validate_targets


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: ``y = base(x) + scaling · B(A(dropout(x)))`` with ``scaling = alpha / r``
    (``alpha / sqrt(r)`` when ``rslora``). ``targets="auto"``: PEFT's default for the architecture
    (q_proj and v_proj on LLaMA). The LLM-Adapters paper's settings are ``preset="llm-adapters"``."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str | tuple[str, ...] = "auto"
    rslora: bool = False
    method: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        _checks.positive_int("r", self.r)
        _checks.finite_number("alpha", self.alpha)
        _checks.probability("dropout", self.dropout)
        _checks.boolean("rslora", self.rslora)
        object.__setattr__(self, "targets", validate_targets(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
        return d


def _paper_options(model: nn.Module) -> dict[str, Any]:
    arch = lookup(model)
    if arch is None:
        raise ValueError(
            f"preset 'llm-adapters' has no LoRA targets for model_type {model_type(model)!r}; pass targets= "
            "the attention and MLP projections to adapt"
        )
    return {"r": 32, "alpha": 64, "dropout": 0.05, "targets": list(arch.paper_lora_targets)}


#: LLM-Adapters' LoRA command: r=32, alpha=64, dropout 0.05 on q, k, v, up and down (LLaMA), lr 3e-4.
PRESETS = {
    "llm-adapters": Preset(
        options=_paper_options, learning_rate=3e-4,
        description="r=32, alpha=64, dropout 0.05 on q,k,v,up,down_proj (or the architecture's equivalents)",
    ),
}
