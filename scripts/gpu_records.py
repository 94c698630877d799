"""GPU verification records (fastadapt/ops/verification.py) from what a ``scripts/gpu-check.sh`` run finished.

    python scripts/gpu_records.py records --results R.jsonl --stamp gpu-check-commit.json --out verified.json
    python scripts/gpu_records.py stamp        # on the dev machine (git): write gpu-check-commit.json
    python scripts/gpu_records.py check-stamp  # the tree still is what the stamp says (gpu-check.sh's preflight)
    python scripts/gpu_records.py covers       # the (op, backend) pairs a run can verify

Inputs: the JSON-lines file the steps stream (``scripts/gpu_check_plugin.py``: one line per finished
test, benchmark records included), and optionally pytest ``--junitxml`` and ``--benchmark-json``
files of a manual run. A record is written for an (op, backend, shape class) when
- its op-level test in ``tests/gpu/test_fused_ops_gpu.py`` passed for the variant at every dropout
  it was run with (a skip or a missing result is not a pass),
- no GPU test that :data:`TEST_OPS` maps to that (op, backend) failed — a test blocks exactly the ops
  it checks, so a CUDA-backend failure never blocks a Triton op and one op's failure never blocks
  another's; a failing test under ``tests/`` that the map does not know blocks every record
  (``tests/test_gpu_check.py`` keeps the map complete; a failed benchmark only measured nothing), and
- the benchmark measured it beside the torch path on the same cases (``speedup_over_torch`` is the
  geometric mean of torch time ÷ fused time over those cases).
For the LoRA ops the variant with the best speedup among the correct ones is recorded. An op or
backend not in :data:`BENCH` is never recorded, so ``auto`` keeps it on the torch path. ``auto`` uses
a record only while it is faster than torch and its kernel hash is current.

The commit comes from the stamp file written on the dev machine before the lease (the device copy has
no ``.git``): the commit, a dirty flag, the files that travel with a digest of their contents, and the
kernel hashes. Records refuse to be written for a tree that is not the stamped one.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAMP = REPO / "gpu-check-commit.json"

#: bench suite (= op) -> (torch-path variant, {bench variant: (backend, join variant)})
BENCH = {
    "lora_linear": ("addmm", {"fastadapt": ("triton", "addmm"), "fastadapt_epilogue": ("triton", "epilogue"),
                              "fastadapt_fused": ("triton", "fused")}),
    "lora_linear_group": ("addmm", {"fastadapt_group": ("triton", "addmm")}),
    "dora_linear": ("addmm", {"fastadapt": ("triton", "addmm"), "fastadapt_fused": ("triton", "fused")}),
    "bottleneck_adapter": ("eager_bf16", {"triton": ("triton", "default"), "cuda": ("cuda", "default")}),
    # the parallel adapter joins its up-projection to the frozen GEMM like LoRA: the default join
    "parallel_adapter": ("eager_bf16", {"triton": ("triton", "addmm"), "cuda": ("cuda", "default")}),
    "lora_merge": ("torch", {"cuda": ("cuda", "default")}),
    "lora_linear_4bit": ("torch", {"fastadapt_fused": ("triton", "fused"),
                                   "fastadapt_dequantize": ("triton", "dequantize")}),
}
#: training shapes are judged on forward + backward, decode on the no-grad forward
MODE = {"batch": ("fwd_bwd",), "decode": ("decode",), "any": ("merge",)}


def covers() -> list[tuple[str, str]]:
    """Every (op, backend) a run can verify; any other op stays on the torch path."""
    return sorted({(op, backend) for op, (_, fused) in BENCH.items() for backend, _ in fused.values()})


def not_covered() -> list[tuple[str, str]]:
    """The fused (op, backend) pairs fastadapt registers that no run verifies (a kernel added without
    a GPU harness case and a benchmark here): ``auto`` keeps them on the torch path."""
    from fastadapt.ops import dispatch

    return sorted({(op, b) for op, available in dispatch.OPS.items() for b in available} - set(covers()))


def _ops(*names: str, backend: str) -> frozenset[tuple[str, str]]:
    return frozenset((name, backend) for name in names)


#: The Triton ops built on the LoRA kernels (kernels/fastadapt_kernels/lora_linear.py; the 4-bit op's rank
#: term and its dequantize variant run them).
LORA_KERNEL_OPS = _ops("lora_linear", "lora_linear_group", "dora_linear", "parallel_adapter", "lora_linear_4bit",
                       backend="triton")
CUDA_OPS = _ops("bottleneck_adapter", "parallel_adapter", "lora_merge", backend="cuda")
#: The series kernel, and the parallel adapter that runs it (CUDA) or shares its tests (tests/ops).
ADAPTERS_CUDA = _ops("bottleneck_adapter", "parallel_adapter", backend="cuda")
ADAPTERS_TRITON = _ops("bottleneck_adapter", "parallel_adapter", backend="triton")
#: The op-level harness: a test's own (op, backend, class, variant) comes from its id.
HARNESS = re.compile(r"tests/gpu/test_fused_ops_gpu\.py::test_op_matches_float64"
                     r"\[(?P<op>\w+)-(?P<backend>\w+)-(?P<cls>\w+)-(?P<variant>\w+)-p(?P<p>[\d.]+)\]")
HARNESS_FILE = REPO / "tests" / "gpu" / "test_fused_ops_gpu.py"
#: Which (op, backend) pairs a failing GPU test blocks: (node id pattern, pairs), first match wins.
#: A module that fails to collect has the module's node id (``path.py``), matched by the same row.
TEST_OPS: tuple[tuple[re.Pattern, frozenset[tuple[str, str]]], ...] = tuple((re.compile(p), ops) for p, ops in (
    # the harness's cases block their own key (below); its module failing to collect leaves no pass at all
    (r"tests/gpu/test_fused_ops_gpu\.py(::|$)", frozenset()),
    (r"tests/gpu/test_cuda_kernels\.py::test_bottleneck_", ADAPTERS_CUDA),
    (r"tests/gpu/test_cuda_kernels\.py::test_merge_", _ops("lora_merge", backend="cuda")),
    (r"tests/gpu/test_cuda_kernels\.py(::|$)", CUDA_OPS),  # the sanitizer, the fixture, collection
    (r"tests/gpu/test_triton_adapters\.py::test_series_", _ops("bottleneck_adapter", backend="triton")),
    (r"tests/gpu/test_triton_adapters\.py::test_parallel_", _ops("parallel_adapter", backend="triton")),
    (r"tests/gpu/test_triton_adapters\.py(::|$)", ADAPTERS_TRITON),
    (r"tests/kernels/test_lora_linear_kernels\.py(::|$)", LORA_KERNEL_OPS),
    (r"tests/kernels/test_dora_linear_kernels\.py(::|$)", _ops("dora_linear", backend="triton")),
    (r"tests/kernels/test_bottleneck_adapter_kernels\.py(::|$)", _ops("bottleneck_adapter", backend="triton")),
    (r"tests/ops/test_lora_linear\.py(::|$)", _ops("lora_linear", "lora_linear_group", backend="triton")),
    (r"tests/ops/test_dora_linear\.py(::|$)", _ops("dora_linear", backend="triton")),
    (r"tests/ops/test_bottleneck_adapter\.py::\w+\[cuda-", ADAPTERS_CUDA),
    (r"tests/ops/test_bottleneck_adapter\.py(::|$)", ADAPTERS_TRITON),
))


def ops_of_test(nodeid: str) -> frozenset[tuple[str, str]] | None:
    """The (op, backend) pairs a failure of ``nodeid`` blocks; None when the map does not know it."""
    for pattern, ops in TEST_OPS:
        if pattern.match(nodeid):
            return ops
    return None


# -- reading a run ------------------------------------------------------------------------------------


def read_results(paths: list[Path], *, tree: str | None = None) -> tuple[dict[str, str], list[dict]]:
    """({node id: outcome}, [benchmark records]) from gpu_check_plugin's JSON-lines files; the last
    line of a test wins. A line cut short by a kill is skipped (that test did not finish). ``tree``:
    the stamp's digest — lines a run of another tree wrote (a --resume after the code changed) are
    skipped: they did not test this code."""
    outcomes: dict[str, str] = {}
    bench: list[dict] = []
    other = 0
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not row.get("nodeid"):
                continue  # a step's status line
            if tree is not None and row.get("tree") != tree:
                other += 1
                continue
            outcomes[row["nodeid"]] = row.get("outcome", "failed")
            if row.get("bench") and row.get("outcome") == "passed":
                bench.append(row["bench"])
    if other:
        print(f"gpu_records: {other} result lines of another tree than the stamped {tree} skipped")
    return outcomes, bench


def read_junit(paths: list[Path]) -> dict[str, str]:
    """{node id: outcome} from pytest --junitxml files (class-less tests: ``a.b.test_x`` -> ``a/b/test_x.py``)."""
    outcomes: dict[str, str] = {}
    for path in paths:
        for tc in ET.parse(path).getroot().iter("testcase"):
            tags = {child.tag for child in tc}
            outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
            nodeid = tc.get("classname", "").replace(".", "/") + ".py::" + tc.get("name", "")
            outcomes[nodeid] = outcome
    return outcomes


def read_bench(paths: list[Path]) -> list[dict]:
    """The ``extra_info`` records of pytest-benchmark JSON files."""
    infos = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except ValueError:  # a step cut short may leave an empty file: what it measured is lost, say so
            print(f"gpu_records: {path} is not benchmark JSON (empty: its step was cut short?); skipped")
            continue
        infos += [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    return infos


def harness_dropouts() -> dict[tuple, frozenset[str]]:
    """{(op, backend, class, variant): the dropouts (as in the test ids) the harness runs it at}: the
    harness's own ``cases()`` is the one home of that list."""
    import importlib.util

    name = "_fastadapt_gpu_harness"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, HARNESS_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclass resolves annotations through sys.modules
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # never leave a half-run module for the next call
            raise
    expected: dict[tuple, set[str]] = defaultdict(set)
    for case in module.cases():
        m = HARNESS.fullmatch(f"tests/gpu/test_fused_ops_gpu.py::test_op_matches_float64[{case.id}]")
        expected[(m["op"], m["backend"], m["cls"], m["variant"])].add(m["p"])
    return {key: frozenset(ps) for key, ps in expected.items()}


def verdicts(outcomes: dict[str, str]
             ) -> tuple[dict[tuple, dict[str, bool]], dict[tuple[str, str], list[str]], list[str]]:
    """(harness cases {(op, backend, class, variant): {dropout: passed}}, blocked {(op, backend):
    failing tests}, failing tests the map does not know)."""
    cases: dict[tuple, dict[str, bool]] = defaultdict(dict)
    blocked: dict[tuple[str, str], list[str]] = defaultdict(list)
    unknown: list[str] = []
    for nodeid, outcome in sorted(outcomes.items()):
        m = HARNESS.fullmatch(nodeid)
        if m:
            cases[(m["op"], m["backend"], m["cls"], m["variant"])][m["p"]] = outcome == "passed"
            continue
        if outcome != "failed" or not nodeid.startswith("tests/"):
            continue  # a benchmark that failed measured nothing: no ratio, so no record, and no verdict
        ops = ops_of_test(nodeid)
        if ops is None:
            unknown.append(nodeid)
        for pair in ops or ():
            blocked[pair].append(nodeid)
    return cases, blocked, unknown


def shape_class(suite: str, rows: int | None) -> str:
    """The record's shape class of a bench case: the dispatch's own rule (a merge has no rows)."""
    from fastadapt.ops import verification

    return "any" if suite == "lora_merge" else verification.shape_class(rows) or "batch"


def ratios_of(infos: list[dict]) -> dict[tuple, list[float]]:
    """{(op, backend, class, variant): [torch ms / fused ms per measured case]}."""
    times: dict[tuple, tuple[float, int | None]] = {}
    for info in infos:
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


def build_records(cases, blocked, ratios, *, gpu: str, hashes: dict[str, str | None], meta: dict,
                  unknown: list[str] = (), expected: dict[tuple, frozenset[str]] | None = None) -> list[dict]:
    """``expected``: :func:`harness_dropouts` (default): a key is vouched for only when its case
    passed at every dropout the harness runs it at — a step cut short after p0 is not a pass."""
    if unknown:  # a failure we cannot attribute could be any op's: vouch for none
        return []
    expected = harness_dropouts() if expected is None else expected
    best: dict[tuple, dict] = {}
    for key, outcomes in sorted(cases.items()):
        op, backend, cls, variant = key
        if key not in expected or not expected[key] <= outcomes.keys() or not all(outcomes.values()):
            continue
        if blocked.get((op, backend)) or not hashes.get(backend):
            continue
        if (op, backend) not in covers():
            continue
        measured = ratios.get((op, backend, cls, variant))
        if not measured:
            continue
        rec = {"gpu": gpu, "op": op, "backend": backend, "shape_class": cls,
               **({"variant": variant} if variant != "default" else {}),
               "kernel_hash": hashes[backend], "speedup_over_torch": round(geomean(measured), 4),
               "cases_measured": len(measured), **meta}
        slot = (op, backend, cls)
        if slot not in best or rec["speedup_over_torch"] > best[slot]["speedup_over_torch"]:
            best[slot] = rec
    return [best[k] for k in sorted(best)]


# -- the stamp: which commit the tree on the device is ------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30).stdout


def kernel_hashes() -> dict[str, str | None]:
    from fastadapt.ops import verification

    return {b: verification.kernel_hash(b) for b in ("triton", "cuda")}


def tree_digest(root: Path, files: list[str]) -> str:
    """sha256 over the named files' paths and contents (a missing file counts as changed)."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = root / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"\1missing") + b"\0")
    return h.hexdigest()[:16]


def stamp(path: Path = STAMP) -> dict:
    """Write the stamp for this checkout: HEAD, whether the tree differs from it (tracked changes or
    untracked files, which travel to the device too), the files that travel and a digest of them, and
    the kernel hashes."""
    head = _git("rev-parse", "HEAD").strip()
    changes = [line for line in _git("status", "--porcelain").splitlines() if not line.endswith(path.name)]
    files = [f for f in _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
             if f and f != path.name and (REPO / f).is_file()]
    data = {"commit": head, "dirty": bool(changes), "kernel_hash": kernel_hashes(),
            "tree_digest": tree_digest(REPO, files), "files": files,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "by": "bash scripts/gpu-check.sh --stamp"}
    from fastadapt import _files

    _files.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))
    return data


def read_stamp(path: Path = STAMP) -> dict:
    """The stamp, checked against this tree: an error naming what is wrong (records name a commit:
    never guess it)."""
    if not path.is_file():
        raise ValueError(f"no {path.name} in {path.parent}: run `bash scripts/gpu-check.sh --stamp` in the "
                         "checkout (with .git) before sending the tree to the GPU machine")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from exc
    if not re.fullmatch(r"[0-9a-f]{40}", str(data.get("commit", ""))) or not isinstance(data.get("dirty"), bool):
        raise ValueError(f"{path}: expected a 40-hex 'commit' and a boolean 'dirty', got {data!r}")
    now = kernel_hashes()
    if data.get("kernel_hash") != now:
        raise ValueError(f"{path} was written for kernel hashes {data.get('kernel_hash')}, this tree has {now}: "
                         "the kernels changed since; run `bash scripts/gpu-check.sh --stamp` again")
    files = data.get("files")
    if not isinstance(files, list) or tree_digest(REPO, files) != data.get("tree_digest"):
        missing = [f for f in files or [] if not (REPO / f).is_file()][:3]
        why = f" ({missing} missing)" if missing else ""
        raise ValueError(f"{path}: the files of {REPO} are not the ones stamped{why}: the tree changed since (or "
                         "the stamp was committed); run `bash scripts/gpu-check.sh --stamp` again")
    return data


# -- commands -------------------------------------------------------------------------------------------


def cmd_records(args) -> int:
    import torch
    import triton

    from fastadapt import _files

    if not torch.cuda.is_available():
        print("gpu_records: no CUDA device: records name a GPU, none written", file=sys.stderr)
        return 1
    try:
        stamped = read_stamp(args.stamp)
    except ValueError as exc:
        print(f"gpu_records: {exc}", file=sys.stderr)
        return 2
    outcomes, infos = read_results([p for p in args.results if p.is_file()], tree=stamped["tree_digest"])
    outcomes |= read_junit([p for p in args.junit if p.is_file()])
    infos += read_bench([p for p in args.bench if p.is_file()])
    cases, blocked, unknown = verdicts(outcomes)
    meta = {"commit": stamped["commit"], "dirty": stamped["dirty"], "date": datetime.date.today().isoformat(),
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
            "autotune": os.environ.get("FASTADAPT_AUTOTUNE", "1") not in ("0", "false", "no", "off")}
    expected = harness_dropouts()
    records = build_records(cases, blocked, ratios_of(infos), gpu=torch.cuda.get_device_name(0),
                            hashes=kernel_hashes(), meta=meta, unknown=unknown, expected=expected)
    _files.atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"))
    print(f"gpu_records: {len(outcomes)} test results, {len(infos)} benchmark records read")
    for test in unknown:
        print(f"gpu_records: {test} failed and scripts/gpu_records.py::TEST_OPS does not say which op it "
              "checks: no record written")
    for (op, backend), tests in sorted(blocked.items()):
        print(f"gpu_records: {op} ({backend}) blocked by {len(tests)} failed GPU test(s): {', '.join(tests[:3])}")
    ratios = ratios_of(infos)
    for op, backend in covers():
        if any(r["op"] == op and r["backend"] == backend for r in records) or (op, backend) in blocked:
            continue
        mine = {key: ok for key, ok in cases.items() if key[:2] == (op, backend)}
        failed = [f"{key[2]}-{key[3]}" for key, ok in mine.items() if not all(ok.values())]
        partial = [f"{key[2]}-{key[3]} (p{', p'.join(sorted(expected.get(key, set()) - ok.keys()))})"
                   for key, ok in mine.items() if all(ok.values()) and not expected.get(key, set()) <= ok.keys()]
        if not mine:
            why = "no op-level GPU test finished (its step did not run, or was stopped first)"
        elif failed and len(failed) == len(mine):
            why = f"its op-level GPU tests failed or were skipped ({', '.join(sorted(failed)[:4])})"
        elif partial and len(failed) + len(partial) == len(mine):
            why = ("not every dropout case of its op-level GPU tests finished "
                   f"(missing {', '.join(sorted(partial)[:4])})")
        else:
            why = "not measured beside the torch path" + ("" if any(k[:2] == (op, backend) for k in ratios) else
                                                          " (its benchmarks did not run or finish)")
        print(f"gpu_records: {op} ({backend}): no record: {why}")
    print(f"gpu_records: {len(records)} records -> {args.out}")
    for r in records:
        print(f"  {r['op']:<20} {r['backend']:<7} {r['shape_class']:<7} {r.get('variant', ''):<9} "
              f"{r['speedup_over_torch']:.3f}x torch ({r['cases_measured']} cases)")
    return 0


def cmd_stamp(args) -> int:
    data = stamp(args.out)
    print(f"gpu_records: {args.out}: commit {data['commit']}{' (dirty tree)' if data['dirty'] else ''}, "
          f"kernel hashes {data['kernel_hash']}")
    return 0


def cmd_check_stamp(args) -> int:
    try:
        data = read_stamp(args.stamp)
    except ValueError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    print(f"{data['commit']} {'dirty' if data['dirty'] else 'clean'}")
    return 0


def cmd_covers(args) -> int:
    by_op: dict[str, list[str]] = defaultdict(list)
    for op, backend in covers():
        by_op[op].append(backend)
    print("covers: " + "; ".join(f"{op} ({', '.join(b)})" for op, b in by_op.items())
          + ". Any other op or backend gets no record: auto keeps it on the torch path.")
    try:
        others = "; ".join(f"{op} ({backend})" for op, backend in not_covered()) or "none"
    except ImportError as exc:  # --plan on a machine without fastadapt installed
        others = f"unknown here (fastadapt does not import: {exc})"
    print(f"not covered (no GPU harness case and benchmark here; torch path under auto): {others}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("records", help="write the records of a run")
    rec.add_argument("--results", type=Path, nargs="*", default=[], help="gpu_check_plugin JSON-lines files")
    rec.add_argument("--junit", type=Path, nargs="*", default=[], help="pytest --junitxml files")
    rec.add_argument("--bench", type=Path, nargs="*", default=[], help="pytest-benchmark JSON files")
    rec.add_argument("--stamp", type=Path, default=STAMP, help=f"the commit stamp (default: {STAMP.name})")
    rec.add_argument("--out", type=Path, required=True, help="where to write the records (JSON list)")
    rec.set_defaults(func=cmd_records)
    st = sub.add_parser("stamp", help="write the commit stamp of this checkout (needs git)")
    st.add_argument("--out", type=Path, default=STAMP)
    st.set_defaults(func=cmd_stamp)
    ck = sub.add_parser("check-stamp", help="print '<sha> clean|dirty' if the stamp matches this tree")
    ck.add_argument("--stamp", type=Path, default=STAMP)
    ck.set_defaults(func=cmd_check_stamp)
    sub.add_parser("covers", help="the ops and backends a run can verify").set_defaults(func=cmd_covers)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
