"""Which backend runs a functional op: ``"torch" | "triton" | "cuda" | "reference"``, or ``"auto"``.

Order of precedence: an explicit ``backend=`` argument, then ``FASTADAPT_BACKEND``, then ``auto``.
``auto`` takes a fused backend only where a GPU verification record vouches for it on this device,
shape class and kernel source (:mod:`fastadapt.ops.verification`) and it can run on the input's
device; otherwise the torch path (``fastadapt.ops.torch_backend``: the reference's function with
less kept for backward), saying why once per op and GPU. ``"reference"``
(``fastadapt.ops.reference``, plain autograd: the oracle the tests compare with) runs only when
asked for; ops without a separate lean path run their torch path for it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import settings
from . import verification

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda", "reference")
#: the backends that run torch operations (every op has them; ``auto`` picks only ``torch``)
TORCH_BACKENDS = ("torch", "reference")

_warned: set[tuple] = set()

#: op -> its fused backends, each with where it can run, in ``auto``'s order (``fastadapt backends``
#: lists these; a call may narrow them further, e.g. the CUDA bottleneck kernel takes no dropout).
OPS: dict[str, dict[str, Callable[[torch.device], bool]]] = {}
#: the rows that stand for each shape class in :func:`explain`
EXAMPLE_ROWS = {"decode": 1, "batch": 8192}


def register_op(op: str, available: dict[str, Callable[[torch.device], bool]]) -> None:
    """Declare an op's fused backends (once, where the op is defined)."""
    if op in OPS:
        raise ValueError(f"op {op!r} is registered twice")
    OPS[op] = dict(available)


def explain(device: torch.device) -> list[tuple[str, str, Decision]]:
    """What ``auto`` picks on ``device`` for every registered op and shape class, and why."""
    return [(op, cls, decide(op, "auto", device, available=available, rows=rows))
            for op, available in sorted(OPS.items()) for cls, rows in EXAMPLE_ROWS.items()]


@dataclass(frozen=True)
class Decision:
    """The backend that runs a call and why (``fastadapt backends`` prints these)."""

    backend: str
    reason: str
    record: dict | None = None


def resolve_backend(op: str, requested: str, device: torch.device, **kw) -> str:
    """The backend that runs ``op`` on ``device``: :func:`decide` without the reason."""
    return decide(op, requested, device, **kw).backend


def decide(
    op: str,
    requested: str,
    device: torch.device,
    *,
    available: dict[str, Callable[[torch.device], bool]],
    rows: int | None = None,
) -> Decision:
    """Pick the backend that runs ``op`` on ``device``, with the reason.

    ``available`` maps each fused backend the op implements to a predicate telling whether it can
    run on a device, in ``auto``'s order of preference; the torch backend always exists. ``rows``
    (the flattened batch M) selects the verification records' shape class.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    available = {**available, "torch": lambda device: True, "reference": lambda device: True}
    source = f"backend={requested!r}"
    if requested == "auto":
        forced = settings.backend_override()
        if forced is not None:
            source = f"FASTADAPT_BACKEND={forced}"
            if forced not in BACKENDS:
                raise ValueError(f"FASTADAPT_BACKEND must be one of {BACKENDS}, got {forced!r}")
            if forced in available:
                requested = forced
            elif (op, forced) not in _warned:
                _warned.add((op, forced))
                logger.warning("FASTADAPT_BACKEND=%s: %s has no %s backend; using auto", forced, op, forced)
    if requested == "auto":
        return _auto(op, device, available, rows)
    if requested not in available:
        raise ValueError(f"{source}: {op} has no {requested} backend; available: {sorted(available)}")
    if not available[requested](device):
        hint = " (Triton on CPU tensors needs TRITON_INTERPRET=1)" if requested == "triton" else ""
        raise RuntimeError(f"{source}: {op} cannot run the {requested} backend on device {device}{hint}")
    return Decision(requested, f"asked for by {source}")


def _auto(op: str, device: torch.device, available: dict, rows: int | None) -> Decision:
    """The first fused backend verified for this call that can run here; else torch, with why not.
    The record comes first: asking whether the CUDA backend can run may build the extension
    (minutes), which only a verified backend is worth."""
    why = []
    fused = [name for name in available if name not in TORCH_BACKENDS]
    for name in fused:
        verdict = verification.find(op, name, device, rows)
        if not verdict.verified:
            why.append(verdict.reason)
        elif not available[name](device):
            why.append(_not_usable(name, device))
        else:
            return Decision(name, verdict.reason, verdict.record)
    reason = "; ".join(why) or f"{op} has no fused backend"
    gpu = verification.device_name(device)
    if gpu is not None and fused:
        key = (op, gpu, verification.shape_class(rows), verification.generation())
        if key not in _warned:  # once per op, GPU, shape class and set of records: a run logs it once
            _warned.add(key)
            logger.warning("fastadapt: %s runs the torch path on %s: %s. `fastadapt backends` explains; "
                           "FASTADAPT_BACKEND=triton forces the fused kernels.", op, key[1], reason)
    return Decision("torch", reason)


def _not_usable(backend: str, device: torch.device) -> str:
    if backend == "triton":
        return f"triton runs on CUDA devices (or in the TRITON_INTERPRET=1 interpreter), not {device}"
    if backend == "cuda" and device.type == "cuda":
        from ._native import native_load_error

        return f"the CUDA extension is unavailable ({native_load_error() or 'not loaded'})"
    return f"{backend} cannot run on {device}"


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda":
        return _triton_importable()
    return device.type == "cpu" and settings.triton_interpret() and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
