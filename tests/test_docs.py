"""Reference docs list what the code defines (one home per fact: the code; the docs follow it)."""

from __future__ import annotations

from pathlib import Path

from fastadapt import settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_switch_is_documented():
    table = (ROOT / "docs" / "kernels.md").read_text()
    missing = [name for name in settings.ENV_VARS if f"`{name}`" not in table]
    assert not missing, f"docs/kernels.md's environment table lacks {missing}"


def test_readme_has_no_unfilled_placeholders():
    readme = (ROOT / "README.md").read_text()
    assert "MAIN_JOB_TABLE" not in readme and "MAIN_JOB_WALL" not in readme
