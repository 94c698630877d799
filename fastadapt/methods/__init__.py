"""Adapter methods (layer 5): one package per method, registered once in :mod:`.registry`.

Built in: ``lora`` (:mod:`.lora`), ``dora`` (:mod:`.dora`), ``series`` and ``parallel``
(:mod:`.bottleneck`), ``prefix`` (:mod:`.prefix`). Adding a method: docs/architecture.md.
"""

# isort: off
# Each package registers its methods on import, in this order (the order the CLI lists them).
from . import lora, dora, bottleneck, prefix  # noqa: F401
# isort: on
from .registry import Method, Preset, get_method, method_for_peft_type, method_names, register_method
from .state import NamedAdapter, PatchState, adapter_modules, get_state, require_state, wrapped_modules

__all__ = [
    "Method",
    "PatchState",
    "Preset",
    "NamedAdapter",
    "adapter_modules",
    "get_method",
    "get_state",
    "method_for_peft_type",
    "method_names",
    "register_method",
    "require_state",
    "wrapped_modules",
]
