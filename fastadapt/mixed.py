"""Mixed batches: each row of a batch names its adapter (or ``"__base__"``), for ``model(...)`` and
``model.generate(...)`` on the patched model itself, as PEFT's ``adapter_names=``::

    model(input_ids, attention_mask=mask, adapter_names=["math", "__base__", "code"])
    model.generate(input_ids, attention_mask=mask, adapter_names=[...], max_new_tokens=64)

A forward pre-hook on the top model takes ``adapter_names`` out of the call (a wrapper around
``generate`` holds them for the whole generation) and hands the layers one :class:`RowPlan`; each
layer asks it which slot of its own adapters every row uses, and the plan derives that once per
forward for all layers with the same adapters (``SlotRows``), not per layer. Inference only: a model
in training mode refuses ``adapter_names`` (as PEFT does). A row whose adapter does not adapt a layer
(adapters may target different modules) gets that layer's base output.

The :class:`Router` is what an adapter module asks in its forward once its model holds named
adapters: a mixed batch's plan, the active adapter alone (``None``: the module's own path), or the base
layer for a module that the active adapter does not adapt.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import nn

from .methods import get_state, wrapped_modules
from .modules.bank import active_scaling, slot_forward
from .ops.lora_mixed import SlotRows

#: the name a row gives to run the base model alone, as in PEFT
BASE = "__base__"


class RowPlan:
    """The adapter of every row of one forward (or one ``generate`` call) and, per set of adapters a
    layer holds, the rows' slots (:meth:`slot_rows`), derived once and shared by those layers."""

    def __init__(self, names: tuple[str, ...], active: str, *, expand: bool = False) -> None:
        self.names = names
        self.active = active
        self.expand = expand  # generate may repeat each row (beams, num_return_sequences)
        self._slots: dict[tuple, tuple[SlotRows | None, SlotRows | None]] = {}

    def names_for(self, rows: int) -> tuple[str, ...]:
        n = len(self.names)
        if rows == n:
            return self.names
        if self.expand and n and rows % n == 0:  # generate repeats each input row k times, in order
            k = rows // n
            return tuple(name for name in self.names for _ in range(k))
        raise ValueError(f"adapter_names has {n} entries, but a layer got a batch of {rows} rows: pass one adapter "
                         "name per row of the batch")

    def slot_rows(self, module: nn.Module, rows: int, device: torch.device) -> tuple[SlotRows | None, SlotRows | None]:
        """``(active rows, bank rows)`` of ``module`` for a batch of ``rows`` rows: which rows use the
        active adapter (slot 0 of the module's parameters) and which slot of its bank the others use."""
        bank = getattr(module, "bank", None)
        bank_names = tuple(bank.names) if bank is not None else ()
        key = (bool(module.active), bank_names, rows, device)
        found = self._slots.get(key)
        if found is None:
            names = self.names_for(rows)
            active = SlotRows(tuple(0 if n == self.active else -1 for n in names), device) if module.active else None
            index = {n: i for i, n in enumerate(bank_names)}
            banked = SlotRows(tuple(index.get(n, -1) for n in names), device) if bank_names else None
            found = self._slots[key] = (active, banked)
        return found


class Router:
    """Set on every adapter module of a model with named adapters (``module.router``)."""

    def __init__(self) -> None:
        self.current: RowPlan | None = None
        #: True once the model holds adapters as slots (named adapters, hot-swaps): no-grad forwards of
        #: the active adapter then run through the slot path (scaling in a tensor, the slot's shape)
        self.serving = False
        self._stack: list[RowPlan | None] = []  # the plans of enclosing top-level calls

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The module's output, or None to let it run its own single-adapter path."""
        plan = self.current
        if plan is not None:
            return slot_forward(module, x, plan)
        if not module.active:
            return module.base_output(x)
        # train mode keeps the single-adapter path: it applies dropout, as PEFT does under no_grad too
        if self.serving and not torch.is_grad_enabled() and not module.training and module.quantized is None:
            return slot_forward(module, x, None)
        return None

    def using(self, plan: RowPlan | None):
        return _Using(self, plan)


class _Using:
    def __init__(self, router: Router, plan: RowPlan | None) -> None:
        self.router, self.plan, self.previous = router, plan, None

    def __enter__(self) -> RowPlan | None:
        self.previous, self.router.current = self.router.current, self.plan
        return self.plan

    def __exit__(self, *exc) -> None:
        self.router.current = self.previous


def make_plan(model: nn.Module, adapter_names, *, expand: bool = False) -> RowPlan:
    """Check ``adapter_names`` against the model (PEFT's rules) and make its plan."""
    state = get_state(model)
    if state is None:
        raise ValueError("adapter_names= needs a model patched by fastadapt (fa.load_adapter / fa.patch)")
    if model.training:
        raise ValueError("adapter_names= runs mixed batches for inference only: call model.eval() first (training "
                         "with a batch whose rows use different adapters is refused, as in PEFT)")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not all(
            isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), one per row, got {adapter_names!r}")
    known = known_adapters(model)
    unknown = sorted({n for n in adapter_names if n != BASE} - set(known))
    if unknown:
        raise ValueError(f"adapter_names names adapter(s) {unknown} that the model does not hold; it holds {known} "
                         f"(and {BASE!r} for the base model)")
    if getattr(state.config, "method", None) == "prefix":
        raise ValueError(PREFIX_ERROR)
    for name, module in wrapped_modules(model):
        if getattr(module, "merged", False):
            raise ValueError(f"adapter_names= cannot run on a merged model ({name!r} is merged): call "
                             "fa.unmerge(model) first")
        if getattr(module, "quantized", None) is not None:
            raise ValueError(f"adapter_names= does not run on a quantized (4-bit/8-bit) base yet ({name!r} is "
                             f"{module.quantized}): load the model unquantized for mixed batches, or switch the "
                             "active adapter with fa.set_adapter")
    router_of(model)
    return RowPlan(tuple(adapter_names), state.active, expand=expand)


def known_adapters(model: nn.Module) -> list[str]:
    """The model's adapter names in load order (the active one included)."""
    state = get_state(model)
    if state is None:
        return []
    return list(state.named) if state.named else [state.active]


PREFIX_ERROR = ("prefix tuning has no named adapters or mixed batches: its virtual tokens join every row's "
                "attention, so one batch cannot give rows different prefixes; use LoRA, DoRA, series or parallel "
                "adapters")


def install(model: nn.Module, state) -> None:
    """What ``fa.patch`` installs on every patched model: the hooks that carry ``adapter_names``
    from ``model(...)`` and ``model.generate(...)`` to the layers (their handles go to ``state.hooks``,
    which ``fa.unpatch`` removes). The adapter modules route through the router only once a mixed
    batch or a named adapter needs it (:func:`router_of`): until then their forward is untouched."""
    router = state.router = Router()
    state.hooks.append(model.register_forward_pre_hook(_take_names(model, router), with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_restore(router), always_call=True))
    model.generate = types.MethodType(_generate_with_names, model)
    state.hooks.append(_Attribute(model, "generate"))


def router_of(model: nn.Module) -> Router:
    """The model's router, set on every adapter module (those wrapped since too)."""
    state = get_state(model)
    if getattr(state.config, "method", None) == "prefix":
        raise ValueError(PREFIX_ERROR)
    if state.router is None:  # a model patched before the hooks existed (unpickled): install them now
        install(model, state)
    router = state.router
    for _, module in wrapped_modules(model):
        module.router = router
        # what a compiled forward reads, made before it is traced: guards on instance state, not on
        # a lazily created attribute or the scaling's float (a hot-swap would recompile)
        module.active = bool(module.active)
        active_scaling(module)
    return router


def _take_names(model: nn.Module, router: Router):
    def pre_hook(module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        router._stack.append(router.current)  # pushed first: the always-called hook pops it, even on an error
        if names is not None:
            router.current = make_plan(model, names)
        return args, kwargs

    return pre_hook


def _restore(router: Router):
    def hook(module, args, output):
        router.current = router._stack.pop() if router._stack else None
        return output

    return hook


def _generate_with_names(self, *args, adapter_names=None, **kwargs):
    """``generate`` with ``adapter_names=``: one adapter per input row for every step (repeated
    with the rows when beams or several return sequences repeat them)."""
    generate = type(self).generate
    if adapter_names is None:
        return generate(self, *args, **kwargs)
    plan = make_plan(self, adapter_names, expand=True)
    with get_state(self).router.using(plan):
        return generate(self, *args, **kwargs)


class _Attribute:
    """A hook handle that removes an instance attribute the patch set (``unpatch`` calls ``remove``)."""

    def __init__(self, obj, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


__all__ = ["BASE", "PREFIX_ERROR", "RowPlan", "Router", "install", "known_adapters", "make_plan", "router_of"]
