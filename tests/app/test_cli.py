"""``fastadapt export`` end to end on a tiny model saved to disk."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import randomize_adapters, rel_err
from tiny_models import tiny_model, tokens
from transformers import AutoModelForCausalLM

import fastadapt as fa
from fastadapt.app.cli import main


@pytest.fixture
def base_and_adapter(tmp_path):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    fa.patch(base, "lora", r=4, targets="all-linear")
    randomize_adapters(base, scale=0.05)
    fa.save_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        expected = base(tokens()).logits
    return tmp_path, expected


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_export_command(base_and_adapter, dtype):
    tmp, expected = base_and_adapter
    argv = ["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "adapter"), "--out", str(tmp / "out")]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp / "out", dtype=torch.float32)
    with torch.no_grad():
        got = model(tokens()).logits
    assert rel_err(got, expected) < (1e-5 if dtype is None else 3e-2)
    # a second export into the same folder is refused, and leaves it intact
    assert main(argv) == 2
    assert (tmp / "out" / "config.json").exists()


def test_export_command_missing_adapter(base_and_adapter):
    tmp, _ = base_and_adapter
    code = main(["export", "--model", str(tmp / "base"), "--adapter", str(tmp / "nope"), "--out", str(tmp / "o")])
    assert code == 2 and not (tmp / "o").exists()


def test_console_entry_points():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "export", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--adapter" in out.stdout and "--dtype" in out.stdout
