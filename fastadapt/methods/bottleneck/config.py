"""Series and parallel bottleneck adapters: options, defaults and the LLM-Adapters presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ... import _checks
from ...modules.bottleneck import INITS, check_scaling
from ...ops.reference import BOTTLENECK_ACTIVATIONS
from ..registry import Preset
from ..targets import validate_targets

#: Target keywords resolved through the architecture table's MLP rows ("auto" too): the sides they take.
MLP_TARGETS = {"mlp": ("input", "output"), "mlp-input": ("input",), "mlp-output": ("output",)}
SIDES = ("input", "output")


@dataclass(frozen=True)
class BottleneckConfig:
    """A bottleneck adapter (``A(z) = up(act(down(dropout(z))))``, see ``fastadapt.methods.bottleneck``).

    ``bottleneck``: b ≥ 1; ``activation``: tanh | relu | gelu | silu; ``dropout`` in [0, 1) on the
    adapter input; ``scaling``: a finite number or ``"learned"`` (one trainable scalar per module,
    initialised to 1); ``init``: ``"bert"`` (both matrices N(0, 0.02), LLM-Adapters' default),
    ``"zeros"`` (up zeros: a fresh patch changes nothing) or ``"mam_adapter"``; ``targets``:
    ``"auto"``, ``"mlp"``, ``"mlp-input"``, ``"mlp-output"`` or anything ``fa.patch`` accepts."""

    bottleneck: int = 256
    activation: str = "tanh"
    dropout: float = 0.0
    scaling: float | str = 1.0
    init: str = "bert"
    targets: str | tuple[str, ...] = "auto"
    method: str = field(default="", init=False)

    def __post_init__(self) -> None:
        _checks.positive_int("bottleneck", self.bottleneck)
        _checks.one_of("activation", self.activation, BOTTLENECK_ACTIVATIONS)
        object.__setattr__(self, "dropout", _checks.probability("dropout", self.dropout))
        object.__setattr__(self, "scaling", check_scaling(self.scaling))
        _checks.one_of("init", self.init, INITS)
        mlp_keyword = isinstance(self.targets, str) and self.targets in MLP_TARGETS
        targets = self.targets if mlp_keyword else validate_targets(self.targets)
        object.__setattr__(self, "targets", targets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bottleneck": self.bottleneck,
            "activation": self.activation,
            "dropout": self.dropout,
            "scaling": self.scaling,
            "init": self.init,
            "targets": self.targets if isinstance(self.targets, str) else list(self.targets),
        }


@dataclass(frozen=True)
class SeriesConfig(BottleneckConfig):
    """The series adapter (AdapterH / AdapterP). ``targets="auto"``: the MLP input and output
    projections (AdapterH); ``"mlp-output"``: AdapterP. ``position``: ``"auto"`` (the architecture's
    MLP rows), ``"input"``, ``"output"``, or a dict ``{module name or suffix: "input" | "output"}``
    (unlisted targets use the table)."""

    position: str | tuple[tuple[str, str], ...] = "auto"
    method: str = field(default="series", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "position", _check_position(self.position))

    def to_dict(self) -> dict[str, Any]:
        position = self.position if isinstance(self.position, str) else dict(self.position)
        return {**super().to_dict(), "position": position}


@dataclass(frozen=True)
class ParallelConfig(BottleneckConfig):
    """The parallel adapter, beside each target: ``y = W x + c + s·A(x)``. ``targets="auto"``:
    the MLP projections. ``position`` exists only to say that it does not apply."""

    position: str = "auto"
    method: str = field(default="parallel", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.position not in ("auto", "parallel"):
            raise ValueError(
                "position applies to series adapters only (a parallel adapter sits beside the layer), "
                f"got {self.position!r}"
            )


def _check_position(position: Any) -> str | tuple[tuple[str, str], ...]:
    bad = f"position must be 'auto', 'input', 'output' or a dict {{name: side}}, got {position!r}"
    if isinstance(position, str):
        if position not in ("auto", *SIDES):
            raise ValueError(bad)
        return position
    items = position.items() if isinstance(position, dict) else position
    try:
        pairs = tuple((str(k), v) for k, v in items)
    except (TypeError, ValueError):
        raise TypeError(bad) from None
    for k, v in pairs:
        if v not in SIDES:
            raise ValueError(f"position[{k!r}] must be 'input' or 'output', got {v!r}")
    return pairs


#: LLM-Adapters' commands: bottleneck 256; series on the MLP output projection, parallel beside the
#: MLP projections; lr 3e-4.
SERIES_PRESETS = {
    "llm-adapters": Preset(options=lambda model: {"bottleneck": 256, "targets": "mlp-output"}, learning_rate=3e-4,
                           description="bottleneck 256 after the MLP output projection"),
}
PARALLEL_PRESETS = {
    "llm-adapters": Preset(options=lambda model: {"bottleneck": 256}, learning_rate=3e-4,
                           description="bottleneck 256 beside the MLP projections"),
}
