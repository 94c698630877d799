"""What ``patch`` did to a model, kept on it as ``model.fastadapt_state``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class NamedAdapter:
    """One named adapter of a model (``fa.load_adapter(model, path, adapter_name=...)``), with what
    ``fa.save_adapter(model, path, adapter_name=...)`` needs to write its folder back as it was."""

    name: str
    config: Any  #: the method's config dataclass (rank, scaling, targets, ...)
    modules: list[str]  #: the adapted modules that hold it
    #: the folder's ``adapter_config.json`` as read (None: made by ``fa.patch``, saved in fastadapt's format)
    saved: dict | None = None
    #: the folder's tensor keys as spelled in its file, by the model's own key (``<module>.<role>``)
    keys: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, Any] = field(default_factory=dict)  #: the file's dtype of each (model) key
    weights_file: str | None = None  #: the file's name (``adapter_model.safetensors`` or ``.bin``)
    metadata: dict | None = None  #: the safetensors metadata as read

    @property
    def method(self) -> str:
        return self.config.method


@dataclass
class PatchState:
    config: Any
    modules: list[str]
    hooks: list[Any] = field(default_factory=list)
    #: names of the adapter's parameters (the trainable ones right after patching)
    adapter_keys: list[str] = field(default_factory=list)
    #: the base parameters and their requires_grad flags before patching (unpatch restores them)
    base_requires_grad: tuple[list, list[bool]] = field(default_factory=lambda: ([], []))
    #: named adapters in load order; the active one's tensors are the modules' parameters
    named: dict[str, NamedAdapter] = field(default_factory=dict)
    #: the active adapter's name ("default" for an adapter made by fa.patch or loaded without a name)
    active: str = "default"
    #: what carries a mixed batch's adapter names to the modules (``fastadapt.mixed``), once made
    router: Any = None

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
    """``(name, module)`` for every adapter module of a patched model that holds the active adapter,
    in patch order (a module wrapped only for another named adapter computes its base layer alone)."""
    for name, module in wrapped_modules(model):
        if getattr(module, "active", True):
            yield name, module


def wrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every adapter module of a patched model, whichever adapters it holds."""
    state = require_state(model)
    for name in state.modules:
        yield name, model.get_submodule(name)
