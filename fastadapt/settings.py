"""Every ``FASTADAPT_*`` environment switch, read in this one place.

Values are read when asked for (not at import), so tests and launchers can set them late.
The README lists the same table.
"""

from __future__ import annotations

import os
from pathlib import Path

#: name -> (meaning, default)
ENV_VARS: dict[str, tuple[str, str]] = {
    "FASTADAPT_BACKEND": ("force one kernel backend everywhere: auto | torch | triton | cuda | reference", "auto"),
    "FASTADAPT_CACHE_DIR": ("where converted models and JIT-built extensions are cached", "~/.cache/fastadapt"),
    "FASTADAPT_BUILD_CUDA": ("setup.py: 1 forces building the CUDA extension", "0"),
    "FASTADAPT_SKIP_CUDA_BUILD": ("setup.py: 1 skips building the CUDA extension", "0"),
    "FASTADAPT_JIT_BUILD": ("0 disables building the CUDA extension on first use", "1"),
    "FASTADAPT_LORA_VARIANT": (
        "how the Triton LoRA path joins the rank term to the frozen GEMM: auto | addmm | epilogue | fused", "auto"),
    "FASTADAPT_AUTOTUNE": ("0: Triton GEMM kernels run their first config instead of autotuning", "1"),
    "FASTADAPT_VERIFIED": (
        "GPU verification records (a JSON file or folder) to use instead of the committed ones", ""),
    "FASTADAPT_REQUIRE_CUDA_EXT": ("1: GPU tests fail (not skip) when the CUDA extension cannot load", "0"),
    "FASTADAPT_DORA_RECOMPUTE": (
        "1: DoRA with dropout on the torch backend keeps no M×N product for backward and recomputes it "
        "(one more frozen-size GEMM)", "0"),
    "FASTADAPT_TINY_SHAPES": (
        "1: GPU tests and benchmarks run at tiny sizes, keeping their ids and records (the CPU rehearsal of "
        "scripts/gpu-check.sh; its numbers mean nothing)", "0"),
}


# CPython keeps the environment in ``os.environ._data`` under encoded keys; reading it there costs a
# dict lookup where ``os.environ.get`` re-encodes the key (~0.8 µs): the ops read these switches on
# every call, and a decode step is a few µs of host time in all.
_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_KEYS: dict[str, object] = {}


def _environ(name: str) -> str | None:
    if _DATA is None or _ENCODE is None or _DECODE is None:
        return os.environ.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    raw = _DATA.get(key)
    return None if raw is None else _DECODE(raw)


def _get(name: str) -> str:
    value = _environ(name)
    return ENV_VARS[name][1] if value is None else value


def triton_interpret() -> bool:
    """Triton's own ``TRITON_INTERPRET=1``: kernels run in its interpreter, on CPU tensors."""
    return _environ("TRITON_INTERPRET") == "1"


def backend_override() -> str | None:
    """The backend forced by ``FASTADAPT_BACKEND``, or None when unset / ``auto``."""
    value = _get("FASTADAPT_BACKEND").strip().lower()
    return None if value in ("", "auto") else value


def lora_variant() -> str | None:
    """The LoRA variant forced by ``FASTADAPT_LORA_VARIANT``, or None when unset / ``auto``."""
    value = _get("FASTADAPT_LORA_VARIANT").strip().lower()
    return None if value in ("", "auto") else value


def verified_records() -> str | None:
    """The records file/folder named by ``FASTADAPT_VERIFIED``, or None for the committed ones."""
    return _get("FASTADAPT_VERIFIED").strip() or None


def cache_dir() -> Path:
    return Path(_get("FASTADAPT_CACHE_DIR")).expanduser()


def flag(name: str) -> bool:
    """A boolean switch: ``1``, ``true``, ``yes``, ``on`` are true."""
    return _get(name).strip().lower() in ("1", "true", "yes", "on")
