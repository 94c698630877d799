"""pytest plugin of ``scripts/gpu-check.sh``: every finished test goes to a JSON-lines file the
moment it finishes, so a step stopped at its cap (SIGINT, then SIGKILL after a grace) keeps what it
finished — pytest writes its JUnit XML and benchmark JSON only at the end of a session, and a process
stuck in a CUDA call never gets there.

    python -m pytest -p gpu_check_plugin --gpu-check-results R.jsonl --gpu-check-step NAME [--gpu-check-skip-done] ...

One line per test (``scripts/gpu_records.py`` reads them)::

    {"step": "bench-lora", "nodeid": "bench/...::test_lora_linear[...]", "outcome": "passed",
     "seconds": 0.8, "bench": {...benchmark.extra_info...}, "message": null}

``outcome`` is ``passed`` (every phase passed), ``failed`` (any phase failed or errored; a module that
could not be collected is one ``failed`` line with the module's node id) or ``skipped`` (xfail too:
neither counts as a pass). ``--gpu-check-skip-done`` deselects the tests that an earlier run of the
same step already finished (``gpu-check.sh --resume``). Works under pytest-xdist: workers run the
tests, the controller writes the lines.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("gpu-check")
    group.addoption("--gpu-check-results", default=None, help="JSON-lines file that each finished test is appended to")
    group.addoption("--gpu-check-step", default=None, help="the gpu-check.sh step these tests belong to")
    group.addoption("--gpu-check-skip-done", action="store_true", default=False,
                    help="deselect the tests an earlier run of this step finished (in --gpu-check-results)")


#: the stamped tree this run checks (gpu-check.sh exports the stamp's digest): every line names it, and
#: a --resume counts only lines of the same tree — results of other code must not stand for this one's
TREE = os.environ.get("GPU_CHECK_TREE") or None


def finished(path: Path, step: str) -> set[str]:
    """Node ids of the tests that runs of ``step`` on this tree finished (any outcome) per ``path``."""
    done: set[str] = set()
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a kill: that test did not finish
            continue
        if row.get("step") == step and row.get("nodeid") and row.get("tree") == TREE:
            done.add(row["nodeid"])
    return done


class _Stream:
    def __init__(self, path: Path, step: str) -> None:
        self.path, self.step = path, step
        self.phases: dict[str, dict] = {}

    def write(self, row: dict) -> None:
        # one write per line, flushed and closed at once: a kill right after loses nothing written
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "tree": TREE, **row}, default=str) + "\n")

    @pytest.hookimpl
    def pytest_collectreport(self, report):
        if report.failed:
            self.write({"nodeid": report.nodeid, "outcome": "failed", "seconds": 0.0, "bench": None,
                        "message": _message(report)})

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report):
        state = self.phases.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "bench": None,
                                                        "message": None})
        state["seconds"] += float(getattr(report, "duration", 0.0) or 0.0)
        for name, value in getattr(report, "user_properties", ()):
            if name == "gpu_check_bench":
                state["bench"] = value
        if report.failed:
            state["outcome"] = "failed"
            state["message"] = state["message"] or _message(report)
        elif report.skipped and state["outcome"] == "passed":
            state["outcome"] = "skipped"
        if report.when == "teardown":
            del self.phases[report.nodeid]
            self.write({"nodeid": report.nodeid, **state, "seconds": round(state["seconds"], 3)})


def _message(report) -> str | None:
    text = getattr(report, "longreprtext", "") or ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The benchmark's record travels with the call phase's report (through xdist too)."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call":
        bench = getattr(item, "funcargs", {}).get("benchmark")
        info = getattr(bench, "extra_info", None)
        if info:
            report.user_properties.append(("gpu_check_bench", dict(info)))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A benchmark that a stop at the cap interrupted before its first round has no data, and then
    pytest-benchmark fails to write its JSON at all (``min()`` of nothing): drop it first."""
    benchmarks = getattr(getattr(session.config, "_benchmarksession", None), "benchmarks", None)
    if benchmarks is not None:
        benchmarks[:] = [b for b in benchmarks if b]
    yield


def pytest_configure(config):
    # gpu-check.sh stops a step at its cap with SIGINT, so that pytest ends the session and writes what it
    # has. A process started in the background by a non-interactive shell inherits SIGINT *ignored*, and
    # Python then leaves it ignored: take it back (workers too: they stop their test at once).
    if config.getoption("--gpu-check-results"):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    path = config.getoption("--gpu-check-results")
    if not path or hasattr(config, "workerinput"):  # xdist workers: the controller writes
        return
    step = config.getoption("--gpu-check-step") or "unnamed"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    config.pluginmanager.register(_Stream(Path(path), step), "gpu_check_stream")


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--gpu-check-results")
    if not path or not config.getoption("--gpu-check-skip-done"):
        return
    done = finished(Path(path), config.getoption("--gpu-check-step") or "unnamed")
    if not done:
        return
    keep = [item for item in items if item.nodeid not in done]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = keep
    if os.environ.get("PYTEST_XDIST_WORKER") in (None, "gw0"):
        print(f"gpu-check: {len(done)} test(s) of this step finished in an earlier run: not run again")
