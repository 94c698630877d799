"""The op-level GPU correctness harness (tests/gpu/test_fused_ops_gpu.py) run on CPU: its Triton
cases in the interpreter at small sizes, so a broken harness shows before a GPU lease is spent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (CPU interpreter)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import test_fused_ops_gpu as harness  # noqa: E402

TRITON_CASES = [c for c in harness.cases() if c.backend == "triton"]


def test_every_record_key_has_a_case():
    keys = {(c.op, c.backend, c.shape_class) for c in harness.cases()}
    for op in ("lora_linear", "lora_linear_group", "parallel_adapter", "bottleneck_adapter", "dora_linear",
               "lora_linear_4bit"):
        assert {(op, "triton", "decode"), (op, "triton", "batch")} <= keys
    assert ("lora_merge", "cuda", "any") in keys


@pytest.mark.parametrize("case", [c for c in TRITON_CASES if c.shape_class == "batch"], ids=lambda c: c.id)
def test_triton_cases_in_the_interpreter(case, monkeypatch):
    harness.check_case(case, torch.device("cpu"), rows=70, width=(48, 40), dtype=torch.float32,
                       monkeypatch=monkeypatch)


def test_the_harness_catches_a_wrong_op(monkeypatch):
    """A kernel that is off by a little must fail the comparison (the test can fail)."""
    import fastadapt as fa

    real = fa.ops.lora_linear
    monkeypatch.setattr(fa.ops, "lora_linear", lambda *a, **kw: real(*a, **kw) * 1.01)
    case = harness.Case("lora_linear", "triton", "batch", "addmm", 0.0)
    with pytest.raises(AssertionError, match="output 0: error"):
        harness.check_case(case, torch.device("cpu"), rows=70, width=(48, 40), dtype=torch.float32,
                           monkeypatch=monkeypatch)
