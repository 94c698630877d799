"""Which modules of a model an adapter goes on, and the swap itself."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ..architectures import matches
from ..modules import is_supported_linear, linear_dims

#: What ``targets`` takes besides names: ``"auto"`` (the method's per-architecture default) and
#: ``"all-linear"`` (every linear layer inside the repeated decoder blocks, never the output head).
TARGET_KEYWORDS = ("auto", "all-linear")


def validate_targets(targets: Any) -> str | tuple[str, ...]:
    """``"auto"``, ``"all-linear"``, a regex string, or a non-empty list of module-name suffixes."""
    if isinstance(targets, str):
        if targets not in TARGET_KEYWORDS:
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


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` as targets see them: an adapter module already swapped in stands for
    the layer it wraps (a second named adapter may target it too), and its insides are not layers."""
    out: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        base = getattr(module, "base_layer", None)
        if name and base is not None and type(module).__module__.startswith("fastadapt."):
            out[name] = base
            inside = (*inside, f"{name}.")
            continue
        out[name] = module
    return out


def select_targets(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """Names of the modules that ``targets`` selects (``"auto"`` resolved by the caller); errors
    name what is wrong and list candidates."""
    modules = layer_modules(model)
    if targets == "auto":
        raise ValueError("targets='auto' must be resolved by the method before select_targets")
    if targets == "all-linear":
        names = _block_linear_names(model)
        if not names:
            raise ValueError(
                "targets='all-linear' found no linear layers inside repeated blocks (nn.ModuleList); "
                f"pass targets= a list of module names, e.g. {candidate_names(model)[:8]}"
            )
        return names
    if isinstance(targets, str):
        pattern = re.compile(targets)
        names = [n for n in modules if n and pattern.fullmatch(n)]
        what = f"regex {targets!r}"
    else:
        names = [n for n in modules if n and any(matches(n, t) for t in targets)]
        what = f"targets {list(targets)}"
    if not names:
        raise ValueError(f"{what} matched no module; candidate linear layers: {candidate_names(model)[:12]}")
    for n in names:
        try:
            linear_dims(modules[n])
        except TypeError as e:
            raise TypeError(f"target {n!r}: {e}") from None
    return names


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the linear layers, for error messages."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and is_supported_linear(module):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _block_linear_names(model: nn.Module) -> list[str]:
    """Linear layers inside the elements of ``nn.ModuleList``s (the decoder blocks)."""
    prefixes = [
        f"{name}.{i}." if name else f"{i}."
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        for i in range(len(m))
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, m in layer_modules(model).items()
        if is_supported_linear(m) and m is not head and any(name.startswith(p) for p in prefixes)
    ]


def check_not_tied(model: nn.Module, names: list[str]) -> None:
    """A target whose weight is shared with another module (tied) cannot take a weight delta."""
    owners: dict[int, list[str]] = {}
    for mod_name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(mod_name)
    for name in names:
        sharing = [o for o in owners[id(model.get_submodule(name).weight)] if o != name]
        if sharing:
            raise ValueError(
                f"target {name!r} shares its weight with {sharing} (tied weights); merging a LoRA "
                "delta would change both. Leave it out of targets"
            )


def warn_large_rank(model: nn.Module, names: list[str], r: int) -> None:
    too_big = []
    for name in names:
        in_f, out_f, _ = linear_dims(model.get_submodule(name))
        if r > min(in_f, out_f):
            too_big.append(f"{name} ({in_f}->{out_f})")
    if too_big:
        warnings.warn(
            f"r={r} > min(in_features, out_features) for {len(too_big)} target module(s), e.g. "
            f"{too_big[0]}: the update cannot have rank r there", UserWarning, stacklevel=4,
        )


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = parent_and_attr(model, name)
    setattr(parent, attr, new)


def minimal_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Last-name suffixes when they select exactly ``names`` (PEFT's suffix match) among the model's
    own modules, else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    inside = tuple(f"{n}." for n in names)  # adapter internals: base_layer, lora_A, adapter_down, ...
    plain = {n for n, _ in model.named_modules() if n and not n.startswith(inside)}
    matched = {n for n in plain if any(matches(n, s) for s in suffixes)}
    return suffixes if matched == set(names) else sorted(names)
