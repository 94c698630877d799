"""Which backend runs a functional op: ``"torch" | "triton" | "cuda"``, or ``"auto"``.

Order of precedence: an explicit ``backend=`` argument, then ``FASTADAPT_BACKEND``, then ``auto``.
``auto`` takes a fused backend only where a GPU run has verified it (:data:`VERIFIED_ON_GPU`) and
it can run on the input's device; otherwise the torch path (``fastadapt.ops.reference``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from .. import settings

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")

#: (op, backend) pairs that a GPU run has shown correct and faster than the torch path; ``auto``
#: uses a fused backend only when its pair is here. No GPU has run the kernels yet: empty.
VERIFIED_ON_GPU: frozenset[tuple[str, str]] = frozenset()

_warned: set[tuple[str, str]] = set()


def resolve_backend(
    op: str,
    requested: str,
    device: torch.device,
    *,
    available: dict[str, Callable[[torch.device], bool]],
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``available`` maps each fused backend the op implements to a predicate telling whether it can
    run on a device, in ``auto``'s order of preference; the torch backend always exists.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    available = {**available, "torch": lambda device: True}
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
        for name, usable in available.items():
            if name != "torch" and (op, name) in VERIFIED_ON_GPU and usable(device):
                return name
        return "torch"
    if requested not in available:
        raise ValueError(f"{source}: {op} has no {requested} backend; available: {sorted(available)}")
    if not available[requested](device):
        hint = " (Triton on CPU tensors needs TRITON_INTERPRET=1)" if requested == "triton" else ""
        raise RuntimeError(f"{source}: {op} cannot run the {requested} backend on device {device}{hint}")
    return requested


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
