"""Loader for the hand-written CUDA extension ``fastadapt._C`` (ops under ``torch.ops.fastadapt_cuda``).

Nothing here touches CUDA at import time. :func:`native_available` finds the extension on first
call: it imports the prebuilt ``fastadapt._C`` (``FASTADAPT_BUILD_CUDA=1 pip install
--no-build-isolation -e .``) or, failing that, builds it once with
``torch.utils.cpp_extension.load`` into a cache directory (JIT; needs a CUDA build of torch,
nvcc/CUDA_HOME and ninja; ``FASTADAPT_JIT_BUILD=0`` turns this off). After loading it registers the
fake (meta) implementations so ``torch.compile`` traces through the ops.

Ops (all CUDA-only; shapes with M = number of rows of x flattened to 2-D):

- ``bottleneck_adapter_fwd(x (..., d_in), w_down (b, d_in), w_up (d_out, b), scaling (1,) fp32,
  residual (..., d_out) | None, activation) -> (out (..., d_out), hidden (M, b))``,
  ``out = (x if residual is None else residual) + s * act(x @ w_down.T) @ w_up.T``; ``hidden`` is the
  pre-activation in x's dtype, saved for backward. bf16/fp16, fp32 accumulation. No dropout: the op
  layer sends ``dropout_p > 0`` to another backend.
- ``bottleneck_adapter_bwd(dout, x, hidden, w_down, w_up, scaling, activation, has_residual) ->
  (dx (..., d_in), dw_down (b, d_in) fp32, dw_up (d_out, b) fp32, dscaling (like scaling) fp32)``;
  ``dx`` excludes the residual's own gradient (that is ``dout``) when ``has_residual``.
- ``lora_merge_(weight, lora_a (r, K) fp32, lora_b (N, r) fp32, scaling, transposed=False, sign=1,
  check_only=False) -> flag (1,) int32``: ``weight += sign * scaling * lora_b @ lora_a`` in place
  (weight (N, K), or (K, N) when ``transposed``), fp32 math and one rounding; ``flag`` is 1 when any
  result is NaN/Inf; ``check_only`` computes the flag without writing.
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

from . import settings

__all__ = ["native_available", "require_native", "native_load_error", "csrc_sources", "NATIVE_NAMESPACE"]

logger = logging.getLogger(__name__)

NATIVE_NAMESPACE = "fastadapt_cuda"
# "auto" (and fa.merge) use the CUDA kernels only once a GPU run has shown them correct
# (tests/gpu/test_cuda_kernels.py). No GPU has run them yet; backend="cuda" still works when built.
VERIFIED_ON_GPU = False
_OPS = ("bottleneck_adapter_fwd", "bottleneck_adapter_bwd", "lora_merge_")

# Default target GPUs: A100-class (sm_80, also runs on sm_86/89) and H100/H200 (sm_90a).
# TORCH_CUDA_ARCH_LIST, when set, replaces them (torch then derives the -gencode flags).
DEFAULT_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
)
# No -std: torch picks the standard its headers need (C++17 up to 2.9, C++20 after); the code is C++17.
NVCC_FLAGS = ("-O3", "-lineinfo")

_CSRC = Path(__file__).resolve().parent.parent / "csrc"

_lock = threading.Lock()
_state: dict[str, object] = {"done": False, "ok": False, "error": None}


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
    try:
        return all(hasattr(getattr(torch.ops, NATIVE_NAMESPACE), op) for op in _OPS)
    except (AttributeError, RuntimeError):
        return False


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


def _arch_flags() -> list[str]:
    return [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else list(DEFAULT_ARCH_FLAGS)


def _jit_build() -> str | None:
    """Builds and loads the extension with torch.utils.cpp_extension.load; None on success."""
    from torch.utils.cpp_extension import load

    sources = csrc_sources()
    flags = list(NVCC_FLAGS) + _arch_flags()
    key = hashlib.sha256()
    for src in sources:
        key.update(src.encode())
        key.update(Path(src).read_bytes())
    key.update(" ".join(flags).encode())
    key.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-{key.hexdigest()[:12]}".replace("+", "_")
    build_dir = _cache_root() / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("fastadapt: building the CUDA extension in %s (first use; takes a few minutes)", build_dir)
    try:
        load(
            name="fastadapt_C",
            sources=sources,
            extra_cflags=["-O3"],
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
            _register_fakes()
            logger.debug("fastadapt: CUDA extension loaded (torch.ops.%s)", NATIVE_NAMESPACE)
        else:
            logger.info("fastadapt: CUDA extension unavailable: %s", error)
        _state.update(done=True, ok=error is None, error=error)
        return error is None


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


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations, mirroring the shape/dtype rules of the C++ ops.
_fakes_registered = False


def _register_fake(qualname: str):
    register = getattr(torch.library, "register_fake", None)
    if register is None:  # torch < 2.4
        register = torch.library.impl_abstract
    return register(qualname)


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    ns = NATIVE_NAMESPACE

    @_register_fake(f"{ns}::bottleneck_adapter_fwd")
    def _bottleneck_adapter_fwd_fake(x, w_down, w_up, scaling, residual, activation):
        d_in = x.shape[-1]
        b, d_out = w_down.shape[0], w_up.shape[0]
        m = x.numel() // d_in if d_in else 0
        out = x.new_empty((*x.shape[:-1], d_out))
        hidden = x.new_empty((m, b))
        return out, hidden

    @_register_fake(f"{ns}::bottleneck_adapter_bwd")
    def _bottleneck_adapter_bwd_fake(dout, x, hidden, w_down, w_up, scaling, activation, has_residual):
        dx = x.new_empty(x.shape)
        dw_down = w_down.new_empty(w_down.shape, dtype=torch.float32)
        dw_up = w_up.new_empty(w_up.shape, dtype=torch.float32)
        dscaling = scaling.new_empty(scaling.shape, dtype=torch.float32)
        return dx, dw_down, dw_up, dscaling

    @_register_fake(f"{ns}::lora_merge_")
    def _lora_merge_fake(weight, lora_a, lora_b, scaling, transposed=False, sign=1, check_only=False):
        return weight.new_empty((1,), dtype=torch.int32)

    _fakes_registered = True


# If the extension was loaded by someone else first (e.g. `import fastadapt._C`), give its ops
# their fake impls now. No CUDA call: this only inspects the op registry.
if _ops_registered():
    _register_fakes()
