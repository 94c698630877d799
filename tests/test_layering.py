"""The package's layering (docs/architecture.md): imports only point down, no import cycle, one
name per file (no symlink), and pyproject lists every package."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels" / "fastadapt_kernels"  # the package fastadapt.kernels (pyproject's package-dir)

#: Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("fastadapt.settings", "fastadapt._checks", "fastadapt._files", "fastadapt._cuda_build", "fastadapt.distributed", "fastadapt.models"),
    ("fastadapt.kernels",),
    ("fastadapt.ops",),
    ("fastadapt.modules",),
    ("fastadapt.architectures",),
    ("fastadapt.methods",),
    ("fastadapt.io", "fastadapt.gguf_io"),
    ("fastadapt.patch", "fastadapt.mixed"),
    ("fastadapt.named",),
    ("fastadapt.merge", "fastadapt.export"),
    ("fastadapt",),  # the public API (fastadapt/__init__.py)
    ("fastadapt.app", "fastadapt.__main__"),
]


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "fastadapt").rglob("*.py")) + sorted(KERNELS.glob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "kernels":  # kernels/fastadapt_kernels/<op>.py installs as fastadapt.kernels.<op>
            parts = ["fastadapt", "kernels", *parts[2:]]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer of LAYERS"
    return rank


def _imports(module: str, path: Path) -> set[str]:
    """Every fastadapt module that ``module`` imports, at any depth of its code (lazy imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "fastadapt" or t.startswith("fastadapt."))
    return found - {module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports from higher layers: {upward}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle():
    assert not _cycles(GRAPH), f"import cycles: {_cycles(GRAPH)}"


def test_no_symlinks_in_the_package():
    links = [str(p.relative_to(ROOT)) for d in ("fastadapt", "kernels") for p in (ROOT / d).rglob("*") if p.is_symlink()]
    assert not links, f"symlinks give one file two import names: {links}"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == on_disk, f"pyproject packages differ from the folders: {sorted(listed ^ on_disk)}"


def test_the_checker_catches_lazy_upward_imports_and_cycles(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("import torch\n\ndef f():\n    from ..patch import patch\n")
    found = _imports("fastadapt.ops.fake", fake)
    assert found == {"fastadapt.patch"} and _layer("fastadapt.patch") > _layer("fastadapt.ops.fake")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
