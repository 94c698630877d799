"""``fastadapt backends``: which backend ``auto`` picks for each op on this machine, and why."""

from __future__ import annotations

import platform

import torch

from .. import settings
from ..ops import dispatch, verification


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def report(device: torch.device) -> str:
    """The table ``fastadapt backends`` prints: one line per op and shape class, with the reason."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    source = settings.verified_records() or verification.RECORDS_DIR
    lines = [
        f"device: {device} ({verification.device_name(device) or platform.processor() or 'CPU'})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}",
        f"verification records: {source}",
        f"kernel hashes: triton {verification.kernel_hash('triton') or 'n/a'}, "
        f"cuda {verification.kernel_hash('cuda') or 'n/a'}",
        "",
    ]
    rows = [(op, cls, d.backend, d.reason) for op, cls, d in dispatch.explain(device)]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    head = ("op", "shape", "backend")
    width = [max(w, len(h)) for w, h in zip(width, head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, width)) + "  why")
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], width)) + "  " + r[3])
    lines += ["", f"shapes: decode = at most {verification.DECODE_MAX_ROWS} rows (tokens), batch = more. "
                  "FASTADAPT_BACKEND forces a backend; scripts/gpu-check.sh writes the records."]
    return "\n".join(lines)
