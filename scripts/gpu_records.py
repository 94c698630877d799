"""Turn one ``scripts/gpu-check.sh`` run into GPU verification records (fastadapt/ops/verification.py).

    python scripts/gpu_records.py --junit J.xml [J2.xml …] --bench B.json [B2.json …] --out verified.json

A record is written for an (op, backend, shape class) when
- its op-level test in ``tests/gpu/test_fused_ops_gpu.py`` passed for the variant, at every dropout
  it was run with (a skip or a missing result is not a pass),
- no kernel-level GPU test of that backend failed in the same run (``tests/gpu/test_cuda_kernels.py``
  for ``cuda``; the Triton kernels' and ops' GPU tests for ``triton``), and
- the benchmark measured it beside the torch path on the same cases (``speedup_over_torch`` is the
  geometric mean of torch time ÷ fused time over those cases).
For the LoRA ops the variant with the best speedup among the correct ones is recorded. ``auto`` then
uses a record only while it is faster than torch and its kernel hash is current.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from fastadapt.ops import verification

REPO = Path(__file__).resolve().parents[1]
CASE_TEST = re.compile(r"test_op_matches_float64\[(?P<op>\w+)-(?P<backend>\w+)-(?P<cls>\w+)-(?P<variant>\w+)-p[\d.]+\]")

#: bench suite -> (torch-path variant, {bench variant: (backend, join variant)}, mode per shape class)
BENCH = {
    "lora_linear": ("addmm", {"fastadapt": ("triton", "addmm"), "fastadapt_epilogue": ("triton", "epilogue"),
                              "fastadapt_fused": ("triton", "fused")}),
    "lora_linear_group": ("addmm", {"fastadapt_group": ("triton", "addmm")}),
    "dora_linear": ("addmm", {"fastadapt": ("triton", "addmm"), "fastadapt_fused": ("triton", "fused")}),
    "bottleneck_adapter": ("eager_bf16", {"triton": ("triton", "default"), "cuda": ("cuda", "default")}),
    # the parallel adapter joins its up-projection to the frozen GEMM like LoRA: the default join
    "parallel_adapter": ("eager_bf16", {"triton": ("triton", "addmm"), "cuda": ("cuda", "default")}),
    "lora_merge": ("torch", {"cuda": ("cuda", "default")}),
}
#: training shapes are judged on forward + backward, decode on the no-grad forward
MODE = {"batch": ("fwd_bwd",), "decode": ("decode",), "any": ("merge",)}


def _backend_of_test(classname: str) -> str | None:
    if "test_fused_ops_gpu" in classname:
        return None
    if "test_cuda_kernels" in classname:
        return "cuda"
    return "triton"


def read_junit(paths: list[Path]) -> tuple[dict[tuple, list[bool]], dict[str, list[str]]]:
    """({(op, backend, class, variant): [passed per dropout case]}, {backend: failed kernel-level tests})."""
    cases: dict[tuple, list[bool]] = defaultdict(list)
    failed: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        for tc in ET.parse(path).getroot().iter("testcase"):
            outcome = {child.tag for child in tc}
            bad = bool(outcome & {"failure", "error"})
            ok = not bad and "skipped" not in outcome
            m = CASE_TEST.fullmatch(tc.get("name", ""))
            if m:
                cases[(m["op"], m["backend"], m["cls"], m["variant"])].append(ok)
            elif bad:
                backend = _backend_of_test(tc.get("classname", ""))
                if backend:
                    failed[backend].append(f"{tc.get('classname')}::{tc.get('name')}")
    return cases, failed


def shape_class(suite: str, rows: int | None) -> str:
    """The record's shape class of a bench case: the dispatch's own rule (a merge has no rows)."""
    return "any" if suite == "lora_merge" else verification.shape_class(rows) or "batch"


def read_bench(paths: list[Path]) -> dict[tuple, list[float]]:
    """{(op, backend, class, variant): [torch ms / fused ms per measured case]}."""
    times: dict[tuple, float] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except ValueError:  # a step cut short may leave an empty file: what it measured is lost, say so
            print(f"gpu_records: {path} is not benchmark JSON (empty: its step was cut short?); skipped")
            continue
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("suite") in BENCH and info.get("median_ms"):
                times[(info["suite"], info.get("case"), info.get("mode"), info.get("variant"))] = (
                    float(info["median_ms"]), info.get("M"))
    ratios: dict[tuple, list[float]] = defaultdict(list)
    for (suite, case, mode, variant), (ms, rows) in times.items():
        torch_variant, fused = BENCH[suite]
        if variant not in fused:
            continue
        cls = shape_class(suite, rows)
        base = times.get((suite, case, mode, torch_variant))
        if base is None or mode not in MODE[cls]:
            continue
        backend, join = fused[variant]
        ratios[(suite, backend, cls, join)].append(base[0] / ms)
    return ratios


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def build_records(cases, failed, ratios, *, gpu: str, hashes: dict[str, str | None], meta: dict) -> list[dict]:
    best: dict[tuple, dict] = {}
    for (op, backend, cls, variant), outcomes in sorted(cases.items()):
        if not outcomes or not all(outcomes) or failed.get(backend) or not hashes.get(backend):
            continue
        measured = ratios.get((op, backend, cls, variant))
        if not measured:
            continue
        rec = {"gpu": gpu, "op": op, "backend": backend, "shape_class": cls,
               **({"variant": variant} if variant != "default" else {}),
               "kernel_hash": hashes[backend], "speedup_over_torch": round(geomean(measured), 4),
               "cases_measured": len(measured), **meta}
        key = (op, backend, cls)
        if key not in best or rec["speedup_over_torch"] > best[key]["speedup_over_torch"]:
            best[key] = rec
    return [best[k] for k in sorted(best)]


def _commit() -> str:
    if os.environ.get("FASTADAPT_BENCH_COMMIT"):
        return os.environ["FASTADAPT_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--junit", type=Path, nargs="+", required=True, help="pytest --junitxml files of the run")
    ap.add_argument("--bench", type=Path, nargs="*", default=[], help="pytest-benchmark JSON files of the run")
    ap.add_argument("--out", type=Path, required=True, help="where to write the records (JSON list)")
    args = ap.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("gpu_records: no CUDA device: records name a GPU, none written", file=sys.stderr)
        return 1
    junit = [p for p in args.junit if p.is_file()]
    bench = [p for p in args.bench if p.is_file()]
    cases, failed = read_junit(junit)
    ratios = read_bench(bench)
    meta = {"commit": _commit(), "date": datetime.date.today().isoformat(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
            "autotune": os.environ.get("FASTADAPT_AUTOTUNE", "1") not in ("0", "false", "no", "off")}
    hashes = {b: verification.kernel_hash(b) for b in ("triton", "cuda")}
    records = build_records(cases, failed, ratios, gpu=torch.cuda.get_device_name(0), hashes=hashes, meta=meta)
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    for backend, tests in failed.items():
        print(f"gpu_records: {backend}: {len(tests)} kernel-level GPU test(s) failed, no {backend} record: "
              + ", ".join(tests[:5]))
    print(f"gpu_records: {len(records)} records -> {args.out}")
    for r in records:
        print(f"  {r['op']:<20} {r['backend']:<7} {r['shape_class']:<7} {r.get('variant', ''):<9} "
              f"{r['speedup_over_torch']:.3f}x torch ({r['cases_measured']} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
