"""GPU verification records: what lets ``backend="auto"`` take a fused backend.

A record says that on one GPU model (``torch.cuda.get_device_name``), for one op and shape class,
one fused backend passed the GPU correctness tests and was the fastest backend measured — written by
a passing ``scripts/gpu-check.sh`` run, with the commit, the versions and a hash of the kernel
sources it ran. ``auto`` uses a fused backend only where a record matches this device, the shape
class and the *current* kernel hash: a kernel edited since the GPU run is unverified again.

Records are JSON files (a list of records each) in ``fastadapt/ops/verified/``, committed from a
GPU run (``bench/README.md`` says how); ``FASTADAPT_VERIFIED`` points at another file or folder
instead (gpu-check.sh uses it to try the records it just wrote). One record::

    {"gpu": "NVIDIA H100 80GB HBM3", "op": "lora_linear", "backend": "triton", "shape_class": "batch",
     "variant": "addmm", "kernel_hash": "…", "speedup_over_torch": 1.31, "commit": "…",
     "versions": {"torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}, "date": "2026-12-01"}

Shape classes (:func:`shape_class`): ``decode`` (at most 64 rows: launch- and weight-read-bound)
and ``batch`` (more rows: bandwidth/compute-bound); ``any`` in a record covers both.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import settings

__all__ = [
    "DECODE_MAX_ROWS",
    "RECORDS_DIR",
    "Verdict",
    "device_name",
    "find",
    "generation",
    "kernel_hash",
    "load_records",
    "reload",
    "shape_class",
]

logger = logging.getLogger(__name__)

RECORDS_DIR = Path(__file__).resolve().parent / "verified"
DECODE_MAX_ROWS = 64
SHAPE_CLASSES = ("decode", "batch")
_REQUIRED = ("gpu", "op", "backend", "shape_class", "kernel_hash")

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


def shape_class(rows: int | None) -> str | None:
    """``decode`` for at most :data:`DECODE_MAX_ROWS` rows, ``batch`` above; None when unknown."""
    if rows is None:
        return None
    return "decode" if rows <= DECODE_MAX_ROWS else "batch"


def device_name(device: torch.device) -> str | None:
    """The GPU model a record names (``torch.cuda.get_device_name``); None for a non-CUDA device."""
    if device.type != "cuda":
        return None
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


# ---------------------------------------------------------------------------------------------
# kernel hashes


#: The op-layer files that compose kernels into ops (launch order, variants, backward): a change to
#: them can break a verified backend as surely as a kernel edit. Dispatch, records and the torch
#: twins are not in it.
_OPS = Path(__file__).resolve().parent
_OP_FILES = ("_cache.py", "_inputs.py", "_library.py", "bottleneck_adapter.py", "dora_linear.py", "lora_linear.py",
             "lora_linear_4bit.py", "lora_merge.py", "lora_mixed.py",
             "parallel_adapter.py")


@functools.cache
def kernel_hash(backend: str) -> str | None:
    """A hash of the sources a fused backend runs: its kernels — the Triton kernels (``kernels/fastadapt_kernels/*.py``,
    installed as ``fastadapt.kernels``) or the CUDA sources and build flags (``csrc/``,
    ``fastadapt/_cuda_build.py``) — and the op files that call them (:data:`_OP_FILES`). None when
    the kernels are not on disk (a wheel ships no csrc/, so its prebuilt extension cannot be matched
    to a record)."""
    if backend == "triton":
        spec = importlib.util.find_spec("fastadapt.kernels")  # the folder, without importing triton
        if spec is None or not spec.submodule_search_locations:
            return None
        kernels = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.py"))
    elif backend == "cuda":
        kernels = sorted(p for p in _CSRC.rglob("*") if p.suffix in _CSRC_SUFFIXES) if _CSRC.is_dir() else []
        if kernels:
            kernels.append(_OPS.parent / "_cuda_build.py")
    else:
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    if not kernels:
        return None
    h = hashlib.sha256()
    for f in [*kernels, *(_OPS / name for name in _OP_FILES)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading


def _source(override: str | None) -> Path:
    return Path(override).expanduser() if override else RECORDS_DIR


def load_records(source: Path) -> list[dict]:
    """Every record in a JSON file, or in the ``*.json`` files of a folder. A malformed file is an
    error naming it (records gate which kernels run: never guess)."""
    if source.is_dir():
        files = sorted(source.glob("*.json"))
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(f"FASTADAPT_VERIFIED: no such file or folder: {source}")
    records = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"verification records {f}: not readable JSON ({exc})") from exc
        if not isinstance(data, list):
            raise ValueError(f"verification records {f}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            missing = [k for k in _REQUIRED if not isinstance(rec, dict) or not rec.get(k)]
            if missing:
                raise ValueError(f"verification records {f}, record {i}: missing {', '.join(missing)}")
            if rec["shape_class"] not in (*SHAPE_CLASSES, "any"):
                raise ValueError(f"verification records {f}, record {i}: shape_class must be one of "
                                 f"{(*SHAPE_CLASSES, 'any')}, got {rec['shape_class']!r}")
        records.extend(data)
    return records


_UNREAD = object()
_state: dict[str, object] = {"override": _UNREAD, "records": None, "generation": 0}
_found: dict[tuple, Verdict] = {}


def _records() -> list[dict]:
    override = settings.verified_records()  # a fast read: dispatch asks on every call
    if override != _state["override"]:
        source = _source(override)
        records = load_records(source) if source != RECORDS_DIR or source.is_dir() else []
        _state.update(override=override, records=records,
                      generation=int(_state["generation"]) + 1)  # type: ignore[call-overload]
        _found.clear()
    return _state["records"]  # type: ignore[return-value]


def generation() -> int:
    """Changes whenever the records in use change: callers that cache a backend choice key on it."""
    _records()
    return int(_state["generation"])  # type: ignore[call-overload]


def reload() -> None:
    """Forget the loaded records and every cached verdict (after editing a records file in place)."""
    _state["override"] = _UNREAD
    kernel_hash.cache_clear()
    _records()


# ---------------------------------------------------------------------------------------------
# lookup


@dataclass(frozen=True)
class Verdict:
    """Whether a fused backend is verified for a call, the record that says so, and why (not)."""

    verified: bool
    reason: str
    record: dict | None = None


def find(op: str, backend: str, device: torch.device, rows: int | None = None) -> Verdict:
    """The verification verdict for running ``op`` on ``backend`` for ``rows`` rows on ``device``."""
    records = _records()
    cls = shape_class(rows)
    key = (op, backend, str(device), cls)
    cached = _found.get(key)
    if cached is not None:
        return cached
    verdict = _find(records, op, backend, device, cls)
    _found[key] = verdict
    return verdict


def _find(records: list[dict], op: str, backend: str, device: torch.device, cls: str | None) -> Verdict:
    gpu = device_name(device)
    if gpu is None:
        return Verdict(False, f"{backend} is verified on GPUs only (device {device})")
    mine = [r for r in records if r["gpu"] == gpu and r["op"] == op and r["backend"] == backend]
    if not mine:
        return Verdict(False, f"no GPU verification record for {op} on {backend} for {gpu} "
                              "(scripts/gpu-check.sh writes them)")
    wanted = SHAPE_CLASSES if cls is None else (cls,)
    fitting = [r for r in mine if r["shape_class"] == "any" or r["shape_class"] in wanted]
    if not fitting:
        have = sorted({r["shape_class"] for r in mine})
        return Verdict(False, f"{op} on {backend} for {gpu} is verified for {', '.join(have)} shapes, not {cls}")
    current = kernel_hash(backend)
    if current is None:
        return Verdict(False, f"the {backend} kernel sources are not on disk, so no record can vouch for them")
    fresh = [r for r in fitting if r["kernel_hash"] == current]
    if not fresh:
        return Verdict(False, f"the {backend} kernels changed since {op} was verified on {gpu} "
                              f"(record hash {fitting[0]['kernel_hash']}, now {current}): unverified again")
    best = max(fresh, key=lambda r: float(r.get("speedup_over_torch") or 0.0))
    speedup = float(best.get("speedup_over_torch") or 0.0)
    if speedup <= 1.0:
        return Verdict(False, f"{op} on {backend} passed on {gpu} but was not faster than torch "
                              f"({speedup:.2f}x)", best)
    return Verdict(True, f"verified on {gpu} at commit {str(best.get('commit', '?'))[:12]}: "
                         f"{speedup:.2f}x the torch path", best)
