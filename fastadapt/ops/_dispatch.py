"""Backend choice shared by every functional op.

Order of precedence: an explicit ``backend=`` argument, then ``FASTADAPT_BACKEND``, then the
op's own ``auto`` rule for the input's device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .. import settings

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cuda")

_warned: set[tuple[str, str]] = set()


def resolve_backend(
    op: str,
    requested: str,
    device: torch.device,
    *,
    available: dict[str, Callable[[torch.device], bool]],
    auto_order: tuple[str, ...],
) -> str:
    """Pick the backend that runs ``op`` on ``device``.

    ``available`` maps each backend the op implements to a predicate telling whether it can run on a
    device (the torch backend is always available). ``auto_order`` is the preference for ``auto``.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
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
        for name in auto_order:
            if name in available and available[name](device):
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
    import os

    if device.type == "cuda":
        return _triton_importable()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
