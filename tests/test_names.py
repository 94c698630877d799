"""No name of ours shadows a package our dependencies import (docs/architecture.md).

`python -m pytest`, `python -m fastadapt`, `python -c ...` and a notebook started in the repository
root put the root first on ``sys.path``; ``tests/conftest.py`` puts ``tests/`` there too. A folder
in either with an ``__init__.py`` (or a ``.py`` file) wins over an installed package of the same
name: our old top-level ``kernels/__init__.py`` hid Hugging Face's ``kernels`` (required and
imported by transformers >= 5.25) and broke every command. These tests run the real commands from
the root in fresh interpreters and build the wheel; none of them skips.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
#: The folders our commands put first on sys.path: the root (python -m ... / -c in the root) and
#: tests/ (conftest.py, so that test modules import helpers and tiny_models).
SEARCH_ROOTS = (ROOT, TESTS)


def run_in_root(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh interpreter whose working directory is the repository root, as a
    user types it there: nothing of ours on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONSTARTUP")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def importable_names(folder: Path) -> dict[str, Path]:
    """Top-level names an import statement finds in ``folder``: packages (with or without
    ``__init__.py``) and modules."""
    names = {}
    for entry in folder.iterdir():
        if entry.name.startswith((".", "_")) or entry.name == "__pycache__":
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = entry
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = entry
    return names


def installed_top_level_names() -> dict[str, list[str]]:
    """Import name -> the installed distributions (other than fastadapt) that provide it."""
    provided = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in provided.items() if set(dists) - {"fastadapt"}}


def test_no_folder_of_ours_is_found_before_an_installed_package():
    """For every name an installed distribution provides that the root or tests/ also holds, the
    import system, searching our folders first (as it does there), finds the installed one. This
    fails on a folder with an ``__init__.py`` or a module of ours named like any installed package,
    whether or not anything imports it yet."""
    installed = installed_top_level_names()
    clashes = []
    for folder in SEARCH_ROOTS:
        for name, path in importable_names(folder).items():
            if name not in installed:
                continue
            spec = importlib.machinery.PathFinder.find_spec(name, [str(f) for f in SEARCH_ROOTS] + sys.path)
            if spec is None:
                continue
            # a module or regular package found in our folders wins; a namespace made only of our
            # folders means the installed package was never reached
            where = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
            if where and all(Path(w).resolve().is_relative_to(ROOT) for w in where):
                clashes.append(f"{path.relative_to(ROOT)} shadows {name!r} of {installed[name]}")
    assert not clashes, "names of ours hide installed packages: " + "; ".join(clashes)


def test_the_kernels_folder_is_not_a_package_at_the_top_level():
    """Whatever is installed: the top-level ``kernels/`` can never be a regular package (it would
    shadow Hugging Face's ``kernels``); the Triton sources are ``fastadapt.kernels``."""
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(ROOT)])
    assert spec is None or spec.origin is None, f"{ROOT / 'kernels'} is a regular package ({spec.origin}): it shadows Hugging Face's kernels"
    assert not (ROOT / "kernels.py").exists()
    spec = importlib.util.find_spec("fastadapt.kernels")
    assert spec is not None and spec.origin and Path(spec.origin).name == "__init__.py", spec


def test_from_the_root_kernels_is_hugging_faces_and_transformers_imports():
    """transformers' hub-kernels integration and peft import from the root; where Hugging Face's
    ``kernels`` is installed (transformers >= 5.25 requires it; the test extra installs it), the
    root's ``import kernels`` is that package, not our folder."""
    probe = (
        "import importlib.util, json\n"
        "import transformers.integrations.hub_kernels, peft\n"
        "import fastadapt.kernels.lora_linear as k\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps({'kernels': None if spec is None else (spec.origin or list(spec.submodule_search_locations)),\n"
        "                  'fastadapt.kernels': k.__file__}))\n"
    )
    done = run_in_root("-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["fastadapt.kernels"]).name == "lora_linear.py"
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        hf_kernels = False
    else:
        hf_kernels = True
    if hf_kernels:
        origin = found["kernels"]
        paths = [origin] if isinstance(origin, str) else origin
        assert paths and not any(Path(p).resolve().is_relative_to(ROOT) for p in paths), (
            f"from the root, `import kernels` finds {paths}, not Hugging Face's package")


def test_python_m_fastadapt_runs_from_the_root():
    done = run_in_root("-m", "fastadapt", "--help", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "main-job" in done.stdout


def test_pytest_collects_from_the_root():
    """The README's test command collects every test module without an error (an import clash shows
    up here first: the failure that hid behind an older transformers)."""
    done = run_in_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "error" not in out.lower().split("tests collected")[-1], out[-4000:]
    assert " tests collected" in out or " test collected" in out, out[-2000:]


#: What a build needs from the tree (everything else is tests, docs, runs).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "fastadapt", "kernels", "csrc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree with the installed setuptools (no network, no build
    isolation; the CUDA extension is not built, as on any machine without nvcc + CUDA torch)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "FASTADAPT_SKIP_CUDA_BUILD": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (built,) = out.glob("fastadapt-*.whl")
    return built


def test_the_wheel_installs_fastadapt_alone_at_the_top_level(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top = {n.split("/", 1)[0] for n in names}
        dist_info = {t for t in top if t.endswith(".dist-info")}
        assert top - dist_info == {"fastadapt"}, f"the wheel installs {sorted(top - dist_info)} at the top level"
        (info,) = dist_info
        if f"{info}/top_level.txt" in names:
            assert zf.read(f"{info}/top_level.txt").decode().split() == ["fastadapt"]
    # the Triton kernels are in it, under their one name, with the data the package reads
    for needed in ("fastadapt/kernels/__init__.py", "fastadapt/kernels/lora_linear.py", "fastadapt/kernels/_common.py",
                   "fastadapt/app/data/LICENSES.md", "fastadapt/app/data/gsm8k.train.jsonl.gz"):
        assert needed in names, f"{needed} is missing from {wheel.name}"
    assert not any(n.startswith("kernels/") for n in names)
