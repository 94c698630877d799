"""The CPU rehearsal of ``scripts/gpu-check.sh``: the whole script, end to end, on a copy of the tree as
the GPU machine receives it (tracked and untracked-not-ignored files, no ``.git``), with only the GPU's
*execution* faked (``tests/fake_gpu/sitecustomize.py``: torch.cuda reports a Hopper GPU, cuda tensors
live on the CPU, the Triton kernels run in the interpreter, the cases at ``FASTADAPT_TINY_SHAPES``).
Everything else is real: the stamp written by the helper, the offline install (``python3 -m pip
--no-index --no-build-isolation``, with every index and proxy unreachable), the failing CUDA build, the
steps' pytest runs and their streamed results, ``gpu_records.py`` on those files, the report.

Planted faults (``tests/fake_gpu/fake_gpu_faults.py``; the tree itself is the stamped one) must each
cost exactly what they break: a wrong ``lora_linear_group`` blocks that op only (not lora_linear, on
the same kernels); a test module that fails to collect (``tests/ops/test_dora_linear.py``) blocks
dora_linear only and cancels no other test of its step; the failed CUDA build blocks the CUDA backend
only; a benchmark stuck with SIGINT blocked (a series-adapter case) gets its step stopped at its cap by
SIGKILL, and the records are still written from what that step finished (the series adapter's cases
before it). A ``--resume`` run then finishes only what was left, and the parallel adapter's record joins.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastadapt.ops import verification

REPO = Path(__file__).resolve().parents[1]


def _fake_gpu_name() -> str:
    """The fake device's name, from the module that fakes it (loaded by path: it is no module of ours)."""
    spec = importlib.util.spec_from_file_location("fake_gpu_sitecustomize", REPO / "tests" / "fake_gpu" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # patches nothing without FASTADAPT_FAKE_GPU=1
    return module.NAME


NAME = _fake_gpu_name()

pytestmark = pytest.mark.slow

#: Every step finishes its tiny cases well inside these caps on a loaded 2-core machine, but bench-rest,
#: whose sixth case hangs: it is stopped at 40 s (SIGINT at 25 s: 40 - 12 kept for the records - 3 of
#: grace, ignored; SIGKILL at 28 s). Its first five cases take ~10 s of a 2-core machine.
CAPS = "install=120,build=120,correct-lora=400,bench-lora=400,correct-rest=300,bench-rest=40,e2e=200,report=200"
HANG = "test_bench_series[8192-4096-256-triton-fwd+bwd-p0.1]"
EXPECTED_RECORDS = {  # what the tiny run can vouch for, given the planted faults
    ("lora_linear", "triton", "batch"), ("lora_linear", "triton", "decode"),
    ("lora_linear_4bit", "triton", "batch"), ("lora_linear_4bit", "triton", "decode"),  # QLoRA joined the run
    ("bottleneck_adapter", "triton", "batch"),  # from the cases bench-rest finished before it was stopped
}
AFTER_RESUME = EXPECTED_RECORDS | {("parallel_adapter", "triton", "batch")}
OUT_FILES = {"gpu-check.log", "results.jsonl", "bench-lora.json", "bench-rest.json", "bench-e2e.json",
             "verified-nvidia-rehearsal.json", "report.md"}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def _copy_tree(dest: Path) -> None:
    """What the device tool sends: tracked and untracked-not-ignored files, without .git."""
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file() and name != "gpu-check-commit.json":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _venv(path: Path) -> Path:
    """A fresh interpreter called python3 that sees this one's packages but none of its .pth files —
    so the offline install of the copy is the only fastadapt it can import."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = subprocess.run([str(path / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    Path(purelib, "zz_rehearsal_parent.pth").write_text("\n".join(ours) + "\n")
    return path / "bin"


def _rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _status(rows: list[dict]) -> dict[str, str]:
    return {r["step"]: r["status"] for r in rows if r.get("event") == "step"}


def _tests(rows: list[dict], step: str) -> dict[str, dict]:
    return {r["nodeid"]: r for r in rows if r.get("step") == step and r.get("nodeid")}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout (the stamp names its commit)")
    base = tmp_path_factory.mktemp("rehearsal")
    tree, out = base / "tree", base / "out"
    tree.mkdir()
    head = _git("rev-parse", "HEAD").strip()  # what the copy is (HEAD may move while the rehearsal runs)
    _copy_tree(tree)
    # the helper writes the stamp on the dev machine (git); the copy then travels without .git
    subprocess.run([sys.executable, "scripts/gpu_records.py", "stamp", "--out", str(tree / "gpu-check-commit.json")],
                   cwd=REPO, check=True, capture_output=True, text=True)
    bin_dir = _venv(base / "venv")
    unreachable = "http://127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "FASTADAPT_", "TRITON_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(tree / "tests" / "fake_gpu"), FASTADAPT_FAKE_GPU="1",
        FASTADAPT_TINY_SHAPES="1", PYTEST_PLUGINS="fake_gpu_faults", FASTADAPT_FAKE_GPU_WRONG="lora_linear_group",
        FASTADAPT_FAKE_GPU_UNCOLLECTABLE="tests/ops/test_dora_linear.py", FASTADAPT_FAKE_GPU_HANG=HANG,
        FASTADAPT_BENCH_ROUNDS="1", GPU_CHECK_CAPS=CAPS,
        GPU_CHECK_GRACE_S="3", OUT=str(out), FASTADAPT_CACHE_DIR=str(base / "cache"),
        TRITON_CACHE_DIR=str(base / "triton"), PIP_NO_INDEX="1", PIP_INDEX_URL=unreachable, PIP_FIND_LINKS="",
        http_proxy=unreachable, https_proxy=unreachable, HTTP_PROXY=unreachable, HTTPS_PROXY=unreachable,
        HF_HUB_OFFLINE="1",
    )
    first = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=tree, env=env, capture_output=True, text=True,
                           timeout=900)
    after_first = {"rows": _rows(out / "results.jsonl"), "records": json.loads((out / "verified-nvidia-rehearsal.json").read_text()),
                   "files": {p.name for p in out.iterdir()}, "bench_rest": json.loads((out / "bench-rest.json").read_text())}
    env.pop("FASTADAPT_FAKE_GPU_HANG")
    env["GPU_CHECK_CAPS"] = CAPS.replace("bench-rest=40", "bench-rest=300")
    second = subprocess.run(["bash", "scripts/gpu-check.sh", "--resume", "--only", "bench-rest"], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=600)
    # a tree edited after its stamp: the install step refuses it, and the run stops there (exit 3)
    readme = tree / "README.md"
    text = readme.read_text()
    readme.write_text(text + "\nedited after the stamp\n")
    stale = subprocess.run(["bash", "scripts/gpu-check.sh", "--only", "correct-lora"], cwd=tree,
                           env={**env, "OUT": str(base / "out-stale")}, capture_output=True, text=True, timeout=300)
    readme.write_text(text)
    return {"tree": tree, "out": out, "env": env, "head": head, "first": first, "second": second, "stale": stale,
            "stale_rows": _rows(base / "out-stale" / "results.jsonl"),
            "stale_log": (base / "out-stale" / "gpu-check.log").read_text(), **after_first}


def test_every_step_runs_and_says_how_it_ended(rehearsal):
    first = rehearsal["first"]
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # build and tests failed
    assert _status(rehearsal["rows"]) == {
        "install": "ok", "build": "FAILED (exit 1)", "correct-lora": "FAILED (exit 1)", "bench-lora": "ok",
        "correct-rest": "FAILED (exit 1)", "bench-rest": "stopped at cap", "e2e": "ok", "report": "ok"}
    assert rehearsal["files"] == OUT_FILES  # at most 7 files come back from a lease
    log = (rehearsal["out"] / "gpu-check.log").read_text()
    assert "Not uninstalling fastadapt" in log or "Successfully installed fastadapt" in log  # the real install ran
    assert "is not a CUDA build" in log  # the real build was tried, and failed
    assert f"gpu-check on {NAME}" in first.stdout and "records: 5 in verified-nvidia-rehearsal.json" in first.stdout


def test_each_fault_blocks_its_own_op_only(rehearsal):
    got = {(r["op"], r["backend"], r["shape_class"]) for r in rehearsal["records"]}
    assert got == EXPECTED_RECORDS
    lora = _tests(rehearsal["rows"], "correct-lora")
    group = [t for n, t in lora.items() if "[lora_linear_group-triton" in n]
    assert group and all(t["outcome"] == "failed" for t in group)  # the wrong op was caught...
    plain = [t for n, t in lora.items() if "[lora_linear-triton" in n]
    assert plain and all(t["outcome"] == "passed" for t in plain)  # ...and only it
    assert lora["tests/ops/test_dora_linear.py"]["outcome"] == "failed"  # the collection error...
    dora = [t for n, t in lora.items() if "[dora_linear-triton" in n]
    assert dora and all(t["outcome"] == "passed" for t in dora)  # ...cancelled no test, yet blocks dora_linear
    rest = _tests(rehearsal["rows"], "correct-rest")
    assert any(n.startswith("tests/gpu/test_cuda_kernels.py") and t["outcome"] == "failed" for n, t in rest.items())
    assert all(t["outcome"] == "passed" for n, t in rest.items() if "adapter-triton" in n)


def test_a_step_stopped_at_its_cap_keeps_what_it_finished(rehearsal):
    bench_rest = _tests(rehearsal["rows"], "bench-rest")
    assert not any(HANG in n for n in bench_rest)  # stuck until SIGKILL: never finished
    finished = {n for n, t in bench_rest.items() if t["outcome"] == "passed"}
    assert any("[8192-4096-256-triton-fwd+bwd-p0]" in n for n in finished)
    assert not any("test_bench_parallel" in n for n in bench_rest)  # after the hang: not reached
    # pytest never wrote its JSON (SIGKILL): the step's file holds the streamed records, and the series
    # adapter's record came from them
    assert {b["fullname"] for b in rehearsal["bench_rest"]["benchmarks"]} == finished
    series = [r for r in rehearsal["records"] if r["op"] == "bottleneck_adapter"]
    assert len(series) == 1 and series[0]["cases_measured"] == 1


def test_records_name_the_stamped_commit_and_the_measured_kernels(rehearsal, monkeypatch):
    stamp = json.loads((rehearsal["tree"] / "gpu-check-commit.json").read_text())
    assert stamp["commit"] == rehearsal["head"]
    # the kernel hashes of the measured tree, as its own interpreter computes them
    measured = subprocess.run(["python3", "-c", "from fastadapt.ops import verification as v; "
                               "print(v.kernel_hash('triton'), v.kernel_hash('cuda'))"],
                              cwd="/", env=rehearsal["env"], capture_output=True, text=True, check=True).stdout.split()
    assert measured == [stamp["kernel_hash"]["triton"], stamp["kernel_hash"]["cuda"]]
    assert measured[0] == verification.kernel_hash("triton")  # the copy is this tree
    for rec in rehearsal["records"]:
        assert rec["kernel_hash"] == measured[0] and rec["gpu"] == NAME
        assert rec["commit"] == stamp["commit"] and rec["dirty"] == stamp["dirty"] and rec["autotune"] is False
    # what verification reads back: every record matches this device and the current kernels
    path = rehearsal["out"] / "verified-nvidia-rehearsal.json"
    records = verification.load_records(path)
    monkeypatch.setattr(verification, "device_name", lambda device: NAME)
    for rec in records:
        verdict = verification._find(records, rec["op"], rec["backend"], torch.device("cuda"), rec["shape_class"])
        assert verdict.record is not None and "changed" not in verdict.reason, verdict.reason


def test_resume_finishes_only_what_was_left(rehearsal):
    second = rehearsal["second"]
    assert second.returncode == 1, second.stdout[-3000:]  # the build still fails (bench-rest needs it)
    rows = _rows(rehearsal["out"] / "results.jsonl")
    steps = [r["step"] for r in rows if r.get("event") == "step"]
    assert steps[-3:] == ["install", "build", "bench-rest"] and _status(rows)["bench-rest"] == "ok"
    lines = [r["nodeid"] for r in rows if r.get("step") == "bench-rest" and r.get("nodeid")]
    assert len(lines) == len(set(lines))  # nothing finished before ran again
    assert any(HANG in n for n in lines) and any("test_bench_lora_merge" in n for n in lines)
    merged = {b["fullname"] for b in json.loads((rehearsal["out"] / "bench-rest.json").read_text())["benchmarks"]}
    assert {b["fullname"] for b in rehearsal["bench_rest"]["benchmarks"]} < merged
    again = json.loads((rehearsal["out"] / "verified-nvidia-rehearsal.json").read_text())
    assert {(r["op"], r["backend"], r["shape_class"]) for r in again} == AFTER_RESUME


def test_a_tree_that_is_not_the_stamped_one_stops_at_the_install(rehearsal):
    stale = rehearsal["stale"]
    assert stale.returncode == 3, stale.stdout[-3000:] + stale.stderr[-3000:]
    assert "not the ones stamped" in rehearsal["stale_log"] and "install failed" in stale.stdout
    assert [r["step"] for r in rehearsal["stale_rows"] if r.get("event") == "step"] == ["install"]  # nothing after it
    assert not any(r.get("nodeid") for r in rehearsal["stale_rows"])

