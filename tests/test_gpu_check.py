"""scripts/gpu-check.sh and its helpers without a GPU: the plan fits a lease by construction, every GPU
test belongs to one step and one set of ops, the bench selections name real cases, and records come
only from a clean, measured run of the stamped tree. tests/test_gpu_rehearsal.py runs the whole script.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastadapt.ops import verification

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"
HARD_TOTAL = 420


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_records = _module("gpu_records")
gpu_check = _module("gpu_check")


def _plan(*args: str) -> tuple[list[tuple[str, int]], str]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan", *args], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}).stdout
    rows = [(m[1], int(m[2])) for m in re.finditer(r"^([a-z0-9-]+) +(\d+)  ", out, re.M)]
    return rows, out


def test_plan_fits_the_lease_by_construction():
    rows, out = _plan()
    assert [name for name, _ in rows] == ["install", "build", "correct-lora", "bench-lora", "correct-rest",
                                          "bench-rest", "e2e", "report"]  # the most valuable first
    total = int(re.search(r"^total: (\d+) s", out, re.M).group(1))
    assert total == sum(cap for _, cap in rows) <= HARD_TOTAL
    assert "covers: " in out and "lora_linear (triton)" in out and "torch path" in out
    sanitized, out = _plan("--sanitizer")
    assert dict(sanitized)["sanitizer"] == 60 and sum(c for _, c in sanitized) == total + 60
    only, _ = _plan("--only", "bench-rest")  # prerequisites come along: install, and the build it needs
    assert [name for name, _ in only] == ["install", "build", "bench-rest"]


def test_bad_arguments_and_a_missing_stamp_are_refused(tmp_path):
    bad = subprocess.run(["bash", str(SCRIPT), "--only", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no step 'nonsense'" in bad.stderr
    if (REPO / "gpu-check-commit.json").exists():
        pytest.skip("this checkout has a stamp (it is about to be sent to a GPU)")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and "--stamp" in proc.stderr and not (tmp_path / "out").exists()


def test_without_a_gpu_it_says_so(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "scripts")
    (tmp_path / "gpu-check-commit.json").write_text(json.dumps({"commit": "0" * 40, "dirty": False}))
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu-check.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "gpu-check-out").exists()


# -- what the steps select --------------------------------------------------------------------------------


def _var(name: str) -> str:
    return re.search(rf'^{name}="(.+)"$', SCRIPT.read_text(), re.M).group(1)


def _collect(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_every_gpu_test_is_in_one_step_and_checks_known_ops():
    """The two correctness steps (and the sanitizer) partition the GPU tests, and TEST_OPS says which ops
    each one vouches for: a failure the map does not know would block every record."""
    everything = set(_collect("-m", "gpu", "tests/gpu", "tests/kernels", "tests/ops"))
    lora = set(_collect("-m", "gpu", *_var("CORRECT_LORA_FILES").split(), "-k", _var("CORRECT_LORA_K")))
    rest = set(_collect("-m", "gpu", *_var("CORRECT_REST_FILES").split(), "-k", _var("CORRECT_REST_K")))
    sanitizer = {t for t in everything if "compute_sanitizer" in t}
    assert not lora & rest and lora | rest | sanitizer == everything and sanitizer
    assert any("lora_linear-triton-batch-fused-p0.1" in t for t in lora)
    assert any("lora_merge-cuda-any" in t for t in rest)
    unknown = [t for t in everything if gpu_records.ops_of_test(t) is None]
    assert not unknown, f"add these to scripts/gpu_records.py::TEST_OPS: {unknown[:5]}"
    # no GPU test hides in another folder, where no step would run it
    stray = [p for p in (REPO / "tests").rglob("test_*.py") if p != Path(__file__)
             and "pytest.mark.gpu" in p.read_text() and p.parent.name not in ("gpu", "kernels", "ops")]
    assert not stray


def test_lora_bench_selection_covers_every_record_key():
    ids = _collect("bench/test_bench_lora_linear.py", "bench/test_bench_dora_linear.py", "-k", _var("LORA_SEL"))
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
    assert len(ids) < 160  # the step's cap assumes about this many cases
    qlora = _collect("bench/test_bench_lora_linear_4bit.py", "-k", _var("LORA_SEL"))  # run last in the step
    for shape in ("K4096xN4096", "K4096xN11008"):
        for variant in ("torch", "fastadapt_fused", "fastadapt_dequantize"):
            assert any(f"fwd_bwd-{shape}-M8192-" in i and i.endswith(f"-{variant}]") for i in qlora), (shape, variant)
            assert any(f"decode-{shape}-M1-" in i and i.endswith(f"-{variant}]") for i in qlora), (shape, variant)
    assert len(qlora) == 18


# -- records from a fabricated run ---------------------------------------------------------------------------

HARNESS = "tests/gpu/test_fused_ops_gpu.py::test_op_matches_float64"


def _case(op, backend, cls, variant, p):
    return f"{HARNESS}[{op}-{backend}-{cls}-{variant}-p{p}]"


def _passing(*keys) -> dict[str, str]:
    return {_case(*key, p): "passed" for key in keys for p in (0, 0.1)}


def _info(suite, case, mode, variant, rows, ms):
    return {"suite": suite, "case": case, "mode": mode, "variant": variant, "M": rows, "median_ms": ms}


def _build(outcomes: dict[str, str], infos: list[dict]) -> list[dict]:
    cases, blocked, unknown = gpu_records.verdicts(outcomes)
    return gpu_records.build_records(cases, blocked, gpu_records.ratios_of(infos), gpu="Fake GPU",
                                     hashes={"triton": "t1", "cuda": "c1"}, meta={"commit": "abc"}, unknown=unknown)


def _keys(records) -> set[tuple]:
    return {(r["op"], r["backend"], r["shape_class"]) for r in records}


LORA_ROWS = [
    _info("lora_linear", "K4096xN4096-M8192-r16-p0.1", "fwd_bwd", "addmm", 8192, 2.0),
    _info("lora_linear", "K4096xN4096-M8192-r16-p0.1", "fwd_bwd", "fastadapt", 8192, 1.6),
    _info("lora_linear", "K4096xN4096-M8192-r16-p0.1", "fwd_bwd", "fastadapt_fused", 8192, 1.25),
    _info("lora_linear", "K4096xN4096-M8192-r16-p0.1", "forward", "fastadapt_fused", 8192, 0.1),  # other mode
    _info("lora_linear", "K4096xN4096-M1-r16-p0", "decode", "addmm", 1, 0.05),
    _info("lora_linear", "K4096xN4096-M1-r16-p0", "decode", "fastadapt", 1, 0.04),
]
ADAPTER_ROWS = [
    _info("parallel_adapter", "parallel M=8192", "fwd_bwd", "eager_bf16", 8192, 2.0),
    _info("parallel_adapter", "parallel M=8192", "fwd_bwd", "triton", 8192, 1.0),
    _info("parallel_adapter", "parallel M=8192", "fwd_bwd", "cuda", 8192, 0.8),
    _info("bottleneck_adapter", "series M=8192", "fwd_bwd", "eager_bf16", 8192, 3.0),
    _info("bottleneck_adapter", "series M=8192", "fwd_bwd", "triton", 8192, 1.0),
    _info("lora_merge", "W 4096x4096 r=16", "merge", "torch", 4096, 1.0),
    _info("lora_merge", "W 4096x4096 r=16", "merge", "cuda", 4096, 0.25),
]
ALL_PASSING = _passing(("lora_linear", "triton", "batch", "fused"), ("parallel_adapter", "triton", "batch", "addmm"),
                       ("parallel_adapter", "cuda", "batch", "default"),
                       ("bottleneck_adapter", "triton", "batch", "default")) | {
    _case("lora_merge", "cuda", "any", "default", 0): "passed"}
ALL_KEYS = {("lora_linear", "triton", "batch"), ("parallel_adapter", "triton", "batch"),
            ("parallel_adapter", "cuda", "batch"), ("bottleneck_adapter", "triton", "batch"),
            ("lora_merge", "cuda", "any")}


def test_records_need_every_dropout_case_and_a_measurement():
    outcomes = _passing(("lora_linear", "triton", "batch", "addmm"), ("lora_linear", "triton", "batch", "fused"))
    outcomes[_case("lora_linear", "triton", "batch", "epilogue", 0)] = "passed"
    outcomes[_case("lora_linear", "triton", "batch", "epilogue", 0.1)] = "failed"  # epilogue: not correct
    outcomes[_case("lora_linear", "triton", "decode", "addmm", 0)] = "passed"
    outcomes[_case("lora_linear", "triton", "decode", "addmm", 0.1)] = "skipped"  # a skip is not a pass
    records = _build(outcomes, LORA_ROWS)
    assert [(r["op"], r["shape_class"], r["variant"]) for r in records] == [("lora_linear", "batch", "fused")]
    rec = records[0]
    assert rec["speedup_over_torch"] == pytest.approx(2.0 / 1.25) and rec["kernel_hash"] == "t1"
    assert rec["gpu"] == "Fake GPU" and rec["commit"] == "abc" and rec["cases_measured"] == 1
    assert _keys(_build(ALL_PASSING, LORA_ROWS + ADAPTER_ROWS)) == ALL_KEYS


@pytest.mark.parametrize("failing,lost", [
    # a CUDA-backend failure never blocks a Triton op...
    ("tests/ops/test_bottleneck_adapter.py::test_gpu_real_shapes_bf16[cuda-2048]",
     {("parallel_adapter", "cuda", "batch")}),
    ("tests/gpu/test_cuda_kernels.py::test_merge_flags_nan_and_overflow", {("lora_merge", "cuda", "any")}),
    ("tests/gpu/test_cuda_kernels.py", {("parallel_adapter", "cuda", "batch"), ("lora_merge", "cuda", "any")}),
    # ...nor the other way round, and one op's failure never blocks another's
    ("tests/ops/test_bottleneck_adapter.py::test_gpu_real_shapes_bf16[triton-fused]",
     {("parallel_adapter", "triton", "batch"), ("bottleneck_adapter", "triton", "batch")}),
    ("tests/ops/test_dora_linear.py::test_gpu_real_shapes_bf16[0.1-4096-4096]", set()),
    ("tests/gpu/test_triton_adapters.py::test_series_triton_backward_memory_is_bounded[2048]",
     {("bottleneck_adapter", "triton", "batch")}),
    ("tests/kernels/test_bottleneck_adapter_kernels.py", {("bottleneck_adapter", "triton", "batch")}),  # no collection
    # the shared LoRA kernels block every op built on them
    ("tests/kernels/test_lora_linear_kernels.py::test_gpu_real_shapes[1-bf16]",
     {("lora_linear", "triton", "batch"), ("parallel_adapter", "triton", "batch")}),
    # a failure no row of the map knows could be any op's; a failed benchmark only measured nothing
    ("tests/gpu/test_new_thing.py::test_x", ALL_KEYS),
    ("bench/test_bench_lora_linear.py::test_lora_linear_group[fwd_bwd-qkv-M8192-r16-p0-fastadapt_group]", set()),
])
def test_a_failing_test_blocks_exactly_the_ops_it_checks(failing, lost):
    records = _build(ALL_PASSING | {failing: "failed"}, LORA_ROWS + ADAPTER_ROWS)
    assert _keys(records) == ALL_KEYS - lost


def test_a_key_whose_run_stopped_after_its_first_dropout_gets_no_record():
    """A step cut short (or a --resume) may leave only the p0 case of a key: p0.1 never ran, so the
    dropout path is unverified and no record may say otherwise."""
    outcomes = _passing(("lora_linear", "triton", "batch", "addmm"))
    outcomes[_case("lora_linear", "triton", "batch", "fused", 0)] = "passed"  # its p0.1 never ran
    assert [r.get("variant") for r in _build(outcomes, LORA_ROWS)] == ["addmm"]
    expected = gpu_records.harness_dropouts()
    assert expected[("lora_linear", "triton", "batch", "fused")] == {"0", "0.1"}
    assert expected[("lora_merge", "cuda", "any", "default")] == {"0"}


def test_the_harness_case_of_one_variant_blocks_that_variant_only():
    outcomes = _passing(("lora_linear", "triton", "batch", "addmm"), ("lora_linear", "triton", "batch", "fused"))
    outcomes[_case("lora_linear", "triton", "batch", "fused", 0.1)] = "failed"
    records = _build(outcomes, LORA_ROWS)
    assert [(r["shape_class"], r["variant"]) for r in records] == [("batch", "addmm")]


def test_results_junit_and_benchmark_json_are_read_alike(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [{"step": "correct-lora", "nodeid": _case("lora_linear", "triton", "batch", "fused", p), "outcome": "passed",
             "bench": None} for p in (0, 0.1)]
    rows += [{"step": "bench-lora", "nodeid": f"bench/x.py::t[{i}]", "outcome": "passed", "bench": info}
             for i, info in enumerate(LORA_ROWS)]
    rows += [{"event": "step", "step": "bench-lora", "status": "ok", "seconds": 3}]
    results.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": "bench-lora", "nodeid": "cut sh')
    outcomes, infos = gpu_records.read_results([results])
    assert len(outcomes) == 8 and infos == LORA_ROWS
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.ops.test_dora_linear" name="test_a[1]">'
                     '<failure message="x"/></testcase></testsuite></testsuites>')
    assert gpu_records.read_junit([junit]) == {"tests/ops/test_dora_linear.py::test_a[1]": "failed"}
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": [{"extra_info": i} for i in LORA_ROWS]}))
    assert gpu_records.read_bench([bench]) == LORA_ROWS


def test_written_records_load_and_decide(tmp_path, monkeypatch):
    """What gpu_records writes is what verification reads, and decides on."""
    import torch

    records = _build(ALL_PASSING, LORA_ROWS + ADAPTER_ROWS)
    path = tmp_path / "verified.json"
    path.write_text(json.dumps(records))
    assert verification.load_records(path) == records
    monkeypatch.setattr(verification, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(verification, "kernel_hash", lambda backend: {"triton": "t1", "cuda": "c1"}[backend])
    verdict = verification._find(records, "lora_linear", "triton", torch.device("cuda"), "batch")
    assert verdict.verified and verdict.record["variant"] == "fused"
    monkeypatch.setattr(verification, "kernel_hash", lambda backend: "edited")
    assert "changed" in verification._find(records, "lora_linear", "triton", torch.device("cuda"), "batch").reason
    rows = verification.DECODE_MAX_ROWS
    assert [gpu_records.shape_class("lora_linear", m) for m in (1, rows, rows + 1)] == ["decode", "decode", "batch"]


def test_an_op_the_run_does_not_cover_stays_on_the_torch_path(tmp_path, monkeypatch):
    """A fused op registered without a harness case and a benchmark here (a kernel added later) is named
    as not covered, gets no record even from a run that reports it passing and measured, and ``auto``
    keeps it on the torch path while the covered ops beside it get their fused backend."""
    import torch

    from fastadapt.ops import dispatch

    registered = {(op, b) for op, available in dispatch.OPS.items() for b in available}
    mixed = [("bottleneck_mixed", "triton"), ("lora_mixed", "triton")]  # issue 27's: no GPU harness case yet
    assert set(gpu_records.covers()) == registered - set(mixed) and gpu_records.not_covered() == mixed
    monkeypatch.setitem(dispatch.OPS, "new_op", {"triton": lambda device: True})
    assert gpu_records.not_covered() == sorted([*mixed, ("new_op", "triton")])
    forged = _passing(("new_op", "triton", "batch", "default"))
    infos = [_info("new_op", "K4096xN4096-M8192", "fwd_bwd", v, 8192, ms)
             for v, ms in (("addmm", 2.0), ("torch", 2.0), ("triton", 1.0), ("fastadapt", 1.0))]
    records = _build(ALL_PASSING | forged, LORA_ROWS + ADAPTER_ROWS + infos)
    assert _keys(records) == ALL_KEYS
    path = tmp_path / "verified.json"
    path.write_text(json.dumps(records))
    monkeypatch.setenv("FASTADAPT_VERIFIED", str(path))
    monkeypatch.setattr(verification, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(verification, "kernel_hash", lambda backend: {"triton": "t1", "cuda": "c1"}[backend])
    for op, want in (("lora_linear", "triton"), ("new_op", "torch")):  # a new FASTADAPT_VERIFIED: re-read
        decision = dispatch.decide(op, "auto", torch.device("cuda"), available=dispatch.OPS[op], rows=8192)
        assert decision.backend == want, (op, decision.reason)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_records.py"), "covers"], capture_output=True,
                         text=True, check=True).stdout
    assert "lora_linear_4bit (triton)" in out.split("not covered")[0]
    assert out.rstrip().endswith(": bottleneck_mixed (triton); lora_mixed (triton)")


def test_every_fused_bench_variant_can_meet_its_correctness_case():
    """Each (suite, bench variant) maps to a key the GPU harness has a case for, else no record
    could ever be written for it."""
    sys.path.insert(0, str(REPO / "tests" / "gpu"))
    import test_fused_ops_gpu as harness

    keys = {(c.op, c.backend, c.variant) for c in harness.cases()}
    for suite, (_, fused) in gpu_records.BENCH.items():
        for backend, join in fused.values():
            assert (suite, backend, join) in keys, (suite, backend, join)
    assert {(c.op, c.backend) for c in harness.cases()} == set(gpu_records.covers())


# -- the stamp ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="the stamp needs a git checkout")
def test_the_stamp_names_this_commit_and_refuses_a_changed_tree(tmp_path, monkeypatch):
    path = tmp_path / "gpu-check-commit.json"
    data = gpu_records.stamp(path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert data["commit"] == head and gpu_records.read_stamp(path) == data
    assert data["kernel_hash"] == {b: verification.kernel_hash(b) for b in ("triton", "cuda")}
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    assert data["dirty"] == any(not line.endswith("gpu-check-commit.json") for line in dirty.splitlines())
    edited = dict(data, kernel_hash={"triton": "0" * 16, "cuda": data["kernel_hash"]["cuda"]})
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="the kernels changed since"):
        gpu_records.read_stamp(path)
    path.write_text(json.dumps(dict(data, tree_digest="0" * 16)))  # any file edited after stamping
    with pytest.raises(ValueError, match="not the ones stamped"):
        gpu_records.read_stamp(path)
    path.write_text(json.dumps(dict(data, files=[*data["files"], "gone.py"])))
    with pytest.raises(ValueError, match="gone.py"):
        gpu_records.read_stamp(path)
    assert "scripts/gpu-check.sh" in data["files"] and path.name not in data["files"]
    path.write_text(json.dumps(dict(data, commit="unknown")))
    with pytest.raises(ValueError, match="40-hex"):
        gpu_records.read_stamp(path)
    with pytest.raises(ValueError, match="--stamp"):
        gpu_records.read_stamp(tmp_path / "missing.json")


# -- the step's benchmark file ----------------------------------------------------------------------------


def test_merge_bench_keeps_everything_a_step_finished(tmp_path):
    results, out, new = tmp_path / "results.jsonl", tmp_path / "bench-lora.json", tmp_path / "pytest.json"
    line = lambda n, outcome="passed": {"step": "bench-lora", "nodeid": f"bench/t.py::c[{n}]", "outcome": outcome,
                                        "bench": {"suite": "s", "case": str(n)}}  # noqa: E731
    results.write_text("\n".join(json.dumps(r) for r in (line(1), line(2), line(3, "failed"))) + "\n")
    data = gpu_check.merge_bench("bench-lora", results, None, out)  # SIGKILL: pytest wrote no JSON
    assert [b["fullname"] for b in data["benchmarks"]] == ["bench/t.py::c[1]", "bench/t.py::c[2]"]
    assert all(b["stats"] is None and b["extra_info"]["suite"] == "s" for b in data["benchmarks"])
    # a --resume run: its pytest JSON has the new case with its statistics; the earlier ones stay
    with results.open("a") as f:
        f.write(json.dumps(line(4)) + "\n")
    new.write_text(json.dumps({"fastadapt": {"gpu": "g"}, "benchmarks": [
        {"fullname": "bench/t.py::c[4]", "stats": {"median": 1e-3}, "extra_info": {"suite": "s", "case": "4"}}]}))
    data = gpu_check.merge_bench("bench-lora", results, new, out)
    assert [b["fullname"] for b in data["benchmarks"]] == [f"bench/t.py::c[{n}]" for n in (1, 2, 4)]
    assert data["benchmarks"][-1]["stats"] == {"median": 1e-3} and data["fastadapt"] == {"gpu": "g"}


def test_merge_bench_keeps_only_the_stamped_trees_measurements(tmp_path, monkeypatch):
    """A --resume after the code changed (another stamp): the old tree's lines and its JSON entries
    are not this tree's timings; only what this tree's run measured is merged."""
    results, out = tmp_path / "results.jsonl", tmp_path / "bench-lora.json"
    rows = [{"step": "bench-lora", "nodeid": f"bench/t.py::c[{n}]", "outcome": "passed", "tree": tree,
             "bench": {"suite": "s", "case": str(n), "median_ms": ms}} for n, tree, ms in
            ((1, "old", 1.0), (2, "old", 2.0), (2, "new", 2.5))]
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out.write_text(json.dumps({"benchmarks": [  # the old tree's run wrote its JSON
        {"fullname": f"bench/t.py::c[{n}]", "stats": {"median": ms}, "extra_info": {"median_ms": ms}}
        for n, ms in ((1, 1.0), (2, 2.0))]}))
    monkeypatch.setenv("GPU_CHECK_TREE", "new")
    data = gpu_check.merge_bench("bench-lora", results, None, out)
    assert [(b["fullname"], b["stats"], b["extra_info"]["median_ms"]) for b in data["benchmarks"]] == [
        ("bench/t.py::c[2]", None, 2.5)]


def test_the_plugin_streams_each_test_and_resumes(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(benchmark):\n    benchmark.extra_info['suite'] = 's'\n    benchmark(lambda: None)\n"
        "def test_bad():\n    assert False\n"
        "def test_skip():\n    pytest.skip('no')\n")
    (tmp_path / "test_broken.py").write_text("raise ImportError('x')\n")
    results = tmp_path / "r.jsonl"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_check_plugin",
            "--continue-on-collection-errors", "--gpu-check-results", str(results), "--gpu-check-step", "s",
            str(tmp_path)]
    env = {"PYTHONPATH": str(REPO / "scripts"), "PATH": "/usr/bin:/bin", "GPU_CHECK_TREE": "tree1"}
    subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    rows = {r["nodeid"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert {n: r["outcome"] for n, r in rows.items()} == {
        "test_broken.py": "failed", "test_x.py::test_ok": "passed", "test_x.py::test_bad": "failed",
        "test_x.py::test_skip": "skipped"}
    assert rows["test_x.py::test_ok"]["bench"]["suite"] == "s" and "ImportError" in rows["test_broken.py"]["message"]
    again = subprocess.run([*args, "--gpu-check-skip-done"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert "3 deselected" in again.stdout and len(results.read_text().splitlines()) == 5  # only the broken module again
    # a resume of another tree (the code changed since) counts none of those lines: everything runs again,
    # and the records of each tree read only its own lines
    other = subprocess.run([*args, "--gpu-check-skip-done"], cwd=tmp_path, env={**env, "GPU_CHECK_TREE": "tree2"},
                           capture_output=True, text=True, timeout=120)
    assert "deselected" not in other.stdout and len(results.read_text().splitlines()) == 9
    for tree, n in (("tree1", 4), ("tree2", 4), ("tree3", 0)):
        outcomes, infos = gpu_records.read_results([results], tree=tree)
        assert len(outcomes) == n and len(infos) == min(n, 1)
