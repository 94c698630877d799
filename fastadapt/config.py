"""Validated adapter configurations."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

Targets = str | list[str] | tuple[str, ...]


def validate_targets(targets: Any) -> str | tuple[str, ...]:
    """``"auto"``, ``"all-linear"``, a regex string, or a non-empty list of module-name suffixes."""
    if isinstance(targets, str):
        if targets not in ("auto", "all-linear"):
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"targets is not a valid regular expression: {targets!r} ({e})") from None
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)):
        items = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
        if not items or not all(isinstance(t, str) and t for t in items):
            raise ValueError(
                f"targets must be 'auto', 'all-linear', a regex string or a non-empty list of module "
                f"names, got {targets!r}"
            )
        return tuple(items)
    raise TypeError(
        f"targets must be 'auto', 'all-linear', a regex string or a list of module names, "
        f"got {type(targets).__name__}"
    )


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: ``y = base(x) + scaling · B(A(dropout(x)))`` with ``scaling = alpha / r``
    (``alpha / sqrt(r)`` when ``rslora``)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str | tuple[str, ...] = "auto"
    rslora: bool = False
    method: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"r must be a positive int, got {self.r!r} ({type(self.r).__name__})")
        if self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(
            self.alpha
        ):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise TypeError(f"rslora must be a bool, got {self.rslora!r}")
        object.__setattr__(self, "targets", validate_targets(self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
        return d
