"""``LoraLinear``: a frozen linear (``nn.Linear`` or GPT-2's ``Conv1D``) plus a trainable LoRA term."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from ..distributed import is_dtensor
from ..ops import invalidate_caches, lora_delta, lora_linear, lora_linear_group, lora_merge
from ..ops._cache import generation
from ..ops.lora_linear import selected_backend
from . import quantized
from .base import AdapterModule, AdapterWeight


class LoraLinear(AdapterModule):
    """``y = base(x) + scaling · B(A(dropout(x)))``.

    ``base_layer`` keeps the frozen weight (``nn.Linear``, or ``Conv1D`` whose weight is stored
    transposed: ``fan_in_fan_out``). ``lora_A.weight`` (r, in) is kaiming-uniform, ``lora_B.weight``
    (out, r) zeros, both fp32 by default so the optimizer sees full precision; the forward casts them
    to the activation dtype and never upcasts activations.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        r = _checks.positive_int("r", r)
        alpha = _checks.finite_number("alpha", alpha)
        dropout = _checks.probability("dropout", dropout)
        rslora = _checks.boolean("rslora", rslora)
        factory = self._wrap(base_layer, device, dtype)
        self.r = r
        self.lora_alpha = alpha
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.use_rslora = rslora
        self.dropout = dropout
        self.lora_A = AdapterWeight(r, self.in_features, **factory)
        self.lora_B = AdapterWeight(self.out_features, r, **factory)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self.group: SharedInputGroup | None = None  # set by the patcher for q/k/v, gate/up
        self.reset_parameters()
        self.train(base_layer.training)

    def reset_parameters(self) -> None:
        # Same init as PEFT: A kaiming-uniform(a=√5), B zeros — a fresh adapter changes nothing.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.router is not None:  # named adapters: a mixed batch, or the active one in its slot
            y = self.router.forward(self, x)
            if y is not None:
                return y
        if self.quantized is not None:
            return quantized.lora_forward(self.base_layer, x, self.lora_A.weight, self.lora_B.weight,
                                          scaling=self.scaling, dropout_p=self.dropout if self.training else 0.0)
        if self.group is not None and self.group.usable(x):
            return self.group.output(self, x)
        return lora_linear(
            x,
            self.base_weight_nk(),
            self.lora_A.weight,
            self.lora_B.weight,
            scaling=self.scaling,
            bias=self.base_layer.bias,
            dropout_p=self.dropout if self.training else 0.0,
        )

    # -- merge -------------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` in fp32, laid out like the base weight."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, fan_in_fan_out=self.fan_in_fan_out)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None, *, tensors: dict[str, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """``W + scaling · B A`` computed in fp32 and rounded once, to ``dtype`` (default: the
        weight's dtype). ``tensors``: this module's tensors by their names under it
        (``base_layer.weight``, ``lora_A.weight``, ...), e.g. gathered from shards; default: its own."""
        t = {**dict(self.named_parameters()), **(tensors or {})}
        w = self.base_weight_nk() if self.quantized is not None else t["base_layer.weight"]
        delta = lora_delta(t["lora_A.weight"], t["lora_B.weight"], self.scaling, fan_in_fan_out=self.fan_in_fan_out)
        return (w.float() + delta).to(dtype or w.dtype)

    def _merge_op(self, *, sign: int, check_only: bool) -> bool:
        """``fa.ops.lora_merge`` on this module's weight; True when every result is finite."""
        return lora_merge(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, scaling=self.scaling,
                          fan_in_fan_out=self.fan_in_fan_out, sign=sign, check_only=check_only)

    @torch.no_grad()
    def merge_is_finite(self) -> bool:
        """Whether merging would give finite weights (nothing is written)."""
        return self._merge_op(sign=1, check_only=True)

    @torch.no_grad()
    def merge(self, *, keep_original: bool = False, check: bool = True) -> None:
        """Fold the LoRA term into the base weight (fp32 delta, one rounding).

        Raises ``FloatingPointError`` (weight untouched) when the result holds NaN/Inf;
        ``check=False`` skips that test for a caller that already ran ``merge_is_finite``.
        ``keep_original`` keeps a copy of the unmerged weight so ``unmerge`` restores it exactly.
        """
        if self.merged:
            return
        if self.quantized is not None:
            raise ValueError(quantized.merge_refusal(type(self).__name__, self.base_layer))
        if check and not self.merge_is_finite():
            raise FloatingPointError("merging the LoRA delta produced NaN/Inf values")
        w = self.base_layer.weight
        self._unmerged_weight = w.detach().clone() if keep_original else None
        invalidate_caches()  # the base weight changes (the merge kernel moves no version counter)
        self._merge_op(sign=1, check_only=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: exact when merged with ``keep_original=True``, otherwise
        ``W - scaling · B A`` in fp32, within one rounding of the weight dtype of the original."""
        if not self.merged:
            raise RuntimeError("unmerge called on a LoraLinear that is not merged")
        invalidate_caches()  # the base weight changes (the merge kernel moves no version counter)
        if self._unmerged_weight is not None:
            self.base_layer.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        else:
            self._merge_op(sign=-1, check_only=False)
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )


class SharedInputGroup:
    """LoRA layers that read the same input (q/k/v, gate/up): the first member called with a new x
    computes every member's output with one grouped op (X read once for all S and all dA); the
    others then take theirs. Used on the Triton backend outside ``torch.compile``; a member
    called with another tensor falls back to its own op, so a model that feeds the members
    different inputs still gets the right numbers."""

    def __init__(self, members: list[LoraLinear]) -> None:
        self.members = members
        self._x: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}
        self._versions: tuple[int, ...] = ()

    def usable(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or any(m.merged for m in self.members):
            return False
        # on a GPU asking the dispatch logs its choice: the members are checked first there; elsewhere
        # (every CPU step) the one cheap backend check comes first
        if x.device.type == "cuda":
            return self._members_allow() and self._on_triton(x)
        return self._on_triton(x) and self._members_allow()

    @staticmethod
    def _on_triton(x: torch.Tensor) -> bool:
        return selected_backend(x.device, rows=x.numel() // max(x.shape[-1], 1), op="lora_linear_group") == "triton"

    def _members_allow(self) -> bool:
        for m in self.members:
            base = (m.base_layer.weight, m.base_layer.bias)
            if any(t is not None and t.requires_grad for t in base):
                return False  # the grouped backward computes adapter gradients only
            if any(is_dtensor(t) for t in (*base, m.lora_A.weight, m.lora_B.weight)):
                return False  # members sharded one by one: each gathers its own weight in its own forward
        return True

    def _adapter_versions(self) -> tuple[int, ...]:
        # the pending outputs were computed in this forward; an optimizer step (fused ones move no
        # version counter: the generation) or an in-place write in between makes them stale
        return (generation(), *(w._version for m in self.members for w in (m.lora_A.weight, m.lora_B.weight)))

    def output(self, member: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        if x is self._x and id(member) in self._pending and self._versions == self._adapter_versions():
            y = self._pending.pop(id(member))
            if not self._pending:
                self._x = None
            return y
        first = self.members[0]
        ys = lora_linear_group(
            x,
            [m.base_weight_nk() for m in self.members],
            [m.lora_A.weight for m in self.members],
            [m.lora_B.weight for m in self.members],
            scaling=first.scaling,
            biases=[m.base_layer.bias for m in self.members],
            dropout_p=first.dropout if member.training else 0.0,
        )
        self._pending = {id(m): y for m, y in zip(self.members, ys) if m is not member}
        self._x = x if self._pending else None
        self._versions = self._adapter_versions()  # an optimizer step in between invalidates them
        return ys[self.members.index(member)]
