"""``BottleneckLinear``: a frozen linear with an LLM-Adapters bottleneck adapter (series or parallel)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from ..ops import bottleneck_adapter, parallel_adapter
from ..ops.reference import BOTTLENECK_ACTIVATIONS
from . import quantized
from .base import AdapterModule, AdapterWeight

#: Where the adapter sits relative to the frozen linear ``W x + c`` (``A(z) = up(act(down(drop(z))))``):
#: "input"    y = W (x + s·A(x)) + c     (LLM-Adapters "mh_adapter", MLP input projections)
#: "output"   y = h + s·A(h), h = W x + c (LLM-Adapters "output_adapter", MLP output projection)
#: "parallel" y = W x + c + s·A(x)       (LLM-Adapters "parallel_adapter")
POSITIONS = ("input", "output", "parallel")
INITS = ("bert", "zeros", "mam_adapter")


def check_scaling(scaling: float | str) -> float | str:
    """A finite number, or ``"learned"`` (one trainable scalar, initialised to 1)."""
    if isinstance(scaling, str):
        if scaling != "learned":
            raise ValueError(f"scaling must be a finite number or 'learned', got {scaling!r}")
        return scaling
    try:
        return _checks.finite_number("scaling", scaling)
    except ValueError:
        raise ValueError(f"scaling must be a finite number or 'learned', got {scaling!r}") from None


class BottleneckLinear(AdapterModule):
    """A frozen linear (``nn.Linear`` or GPT-2's ``Conv1D``) plus a bottleneck adapter at ``position``.

    Parameters (fp32 by default; cast to the activation dtype in the forward):
    ``adapter_down.weight`` (b, d_a_in), ``adapter_up.weight`` (d_a_out, b) where the adapter maps
    in_features → in_features ("input"), out_features → out_features ("output") or in_features →
    out_features ("parallel"), as in LLM-Adapters; ``adapter_scaling`` (1,) when ``scaling="learned"``
    (initialised to 1). ``init="bert"``: both N(0, 0.02) (LLM-Adapters' default); ``"zeros"``: down
    N(0, 0.02), up zeros (a fresh adapter changes nothing); ``"mam_adapter"``: down
    kaiming-uniform(a=√5), up zeros (LLM-Adapters' other option).

    Not mergeable: the activation makes the adapter non-linear, no weight delta expresses it.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        position: str,
        bottleneck: int,
        activation: str = "tanh",
        dropout: float = 0.0,
        scaling: float | str = 1.0,
        init: str = "bert",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _checks.one_of("position", position, POSITIONS)
        _checks.positive_int("bottleneck", bottleneck)
        _checks.one_of("activation", activation, BOTTLENECK_ACTIVATIONS)
        dropout = _checks.probability("dropout", dropout)
        scaling = check_scaling(scaling)
        _checks.one_of("init", init, INITS)
        factory = self._wrap(base_layer, device, dtype)
        self.position = position
        self.bottleneck = int(bottleneck)
        self.activation = activation
        self.dropout = float(dropout)
        self.init = init
        self.learned_scaling = scaling == "learned"
        d_a_in = self.out_features if position == "output" else self.in_features
        d_a_out = self.in_features if position == "input" else self.out_features
        self.adapter_down = AdapterWeight(self.bottleneck, d_a_in, **factory)
        self.adapter_up = AdapterWeight(d_a_out, self.bottleneck, **factory)
        if self.learned_scaling:
            self.adapter_scaling = nn.Parameter(torch.ones(1, **factory))
            self.scaling: float | None = None
        else:
            self.scaling = float(scaling)
        self.merged = False  # never True: fa.merge refuses bottleneck adapters
        self.reset_parameters()
        self.train(base_layer.training)

    def reset_parameters(self) -> None:
        if self.init == "mam_adapter":
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.adapter_down.weight, mean=0.0, std=0.02)  # BERT init, as LLM-Adapters
        if self.init == "bert":
            nn.init.normal_(self.adapter_up.weight, mean=0.0, std=0.02)
        else:
            nn.init.zeros_(self.adapter_up.weight)
        if self.learned_scaling:
            with torch.no_grad():
                self.adapter_scaling.fill_(1.0)

    def scaling_value(self) -> float | torch.Tensor:
        """The scaling the op gets: the float, or the learned (1,) parameter."""
        return self.adapter_scaling if self.learned_scaling else self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:  # named adapters: a mixed batch, or the active one in its slot
            y = self.router.forward(self, x)
            if y is not None:
                return y
        p = self.dropout if self.training else 0.0
        kw = {"activation": self.activation, "scaling": self.scaling_value(), "dropout_p": p}
        wd, wu = self.adapter_down.weight, self.adapter_up.weight
        if self.position == "input":
            return self.base_output(bottleneck_adapter(x, wd, wu, **kw))
        if self.position == "output":
            return bottleneck_adapter(self.base_output(x), wd, wu, **kw)
        if self.quantized is not None:
            return quantized.parallel_forward(self.base_layer, x, wd, wu, **kw)
        return parallel_adapter(x, self.base_weight_nk(), wd, wu, bias=self.base_layer.bias, **kw)

    def merge(self, *, keep_original: bool = False) -> None:
        raise ValueError(
            "a bottleneck adapter cannot be merged into its base weight: the activation between "
            "adapter_down and adapter_up makes it non-linear"
        )

    def unmerge(self) -> None:
        raise RuntimeError("a bottleneck adapter is never merged")

    def describe(self) -> str:
        """One line for ``fa.summary``."""
        s = "learned" if self.learned_scaling else f"{self.scaling:g}"
        return f"{self.position} b={self.bottleneck} {self.activation} s={s} {self.in_features}->{self.out_features}"

    def extra_repr(self) -> str:
        s = "learned" if self.learned_scaling else f"{self.scaling:g}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, position={self.position}, "
            f"bottleneck={self.bottleneck}, activation={self.activation}, scaling={s}, dropout={self.dropout:g}, "
            f"fan_in_fan_out={self.fan_in_fan_out}"
        )
