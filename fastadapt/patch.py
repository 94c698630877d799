"""Put adapters into a Hugging Face model and take them out again: ``fa.patch`` (fresh adapters),
``fa.load_adapter`` (saved ones) and ``fa.unpatch``. Every method goes through its registered hooks
(``fastadapt.methods``); nothing here knows a method or an architecture by name."""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import torch
from torch import nn

from . import distributed, mixed
from .io import (
    load_adapter_tensors,
    options_record,
    read_adapter_config,
    read_adapter_tensors,
    read_options,
    save_pretrained_adapter,
)
from .methods import PatchState, get_method, get_state, require_state
from .methods.targets import parent_and_attr
from .modules.base import AdapterModule
from .ops import invalidate_caches

logger = logging.getLogger(__name__)


def patch(model: nn.Module, method: str, *, preset: str | None = None, **options: Any) -> nn.Module:
    """Add adapters to ``model`` in place and return it.

    Freezes every base parameter, makes only adapter parameters trainable and keeps the model's
    train/eval mode. ``method``: ``"lora"`` (``r=8, alpha=16, dropout=0.05, targets="auto",
    rslora=False``), ``"dora"`` (LoRA's options, ``dropout=0.0``), ``"series"``, ``"parallel"`` or
    ``"prefix"`` (see each method's config class in ``fastadapt.methods``). ``targets``: ``"auto"``
    (per-architecture defaults), ``"all-linear"`` (every linear layer inside the repeated decoder
    blocks, never the output head), a list of module-name suffixes, or a regex matched against full
    module names.

    ``preset``: named settings applied before ``options`` (which override them):
    ``"llm-adapters"`` gives the LLM-Adapters paper's settings — LoRA r=32, alpha=64, dropout 0.05
    on q, k, v, up and down projections; series/parallel bottleneck 256 (series after the MLP
    output projection); prefix 10 virtual tokens. ``fastadapt train`` uses it by default.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    impl = get_method(method)
    state = get_state(model)
    if state is not None:
        raise RuntimeError(
            f"model is already patched with {state.method!r} ({len(state.modules)} modules); "
            "call fa.unpatch(model) first"
        )
    if distributed.is_sharded(model):
        raise RuntimeError(
            "model is already sharded (FSDP2 DTensor parameters): call fa.patch (or fa.load_adapter) "
            "before fully_shard / fastadapt.distributed.shard_model"
        )
    _refuse_peft_layers(model)
    if preset is not None:
        options = {**impl.preset(preset).options(model), **options}
    config = impl.make_config(options)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        names, handles = impl.apply(model, config)
    except BaseException:
        # apply validates before swapping, but building a module can still fail (out of memory):
        # give the model back exactly as it was.
        _unswap_adapter_modules(model)
        _restore_requires_grad(params, flags)
        raise
    state = PatchState(
        config=config,
        modules=list(names),
        hooks=list(handles),
        adapter_keys=[n for n, p in model.named_parameters() if p.requires_grad],
        base_requires_grad=(params, flags),
    )
    _install_model_hooks(model, state)
    if getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False):
        # transformers' Trainer refuses a quantized model unless it says adapters are attached
        # (trainer_utils.validate_quantization_for_training): they are now.
        model._hf_peft_config_loaded = True
        state.hooks.append(_AttributeReset(model, "_hf_peft_config_loaded", False))
    mixed.install(model, state)  # adapter_names= in model(...) and model.generate(...)
    model.fastadapt_state = state
    logger.info("patched %d modules with %s", len(names), impl.name)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original layers back (merged weights stay merged) and drop the adapters."""
    state = require_state(model)
    for name in state.modules:
        parent, attr = parent_and_attr(model, name)
        setattr(parent, attr, getattr(parent, attr).base_layer)
    for handle in reversed(state.hooks):
        handle.remove()
    _restore_requires_grad(*state.base_requires_grad)
    model.__dict__.pop("save_pretrained", None)
    del model.fastadapt_state
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Patch ``model`` as the adapter's config says (unless already patched the same way) and load
    its weights. Reads fastadapt folders of every method, PEFT LoRA folders and LLM-Adapters'
    bottleneck checkpoints (docs/interop.md: what loads, what is refused and why). Strict: a
    missing or unexpected key, a shape mismatch, or a saved option fastadapt cannot honour raises an
    error naming it, and the model is left as it was.

    Distributed: load before ``fully_shard`` (every rank reads the files). Into a model that is
    already patched and sharded, every rank must call it (the tensors are scattered to the shards)."""
    model = distributed.unwrap(model)
    where = str(path)
    saved = read_adapter_config(path)
    method, options = read_options(saved, where)
    tensors = read_adapter_tensors(path, options=options_record(method, options))
    state = get_state(model)
    patched_here = state is None
    if patched_here:
        if distributed.is_sharded(model):
            raise RuntimeError(
                "model is sharded (FSDP2) but not patched: call fa.load_adapter (or fa.patch) before "
                "fully_shard / fastadapt.distributed.shard_model, so the adapters are sharded with their layers"
            )
        patch(model, method.name, **options)
    elif state.method != method.name:
        raise ValueError(
            f"model is patched with {state.method!r}; the adapter at {where!r} is {method.title} ({method.name!r})"
        )
    try:
        method.check_loaded(model, get_state(model).config, options, saved, where)
        if method.convert_tensors is not None:
            tensors = method.convert_tensors(model, tensors, saved, where)
        (method.load_tensors or load_adapter_tensors)(model, tensors, where)
        invalidate_caches()  # whatever a method's loader wrote, and however: nothing derived survives
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


def _refuse_peft_layers(model: nn.Module) -> None:
    """A PeftModel (or a model PEFT injected layers into) holds PEFT's own adapter layers, which
    fastadapt cannot wrap or merge: say so, and how to get the plain model or its adapter."""
    for name, module in model.named_modules():
        if type(module).__module__.split(".")[0] == "peft":
            where = f"at {name!r}" if name else "the model itself"
            raise TypeError(
                f"model holds PEFT adapter layers ({type(module).__name__}, {where}): fastadapt patches a plain "
                "transformers model; pass peft_model.unload() (or merge_and_unload()), or save the PEFT adapter and "
                "fa.load_adapter(plain_model, folder)"
            )


def _restore_requires_grad(params: list, flags: list[bool]) -> None:
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)


def _unswap_adapter_modules(model: nn.Module) -> None:
    """Put back the wrapped layer of every adapter module (those of a failed, unrecorded patch)."""
    for name, module in list(model.named_modules()):
        if name and isinstance(module, AdapterModule):
            parent, attr = parent_and_attr(model, name)
            setattr(parent, attr, module.base_layer)


class _AttributeReset:
    """A handle whose ``remove()`` (called by ``unpatch``) sets an attribute back."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name, self.value = obj, name, value

    def remove(self) -> None:
        setattr(self.obj, self.name, self.value)


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
    # Trainer and users call model.save_pretrained: a patched model saves its adapter, as in PEFT.
    model.save_pretrained = types.MethodType(save_pretrained_adapter, model)


__all__ = ["load_adapter", "patch", "unpatch"]
