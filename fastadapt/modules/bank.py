"""Several named adapters in one adapter module: the active one in the module's parameters, the
others in an :class:`AdapterBank`, and the forward of a batch whose rows use different ones.

Each tensor has one home. The **active** adapter's tensors are the module's parameters (what
training, ``fa.merge`` and ``fa.save_adapter`` see, as with one adapter); the **others** are rows of
the module's bank (inference only: never trained, written only through ``fa`` calls). A mixed batch
reads both (``fa.ops.lora_mixed``). Adapters are *slots*: a slot is sized to the largest rank that
was ever put into it, an adapter of a smaller rank fills its first rows (the rest stay zero), and a
larger one grows the slot once; so hot-swapping adapters of rank ≤ the slot's size changes no tensor
shape and a compiled forward of the active adapter does not recompile (its scaling lives in a tensor;
a compiled mixed batch specialises on the banked adapters' ranks and scalings, see ``fa.hotswap_adapter``).

Roles of a module's tensors, as saved (``<module>.<role>``): LoRA ``lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r), DoRA also ``lora_magnitude_vector`` (out,); bottleneck adapters
``adapter_down.weight`` (b, d_in), ``adapter_up.weight`` (d_out, b), ``adapter_scaling`` (1,) when
learned. In a slot, ``down`` holds A / the down projection and ``up`` holds Bᵀ / the up projection
transposed: both share the rank axis, so one compact bank serves every slot.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import bottleneck_mixed, dora_norm, lora_mixed
from ..ops._cache import InferenceCache
from ..ops._inputs import autocast_inputs
from ..ops.lora_mixed import SlotBank, SlotRows
from .base import AdapterModule, AdapterWeight
from .bottleneck import BottleneckLinear
from .dora import DoraLinear
from .lora import LoraLinear

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotSettings:
    """What a slot computes besides its tensors: the rank it uses and its scaling (a number; a
    learned bottleneck scaling is a tensor role instead), plus LoRA's ``alpha``/``rslora``."""

    rank: int
    scaling: float | None
    alpha: float | None = None
    rslora: bool = False


def settings_of(module: AdapterModule, tensors: dict[str, torch.Tensor], config) -> SlotSettings:
    """A slot's settings for ``tensors`` under ``config`` (its adapter's method config: LoRA's
    ``alpha``/``rslora``, a bottleneck adapter's ``scaling``)."""
    if isinstance(module, LoraLinear):
        r = int(tensors["lora_A.weight"].shape[0])
        alpha, rslora = float(config.alpha), bool(config.rslora)
        return SlotSettings(r, alpha / (math.sqrt(r) if rslora else r), alpha, rslora)
    scaling = config.scaling
    return SlotSettings(int(tensors["adapter_down.weight"].shape[0]), None if scaling == "learned" else float(scaling))


def roles(module: AdapterModule) -> tuple[str, ...]:
    """The tensor roles of one adapter on ``module`` (the names its parameters have)."""
    if isinstance(module, DoraLinear):
        return ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    if isinstance(module, LoraLinear):
        return ("lora_A.weight", "lora_B.weight")
    return ("adapter_down.weight", "adapter_up.weight") + (("adapter_scaling",) if module.learned_scaling else ())


def _down_up(module: AdapterModule, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, K), up (r, N)) of one adapter's tensors."""
    if isinstance(module, LoraLinear):
        return tensors["lora_A.weight"], tensors["lora_B.weight"].t()
    return tensors["adapter_down.weight"], tensors["adapter_up.weight"].t()


def _widths(module: AdapterModule) -> tuple[int, int]:
    """(K, N): the input and output width of the adapter's term on ``module``."""
    if isinstance(module, BottleneckLinear):
        return module.adapter_down.weight.shape[1], module.adapter_up.weight.shape[0]
    return module.in_features, module.out_features


class AdapterBank(nn.Module):
    """The inactive named adapters of one module, in compact slots along the rank axis.

    ``down`` (R + 1, K) and ``up`` (R + 1, N) (their last row is a spare zero row, which
    ``fa.ops.lora_mixed`` gathers to pad slots); slot ``i`` owns rows ``offsets[i] ..
    offsets[i] + capacities[i]``. ``scalings`` (n,), ``magnitude`` (n, N) for DoRA. Non-persistent
    buffers (``.to()`` and ``.half()`` move them; no state-dict key), in the dtype of the module's
    adapter parameters, so a saved adapter comes back bit for bit. ``version`` moves on every write:
    what is derived from the bank keys on it."""

    def __init__(self, module: AdapterModule) -> None:
        super().__init__()
        k, n = _widths(module)
        ref = next(p for name, p in module.named_parameters() if not name.startswith("base_layer."))
        factory = {"device": ref.device, "dtype": ref.dtype}
        self.names: list[str] = []
        self.capacities: list[int] = []
        self.settings: list[SlotSettings] = []
        self.register_buffer("down", torch.zeros(1, k, **factory), persistent=False)
        self.register_buffer("up", torch.zeros(1, n, **factory), persistent=False)
        #: fp32 whatever the adapters' dtype (a scaling is never rounded to 16 bits): not a buffer
        self.scalings = torch.zeros(0, device=ref.device)
        dora = isinstance(module, DoraLinear)
        self.register_buffer("magnitude", torch.zeros(0, n, **factory) if dora else None, persistent=False)
        self.version = 0
        self._derived = InferenceCache()
        self._layout_memo: tuple | None = None

    def _apply(self, fn, recurse: bool = True):
        self.version += 1  # .to() / .half(): new tensors, derived copies go
        out = super()._apply(fn, recurse)
        self.scalings = self.scalings.to(self.down.device)
        return out

    def extra_repr(self) -> str:
        return f"slots={list(zip(self.names, self.capacities))}"

    # -- layout ------------------------------------------------------------------------------------

    @property
    def offsets(self) -> list[int]:
        return [sum(self.capacities[:i]) for i in range(len(self.capacities))]

    def _host_layout(self) -> tuple:
        """``(offsets, capacities, ranks, scalings_host)`` as :class:`SlotBank` takes them, made once per
        write (every writer — ``put``, ``remove``, ``_relayout`` — drops it): forming them is Python work
        that every layer's call would repeat. Host numbers only, no tensor."""
        memo = self.__dict__.get("_layout_memo")  # absent in a bank pickled before it existed
        if memo is None:
            fixed = all(st.scaling is not None for st in self.settings)
            memo = self._layout_memo = (tuple(self.offsets), tuple(self.capacities),
                                        tuple(st.rank for st in self.settings),
                                        tuple(st.scaling for st in self.settings) if fixed else None)
        return memo

    def slot(self, name: str) -> int | None:
        return self.names.index(name) if name in self.names else None

    def _relayout(self, capacities: list[int]) -> None:
        """New tensors for ``capacities`` (one per slot, in order), keeping what each slot holds."""
        old_offsets, old_caps = self.offsets, self.capacities
        total = sum(capacities)
        down = self.down.new_zeros(total + 1, self.down.shape[1])
        up = self.up.new_zeros(total + 1, self.up.shape[1])
        start = 0
        for i, cap in enumerate(capacities):
            if i < len(old_caps):
                keep = min(cap, old_caps[i])
                down[start:start + keep] = self.down[old_offsets[i]:old_offsets[i] + keep]
                up[start:start + keep] = self.up[old_offsets[i]:old_offsets[i] + keep]
            start += cap
        self.down, self.up, self.capacities = down, up, list(capacities)
        self._layout_memo = None

    # -- writing (only through fa calls) ---------------------------------------------------------------

    @torch.no_grad()
    def put(self, name: str, module: AdapterModule, tensors: dict[str, torch.Tensor], settings: SlotSettings) -> None:
        """Store ``tensors`` (one adapter's roles at their own shapes) in ``name``'s slot: in place when
        its rank fits the slot, else the slot grows (a new slot is sized to the rank)."""
        down, up = _down_up(module, tensors)
        rank = down.shape[0]
        i = self.slot(name)
        if i is None:
            self.names.append(name)
            self.settings.append(settings)
            self._relayout(self.capacities + [rank])
            i = len(self.names) - 1
            self.scalings = torch.cat([self.scalings, self.scalings.new_zeros(1)])
            if self.magnitude is not None:
                self.magnitude = torch.cat([self.magnitude, self.magnitude.new_zeros(1, self.magnitude.shape[1])])
        elif rank > self.capacities[i]:
            self._relayout([rank if j == i else c for j, c in enumerate(self.capacities)])
        off, cap = self.offsets[i], self.capacities[i]
        self.down[off:off + cap].zero_()
        self.up[off:off + cap].zero_()
        self.down[off:off + rank] = down
        self.up[off:off + rank] = up
        self.settings[i] = settings
        self._layout_memo = None
        scale = tensors["adapter_scaling"].reshape(()) if "adapter_scaling" in tensors else settings.scaling
        self.scalings[i] = float(scale)
        if self.magnitude is not None:
            self.magnitude[i] = tensors["lora_magnitude_vector"]
        self.version += 1

    def take(self, name: str, module: AdapterModule) -> dict[str, torch.Tensor]:
        """Copies of ``name``'s tensors at their own shapes (its roles)."""
        i = self.names.index(name)
        off, rank = self.offsets[i], self.settings[i].rank
        down, up = self.down[off:off + rank].clone(), self.up[off:off + rank].t().clone()
        if isinstance(module, LoraLinear):
            out = {"lora_A.weight": down, "lora_B.weight": up}
            if self.magnitude is not None:
                out["lora_magnitude_vector"] = self.magnitude[i].clone()
            return out
        out = {"adapter_down.weight": down, "adapter_up.weight": up}
        if module.learned_scaling:
            out["adapter_scaling"] = self.scalings[i:i + 1].clone()
        return out

    def remove(self, name: str) -> None:
        i = self.names.index(name)
        keep = [j for j in range(len(self.names)) if j != i]
        offsets = self.offsets
        down = [self.down[offsets[j]:offsets[j] + self.capacities[j]] for j in keep]
        up = [self.up[offsets[j]:offsets[j] + self.capacities[j]] for j in keep]
        self.down = torch.cat([*down, self.down.new_zeros(1, self.down.shape[1])])
        self.up = torch.cat([*up, self.up.new_zeros(1, self.up.shape[1])])
        self.capacities = [self.capacities[j] for j in keep]
        self.names = [self.names[j] for j in keep]
        self.settings = [self.settings[j] for j in keep]
        self._layout_memo = None
        self.scalings = self.scalings[keep].clone()
        if self.magnitude is not None:
            self.magnitude = self.magnitude[keep].clone()
        self.version += 1

    # -- reading ---------------------------------------------------------------------------------

    def source(self, module: AdapterModule, dtype: torch.dtype) -> SlotBank:
        """The bank as ``fa.ops.lora_mixed`` takes it, ``down``/``up`` in ``dtype``. A cast copy and
        DoRA's row norms are derived values: reused on the no-grad path while the bank (its
        ``version`` and tensors) and the frozen weight are provably unchanged (``ops._cache``)."""
        down, up = self.down, self.up
        frozen = (self.down, self.up, module.base_layer.weight)
        if down.dtype != dtype:
            down = self._derived.get(lambda: self.down.to(dtype), frozen=frozen, extra=("down", dtype, self.version))
            up = self._derived.get(lambda: self.up.to(dtype), frozen=frozen, extra=("up", dtype, self.version))
        norm = None
        if self.magnitude is not None:
            norm = self._derived.get(lambda: self._norms(module), frozen=frozen, extra=("norm", self.version))
        offsets, capacities, ranks, scalings_host = self._host_layout()
        return SlotBank(
            down=down, up=up, scalings=self.scalings.float(), offsets=offsets, capacities=capacities, ranks=ranks,
            scalings_host=scalings_host, magnitude=None if self.magnitude is None else self.magnitude.float(),
            norm=norm)

    @torch.no_grad()
    def _norms(self, module: DoraLinear) -> torch.Tensor:
        """(n, N) fp32: ‖W + s_i·B_i A_i‖ per output row for every slot (one pass over W each)."""
        w = module.base_weight_nk()
        rows = []
        for i, off in enumerate(self.offsets):
            r, scaling = self.settings[i].rank, self.settings[i].scaling
            rows.append(dora_norm(w, self.down[off:off + r], self.up[off:off + r].t(), scaling=scaling))
        return torch.stack(rows) if rows else torch.zeros(0, self.up.shape[1], device=w.device)


# -- the active adapter: the module's own parameters --------------------------------------------------


def active_tensors(module: AdapterModule) -> dict[str, torch.Tensor]:
    """The active adapter's tensors at its own shapes (views of the parameters, which may be larger:
    a slot keeps the size of the largest rank it held)."""
    r = module.r if isinstance(module, LoraLinear) else module.bottleneck
    if isinstance(module, LoraLinear):
        out = {"lora_A.weight": module.lora_A.weight[:r], "lora_B.weight": module.lora_B.weight[:, :r]}
        if isinstance(module, DoraLinear):
            out["lora_magnitude_vector"] = module.lora_magnitude_vector
        return out
    out = {"adapter_down.weight": module.adapter_down.weight[:r], "adapter_up.weight": module.adapter_up.weight[:, :r]}
    if module.learned_scaling:
        out["adapter_scaling"] = module.adapter_scaling
    return out


def trim_saved(module: AdapterModule, role: str, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter tensor of ``module`` (e.g. gathered for saving) cut to the active adapter's own
    rank: a slot larger than the adapter keeps zero rows that are not the adapter's."""
    r = module.r if isinstance(module, LoraLinear) else getattr(module, "bottleneck", None)
    if role in ("lora_A.weight", "adapter_down.weight"):
        return tensor[:r]
    if role in ("lora_B.weight", "adapter_up.weight"):
        return tensor[:, :r]
    return tensor


@torch.no_grad()
def set_active(module: AdapterModule, tensors: dict[str, torch.Tensor] | None, settings: SlotSettings | None) -> None:
    """Make ``tensors`` (one adapter's roles, own shapes) the module's active adapter, in place while
    the rank fits the parameters (the rest zeroed), else in new, larger parameters (a slot grows once:
    an optimizer holding the old ones must be rebuilt). ``None``: no active adapter here (the module
    computes the base layer alone; its parameters stay, zeroed, frozen)."""
    present = tensors is not None
    if not present:
        for name, p in module.named_parameters():
            if not name.startswith("base_layer."):
                p.zero_()
                p.requires_grad_(False)
        module.active = False
        return
    down, up = _down_up(module, tensors)
    rank = down.shape[0]
    if isinstance(module, LoraLinear):
        a, b = module.lora_A, module.lora_B
    else:
        a, b = module.adapter_down, module.adapter_up
    if rank > a.weight.shape[0]:
        _grow(module, rank)
        a, b = (module.lora_A, module.lora_B) if isinstance(module, LoraLinear) else (module.adapter_down,
                                                                                    module.adapter_up)
    a.weight.zero_()
    b.weight.zero_()
    a.weight[:rank] = down
    b.weight[:, :rank] = up.t()
    if isinstance(module, LoraLinear):
        module.r, module.lora_alpha, module.use_rslora = rank, settings.alpha, settings.rslora
        module.scaling = settings.scaling
        if isinstance(module, DoraLinear):
            module.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])
    else:
        module.bottleneck = rank
        if module.learned_scaling:
            module.adapter_scaling.copy_(tensors["adapter_scaling"].reshape(1))
        else:
            module.scaling = settings.scaling
    active_scaling(module).fill_(settings.scaling if settings.scaling is not None else 1.0)
    module.active = True


def _grow(module: AdapterModule, rank: int) -> None:
    """Larger parameters for the active slot (the old values are overwritten by the caller)."""
    if isinstance(module, LoraLinear):
        old_a, old_b = module.lora_A.weight, module.lora_B.weight
        kw = {"device": old_a.device, "dtype": old_a.dtype}
        module.lora_A = AdapterWeight(rank, module.in_features, **kw)
        module.lora_B = AdapterWeight(module.out_features, rank, **kw)
        new = (module.lora_A.weight, module.lora_B.weight)
    else:
        old_a, old_b = module.adapter_down.weight, module.adapter_up.weight
        kw = {"device": old_a.device, "dtype": old_a.dtype}
        module.adapter_down = AdapterWeight(rank, old_a.shape[1], **kw)
        module.adapter_up = AdapterWeight(old_b.shape[0], rank, **kw)
        new = (module.adapter_down.weight, module.adapter_up.weight)
    for p, old in zip(new, (old_a, old_b)):
        p.requires_grad_(old.requires_grad)
    if old_a.requires_grad:
        logger.warning("%s: the adapter parameters grew to rank %d (new tensors): an optimizer made over the old "
                       "ones no longer updates this module; make it again", type(module).__name__, rank)


def ensure_slots(module: AdapterModule) -> AdapterBank:
    """The module's bank (made on first use)."""
    if getattr(module, "bank", None) is None:
        module.bank = AdapterBank(module)
    return module.bank


def active_scaling(module: AdapterModule) -> torch.Tensor:
    """The active adapter's scaling as a 0-dim fp32 tensor on the adapter's device, written in place
    when the adapter changes (a compiled graph takes it as an input, not a constant). Not a buffer:
    ``.half()`` must not round it."""
    device = module.base_layer.weight.device
    t = module.__dict__.get("_active_scaling")
    if t is None or t.device != device:
        scaling = module.scaling if getattr(module, "scaling", None) is not None else 1.0
        t = module.__dict__["_active_scaling"] = torch.full((), float(scaling), dtype=torch.float32, device=device)
    return t


def active_source(module: AdapterModule, dtype: torch.dtype, *, fixed_scaling: bool) -> SlotBank:
    """The active adapter as a one-slot source (its parameters, cast to ``dtype`` per call, as the
    single-adapter ops cast them). ``fixed_scaling``: offer the scaling as a number too (rows of
    equal layouts share their column scale); False keeps it a tensor only (compiled graphs do not
    specialise on it)."""
    if isinstance(module, LoraLinear):
        a, b = module.lora_A.weight, module.lora_B.weight
        rank = module.r
    else:
        a, b = module.adapter_down.weight, module.adapter_up.weight
        rank = module.bottleneck
    if isinstance(module, BottleneckLinear) and module.learned_scaling:
        scalings = module.adapter_scaling.reshape(1)
        host = None
    else:
        scalings = active_scaling(module).reshape(1)
        host = (float(module.scaling),) if fixed_scaling else None
    magnitude = norm = None
    if isinstance(module, DoraLinear):
        magnitude = module.lora_magnitude_vector[None, :]
        norm = _active_norms.get(
            lambda: dora_norm(module.base_weight_nk(), a, b, scaling=module.scaling)[None, :],
            frozen=(module.base_weight_nk(),), watched=(a, b), extra=(float(module.scaling),))
    # without fixed_scaling (a compiled plain forward) the slot's whole size counts as its rank: the
    # rows past the rank are zero, and the graph then does not depend on the rank either
    return SlotBank(down=a.to(dtype), up=b.to(dtype).t(), scalings=scalings.float(), offsets=(0,),
                    capacities=(a.shape[0],), ranks=(rank if fixed_scaling else a.shape[0],), scalings_host=host,
                    magnitude=magnitude, norm=norm)


#: the active DoRA adapter's row norms on the no-grad path (the same rules as ``fa.ops.dora_linear``'s)
_active_norms = InferenceCache()


def all_rows(rows: int, device: torch.device) -> SlotRows:
    """Every row on slot 0 (a plain forward of the active adapter through the slot path)."""
    return SlotRows((0,) * rows, device)


def slot_forward(module: AdapterModule, x: torch.Tensor, plan) -> torch.Tensor:
    """``module``'s output when its adapters are slots: each row of ``x`` (its first dimension) with the
    adapter ``plan`` gives it (``plan.slot_rows(module, rows, device)`` -> the active adapter's and
    the bank's :class:`SlotRows`, either None), or — ``plan`` None — every row with the active one.
    Rows without an adapter here get the base layer's output."""
    if plan is None:
        active, banked = all_rows(x.shape[0], x.device), None
    else:
        active, banked = plan.slot_rows(module, x.shape[0], x.device)
    if active is not None and not (module.active and active.used):
        active = None
    if banked is not None and not banked.used:
        banked = None
    if active is None and banked is None:
        return module.base_output(x)
    lead = x.shape
    x3 = x.reshape(lead[0], -1, lead[-1])

    def sources(dtype):
        pairs = []
        if active is not None:
            pairs.append((active_source(module, dtype, fixed_scaling=plan is not None), active))
        if banked is not None:
            pairs.append((module.bank.source(module, dtype), banked))
        return [b for b, _ in pairs], [r for _, r in pairs]

    if isinstance(module, LoraLinear) or module.position == "parallel":
        xc, w, bias = autocast_inputs(x3, module.base_weight_nk(), module.base_layer.bias)
        banks, rows = sources(xc.dtype)
        act = None if isinstance(module, LoraLinear) else module.activation
        y = lora_mixed(xc, w, banks, rows, bias=bias, activation=act)
        return y.reshape(*lead[:-1], y.shape[-1])
    if module.position == "input":
        banks, rows = sources(x3.dtype)
        x_in = bottleneck_mixed(x3, banks, rows, activation=module.activation)
        return module.base_output(x_in.reshape(lead))
    h = module.base_output(x3)
    banks, rows = sources(h.dtype)
    out = bottleneck_mixed(h, banks, rows, activation=module.activation)
    return out.reshape(*lead[:-1], out.shape[-1])


__all__ = ["AdapterBank", "SlotSettings", "active_source", "active_tensors", "all_rows", "ensure_slots", "roles",
           "set_active", "settings_of", "slot_forward", "trim_saved"]
