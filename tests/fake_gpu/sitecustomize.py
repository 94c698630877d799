"""A fake CUDA device for the CPU rehearsal of ``scripts/gpu-check.sh`` (tests/test_gpu_rehearsal.py).

With this folder on ``PYTHONPATH`` and ``FASTADAPT_FAKE_GPU=1``, every Python process of the run (pytest
and its xdist workers, gpu_records, ``fastadapt backends``) that imports torch sees one CUDA device:
``torch.cuda`` answers as a Hopper GPU named :data:`NAME`, tensors and generators asked for on ``cuda``
are made on the CPU, the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``) and
``triton.testing.do_bench`` times one call with the host clock. Only the execution is fake: the
offline install, the extension build (it fails: a CPU torch has no CUDA), the tests, the benchmarks
(at ``FASTADAPT_TINY_SHAPES`` sizes, set by the rehearsal) and the records are the script's own.
The patches are applied when torch (and ``triton.testing``) are first imported, so processes that
never import them (pip, the script's bookkeeping) start as fast as without. Faults to plant:
``fake_gpu_faults.py`` (a pytest plugin).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

NAME = "NVIDIA REHEARSAL (CPU, no GPU)"


def _patch_torch(torch) -> None:
    import contextlib
    from types import SimpleNamespace

    from torch.overrides import TorchFunctionMode

    def cpu(device):
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        if isinstance(device, str) and device.startswith("cuda"):
            return "cpu"
        return device

    class OnCpu(TorchFunctionMode):
        """Whatever asks for a cuda tensor gets a CPU one (``device=`` arguments, ``.to``, ``.cuda()``)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.to:
                args = tuple(cpu(a) if i else a for i, a in enumerate(args))
            return func(*args, **kwargs)

    class Generator(torch.Generator):
        def __new__(cls, device="cpu"):
            return super().__new__(cls, device=cpu(device))

        def __init__(self, device="cpu"):
            pass

    # 1 byte of L2: every input set is "larger than L2", so the benchmarks build one set per case
    props = SimpleNamespace(name=NAME, major=9, minor=0, total_memory=80 << 30, multi_processor_count=132,
                            L2_cache_size=1)
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.get_device_name = lambda device=None: NAME
    cuda.get_device_capability = lambda device=None: (9, 0)
    cuda.get_device_properties = lambda device=None: props
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.reset_peak_memory_stats = lambda device=None: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    cuda.device = lambda device=None: contextlib.nullcontext()
    torch.Generator = Generator
    OnCpu().__enter__()  # for the life of the process


def _patch_triton_testing(testing) -> None:
    import time

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean", **_):
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms for _ in quantiles] if quantiles else ms

    testing.do_bench = do_bench


_PATCHES = {"torch": _patch_torch, "triton.testing": _patch_triton_testing}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a patched module so the patch runs right after it."""

    def find_spec(self, fullname, path=None, target=None):
        patch = _PATCHES.pop(fullname, None)
        if patch is None:
            return None
        if not _PATCHES:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("FASTADAPT_FAKE_GPU") == "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its kernels are decorated then
    # bitsandbytes (the QLoRA extra, installed in CI) would load its CUDA library for the fake device
    # as soon as PEFT imports it: hidden, as on the GPU image, which has no bitsandbytes
    # (importlib.util.find_spec answers None and ``import bitsandbytes`` fails, as when not installed)
    sys.modules["bitsandbytes"] = None
    sys.meta_path.insert(0, _PatchOnImport())
