"""pytest configuration of the benchmark suite (``pytest bench/``): see bench/README.md.

- Without CUDA every ``gpu`` case is skipped and the ``smoke`` cases run on CPU tensors (Triton
  kernels in the interpreter). With CUDA the ``gpu`` cases run and ``smoke`` is skipped unless
  ``--bench-smoke``.
- Cases marked ``full`` (the rest of the issue's sweep) are deselected unless ``--bench-full``
  or an explicit ``-m`` expression is given.
- ``--benchmark-json`` output gets a top-level ``fastadapt`` block (GPU, torch/triton/CUDA
  versions, commit, date) and the same block in ``machine_info``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Must happen before any Triton kernel is decorated, i.e. before fastadapt's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import benchlib  # noqa: E402

_ENV: dict | None = None


def _environment() -> dict:
    global _ENV
    if _ENV is None:
        _ENV = benchlib.environment()
    return _ENV


def pytest_addoption(parser):
    group = parser.getgroup("fastadapt-bench")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="run the whole sweep (cases marked `full`), not only the default subset")
    group.addoption("--bench-smoke", action="store_true", default=False,
                    help="also run the tiny `smoke` cases on a CUDA machine")


def pytest_configure(config):
    for line in (
        "gpu: needs a CUDA device (skipped without one)",
        "full: part of the complete sweep, deselected unless --bench-full or -m selects it",
        "smoke: tiny CPU version that proves the benchmark code runs (skipped on CUDA without --bench-smoke)",
        "e2e: end-to-end training-step benchmark",
        "memory: bytes saved for backward (test_bench_saved_memory.py; -m memory runs the embedded model)",
        "mixed: mixed-batch generation (issue 27; minutes of CPU time, marked full too)",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    if not config.getoption("--bench-full") and not config.option.markexpr:
        keep, drop = [], []
        for item in items:
            (drop if item.get_closest_marker("full") else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU benchmark)")
    skip_smoke = pytest.mark.skip(reason="smoke case: CUDA present, pass --bench-smoke to run it")
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("smoke") and has_cuda and not config.getoption("--bench-smoke"):
            item.add_marker(skip_smoke)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastadapt"] = _environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastadapt"] = _environment()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A short table last (the device reply carries only the end of the output)."""
    rows = benchlib.RESULTS
    if not rows:
        return
    tr = terminalreporter
    env = _environment()
    tr.section("fastadapt bench summary")
    gpu = (env.get("gpu") or {}).get("name", "no GPU (CPU)")
    tr.write_line(f"{gpu} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda_runtime']} | "
                  f"commit {env['git']['commit']} | {env['date_utc']}")
    kernel = [r for r in rows if r.get("suite") in ("lora_linear", "lora_linear_group")]
    if kernel:
        # the issue-4 target points first, then everything else's count
        focus = [r for r in kernel if r.get("M") in (1, 16, 8192) and r.get("r") == 16 and r.get("mode") == "fwd_bwd"]
        tr.write_line(f"{len(kernel)} kernel records; fwd_bwd at r=16, M in (1, 16, 8192):")
        tr.write_line(f"{'case':36s} {'mode':8s} {'variant':16s} {'median ms':>10s} {'x frozen':>9s} {'peak':>10s}")
        for r in focus or kernel[:40]:
            ratio = r.get("ratio_to_ref")
            tr.write_line(
                f"{r.get('case', '')[:36]:36s} {r.get('mode', '')[:8]:8s} {r.get('variant', '')[:16]:16s} "
                f"{r.get('median_ms', 0):10.4f} "
                f"{(f'{ratio:.3f}' if ratio else '-'):>9s} {benchlib.fmt_bytes(r.get('peak_mem_bytes')):>10s}"
            )
    e2e = [r for r in rows if r.get("suite") == "e2e"]
    if e2e:
        tr.write_line(f"{'e2e case':44s} {'variant':16s} {'tokens/s':>10s} {'x frozen':>9s} {'peak':>10s}")
        for r in e2e:
            ratio = r.get("ratio_to_ref")
            tr.write_line(
                f"{r.get('case', '')[:44]:44s} {r.get('variant', '')[:16]:16s} {r.get('tokens_per_s', 0):10.0f} "
                f"{(f'{ratio:.3f}' if ratio else '-'):>9s} {benchlib.fmt_bytes(r.get('peak_mem_bytes')):>10s}"
            )
    for r in (r for r in rows if r.get("suite") == "decode_host"):
        us = r.get("host_us") or {}
        tr.write_line(f"decode host time (M=1, no grad): fastadapt {us.get('fastadapt', 0):.1f} µs, hand-written "
                      f"{us.get('hand', 0):.1f} µs ({r.get('ratio_to_hand', 0):.2f}×), "
                      f"F.linear {us.get('frozen', 0):.1f} µs")
    memory = [r for r in rows if r.get("suite") == "saved_memory"]
    if memory:
        tr.write_line(f"{'saved for backward: case':40s} {'variant':26s} {'saved +MiB':>10s} {'×PEFT':>6s} "
                      f"{'held +MiB':>10s} {'×PEFT':>6s}  goal")
        for r in memory:
            ratios = [r.get(f"{c}_ratio_to_peft") for c in ("saved", "held")]
            met = [r.get(f"goal_{c}_met") for c in ("saved", "held")]
            goal = "" if met == [None, None] else ("met" if all(m is not False for m in met) else "MISSED")
            tr.write_line(
                f"{r.get('case', '')[-40:]:40s} {r.get('variant', '')[:26]:26s} {r.get('saved_extra_mib', 0):10.1f} "
                f"{'-' if ratios[0] is None else f'{ratios[0]:.3f}':>6s} {r.get('held_extra_mib', 0):10.1f} "
                f"{'-' if ratios[1] is None else f'{ratios[1]:.3f}':>6s}  {goal}"
            )
    other = [r for r in rows if r.get("suite") not in ("lora_linear", "lora_linear_group", "e2e", "decode_host",
                                                         "saved_memory")]
    if other:
        tr.write_line(f"{len(other)} other records (suites: {sorted({str(r.get('suite')) for r in other})})")
