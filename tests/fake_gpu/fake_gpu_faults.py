"""Faults the CPU rehearsal of ``scripts/gpu-check.sh`` plants (a pytest plugin: ``PYTEST_PLUGINS``).

- ``FASTADAPT_FAKE_GPU_WRONG=<op>``: ``fa.ops.<op>`` returns results 1% off — a wrong kernel that the
  op's GPU tests must catch, and whose records (only its) must not be written.
- ``FASTADAPT_FAKE_GPU_UNCOLLECTABLE=<path>``: that test module fails to collect (as an import error
  would: a newer dependency, a shadowed package) — its tests must block its ops only, and the rest of
  the step must run.
- ``FASTADAPT_FAKE_GPU_HANG=<text>``: every test whose node id contains ``<text>`` hangs with SIGINT
  blocked — a process stuck in a device call — so its step is stopped at its cap by SIGKILL, and what
  finished before must survive.
"""

from __future__ import annotations

import os
import signal
import time

import pytest


def pytest_configure(config):
    op = os.environ.get("FASTADAPT_FAKE_GPU_WRONG")
    if op:
        import fastadapt.ops

        real = getattr(fastadapt.ops, op)

        def wrong(*args, **kwargs):
            out = real(*args, **kwargs)
            return [y * 1.01 for y in out] if isinstance(out, (list, tuple)) else out * 1.01

        setattr(fastadapt.ops, op, wrong)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if collector.nodeid and collector.nodeid == os.environ.get("FASTADAPT_FAKE_GPU_UNCOLLECTABLE"):
        return pytest.CollectReport(collector.nodeid, "failed", "ImportError: planted by the GPU rehearsal", [])
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    text = os.environ.get("FASTADAPT_FAKE_GPU_HANG")
    if text and text in item.nodeid:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        while True:
            time.sleep(60)
