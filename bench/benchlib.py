"""Shared helpers of the ``pytest bench/`` suite: timing, memory, environment, result records.

Every benchmark writes one flat dict into ``benchmark.extra_info`` (the schema is in
bench/README.md) through :func:`record`; ``bench/report.py`` reads only that dict and the
``fastadapt`` block that ``conftest.py`` adds to the JSON.

No CUDA call happens at import time. On a machine without CUDA the helpers time on the CPU
with ``time.perf_counter`` (the smoke mode: it proves the code runs, its numbers mean nothing).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

#: Every record made in this process, for the short table conftest prints last.
RESULTS: list[dict[str, Any]] = []

#: Reference-variant medians measured in this process: (suite, ref_key, mode) -> ms.
REF_MS: dict[tuple[str, str, str], float] = {}

#: Measured ceilings from shared/PERF.md (bf16 dense matmul FLOP/s, device copy bytes/s
#: counting read + write). Used only for "measured / floor"; override with
#: FASTADAPT_BENCH_PEAK_TFLOPS / FASTADAPT_BENCH_PEAK_TBPS on other GPUs.
CEILINGS = {"H100": (798e12, 3.0e12), "H200": (790e12, 4.3e12)}


# -- knobs ----------------------------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def tiny() -> bool:
    """``FASTADAPT_TINY_SHAPES``: the GPU cases run at tiny sizes (the CPU rehearsal of scripts/gpu-check.sh)."""
    from fastadapt import settings

    return settings.flag("FASTADAPT_TINY_SHAPES")


def dim(n: int) -> int:
    """The tensor size a GPU case uses for its size ``n``: ``n`` itself, or under :func:`tiny` a small
    ragged stand-in (sizes up to 16 kept, larger ones 24-46). Case ids and records keep ``n``."""
    return n if n <= 16 or not tiny() else min(n, 24 + n % 23)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def bench_device() -> torch.device:
    return torch.device("cuda") if has_cuda() else torch.device("cpu")


# -- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device | None = None) -> None:
    if (device is None and has_cuda()) or (device is not None and device.type == "cuda"):
        torch.cuda.synchronize()


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device sync: what ``benchmark.pedantic`` must time (CUDA is async)."""

    def wrapper():
        out = fn()
        sync(device)
        return out

    return wrapper


def median_ms(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
    cpu_iters: int = 2,
) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` on CUDA (events, L2 flushed before
    every repetition), a plain ``perf_counter`` median of ``cpu_iters`` calls on the CPU."""
    if device.type == "cuda":
        import triton.testing

        warmup = warmup_ms if warmup_ms is not None else env_float("FASTADAPT_BENCH_WARMUP_MS", 10.0)
        rep = rep_ms if rep_ms is not None else env_float("FASTADAPT_BENCH_REP_MS", 60.0)
        try:
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        except TypeError:  # older triton: no return_mode
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])
    fn()
    times = []
    for _ in range(max(1, cpu_iters)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_delta(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, int | None]:
    """(peak bytes allocated while ``fn`` runs, bytes still held by what ``fn`` returns), both
    over what was allocated before; (None, None) on the CPU."""
    if device.type != "cuda":
        fn()
        return None, None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    held = torch.cuda.memory_allocated() - before
    del out
    return int(peak), int(held)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 20
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def rotations(set_bytes: int, device: torch.device, *, cap: int = 8) -> int:
    """How many independent input sets to cycle through so repeated calls do not hit in L2:
    1 when one set is larger than L2, else enough sets to cover 3 × L2 (at most ``cap``)."""
    l2 = l2_bytes(device)
    if device.type != "cuda" or set_bytes > l2:
        return 1
    return max(2, min(cap, math.ceil(3 * l2 / max(set_bytes, 1))))


class Rotator:
    """Calls ``fns[i % len(fns)]`` on the i-th call: one closure per input set."""

    def __init__(self, fns: Sequence[Callable[[], Any]]) -> None:
        self.fns = list(fns)
        self.i = 0

    def __call__(self):
        fn = self.fns[self.i % len(self.fns)]
        self.i += 1
        return fn()


def ceilings(device: torch.device) -> tuple[float | None, float | None]:
    """(peak FLOP/s, bandwidth bytes/s) for the floor; env overrides, then PERF.md's table."""
    tflops = os.environ.get("FASTADAPT_BENCH_PEAK_TFLOPS")
    tbps = os.environ.get("FASTADAPT_BENCH_PEAK_TBPS")
    flops = float(tflops) * 1e12 if tflops else None
    bw = float(tbps) * 1e12 if tbps else None
    if device.type == "cuda" and (flops is None or bw is None):
        name = torch.cuda.get_device_name(device)
        for key, (f, b) in CEILINGS.items():
            if key in name:
                flops, bw = flops or f, bw or b
                break
    return flops, bw


def floor_ms(flops: float, min_bytes: float, device: torch.device) -> float | None:
    """max(FLOPs / peak, bytes / bandwidth) in ms, or None when the ceilings are unknown."""
    peak, bw = ceilings(device)
    if peak is None or bw is None:
        return None
    return max(flops / peak, min_bytes / bw) * 1e3


# -- records --------------------------------------------------------------------------------------


def record(benchmark, info: dict[str, Any]) -> dict[str, Any]:
    """Put ``info`` into ``benchmark.extra_info`` (JSON-safe values) and remember it for the summary.

    Adds ``ratio_to_ref`` and ``pct_over_ref`` when ``ref_ms`` and ``median_ms`` are both there."""
    info = dict(info)
    if info.get("ref_ms") and info.get("median_ms") is not None:
        info["ratio_to_ref"] = info["median_ms"] / info["ref_ms"]
        info["pct_over_ref"] = 100.0 * (info["ratio_to_ref"] - 1.0)
    info.setdefault("device", device_name(bench_device()))
    clean = {k: _jsonable(v) for k, v in info.items()}
    if benchmark is not None:
        benchmark.extra_info.update(clean)
    RESULTS.append(clean)
    return clean


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def gpu_slug() -> str:
    """A directory name for bench/results/<gpu>/, e.g. ``nvidia-h100-80gb-hbm3``; ``cpu`` without CUDA."""
    if not has_cuda():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


# -- environment ----------------------------------------------------------------------------------


def _version(mod: str) -> str | None:
    try:
        module = __import__(mod)
    except Exception:  # an optional package that is missing or broken: report it as absent
        return None
    return getattr(module, "__version__", None)


def git_commit() -> dict[str, Any]:
    """HEAD and whether the tree is dirty; FASTADAPT_BENCH_COMMIT (and FASTADAPT_BENCH_DIRTY, 0 or 1) win: a
    device copy has no .git, and scripts/gpu-check.sh passes its stamp's commit."""
    forced = os.environ.get("FASTADAPT_BENCH_COMMIT")
    if forced:
        dirty = os.environ.get("FASTADAPT_BENCH_DIRTY", "").strip()
        return {"commit": forced, "dirty": bool(int(dirty)) if dirty in ("0", "1") else None,
                "source": "FASTADAPT_BENCH_COMMIT"}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return {"commit": head, "dirty": bool(status.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "source": "unavailable"}


def source_hash() -> str:
    """sha256 over fastadapt/ and kernels/ Python sources: identifies the code without git."""
    h = hashlib.sha256()
    for root in ("fastadapt", "kernels"):
        base = REPO / root
        if not base.exists():
            continue
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(REPO)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def environment() -> dict[str, Any]:
    """What a result depends on: GPU, versions, commit, date. Safe without CUDA."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda_runtime": torch.version.cuda,
        "git": git_commit(),
        "source_sha256_16": source_hash(),
        "FASTADAPT_BACKEND": os.environ.get("FASTADAPT_BACKEND"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "gpu": None,
    }
    if has_cuda():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "slug": gpu_slug(),
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
            "sm_count": int(props.multi_processor_count),
            "l2_bytes": l2_bytes(torch.device("cuda")),
            "count": torch.cuda.device_count(),
        }
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
            info["gpu"]["nvidia_smi"] = out.splitlines()[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["gpu"]["nvidia_smi"] = None
    return info


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"
