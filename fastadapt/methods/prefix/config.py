"""Prefix tuning's options, defaults and LLM-Adapters preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ... import _checks
from ...modules.prefix import check_init_std
from ..registry import Preset


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: ``num_virtual_tokens`` trainable keys/values per attention layer.

    ``projection``: PEFT's MLP reparameterisation (``encoder_hidden_size`` hidden units, default the
    model's hidden size); ``init_std``: std of the normal init of the prefix table (PEFT: 1.0)."""

    num_virtual_tokens: int = 10
    projection: bool = False
    encoder_hidden_size: int | None = None
    init_std: float = 1.0
    method: str = field(default="prefix", init=False)

    def __post_init__(self) -> None:
        _checks.positive_int("num_virtual_tokens", self.num_virtual_tokens)
        _checks.boolean("projection", self.projection)
        if self.encoder_hidden_size is not None:
            _checks.positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_init_std(self.init_std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: LLM-Adapters' prefix command: 10 virtual tokens, lr 3e-2.
PRESETS = {
    "llm-adapters": Preset(options=lambda model: {"num_virtual_tokens": 10}, learning_rate=3e-2,
                           description="10 virtual tokens"),
}
