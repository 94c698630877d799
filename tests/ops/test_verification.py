"""GPU verification records drive ``backend="auto"`` (fastadapt/ops/verification.py), tested on CPU
with fabricated records: the device name is faked and Triton runs in its interpreter."""

from __future__ import annotations

import importlib
import json
import logging
import os

import pytest
import torch

import fastadapt as fa
from fastadapt.ops import dispatch, verification

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
    pytest.skip("fabricated records for a CPU device: needs TRITON_INTERPRET=1 and no GPU", allow_module_level=True)

lora_op = importlib.import_module("fastadapt.ops.lora_linear")
GPU = "Fake GPU 80GB"


@pytest.fixture
def fake_gpu(monkeypatch):
    """The CPU device poses as a GPU called GPU; the records in use are reloaded after the test."""
    monkeypatch.setattr(verification, "device_name", lambda device: GPU)
    monkeypatch.delenv("FASTADAPT_BACKEND", raising=False)
    monkeypatch.delenv("FASTADAPT_LORA_VARIANT", raising=False)
    yield
    monkeypatch.undo()
    verification.reload()


def write_records(tmp_path, monkeypatch, *records) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(list(records)))
    monkeypatch.setenv("FASTADAPT_VERIFIED", str(path))
    verification.reload()


def record(**kw) -> dict:
    rec = {"gpu": GPU, "op": "lora_linear", "backend": "triton", "shape_class": "batch", "variant": "fused",
           "kernel_hash": verification.kernel_hash("triton"), "speedup_over_torch": 1.4, "commit": "abc123"}
    return {**rec, **kw}


def inputs(m=80, k=40, n=24, r=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(r, k, generator=g),
            torch.randn(n, r, generator=g))


def test_committed_records_load_and_the_cpu_is_never_verified():
    verification.reload()
    assert isinstance(verification.load_records(verification.RECORDS_DIR), list)
    decision = dispatch.decide("lora_linear", "auto", torch.device("cpu"), available={"triton": lambda d: True})
    assert decision.backend == "torch" and "GPUs only" in decision.reason


def test_matching_record_turns_the_fused_backend_on(fake_gpu, tmp_path, monkeypatch):
    dev = torch.device("cpu")
    assert lora_op.selected_backend(dev, rows=80) == "torch"  # committed records: none for this GPU
    write_records(tmp_path, monkeypatch, record())
    assert lora_op.selected_backend(dev, rows=80) == "triton"
    assert lora_op.selected_variant(80, dev) == "fused"  # the record's measured variant
    # the shape class counts: a batch record does not vouch for decode
    assert lora_op.selected_backend(dev, rows=8) == "torch"
    assert lora_op.selected_variant(8, dev) == lora_op.DEFAULT_VARIANT
    # a real call takes the fused path (the torch path would raise)
    monkeypatch.setattr(lora_op, "_torch_path", lambda *a: pytest.fail("auto ran the torch path"))
    x, w, a, b = inputs()
    y = fa.ops.lora_linear(x, w, a, b, scaling=0.5)
    torch.testing.assert_close(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


def test_stale_kernel_hash_turns_it_off(fake_gpu, tmp_path, monkeypatch):
    write_records(tmp_path, monkeypatch, record(kernel_hash="0123456789abcdef"))
    decision = dispatch.decide("lora_linear", "auto", torch.device("cpu"), available=lora_op._AVAILABLE, rows=80)
    assert decision.backend == "torch"
    assert "changed since" in decision.reason and "0123456789abcdef" in decision.reason


def test_a_kernel_edit_after_the_run_makes_the_record_stale(fake_gpu, tmp_path, monkeypatch):
    """The hash covers the kernel sources and the op files that call them: an edit to either makes
    the backend unverified again."""
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "k.py").write_text("x = 1\n")
    spec = importlib.machinery.ModuleSpec("fastadapt.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(kernels)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    verification.kernel_hash.cache_clear()
    ops = tmp_path / "ops"
    ops.mkdir()
    for name in verification._OP_FILES:
        (ops / name).write_text("# op\n")
    monkeypatch.setattr(verification, "_OPS", ops)
    verification.kernel_hash.cache_clear()
    before = verification.kernel_hash("triton")
    (kernels / "k.py").write_text("x = 2\n")
    verification.kernel_hash.cache_clear()
    after_kernel = verification.kernel_hash("triton")
    assert after_kernel != before
    (ops / "lora_linear.py").write_text("# the op composes the kernels differently\n")
    verification.kernel_hash.cache_clear()
    assert verification.kernel_hash("triton") != after_kernel


def test_slower_than_torch_other_gpu_other_op_stay_off(fake_gpu, tmp_path, monkeypatch):
    dev = torch.device("cpu")
    write_records(tmp_path, monkeypatch, record(speedup_over_torch=0.9), record(gpu="Another GPU"),
                  record(op="parallel_adapter"))
    decision = dispatch.decide("lora_linear", "auto", dev, available=lora_op._AVAILABLE, rows=80)
    assert decision.backend == "torch" and "not faster" in decision.reason
    decision = dispatch.decide("lora_linear_group", "auto", dev, available=lora_op._AVAILABLE, rows=80)
    assert decision.backend == "torch" and "no GPU verification record" in decision.reason


def test_any_class_and_explicit_backend(fake_gpu, tmp_path, monkeypatch):
    dev = torch.device("cpu")
    write_records(tmp_path, monkeypatch, record(shape_class="any"))
    assert lora_op.selected_backend(dev, rows=1) == lora_op.selected_backend(dev, rows=10**6) == "triton"
    # an explicit backend never needs a record
    assert dispatch.decide("lora_linear", "torch", dev, available=lora_op._AVAILABLE).backend == "torch"


def test_cached_choice_follows_the_records(fake_gpu, tmp_path, monkeypatch):
    """The per-metadata cache of lora_linear keys on the records' generation."""
    x, w, a, b = inputs()
    write_records(tmp_path, monkeypatch, record())
    assert lora_op._checked_backend(x, w, a, b, 0.5, None, 0.0, "auto") == "triton"
    write_records(tmp_path, monkeypatch, record(kernel_hash="ffffffffffffffff"))
    assert lora_op._checked_backend(x, w, a, b, 0.5, None, 0.0, "auto") == "torch"


def test_fallback_on_a_gpu_is_logged_once(fake_gpu, tmp_path, monkeypatch, caplog):
    write_records(tmp_path, monkeypatch)  # no records at all
    dev = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="fastadapt.ops.dispatch"):
        for _ in range(3):
            dispatch.decide("lora_linear", "auto", dev, available=lora_op._AVAILABLE, rows=80)
    warnings = [r for r in caplog.records if "runs the torch path" in r.getMessage()]
    assert len(warnings) == 1 and GPU in warnings[0].getMessage()


@pytest.mark.parametrize("content,match", [
    ("{not json", "not readable JSON"),
    ('{"gpu": "x"}', "expected a JSON list"),
    ('[{"gpu": "x", "op": "lora_linear"}]', "missing backend, shape_class, kernel_hash"),
    ('[{"gpu": "x", "op": "o", "backend": "triton", "shape_class": "tiny", "kernel_hash": "h"}]', "shape_class"),
])
def test_malformed_records_are_errors_naming_the_file(tmp_path, monkeypatch, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    monkeypatch.setenv("FASTADAPT_VERIFIED", str(path))
    try:
        with pytest.raises(ValueError, match=match) as info:
            verification.reload()
        assert str(path) in str(info.value)
    finally:
        monkeypatch.delenv("FASTADAPT_VERIFIED")
        verification.reload()


def test_missing_records_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPT_VERIFIED", str(tmp_path / "nope"))
    try:
        with pytest.raises(FileNotFoundError, match="FASTADAPT_VERIFIED"):
            verification.reload()
    finally:
        monkeypatch.delenv("FASTADAPT_VERIFIED")
        verification.reload()


def test_no_record_never_asks_whether_a_backend_can_run(fake_gpu, tmp_path, monkeypatch):
    """Asking the CUDA backend may build the extension (minutes): only a verified backend is asked."""
    write_records(tmp_path, monkeypatch)
    asked = []
    available = {"cuda": lambda d: asked.append("cuda") or True, "triton": lambda d: asked.append("triton") or True}
    assert dispatch.decide("bottleneck_adapter", "auto", torch.device("cpu"), available=available, rows=80).backend \
        == "torch"
    assert asked == []
    write_records(tmp_path, monkeypatch, record(op="bottleneck_adapter", backend="cuda",
                                                kernel_hash=verification.kernel_hash("cuda")))
    assert dispatch.decide("bottleneck_adapter", "auto", torch.device("cpu"), available=available, rows=80).backend \
        == "cuda"
    assert asked == ["cuda"]
