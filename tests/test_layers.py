"""Imports point one way: no cycle between flipcheck's subpackages and top-level modules, counting
imports inside functions, and the executors and evaluation import nothing of the layers above them."""

from __future__ import annotations

import ast
from pathlib import Path

import flipcheck

ROOT = Path(flipcheck.__file__).parent


def _unit(parts: list[str]) -> str:
    """A subpackage by its folder, a top-level module by its name."""
    return parts[0].removesuffix(".py")


def import_edges() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: [where, ...]} over every ``import flipcheck...`` anywhere in a file."""
    edges: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        unit = _unit(list(rel.parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "flipcheck" else [f"flipcheck.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "flipcheck" or len(parts) < 2:
                    continue
                target = parts[1]
                if target != unit and ((ROOT / target).is_dir() or (ROOT / f"{target}.py").is_file()):
                    edges.setdefault(unit, {}).setdefault(target, []).append(f"{rel}:{node.lineno}")
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected sets of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for e in edges.values() for w in e}):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_subpackages_or_modules():
    edges = import_edges()
    found = cycles(edges)
    where = {" <-> ".join(c): {a: {b: edges[a][b][:2] for b in edges.get(a, {}) if b in c} for a in c} for c in found}
    assert not found, where


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]


def test_executors_run_opaque_work_and_evaluation_knows_nothing_above_it():
    edges = import_edges()
    assert set(edges.get("executors", {})) <= {"errors"}, edges.get("executors")
    above = {"orchestrate", "recipes", "decide", "judge", "executors", "cli", "gate", "demo", "demo_run"}
    assert not set(edges.get("evaluation", {})) & above, edges.get("evaluation")
    assert not set(edges.get("compressors", {})) & (above | {"evaluation"}), edges.get("compressors")
