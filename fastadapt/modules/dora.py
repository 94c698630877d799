"""``DoraLinear``: a frozen linear (``nn.Linear`` or GPT-2's ``Conv1D``) with DoRA (Liu et al., 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import dora_linear, dora_merge, dora_norm
from . import quantized
from .lora import LoraLinear


class DoraLinear(LoraLinear):
    """``y = g ⊙ (base(x) - bias + scaling · B(A(x))) + bias`` with ``g = m / ‖W + scaling · B A‖``
    (row norms, detached), and PEFT's dropout form when dropout is on (``fa.ops.dora_linear``).

    LoRA's ``lora_A`` / ``lora_B`` (same init, fp32) plus ``lora_magnitude_vector`` (out,), fp32,
    initialised to the rows' norms ``‖W_n‖`` (B is zero), so a fresh adapter changes nothing —
    PEFT's init and the parameter name PEFT writes to disk. It never joins a shared-input group.
    """

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        """``options``: LoraLinear's (``r``, ``alpha``, ``dropout``, ``rslora``, ``device``, ``dtype``)."""
        if getattr(base_layer, "weight", None) is not None and base_layer.weight.device.type == "meta":
            raise ValueError(
                "DoRA initialises its magnitude from the base weight's row norms, but the weight is on the meta "
                "device (no values yet): load the weights first (from_pretrained, or to_empty() then "
                "load_state_dict), then patch"
            )
        super().__init__(base_layer, **options)
        a = self.lora_A.weight
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=a.device, dtype=a.dtype))
        #: the row norms of the unmerged weight while merged (unmerge divides by g again)
        self._merged_norm: torch.Tensor | None = None
        self._reset_magnitude()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_magnitude_vector"):  # LoraLinear.__init__ calls this before it exists
            self._reset_magnitude()

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        self.lora_magnitude_vector.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``‖W_n + scaling · B_n A‖`` per output row, fp32 (N,), of the unmerged weight."""
        if self.merged:
            return self._merged_norm
        if self.quantized is not None:  # recomputed from the quantized storage: never a stale norm
            return quantized.dora_weight_norm(self.base_layer, self.lora_A.weight, self.lora_B.weight,
                                              scaling=self.scaling)
        return dora_norm(self.base_weight_nk(), self.lora_A.weight, self.lora_B.weight, scaling=self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.router is not None:  # named adapters: a mixed batch, or the active one in its slot
            y = self.router.forward(self, x)
            if y is not None:
                return y
        if self.quantized is not None:
            return quantized.dora_forward(self.base_layer, x, self.lora_A.weight, self.lora_B.weight,
                                          self.lora_magnitude_vector, scaling=self.scaling,
                                          dropout_p=self.dropout if self.training else 0.0)
        return dora_linear(
            x,
            self.base_weight_nk(),
            self.lora_A.weight,
            self.lora_B.weight,
            self.lora_magnitude_vector,
            scaling=self.scaling,
            bias=self.base_layer.bias,
            dropout_p=self.dropout if self.training else 0.0,
        )

    # -- merge -------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None, *, tensors: dict[str, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """``g ⊙ (W + scaling · B A)`` computed in fp32 and rounded once, to ``dtype`` (default: the
        weight's dtype), laid out like the base weight. ``tensors``: this module's tensors by their
        names under it (``base_layer.weight``, ``lora_A.weight``, ...), e.g. gathered from shards;
        default: its own."""
        own = dict(self.named_parameters())
        t = {**own, **(tensors or {})}
        a, b, m = (t[k] for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
        w = self.base_weight_nk() if self.quantized is not None else t["base_layer.weight"]
        norm = dora_norm(w.t() if self.fan_in_fan_out else w, a, b, scaling=self.scaling, backend="torch")
        merged = w.to(torch.float32, copy=True)
        dora_merge(merged, a, b, m, scaling=self.scaling, norm=norm, fan_in_fan_out=self.fan_in_fan_out)
        return merged.to(dtype or w.dtype)

    def _merge_op(self, *, sign: int, check_only: bool) -> bool:
        """``fa.ops.dora_merge`` on this module's weight; True when every result is finite."""
        norm = self.weight_norm() if sign == 1 else self._merged_norm
        finite = dora_merge(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector,
                            scaling=self.scaling, norm=norm, fan_in_fan_out=self.fan_in_fan_out, sign=sign,
                            check_only=check_only)
        if not check_only:
            self._merged_norm = norm if sign == 1 else None
        return finite

    @torch.no_grad()
    def merge(self, *, keep_original: bool = False, check: bool = True) -> None:
        """Fold DoRA into the base weight: ``W ← g ⊙ (W + scaling · B A)`` (fp32, one rounding), as
        PEFT merges it. Raises ``FloatingPointError`` (weight untouched) when the result holds
        NaN/Inf; ``keep_original`` keeps a copy of the unmerged weight so ``unmerge`` restores it
        exactly."""
        if self.merged:
            return
        if self.quantized is not None:
            raise ValueError(quantized.merge_refusal(type(self).__name__, self.base_layer))
        if check and not self.merge_is_finite():
            raise FloatingPointError("merging the DoRA weight produced NaN/Inf values")
        super().merge(keep_original=keep_original, check=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: exact when merged with ``keep_original=True``, otherwise
        ``W / g - scaling · B A`` in fp32 with the norms of the merge (as PEFT), within about two
        roundings of the weight dtype. A row whose magnitude is 0 was zeroed by the merge and cannot
        be recovered: then it is an error (the weight untouched) unless merged with ``keep_original``."""
        if self.merged and self._unmerged_weight is None and not bool((self.lora_magnitude_vector != 0).all()):
            raise RuntimeError("cannot unmerge a DoRA layer whose magnitude has zeros (the merge zeroed those "
                               "rows); merge with keep_original=True to be able to unmerge")
        super().unmerge()
        self._merged_norm = None

    def describe(self) -> str:
        return f"dora r={self.r} {self.in_features}->{self.out_features}"
