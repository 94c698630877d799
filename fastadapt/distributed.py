"""Distributed training helpers: DDP, FSDP2 (``fully_shard``) and rank-0-only I/O.

fastadapt's modules need nothing special under ``DistributedDataParallel``. Under FSDP2 the rule
is that a kernel may read a weight only inside the forward of an FSDP unit that owns it (FSDP has
all-gathered it then); ``shard_model`` shards at the decoder-layer level, which keeps every
adapter module, its frozen ``base_layer`` and its shared-input siblings (q/k/v, gate/up) in one
unit. See ``docs/distributed.md``.

    import fastadapt as fa
    from fastadapt import distributed as fad

    fa.patch(model, "lora", r=8)            # or fa.load_adapter(model, path): before sharding
    fad.shard_model(model)                  # fully_shard(layer) for each decoder layer, then the root
    ...train...
    fa.save_adapter(model, "out/")          # on every rank: gathers full tensors, rank 0 writes
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "barrier",
    "check_not_sharded",
    "decoder_layers",
    "full_tensor",
    "fully_shard_fn",
    "is_dtensor",
    "is_main_process",
    "is_sharded",
    "rank",
    "shard_model",
    "unwrap",
    "world_size",
]

#: First torch release whose FSDP2 accepts frozen parameters of another dtype than the trainable
#: ones in one unit (pytorch/pytorch#154103): a bf16 base with fp32 adapters in one decoder layer.
MIXED_DTYPE_FSDP_TORCH = (2, 8)


# -- process group --------------------------------------------------------------------------------


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without an initialized process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without an initialized process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a process that is not part of a process group."""
    return rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when a process group of more than one process is up; else nothing."""
    if world_size() > 1:
        dist.barrier()


# -- DTensor / sharded parameters -----------------------------------------------------------------


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor  # public from torch 2.4
    except ImportError:  # pragma: no cover - torch < 2.4 or built without distributed
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """True when ``t`` is a ``DTensor`` (an FSDP2-sharded parameter between forwards)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t.full_tensor()`` for a DTensor (a collective: every rank of its mesh
    must call it, in the same order), ``t`` itself otherwise."""
    return t.full_tensor() if is_dtensor(t) else t


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    return any(is_dtensor(p) for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` (and ``torch.compile``'s
    ``_orig_mod``) wrappers. FSDP2 does not wrap (it changes the class in place): returned as is."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def check_not_sharded(model: nn.Module, action: str) -> None:
    """Raise ``RuntimeError`` with guidance when ``model`` holds sharded (DTensor) parameters."""
    if is_sharded(model):
        raise RuntimeError(
            f"{action} needs the full weights, but this model is sharded (FSDP2 fully_shard: its "
            "parameters are DTensors). Save the adapter with fa.save_adapter(model, path) on every "
            "rank (rank 0 writes full tensors), then in one process load the base model unsharded, "
            f"fa.load_adapter(model, path) and run {action} there"
        )


# -- FSDP2 ----------------------------------------------------------------------------------------


def fully_shard_fn() -> Callable[..., Any]:
    """torch's FSDP2 ``fully_shard``: public in ``torch.distributed.fsdp`` from 2.6, under
    ``torch.distributed._composable.fsdp`` in 2.4/2.5."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError as e:  # pragma: no cover - torch < 2.4
            raise ImportError(f"FSDP2 (fully_shard) needs torch >= 2.4, found {torch.__version__}") from e
    return fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class is in the model's
    ``_no_split_modules`` (what accelerate's ``TRANSFORMER_BASED_WRAP`` uses), else the elements of
    the model's largest ``nn.ModuleList``."""
    model = unwrap(model)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    if no_split:
        layers = [m for m in model.modules() if type(m).__name__ in no_split]
        if layers:
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _check_unit_dtypes(units: Iterable[tuple[str, list[nn.Parameter]]]) -> None:
    """Before torch 2.8 one FSDP unit must hold one parameter dtype (frozen ones included)."""
    if _torch_version() >= MIXED_DTYPE_FSDP_TORCH:
        return
    for unit_name, params in units:
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(
                f"{unit_name} holds parameters of dtypes {sorted(map(str, dtypes))}; FSDP2 in "
                f"torch {torch.__version__} needs one dtype per unit (torch >= 2.8 allows frozen "
                "parameters of another dtype). Either keep the base model in fp32 and train with "
                "MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), or cast "
                "the adapters to the base dtype before sharding (loses the fp32 master weights)"
            )


def shard_model(
    model: nn.Module,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    layers: list[nn.Module] | None = None,
) -> nn.Module:
    """FSDP2-shard a patched (or plain) model in place: ``fully_shard`` on every decoder layer, then
    on the root; returns the same object (its class becomes ``FSDP<Class>``, names are unchanged).

    Sharding per decoder layer keeps each adapter module, its frozen ``base_layer`` and its
    shared-input group (q/k/v, gate/up) inside one unit, so the fused kernels only see gathered
    weights. Patch or ``fa.load_adapter`` *before* sharding. ``mesh``: a 1-D ``DeviceMesh``
    (default: all ranks on the current device type). ``mp_policy``: a ``MixedPrecisionPolicy``
    (e.g. ``param_dtype=torch.bfloat16, reduce_dtype=torch.float32`` for an fp32 model). A bf16
    base with fp32 adapters in one unit needs torch >= 2.8 (checked here, with guidance).
    ``layers``: the modules to shard individually (default: ``decoder_layers(model)``).
    """
    if not is_initialized():
        raise RuntimeError(
            "shard_model needs an initialized process group: launch with torchrun and call "
            "torch.distributed.init_process_group() first"
        )
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError("model is wrapped in DistributedDataParallel: shard the plain model, not the wrapper")
    if is_sharded(model):
        raise RuntimeError("model is already sharded (it holds DTensor parameters)")
    fully_shard = fully_shard_fn()
    layers = decoder_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError(
            "found no decoder layers to shard (no _no_split_modules classes, no nn.ModuleList); pass "
            "layers=[...] explicitly"
        )
    _check_adapters_inside(model, layers)
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    inside = {id(p) for layer in layers for p in layer.parameters()}
    _check_unit_dtypes(
        [(type(layer).__name__, list(layer.parameters())) for layer in layers]
        + [("the root unit", [p for p in model.parameters() if id(p) not in inside])]
    )
    for layer in layers:
        fully_shard(layer, **kwargs)
    # The root unit holds embeddings, final norm and head; it is all-gathered for the whole forward.
    fully_shard(model, **kwargs)
    return model


def _check_adapters_inside(model: nn.Module, layers: list[nn.Module]) -> None:
    """Every adapter module must sit inside one sharded layer (or the root), never straddle two."""
    state = getattr(model, "fastadapt_state", None)
    if state is None:
        return
    layer_ids = {id(m) for m in layers}
    for name in state.modules:
        module = model.get_submodule(name)
        inner = [m for m in module.modules() if id(m) in layer_ids]
        if inner:
            raise ValueError(
                f"layers contains a module inside the adapter module {name!r}; its kernel reads the "
                "base weight directly, so shard the whole decoder layer that holds it instead"
            )
