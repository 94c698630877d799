"""The method registry: each adapter method is one :class:`Method` (its hooks), registered once.

A method package (``fastadapt/methods/<name>/``) supplies a validated config dataclass, ``apply``
(put its modules into a model), and the hooks that map it to and from ``adapter_config.json``;
``patch.py`` and ``io.py`` drive every method through these hooks alone. PEFT's
``tuners/<method>/`` is the model for this layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

#: ``apply``'s result: the names of the swapped-in modules, and handles with a ``remove()`` that
#: ``unpatch`` calls (hooks or overrides that are not module swaps).
Applied = tuple[list[str], list[Any]]


@dataclass(frozen=True)
class Preset:
    """Named settings of a method, e.g. the LLM-Adapters paper's (``preset="llm-adapters"``).

    ``options(model)``: the patch options (resolved against the model, e.g. per-architecture
    targets); ``learning_rate``: the learning rate those settings were trained with."""

    options: Callable[[nn.Module], dict[str, Any]]
    learning_rate: float
    description: str


@dataclass(frozen=True)
class Method:
    """An adapter method and its hooks.

    - ``name``: what ``fa.patch`` takes; ``title``: how messages call it ("LoRA", "prefix tuning").
    - ``config_class``: a frozen dataclass whose init fields are the method's options; it
      validates them (errors name the option).
    - ``apply(model, config) -> (names, handles)``: swap the adapter modules in (each keeps the
      wrapped layer as ``base_layer``), after checking everything that can be checked first.
    - ``peft_type``: the ``peft_type`` written to and recognised in ``adapter_config.json``;
      ``also_reads``: other ``peft_type``s handed to ``read_config`` (which refuses what it cannot honour).
    - ``adapter_config(model, config) -> dict``: the method's fields of ``adapter_config.json``
      (``peft_type``, ``task_type``, ``base_model_name_or_path`` and ``inference_mode`` are added
      by ``io.save_adapter``).
    - ``read_config(adapter_config, path) -> (method name, options)``: the patch call that
      recreates a saved adapter (refusing what cannot be honoured, by name).
    - ``check_loaded(model, config, options, adapter_config, path)``: raise when the patched model
      (patched by the load itself, or before it) differs from the saved adapter in a way the weights
      cannot express.
    - ``training_options``: options that change how the adapter trains, not what its saved weights
      compute (dropout): left out of the record that ties the weights file to its config.
    - ``convert_tensors(model, tensors, adapter_config, path) -> dict``: the loaded tensors as this
      model's adapter takes them (e.g. a PEFT format whose math needs the base weights); None: as they are.
    - ``saved_tensors(model, tensors) -> dict``: the tensors to write, from the adapter's own
      (gathered) parameters; None: PEFT's layout (``base_model.model.<name>``).
    - ``load_tensors(model, tensors, path)``: copy loaded tensors in; None: the strict default.
    - ``merge_error``: why ``fa.merge`` cannot fold this method into the weights (None: it can).
    - ``presets``: named settings, e.g. ``"llm-adapters"``.
    - ``targets(model, config) -> {module name: build options}`` and ``build(layer, config, **options)
      -> module``: what ``apply`` does, one target at a time, for a named adapter added to a patched
      model (its modules may already hold other adapters). None: the method has no named adapters
      (prefix tuning).
    """

    name: str
    title: str
    config_class: type
    apply: Callable[[nn.Module, Any], Applied]
    peft_type: str
    adapter_config: Callable[[nn.Module, Any], dict[str, Any]]
    read_config: Callable[[dict[str, Any], str], tuple[str, dict[str, Any]]]
    check_loaded: Callable[..., None]
    saved_tensors: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    load_tensors: Callable[[nn.Module, dict[str, torch.Tensor], str], None] | None = None
    convert_tensors: Callable[..., dict[str, torch.Tensor]] | None = None
    also_reads: tuple[str, ...] = ()
    training_options: tuple[str, ...] = ()
    merge_error: str | None = None
    presets: Mapping[str, Preset] = field(default_factory=dict)
    targets: Callable[[nn.Module, Any], dict[str, dict[str, Any]]] | None = None
    build: Callable[..., nn.Module] | None = None

    @classmethod
    def from_hooks(cls, hooks: ModuleType, *, name: str, title: str, config_class: type,
                   presets: Mapping[str, Preset]) -> Method:
        """The method whose hooks are the functions of the same names in ``hooks`` (a method
        package's ``model.py``: ``apply``, ``adapter_config``, ``read_config``, ``check_loaded``,
        optionally ``saved_tensors``, ``load_tensors``, ``convert_tensors``, ``targets``, ``build``) with
        its ``PEFT_TYPE`` and,
        optionally, ``ALSO_READS``, ``TRAINING_OPTIONS`` and ``MERGE_ERROR``."""
        return cls(
            name=name, title=title, config_class=config_class, presets=presets,
            apply=hooks.apply, peft_type=hooks.PEFT_TYPE, adapter_config=hooks.adapter_config,
            read_config=hooks.read_config, check_loaded=hooks.check_loaded,
            saved_tensors=getattr(hooks, "saved_tensors", None), load_tensors=getattr(hooks, "load_tensors", None),
            convert_tensors=getattr(hooks, "convert_tensors", None), also_reads=getattr(hooks, "ALSO_READS", ()),
            training_options=getattr(hooks, "TRAINING_OPTIONS", ()), merge_error=getattr(hooks, "MERGE_ERROR", None),
            targets=getattr(hooks, "targets", None), build=getattr(hooks, "build", None),
        )

    @property
    def options(self) -> list[str]:
        fields = self.config_class.__dataclass_fields__
        return [name for name, f in fields.items() if f.init]

    def make_config(self, options: dict[str, Any]):
        """``config_class(**options)``, with an error naming unknown options."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for method {self.name!r}; expected some of {self.options}")
        return self.config_class(**options)

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise ValueError(f"preset must be one of {sorted(self.presets)} for method {self.name!r}, got {name!r}")
        return self.presets[name]


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add a method; a name that is already registered is an error (never a silent replacement)."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name.lower() not in _METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _METHODS[name.lower()]


def method_for_peft_type(peft_type: str) -> Method | None:
    """The (first registered) method that reads adapters of this ``peft_type``."""
    wanted = peft_type.upper()
    return next((m for m in _METHODS.values() if wanted == m.peft_type or wanted in m.also_reads), None)


def peft_types() -> dict[str, str]:
    """``peft_type`` -> the title of the method(s) that write it."""
    titles: dict[str, list[str]] = {}
    for m in _METHODS.values():
        titles.setdefault(m.peft_type, []).append(m.title)
    return {t: " / ".join(names) for t, names in sorted(titles.items())}
