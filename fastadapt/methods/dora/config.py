"""DoRA's options, its defaults and its preset (the DoRA paper's LLM-Adapters-style setting)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lora.config import LoraConfig, _paper_options
from ..registry import Preset


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA (Liu et al., 2024): ``y = g ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) (+ bias)``, ``g = m / ‖W + scaling·B A‖``
    per output row; LoRA's options, targets (``"auto"``: PEFT's default, q_proj and v_proj on LLaMA)
    and architectures. ``dropout`` defaults to 0, PEFT's default: with dropout PEFT's formulation
    multiplies the dropped input by the frozen weight as well — a second GEMM forward and backward."""

    dropout: float = 0.0
    method: str = field(default="dora", init=False)


#: The DoRA paper's LLaMA-7B commonsense setting (NVlabs/DoRA, on LLM-Adapters' code): r=32,
#: alpha=64, dropout 0.05 on q, k, v, up and down, lr 1e-4.
PRESETS = {
    "llm-adapters": Preset(
        options=_paper_options, learning_rate=1e-4,
        description="r=32, alpha=64, dropout 0.05 on q,k,v,up,down_proj (or the architecture's equivalents)",
    ),
}
