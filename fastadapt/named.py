"""Several named adapters in one model::

    fa.load_adapter(model, "adapters/math", adapter_name="math")   # the first one loaded is active
    fa.load_adapter(model, "adapters/code", adapter_name="code")   # kept beside it
    fa.list_adapters(model)             # ['math', 'code']
    fa.set_adapter(model, "code")       # the active adapter: what model(...) computes, trains, merges
    model(ids, adapter_names=["math", "code", "__base__"])          # one batch, one adapter per row
    fa.save_adapter(model, "out/math", adapter_name="math")         # the folder it came from, back
    fa.hotswap_adapter(model, "adapters/math-v2", adapter_name="math")   # new weights in place
    fa.delete_adapter(model, "code")

Adapters of one model share a method (LoRA, DoRA, series or parallel); ranks, alphas, scalings and
target modules may differ. The active adapter's tensors are the modules' parameters; the others live
in each module's bank (``fastadapt.modules.bank``: slots, sized to the largest rank each held, so a
hot-swap of the active adapter with a rank that fits changes no shape and a compiled forward does not
recompile; a larger rank grows the slot once. A compiled *mixed* batch specialises on the banked
adapters' ranks and scalings, which its segmented math uses as numbers: swapping a banked adapter for
one of another rank or alpha re-specialises those graphs once). Prefix tuning has no named adapters (refused by name).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from . import distributed, patch
from .io import (
    adapter_config,
    options_record,
    read_adapter_config,
    read_adapter_tensors,
    read_options,
    read_saved_layout,
)
from .methods import NamedAdapter, adapter_modules, get_method, get_state, require_state, wrapped_modules
from .methods.targets import check_not_tied, parent_and_attr, swap_module
from .mixed import BASE, router_of
from .modules.bank import active_tensors, ensure_slots, roles, set_active, settings_of
from .ops import invalidate_caches

logger = logging.getLogger(__name__)

DEFAULT = "default"


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str | None = None) -> nn.Module:
    """Load a saved adapter (fastadapt or PEFT folder, LLM-Adapters checkpoint: see ``patch.load_adapter``).

    Without ``adapter_name``: as always — patch the model as the adapter says (unless patched the
    same way) and load it as the active adapter. With ``adapter_name``: into an unpatched model, the
    same, and the adapter is named; into a patched model, it is kept beside the others under that name
    (not active: ``fa.set_adapter`` switches, ``model(..., adapter_names=[...])`` mixes). It may have
    another rank, alpha and target modules than the others, but the same method. Strict: a missing or
    unexpected key, a shape mismatch or an option that cannot be honoured is an error naming it, and
    the model is left as it was."""
    if adapter_name is None:
        return patch.load_adapter(model, path)
    _check_name(adapter_name)
    model = distributed.unwrap(model)
    state = get_state(model)
    if state is None:
        patch.load_adapter(model, path)
        state = get_state(model)
        state.active = adapter_name
        state.named = {adapter_name: _record(model, adapter_name, state.config, path,
                                             [n for n, _ in adapter_modules(model)])}
        if get_method(state.method).targets is not None:
            router_of(model).serving = True  # a named adapter is a slot: hot-swaps need no recompile
        return model
    if adapter_name in _names(state):
        raise ValueError(f"adapter_name {adapter_name!r} is already loaded (the model holds {_names(state)}): "
                         "fa.hotswap_adapter replaces its weights, fa.delete_adapter removes it")
    config, tensors, targets = _read_for(model, state, path)
    _remember_patched(model, state)
    modules = _place(model, state, config, tensors, targets, path)
    for name in targets:
        module = modules[name]
        own = _own_tensors(name, module, tensors)
        ensure_slots(module).put(adapter_name, module, own, settings_of(module, own, config))
    state.named[adapter_name] = _record(model, adapter_name, config, path, list(targets))
    router_of(model).serving = True
    invalidate_caches()
    logger.info("loaded adapter %r from %s (%d modules); active: %r", adapter_name, path, len(targets), state.active)
    return model


def list_adapters(model: nn.Module) -> list[str]:
    """The model's adapter names in load order (an adapter made by ``fa.patch`` is ``"default"``)."""
    state = require_state(distributed.unwrap(model))
    return _names(state)


def active_adapter(model: nn.Module) -> str:
    """The name of the active adapter: what ``model(...)`` without ``adapter_names`` computes, trains,
    merges and saves."""
    return require_state(distributed.unwrap(model)).active


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active adapter. Its tensors move into the modules' parameters (in
    place when its rank fits them, else the parameters grow once: an optimizer over the old ones must
    then be rebuilt) and the active one's move into its slot; only the new active adapter's
    parameters are trainable."""
    model = distributed.unwrap(model)
    state = require_state(model)
    if adapter_name not in _names(state):
        raise ValueError(f"adapter_name {adapter_name!r} is not one of the model's adapters {_names(state)}")
    old = state.active
    if adapter_name == old:
        return model
    _refuse_merged(model, "switching adapters")
    _remember_patched(model, state)
    new_record = state.named[adapter_name]
    old_record = state.named[old]
    for _name, module in wrapped_modules(model):
        has_old, bank = module.active, ensure_slots(module)
        has_new = bank.slot(adapter_name) is not None
        outgoing = {k: v.detach().clone() for k, v in active_tensors(module).items()} if has_old else None
        incoming = bank.take(adapter_name, module) if has_new else None
        if has_new and has_old:
            bank.names[bank.slot(adapter_name)] = old  # the outgoing adapter takes the incoming one's slot
            bank.put(old, module, outgoing, settings_of(module, outgoing, old_record.config))
        elif has_old:
            bank.put(old, module, outgoing, settings_of(module, outgoing, old_record.config))
        elif has_new:
            bank.remove(adapter_name)
        if has_new:
            set_active(module, incoming, settings_of(module, incoming, new_record.config))
        elif has_old:
            set_active(module, None, None)
    state.active, state.config = adapter_name, new_record.config
    _refresh_trainable(model, state)
    router_of(model).serving = True
    invalidate_caches()
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove a named adapter that is not active (switch first with ``fa.set_adapter``; the only
    adapter goes with ``fa.unpatch``). Modules that held only it get their original layer back."""
    model = distributed.unwrap(model)
    state = require_state(model)
    names = _names(state)
    if adapter_name not in names:
        raise ValueError(f"adapter_name {adapter_name!r} is not one of the model's adapters {names}")
    if adapter_name == state.active:
        hint = "fa.unpatch(model) removes the only adapter" if len(names) == 1 else \
            f"make another one active first (fa.set_adapter(model, {next(n for n in names if n != adapter_name)!r}))"
        raise ValueError(f"adapter {adapter_name!r} is the active adapter: {hint}")
    for name, module in list(wrapped_modules(model)):
        bank = getattr(module, "bank", None)
        if bank is not None and bank.slot(adapter_name) is not None:
            _drop_from(model, state, name, module, adapter_name, False)
    del state.named[adapter_name]
    invalidate_caches()
    return model


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str) -> nn.Module:
    """Replace the weights of the loaded adapter ``adapter_name`` by the adapter at ``path``, in place:
    no module is swapped and, while its rank fits the slots (the largest rank each held), no tensor
    changes shape — a compiled forward of the active adapter does not recompile (its scaling lives in
    a tensor; a compiled mixed batch re-specialises on a banked adapter's new rank or alpha). A larger
    rank grows the slots once. The new adapter must have the same method and target the same modules or a
    subset of them (the modules it leaves out drop it and, holding no
    adapter, get their original layer back); its rank, alpha or scaling may differ."""
    model = distributed.unwrap(model)
    state = require_state(model)
    if adapter_name not in _names(state):
        raise ValueError(f"adapter_name {adapter_name!r} is not one of the model's adapters {_names(state)}: "
                         "fa.load_adapter(..., adapter_name=...) loads a new one")
    _refuse_merged(model, "hot-swapping an adapter")
    _remember_patched(model, state)
    record = state.named.get(adapter_name)
    held = record.modules if record is not None else [n for n, _ in adapter_modules(model)]
    config, tensors, targets = _read_for(model, state, path)
    extra = sorted(set(targets) - set(held))
    if extra:
        raise ValueError(f"the adapter at {str(path)!r} targets {extra[:5]}, which adapter {adapter_name!r} does not "
                         f"adapt: a hot-swap keeps the modules; load it as a new named adapter instead")
    _check_modules(model, state, config, targets, path)
    _check_keys(model, targets, tensors, config, path)
    active = adapter_name == state.active
    for name in held:
        module = model.get_submodule(name)
        if name not in targets:
            # Not in the new adapter: the module drops it (inactive, or its slot removed), never zeros in
            # place — DoRA's output scales by its magnitude, so a zero magnitude would erase the layer.
            _drop_from(model, state, name, module, adapter_name, active)
            continue
        own = _own_tensors(name, module, tensors)
        settings = settings_of(module, own, config)
        if active:
            set_active(module, own, settings)
        else:
            module.bank.put(adapter_name, module, own, settings)
    state.named[adapter_name] = _record(model, adapter_name, config, path, list(targets))
    if active:
        state.config = config
        _refresh_trainable(model, state)  # the saved and trained keys are the new adapter's modules only
    router_of(model).serving = True
    invalidate_caches()
    return model


# -- reading and placing ------------------------------------------------------------------------------


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter_name must be a non-empty str, got {name!r}")
    if name == BASE:
        raise ValueError(f"adapter_name {BASE!r} is reserved: in adapter_names it means the base model")


def _names(state) -> list[str]:
    return list(state.named) if state.named else [state.active]


def _read_for(model: nn.Module, state, path) -> tuple[Any, dict[str, torch.Tensor], dict[str, dict]]:
    """An adapter folder for a model that already holds adapters: (config, tensors, targets)."""
    where = str(path)
    saved = read_adapter_config(path)
    method, options = read_options(saved, where)
    if method.name != state.method:
        raise ValueError(f"model holds {get_method(state.method).title} adapters ({state.method!r}); the adapter at "
                         f"{where!r} is {method.title} ({method.name!r}): named adapters of one model share a method")
    if method.targets is None:
        raise ValueError(f"{method.title} has no named adapters: load it into a model of its own")
    init = saved.get("init_lora_weights")
    if isinstance(init, str) and init in ("pissa", "olora"):
        raise ValueError(f"adapter at {where!r} has init_lora_weights={init!r}, which loads as a rank-2r conversion of "
                         "the base weight: load it without adapter_name into a model of its own")
    config = method.make_config(options)
    tensors = read_adapter_tensors(path, options=options_record(method, options))
    targets = method.targets(model, config)
    return config, tensors, targets


def _check_modules(model: nn.Module, state, config, targets: dict[str, dict], path) -> None:
    """What the modules already wrapped share with a new adapter (side, activation, kind of scaling)."""
    wrapped = dict(wrapped_modules(model))
    reference = state.config
    for key in ("activation",):
        if hasattr(config, key) and getattr(config, key) != getattr(reference, key):
            raise ValueError(f"adapter at {str(path)!r} has {key}={getattr(config, key)!r}, the model's adapters "
                             f"{getattr(reference, key)!r}: named adapters of one model share it")
    if hasattr(config, "scaling") and (config.scaling == "learned") != (reference.scaling == "learned"):
        raise ValueError(f"adapter at {str(path)!r} has scaling={config.scaling!r}, the model's adapters "
                         f"{reference.scaling!r}: named adapters of one model all learn their scaling or none does")
    for name, options in targets.items():
        module = wrapped.get(name)
        position = options.get("position")
        if module is not None and position is not None and module.position != position:
            raise ValueError(f"adapter at {str(path)!r} puts its {name!r} adapter on the {position} side, the model's "
                             f"adapters on the {module.position} side: one module has one side")


def _check_keys(model: nn.Module, targets: dict[str, dict], tensors: dict[str, torch.Tensor], config, path) -> None:
    """Strict: every key of every target, nothing else, each of the shape the module and config give."""
    wrapped = dict(wrapped_modules(model))
    expected = {}
    for name in targets:
        module = wrapped.get(name)
        for role, shape in _role_shapes(model, name, module, config).items():
            expected[f"{name}.{role}"] = shape
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise KeyError(f"adapter at {str(path)!r} is missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise KeyError(f"adapter at {str(path)!r} has unexpected key(s) {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''} (no such adapter parameter for its targets)")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"adapter key {key!r} has shape {tuple(tensors[key].shape)}, the model expects {shape}")
        if not tensors[key].is_floating_point():
            raise TypeError(f"adapter key {key!r} has dtype {tensors[key].dtype}; expected a float tensor")


def _role_shapes(model: nn.Module, name: str, module, config) -> dict[str, tuple[int, ...]]:
    from .modules.base import linear_dims

    layer = module.base_layer if module is not None else model.get_submodule(name)
    k, n, _ = linear_dims(layer)
    if hasattr(config, "r"):
        shapes = {"lora_A.weight": (config.r, k), "lora_B.weight": (n, config.r)}
        if config.method == "dora":
            shapes["lora_magnitude_vector"] = (n,)
        return shapes
    position = module.position if module is not None else None
    if position is None:
        position = get_method(config.method).targets(model, config)[name]["position"]
    d_in = n if position == "output" else k
    d_out = k if position == "input" else n
    shapes = {"adapter_down.weight": (config.bottleneck, d_in), "adapter_up.weight": (d_out, config.bottleneck)}
    if config.scaling == "learned":
        shapes["adapter_scaling"] = (1,)
    return shapes


def _place(model: nn.Module, state, config, tensors, targets: dict[str, dict], path) -> dict[str, nn.Module]:
    """Check a new named adapter against the model, then wrap the targets that no adapter holds yet
    (their active slot empty). Returns every target's module."""
    _check_modules(model, state, config, targets, path)
    _check_keys(model, targets, tensors, config, path)
    wrapped = dict(wrapped_modules(model))
    new = [n for n in targets if n not in wrapped]
    check_not_tied(model, new)
    method = get_method(config.method)
    built = {}
    for name in new:
        try:
            module = method.build(model.get_submodule(name), config, **targets[name])
        except (TypeError, ValueError) as e:
            raise type(e)(f"target {name!r}: {e}") from None
        for p in module.parameters():
            p.requires_grad_(False)
        set_active(module, None, None)
        built[name] = module
    for name, module in built.items():
        swap_module(model, name, module)
        state.modules.append(name)
        wrapped[name] = module
    router_of(model)  # every module, new ones too, routes through the model's router
    return {n: wrapped[n] for n in targets}


def _own_tensors(name: str, module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    ref = next(p for n, p in module.named_parameters() if not n.startswith("base_layer."))
    return {k[len(prefix):]: v.to(ref.dtype) for k, v in tensors.items() if k.startswith(prefix)
            and k[len(prefix):] in _roles_for(module)}


def _roles_for(module) -> tuple[str, ...]:
    return roles(module)


def _record(model: nn.Module, name: str, config, path, modules: list[str]) -> NamedAdapter:
    weights_file, keys, dtypes, metadata = read_saved_layout(path)
    return NamedAdapter(name=name, config=config, modules=list(modules), saved=read_adapter_config(path), keys=keys,
                        dtypes=dtypes, weights_file=weights_file, metadata=metadata)


def _remember_patched(model: nn.Module, state) -> None:
    """Before a model patched without names holds a second adapter: name its adapter (``default``),
    and give one made by ``fa.patch`` (no folder) the format ``fa.save_adapter`` would write."""
    if not state.named:
        modules = [n for n, _ in adapter_modules(model)]
        state.named[state.active] = NamedAdapter(name=state.active, config=state.config, modules=modules)
    record = state.named[state.active]
    if record.saved is None:
        from .io import PEFT_PREFIX

        record.saved = adapter_config(model)
        record.keys = {k: PEFT_PREFIX + k for k in _active_keys(model)}
        record.weights_file = None


def _active_keys(model: nn.Module) -> list[str]:
    keys = []
    for name, module in adapter_modules(model):
        keys += [f"{name}.{role}" for role in active_tensors(module)]
    return keys


def _drop_from(model: nn.Module, state, name: str, module, adapter_name: str, active: bool) -> None:
    """Module ``name`` no longer holds ``adapter_name`` (the active one's tensors, or its slot); a
    module left holding no adapter gets its original layer back."""
    bank = getattr(module, "bank", None)  # a module that never held a second adapter has none
    if active:
        set_active(module, None, None)
    elif bank is not None and bank.slot(adapter_name) is not None:
        bank.remove(adapter_name)
    if not module.active and not (bank is not None and bank.names):
        parent, attr = parent_and_attr(model, name)
        setattr(parent, attr, module.base_layer)
        state.modules.remove(name)


def _refresh_trainable(model: nn.Module, state) -> None:
    """The active adapter's parameters train (and are the saved keys); the others are frozen."""
    keys = []
    for name, module in wrapped_modules(model):
        for pname, p in module.named_parameters():
            if pname.startswith("base_layer."):
                continue
            p.requires_grad_(bool(module.active))
            if module.active:
                keys.append(f"{name}.{pname}")
    state.adapter_keys = keys


def _refuse_merged(model: nn.Module, what: str) -> None:
    for name, module in wrapped_modules(model):
        if getattr(module, "merged", False):
            raise RuntimeError(f"{what} needs unmerged adapters ({name!r} is merged): call fa.unmerge(model) first")


__all__ = ["active_adapter", "delete_adapter", "hotswap_adapter", "list_adapters", "load_adapter", "set_adapter"]
