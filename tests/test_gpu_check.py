"""scripts/gpu-check.sh and scripts/gpu_records.py without a GPU: the plan fits a lease, the bench
selections name real cases, and records come only from a clean, measured run."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastadapt.ops import verification

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def _records_module():
    spec = importlib.util.spec_from_file_location("gpu_records", REPO / "scripts" / "gpu_records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_records = _records_module()


def test_plan_fits_the_lease():
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines()[1:] if re.match(r"^[a-z0-9-]+ +\d+ +\d+ ", line)]
    assert {r[0] for r in rows} >= {"install", "build", "correctness", "bench-lora", "records"}
    assert all(int(est) <= int(limit) for _, est, limit, *_ in rows)
    total = int(re.search(r"^total: (\d+) s$", out, re.M).group(1))
    assert total == sum(int(r[1]) for r in rows) and total <= 480


def test_without_a_gpu_it_says_so():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr
    assert not (REPO / "gpu-check-out").exists()


def _selection(name: str) -> str:
    return re.search(rf'^{name}="(.+)"$', SCRIPT.read_text(), re.M).group(1)


def _collect(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_lora_bench_selection_covers_every_record_key():
    ids = _collect("bench/test_bench_lora_linear.py", "bench/test_bench_dora_linear.py", "-k", _selection("LORA_SEL"))
    for shape in ("K4096xN4096", "K4096xN11008", "K11008xN4096"):
        for variant in ("frozen", "addmm", "fastadapt", "fastadapt_epilogue", "fastadapt_fused", "peft_default"):
            assert any(f"fwd_bwd-{shape}-M8192" in i and i.endswith(f"-{variant}]") for i in ids), (shape, variant)
            assert any(f"decode-{shape}-M1-" in i and i.endswith(f"-{variant}]") for i in ids), (shape, variant)
    assert any("fwd_bwd-qkv-M8192" in i and "fastadapt_group" in i for i in ids)
    dora = [i for i in ids if "test_dora_linear" in i]
    assert any("fwd_bwd-K4096xN4096-M8192-r16-p0.1-fastadapt_fused" in i for i in dora)
    assert any("decode-K4096xN4096-M16-r16-p0-peft_default" in i for i in dora)
    assert not any("K4096xN11008" in i for i in dora)
    assert not any("M4096-" in i or "M16384" in i or "-r8-" in i or "-r64-" in i for i in ids)
    assert len(ids) < 160  # the step's estimate assumes about this many cases


# -- records from a fabricated run --------------------------------------------------------------------


def _junit(tmp_path, results: dict[str, str]) -> Path:
    cases = []
    for name, outcome in results.items():
        classname, test = name.split("::")
        inner = {"pass": "", "fail": "<failure message='x'/>", "skip": "<skipped message='x'/>"}[outcome]
        cases.append(f'<testcase classname="{classname}" name="{test}">{inner}</testcase>')
    path = tmp_path / "junit.xml"
    path.write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    return path


def _bench(tmp_path, rows: list[tuple]) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": [
        {"extra_info": {"suite": s, "case": c, "mode": m, "variant": v, "M": rows_, "median_ms": ms}}
        for s, c, m, v, rows_, ms in rows]}))
    return path


OPS_TEST = "tests.gpu.test_fused_ops_gpu"


def _case(op, backend, cls, variant, p):
    return f"{OPS_TEST}::test_op_matches_float64[{op}-{backend}-{cls}-{variant}-p{p}]"


def _build(tmp_path, results, rows):
    cases, failed = gpu_records.read_junit([_junit(tmp_path, results)])
    ratios = gpu_records.read_bench([_bench(tmp_path, rows)])
    return gpu_records.build_records(cases, failed, ratios, gpu="Fake GPU", hashes={"triton": "t1", "cuda": "c1"},
                                     meta={"commit": "abc"})


LORA_ROWS = [
    ("lora_linear", "K4096xN4096-M8192-r16-p0.1", "fwd_bwd", "addmm", 8192, 2.0),
    ("lora_linear", "K4096xN4096-M8192-r16-p0.1", "fwd_bwd", "fastadapt", 8192, 1.6),
    ("lora_linear", "K4096xN4096-M8192-r16-p0.1", "fwd_bwd", "fastadapt_fused", 8192, 1.25),
    ("lora_linear", "K4096xN4096-M8192-r16-p0.1", "forward", "fastadapt_fused", 8192, 0.1),  # other mode
    ("lora_linear", "K4096xN4096-M1-r16-p0", "decode", "addmm", 1, 0.05),
    ("lora_linear", "K4096xN4096-M1-r16-p0", "decode", "fastadapt", 1, 0.04),
]


def test_records_need_every_dropout_case_and_a_measurement(tmp_path):
    results = {_case("lora_linear", "triton", "batch", v, p): "pass" for v in ("addmm", "fused") for p in (0, 0.1)}
    results[_case("lora_linear", "triton", "batch", "epilogue", 0)] = "pass"
    results[_case("lora_linear", "triton", "batch", "epilogue", 0.1)] = "fail"  # epilogue: not correct
    results[_case("lora_linear", "triton", "decode", "addmm", 0)] = "pass"
    results[_case("lora_linear", "triton", "decode", "addmm", 0.1)] = "skip"  # a skip is not a pass
    records = _build(tmp_path, results, LORA_ROWS)
    assert [(r["op"], r["shape_class"], r["variant"]) for r in records] == [("lora_linear", "batch", "fused")]
    rec = records[0]
    assert rec["speedup_over_torch"] == pytest.approx(2.0 / 1.25) and rec["kernel_hash"] == "t1"
    assert rec["gpu"] == "Fake GPU" and rec["commit"] == "abc" and rec["cases_measured"] == 1


def test_a_failed_kernel_test_blocks_its_backend_only(tmp_path):
    results = {_case("lora_linear", "triton", "batch", "fused", p): "pass" for p in (0, 0.1)}
    results |= {_case("lora_merge", "cuda", "any", "default", 0): "pass",
                "tests.kernels.test_lora_linear_kernels::test_gpu_real_shapes[1-bf16]": "fail"}
    rows = [*LORA_ROWS, ("lora_merge", "W 4096x4096 r=16", "merge", "torch", 4096, 1.0),
            ("lora_merge", "W 4096x4096 r=16", "merge", "cuda", 4096, 0.25)]
    records = _build(tmp_path, results, rows)
    assert [(r["op"], r["backend"], r["shape_class"]) for r in records] == [("lora_merge", "cuda", "any")]
    assert "variant" not in records[0] and records[0]["speedup_over_torch"] == pytest.approx(4.0)


def test_written_records_load_and_decide(tmp_path, monkeypatch):
    """What gpu_records writes is what verification reads."""
    results = {_case("lora_linear", "triton", "batch", "fused", p): "pass" for p in (0, 0.1)}
    records = _build(tmp_path, results, LORA_ROWS)
    path = tmp_path / "verified.json"
    path.write_text(json.dumps(records))
    assert verification.load_records(path) == records
    rows = verification.DECODE_MAX_ROWS
    assert [gpu_records.shape_class("lora_linear", m) for m in (1, rows, rows + 1)] == ["decode", "decode", "batch"]


def test_every_fused_bench_variant_can_meet_its_correctness_case():
    """Each (suite, bench variant) maps to a key the GPU harness has a case for, else no record
    could ever be written for it."""
    sys.path.insert(0, str(REPO / "tests" / "gpu"))
    import test_fused_ops_gpu as harness

    keys = {(c.op, c.backend, c.variant) for c in harness.cases()}
    for suite, (_, fused) in gpu_records.BENCH.items():
        for backend, join in fused.values():
            assert (suite, backend, join) in keys, (suite, backend, join)


def test_parallel_and_series_records(tmp_path):
    results = {_case("parallel_adapter", "triton", "batch", "addmm", p): "pass" for p in (0, 0.1)}
    results |= {_case("bottleneck_adapter", "triton", "batch", "default", p): "pass" for p in (0, 0.1)}
    rows = [("parallel_adapter", "parallel M=8192", "fwd_bwd", "eager_bf16", 8192, 2.0),
            ("parallel_adapter", "parallel M=8192", "fwd_bwd", "triton", 8192, 1.0),
            ("bottleneck_adapter", "series M=8192", "fwd_bwd", "eager_bf16", 8192, 3.0),
            ("bottleneck_adapter", "series M=8192", "fwd_bwd", "triton", 8192, 1.0)]
    records = {r["op"]: r for r in _build(tmp_path, results, rows)}
    assert records["parallel_adapter"]["variant"] == "addmm" and records["parallel_adapter"]["speedup_over_torch"] == 2
    assert "variant" not in records["bottleneck_adapter"] and records["bottleneck_adapter"]["speedup_over_torch"] == 3
