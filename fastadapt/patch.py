"""Find target modules in Hugging Face models and swap adapter modules in (reversibly)."""

from __future__ import annotations

import logging
import re
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LoraConfig
from .modules import LoraLinear, is_supported_linear, linear_dims
from .modules.lora import SharedInputGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """An adapter method: how to validate its options and how to put it into a model.

    ``apply(model, config)`` swaps adapter modules in (each keeps the wrapped layer as
    ``base_layer``) and returns their names, or ``(names, handles)`` where each handle has a
    ``remove()`` that ``unpatch`` calls (for hooks or overrides that are not module swaps);
    ``save(model, path, state_dict)`` writes its files (``None``: the PEFT LoRA writer in ``io``);
    ``merge_error`` explains why ``fa.merge`` cannot fold this method (``None``: it can)."""

    make_config: Callable[[str, dict[str, Any]], Any]
    apply: Callable[[nn.Module, Any], Any]
    save: Callable[..., Any] | None = None
    merge_error: str | None = None


_METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    _METHODS[name] = method


def methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_impl(name: str) -> Method:
    return _METHODS[name]


#: model_type -> default LoRA targets (module-name suffixes), as in PEFT so PEFT users get no surprise.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "stablelm": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neo": ("q_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "codegen": ("qkv_proj",),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),
}


@dataclass
class PatchState:
    """What ``patch`` did to a model, kept on it as ``model.fastadapt_state``."""

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


def patch(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Add adapters to ``model`` in place and return it.

    Freezes every base parameter, makes only adapter parameters trainable and keeps the model's
    train/eval mode. ``method="lora"`` options: ``r=8, alpha=16, dropout=0.05, targets="auto",
    rslora=False`` (see ``LoraConfig``). ``targets``: ``"auto"`` (per-architecture defaults),
    ``"all-linear"`` (every linear layer inside the repeated decoder blocks, never the output head),
    a list of module-name suffixes, or a regex matched against full module names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method.lower() not in _METHODS:
        raise ValueError(f"method must be one of {methods()}, got {method!r}")
    if get_state(model) is not None:
        state = get_state(model)
        raise RuntimeError(
            f"model is already patched with {state.method!r} ({len(state.modules)} modules); "
            "call fa.unpatch(model) first"
        )
    from .distributed import is_sharded

    if is_sharded(model):
        raise RuntimeError(
            "model is already sharded (FSDP2 DTensor parameters): call fa.patch (or fa.load_adapter) "
            "before fully_shard / fastadapt.distributed.shard_model"
        )
    impl = _METHODS[method.lower()]
    config = impl.make_config(method.lower(), options)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        applied = impl.apply(model, config)
    except BaseException:
        # apply validates before swapping, but building a module can still fail (out of memory):
        # give the model back exactly as it was.
        _unswap_adapter_modules(model)
        _restore_requires_grad(params, flags)
        raise
    names, handles = applied if isinstance(applied, tuple) else (applied, [])
    state = PatchState(
        config=config,
        modules=list(names),
        hooks=list(handles),
        adapter_keys=[n for n, p in model.named_parameters() if p.requires_grad],
        base_requires_grad=(params, flags),
    )
    _install_model_hooks(model, state)
    model.fastadapt_state = state
    logger.info("patched %d modules with %s", len(names), method)
    return model


def _apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    names = select_targets(model, config.targets)
    _check_not_tied(model, names)
    _warn_large_rank(model, names, config.r)
    for name in names:
        parent, attr = _parent_and_attr(model, name)
        base = getattr(parent, attr)
        setattr(
            parent,
            attr,
            LoraLinear(base, r=config.r, alpha=config.alpha, dropout=config.dropout, rslora=config.rslora),
        )
    _group_shared_inputs(model, names)
    return names


#: Sibling layers that HF decoders feed the same tensor: their LoRA S comes from one pass over X.
SHARED_INPUT_SETS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


def _group_shared_inputs(model: nn.Module, names: list[str]) -> None:
    by_parent: dict[str, dict[str, LoraLinear]] = {}
    for name in names:
        parent, _, attr = name.rpartition(".")
        by_parent.setdefault(parent, {})[attr] = model.get_submodule(name)
    for siblings in by_parent.values():
        for shared in SHARED_INPUT_SETS:
            members = [siblings[a] for a in shared if a in siblings]
            if len(members) < 2:
                continue
            first = members[0]
            w = first.base_layer.weight
            if all(
                m.in_features == first.in_features
                and m.base_layer.weight.dtype == w.dtype
                and m.base_layer.weight.device == w.device
                and m.scaling == first.scaling
                and m.dropout == first.dropout
                for m in members
            ):
                group = SharedInputGroup(members)
                for m in members:
                    m.group = group


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original layers back (merged weights stay merged) and drop the adapters."""
    state = _require_state(model)
    for name in state.modules:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, getattr(parent, attr).base_layer)
    for handle in reversed(state.hooks):
        handle.remove()
    _restore_requires_grad(*state.base_requires_grad)
    model.__dict__.pop("save_pretrained", None)
    del model.fastadapt_state
    return model


def _restore_requires_grad(params: list, flags: list[bool]) -> None:
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


def _unswap_adapter_modules(model: nn.Module) -> None:
    """Put back the wrapped layer of every adapter module (those of a failed, unrecorded patch)."""
    from .modules.base import AdapterModule

    for name, module in list(model.named_modules()):
        if name and isinstance(module, AdapterModule):
            parent, attr = _parent_and_attr(model, name)
            setattr(parent, attr, module.base_layer)


def get_state(model: nn.Module) -> PatchState | None:
    return getattr(model, "fastadapt_state", None)


def _require_state(model: nn.Module) -> PatchState:
    state = get_state(model)
    if state is None:
        raise ValueError("model is not patched by fastadapt: call fa.patch(model, ...) first")
    return state


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, module)`` for every adapter module of a patched model, in patch order."""
    state = _require_state(model)
    for name in state.modules:
        yield name, model.get_submodule(name)


# -- target selection --------------------------------------------------------------------------


def select_targets(model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """Names of the modules that ``targets`` selects; errors name what is wrong."""
    modules = dict(model.named_modules())
    if targets == "auto":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(
                f"targets='auto' has no default for model_type {model_type!r}; pass targets= a list of "
                f"module names, e.g. {candidate_names(model)[:8]}, or 'all-linear'"
            )
        targets = DEFAULT_LORA_TARGETS[model_type]
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
        names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in targets)]
        what = f"targets {list(targets)}"
    if not names:
        raise ValueError(
            f"{what} matched no module; candidate linear layers: {candidate_names(model)[:12]}"
        )
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
        for name, m in model.named_modules()
        if is_supported_linear(m) and m is not head and any(name.startswith(p) for p in prefixes)
    ]


def _check_not_tied(model: nn.Module, names: list[str]) -> None:
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


def _warn_large_rank(model: nn.Module, names: list[str], r: int) -> None:
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


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def make_config(cls: type, method: str, options: dict[str, Any]):
    """``cls(**options)``, with an error naming unknown options."""
    known = [f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; expected some of {known}")
    return cls(**options)


# -- model-level hooks ------------------------------------------------------------------------


def _install_model_hooks(model: nn.Module, state: PatchState) -> None:
    # Reentrant gradient checkpointing only back-propagates into a block whose input requires
    # grad; with a frozen base nothing before the first adapter does, so mark the embeddings' output.
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:

        def inputs_require_grad(module, args, output):
            if (
                torch.is_grad_enabled()
                and isinstance(output, torch.Tensor)
                and not output.requires_grad
                and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
            ):
                output.requires_grad_(True)

        state.hooks.append(embeddings.register_forward_hook(inputs_require_grad))

    # Adapter-only checkpoints (what a patched model's save_pretrained writes) are complete: drop
    # the frozen base keys from "missing" when every one of them is missing. (Right after
    # patching, the trainable parameters are exactly the adapter's.)
    all_keys = model.state_dict().keys()
    adapter_keys = set(state.adapter_keys)
    n_base_keys = len(all_keys) - len(adapter_keys)

    def adapter_only_load(module, incompatible):
        missing = incompatible.missing_keys
        n_base_missing = sum(k not in adapter_keys for k in missing)
        if n_base_missing and n_base_missing == n_base_keys:
            missing[:] = [k for k in missing if k in adapter_keys]

    state.hooks.append(model.register_load_state_dict_post_hook(adapter_only_load))

    from .io import save_pretrained_adapter

    # Trainer and users call model.save_pretrained: a patched model saves its adapter, as in PEFT.
    model.save_pretrained = types.MethodType(save_pretrained_adapter, model)


register_method("lora", Method(make_config=lambda m, o: make_config(LoraConfig, m, o), apply=_apply_lora))
