"""The package's layers, read from its imports with ``ast``: no cycle between subpackages, each
layer imports only those below it, and the pure engines import no framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "scpretrain_dist"

# what each part may import (besides itself); lower layers never import higher ones
ALLOWED = {
    "config": set(),
    "console": set(),
    "recipes": {"config"},
    "runtime": {"config", "console"},
    "catalog": {"config"},
    "store": {"config", "catalog"},
    "data": {"config", "catalog", "store", "model"},
    "demo": {"config", "catalog", "store"},
    "pseudolabel": {"config", "store", "data", "model", "runtime"},
    "model": set(),
    "tracking": {"config", "console"},
    "train": {"console", "config", "store", "data", "pseudolabel", "model", "runtime", "tracking"},
    "evaluate": {"console", "config", "store", "data", "model", "train"},
    "serve": {"console", "config", "catalog", "store", "data", "model", "runtime", "tracking"},
    "pipeline": {"console", "config", "recipes", "catalog", "store", "data", "demo", "pseudolabel", "model", "train",
                 "evaluate", "tracking", "serve", "runtime"},
    "cli": {"console", "config", "recipes", "catalog", "store", "data", "demo", "pseudolabel", "model", "train",
            "evaluate", "tracking", "serve", "runtime", "pipeline", "bench"},
    "bench": {"console", "config", "recipes", "catalog", "store", "data", "demo", "pseudolabel", "model", "train",
              "evaluate", "tracking", "serve", "runtime", "pipeline"},
}
# modules that must stay free of the distributed and tracking frameworks
PURE = {"model": ("mlflow", "ray"), "data/normalize.py": ("mlflow", "ray", "torch"),
        "pseudolabel/kmeans.py": ("mlflow", "ray")}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (top level or inside functions), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = _part(path)
        for mod, line in _imports(path):
            if mod.startswith("scpretrain_dist."):
                dst = mod.split(".")[1]
                if dst != src:
                    edges.setdefault((src, dst), []).append(f"{path.relative_to(PACKAGE)}:{line}")
    return edges


def test_every_part_has_a_layer():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert parts <= set(ALLOWED), f"parts without a layer: {sorted(parts - set(ALLOWED))}"


def test_no_part_imports_above_its_layer():
    bad = {f"{a} -> {b}": where for (a, b), where in _edges().items() if b not in ALLOWED.get(a, set())}
    assert not bad, "imports against the layering:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(bad.items()))


def test_no_import_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b)
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


@pytest.mark.parametrize("where", sorted(PURE))
def test_pure_engines_import_no_framework(where):
    target = PACKAGE / where
    files = list(target.rglob("*.py")) if target.is_dir() else [target]
    found = [f"{p.relative_to(PACKAGE)}:{line} imports {mod}" for p in files for mod, line in _imports(p)
             if mod.split(".")[0] in PURE[where]]
    assert not found, found


def test_the_checks_see_an_import_inside_a_function(tmp_path):
    """The walk finds imports wherever they are written, not only at the top of a module."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray\n    from mlflow import x\n")
    assert [m for m, _ in _imports(f)] == ["ray", "mlflow"]


# where each framework may be called from: every MLflow call in tracking/ (serve/ defines the
# pyfunc flavour and runs MLflow's scoring server); Ray where something is distributed
FRAMEWORK_HOMES = {
    "mlflow": {"tracking/mlflow_runs.py", "tracking/registry.py", "serve/pyfunc.py", "serve/server.py"},
    "ray": {"runtime.py", "pseudolabel/pool.py", "train/pretrain.py", "serve/annotate.py", "bench/kmeans.py"},
}


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_HOMES))
def test_frameworks_are_called_from_their_homes_only(framework):
    found = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
             for mod, _ in _imports(p) if mod.split(".")[0] == framework}
    assert found <= FRAMEWORK_HOMES[framework], sorted(found - FRAMEWORK_HOMES[framework])
