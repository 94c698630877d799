"""Build hook for the optional CUDA extension ``fastadapt._C``; all metadata lives in pyproject.toml.

    pip install -e .                                                 # pure Python (Triton/torch backends)
    FASTADAPT_BUILD_CUDA=1 pip install --no-build-isolation -e .     # + CUDA kernels (needs CUDA torch, nvcc)

The extension is built when torch in the *build* environment is a CUDA build and CUDA_HOME (nvcc)
is found, or when FASTADAPT_BUILD_CUDA=1 forces it (an error if that is impossible).
FASTADAPT_SKIP_CUDA_BUILD=1 never builds it. pip's default isolated build environment has no torch
(it is not a build requirement, on purpose: resolving it there would download a second, possibly
CPU-only, torch), so the native build needs ``--no-build-isolation`` against the installed torch.
Without the extension the package still works; ``backend="cuda"`` then says how to build it, and
an editable install can also build it on first use (JIT, see fastadapt/ops/_native.py).

Compiler flags and target GPUs (sm_80, sm_90a, compute_80 PTX; TORCH_CUDA_ARCH_LIST overrides the
targets): fastadapt/_cuda_build.py, shared with the build on first use and CI's compile check.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_flags():
    """fastadapt/_cuda_build.py, loaded by path (the package is not importable before installing)."""
    spec = importlib.util.spec_from_file_location("_cuda_build", os.path.join(ROOT, "fastadapt", "_cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"fastadapt setup.py: {msg}", file=sys.stderr)


def _extension_kwargs() -> dict:
    if _flag("FASTADAPT_SKIP_CUDA_BUILD"):
        _log("FASTADAPT_SKIP_CUDA_BUILD=1: not building the CUDA extension")
        return {}
    force = _flag("FASTADAPT_BUILD_CUDA")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if force:
            raise RuntimeError(
                "FASTADAPT_BUILD_CUDA=1 but torch cannot be imported in the build environment "
                f"({exc}). Install a CUDA build of torch first and build with "
                "`FASTADAPT_BUILD_CUDA=1 pip install --no-build-isolation -e .`"
            ) from exc
        _log("torch not importable in the build environment (isolated build?): no CUDA extension")
        return {}

    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        missing.append("CUDA_HOME / nvcc not found")
    if missing:
        if force:
            raise RuntimeError(
                "FASTADAPT_BUILD_CUDA=1 but the CUDA extension cannot be built: "
                + "; ".join(missing)
                + ". Install a CUDA build of torch and the CUDA toolkit (set CUDA_HOME), then build with "
                "`FASTADAPT_BUILD_CUDA=1 pip install --no-build-isolation -e .`"
            )
        _log("no CUDA toolchain (" + "; ".join(missing) + "): installing without the CUDA extension")
        return {}

    sources = sorted(
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
        if p.endswith((".cu", ".cpp"))
    )
    if not sources:
        if force:
            raise RuntimeError("FASTADAPT_BUILD_CUDA=1 but csrc/ has no sources (not a source checkout?)")
        return {}
    # torch derives -gencode flags from TORCH_CUDA_ARCH_LIST when it is set and no flag names an arch.
    flags = _build_flags()
    ext = CUDAExtension(
        name="fastadapt._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": list(flags.CXX_FLAGS),
                            "nvcc": [*flags.NVCC_FLAGS, *flags.arch_flags(os.environ)]},
    )
    _log(f"building fastadapt._C from {len(sources)} sources (CUDA {torch.version.cuda}, {CUDA_HOME})")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
