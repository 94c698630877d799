"""What ``patch`` did to a model, kept on it as ``model.fastadapt_state``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class PatchState:
    config: Any
    modules: list[str]
    hooks: list[Any] = field(default_factory=list)
    #: names of the adapter's parameters (the trainable ones right after patching)
    adapter_keys: list[str] = field(default_factory=list)
    #: the base parameters and their requires_grad flags before patching (unpatch restores them)
    base_requires_grad: tuple[list, list[bool]] = field(default_factory=lambda: ([], []))

    @property
    def method(self) -> str:
        return self.config.method


def get_state(model: nn.Module) -> PatchState | None:
    return getattr(model, "fastadapt_state", None)


def require_state(model: nn.Module) -> PatchState:
    state = get_state(model)
    if state is None:
        raise ValueError("model is not patched by fastadapt: call fa.patch(model, ...) first")
    return state


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every adapter module of a patched model, in patch order."""
    state = require_state(model)
    for name in state.modules:
        yield name, model.get_submodule(name)
