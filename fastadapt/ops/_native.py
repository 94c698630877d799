"""Loader for the hand-written CUDA extension ``fastadapt._C`` (csrc/).

The extension only implements kernels, for the CUDA dispatch key of ops whose schemas and fake
impls are declared in Python beside the op that calls them (``ops/_library.native_op``):
``fastadapt::bottleneck_adapter_cuda_fwd/_bwd`` (ops/bottleneck_adapter.py) and
``fastadapt::lora_merge_cuda_`` (ops/lora_merge.py).

Nothing here touches CUDA at import time. :func:`native_available` finds the extension on first
call: it imports the prebuilt ``fastadapt._C`` (``FASTADAPT_BUILD_CUDA=1 pip install
--no-build-isolation -e .``) or, failing that, builds it once with
``torch.utils.cpp_extension.load`` into a cache directory (JIT; needs a CUDA build of torch,
nvcc/CUDA_HOME and ninja; ``FASTADAPT_JIT_BUILD=0`` turns this off).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from .. import _cuda_build, settings
from ._library import has_cuda_kernel

__all__ = ["NATIVE_OPS", "csrc_sources", "jit_cache_dir", "native_available", "native_load_error", "require_native"]

logger = logging.getLogger(__name__)

#: The ops whose CUDA kernels the extension registers.
NATIVE_OPS = ("bottleneck_adapter_cuda_fwd", "bottleneck_adapter_cuda_bwd", "lora_merge_cuda_")

# compiler flags: fastadapt/_cuda_build.py (shared with setup.py and CI's compile check)

_CSRC = Path(__file__).resolve().parents[2] / "csrc"

_lock = threading.Lock()
_state: dict[str, object] = {"done": False, "ok": False, "error": None, "cache_dir": None}


# ---------------------------------------------------------------------------------------------
# Environment switches live in fastadapt.settings (one table for the whole package).


def _jit_enabled() -> bool:
    return settings.flag("FASTADAPT_JIT_BUILD")


def _cache_root() -> Path:
    return settings.cache_dir() / "ext"


# ---------------------------------------------------------------------------------------------
def csrc_sources() -> list[str]:
    """The C++/CUDA sources of the extension (absolute paths, sorted); empty in a wheel without csrc/."""
    if not _CSRC.is_dir():
        return []
    return sorted(str(p) for p in _CSRC.rglob("*") if p.suffix in (".cu", ".cpp"))


def _ops_registered() -> bool:
    return all(has_cuda_kernel(op) for op in NATIVE_OPS)


def _import_prebuilt() -> str | None:
    """Imports fastadapt._C; returns None on success, else why not."""
    try:
        importlib.import_module("fastadapt._C")
    except ImportError as exc:  # missing, or built against another torch / CUDA (undefined symbols)
        return f"fastadapt._C could not be imported ({exc})"
    except OSError as exc:
        return f"fastadapt._C could not be loaded ({exc})"
    return None if _ops_registered() else "fastadapt._C imported but did not register its ops"


def _jit_blockers() -> list[str]:
    """Reasons the JIT build cannot run here (empty when it can)."""
    reasons = []
    if not _jit_enabled():
        reasons.append("FASTADAPT_JIT_BUILD=0")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not csrc_sources():
        reasons.append(f"the CUDA sources are not shipped with this install (no {_CSRC})")
    if torch.version.cuda is not None:
        from torch.utils.cpp_extension import CUDA_HOME  # lazy: pulls in setuptools

        if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            if shutil.which("nvcc") is None:
                reasons.append("nvcc / CUDA_HOME not found")
    return reasons


def _jit_build() -> str | None:
    """Builds and loads the extension with torch.utils.cpp_extension.load; None on success."""
    from torch.utils.cpp_extension import load

    sources = csrc_sources()
    flags = list(_cuda_build.NVCC_FLAGS) + _cuda_build.arch_flags(os.environ)
    key = hashlib.sha256()
    for src in sources:
        key.update(src.encode())
        key.update(Path(src).read_bytes())
    key.update(" ".join(flags).encode())
    key.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-{key.hexdigest()[:12]}".replace("+", "_")
    build_dir = _cache_root() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    _state["cache_dir"] = settings.cache_dir()
    logger.info("fastadapt: building the CUDA extension in %s (first use; takes a few minutes)", build_dir)
    try:
        load(
            name="fastadapt_C",
            sources=sources,
            extra_cflags=list(_cuda_build.CXX_FLAGS),
            extra_cuda_cflags=flags,
            extra_include_paths=[str(_CSRC)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=logger.isEnabledFor(logging.DEBUG),
        )
    except Exception as exc:  # build errors surface as RuntimeError/OSError/CalledProcessError
        return f"JIT build in {build_dir} failed: {type(exc).__name__}: {exc}"
    return None if _ops_registered() else "JIT-built extension loaded but did not register its ops"


def native_available() -> bool:
    """True when the CUDA ops are registered; loads (or JIT-builds, once) the extension on first call.

    Never raises; the reason for a False is kept for :func:`native_load_error` and logged once.
    """
    if _state["done"]:
        return bool(_state["ok"])
    with _lock:
        if _state["done"]:
            return bool(_state["ok"])
        error = None
        if not _ops_registered():
            error = _import_prebuilt()
            if error is not None:
                blockers = _jit_blockers()
                if blockers:
                    error += "; JIT build not possible: " + ", ".join(blockers)
                else:
                    jit_error = _jit_build()
                    if jit_error is not None:
                        error += "; " + jit_error
                    else:
                        error = None
        if error is None:
            logger.debug("fastadapt: CUDA extension loaded (%s)", ", ".join(NATIVE_OPS))
        else:
            logger.info("fastadapt: CUDA extension unavailable: %s", error)
        _state.update(done=True, ok=error is None, error=error)
        return error is None


def jit_cache_dir() -> Path | None:
    """The FASTADAPT_CACHE_DIR the extension was JIT-built (or found) under in this process; a child
    process given the same one loads the build instead of compiling again. None when not JIT-built."""
    return _state["cache_dir"]  # type: ignore[return-value]


def native_load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded or was not asked for yet)."""
    return _state["error"]  # type: ignore[return-value]


_BUILD_HELP = (
    "Build it with `FASTADAPT_BUILD_CUDA=1 pip install --no-build-isolation -e .` (needs a CUDA build of "
    "torch and nvcc/CUDA_HOME at install time), or let it build on first use: that JIT build needs a "
    "CUDA build of torch, nvcc (CUDA_HOME), ninja and the source tree's csrc/, with FASTADAPT_JIT_BUILD "
    "unset or 1. Other backends ('triton', 'torch') work without it."
)


def require_native(op_name: str) -> None:
    """Raises RuntimeError saying how to build the extension when ``op_name`` needs it and it is missing."""
    if not native_available():
        raise RuntimeError(
            f"{op_name} with backend='cuda' needs the fastadapt CUDA extension (fastadapt._C), which is not "
            f"available: {native_load_error()}. {_BUILD_HELP}"
        )
