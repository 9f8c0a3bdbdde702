"""An import of flipcheck's own modules inside a function has a reason: the module it names would pull a
heavy third-party package (torch, transformers, lm-eval, ...) into a module that does not need it at
load (a cold path: the CLI starts without torch), or it would close an import cycle, or the line says
why in a comment. Everything else is imported at the top of its module."""

from __future__ import annotations

import ast
from pathlib import Path

import flipcheck

ROOT = Path(flipcheck.__file__).parent
HEAVY = {"torch", "transformers", "lm_eval", "datasets", "llmcompressor", "vllm", "llama_cpp", "ray", "matplotlib",
         "scipy", "openai", "bitsandbytes", "gguf", "safetensors", "accelerate", "huggingface_hub", "numpy"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("flipcheck", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _in_function(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def _scan():
    """(module-level flipcheck imports, module-level third-party packages, function-level imports)."""
    top: dict[str, set[str]] = {m: set() for m in MODULES}
    ext: dict[str, set[str]] = {m: set() for m in MODULES}
    lazy = []
    for mod, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                own = node.module.startswith("flipcheck")
                names = [_resolve(f"{node.module}.{a.name}") for a in node.names] if own else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name if not a.name.startswith("flipcheck") else _resolve(a.name) for a in node.names]
            else:
                continue
            if _under_type_checking(node, parents):
                continue
            inside = _in_function(node, parents)
            for name in names:
                if name.startswith("flipcheck"):
                    if inside:
                        lazy.append((mod, name, node.lineno, any("#" in x for x in lines[node.lineno - 1:node.end_lineno])))
                    elif name != mod:
                        top[mod].add(name)
                elif not inside:
                    ext[mod].add(name.split(".")[0])
    return top, ext, lazy


def _loads(mod: str, top: dict[str, set[str]]) -> set[str]:
    """Every flipcheck module importing `mod` loads (its packages and their imports included)."""
    seen: set[str] = set()
    todo = [mod]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for dep in [".".join(parts[:i]) for i in range(2, len(parts))] + sorted(top.get(m, ())):
            if dep in MODULES and dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_import_inside_a_function_has_a_reason():
    top, ext, lazy = _scan()

    def heavy(m: str) -> set[str]:
        return {p for t in _loads(m, top) | {m} for p in ext[t]} & HEAVY

    unexplained = []
    for mod, target, line, commented in lazy:
        if target == mod or commented or mod in _loads(target, top) or heavy(target) - heavy(mod):
            continue
        unexplained.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {target}")
    assert not unexplained, "import these at the top of the module, or say why on the line:\n" + "\n".join(unexplained)


def test_the_cli_loads_without_torch():
    top, ext, _ = _scan()
    loaded = _loads("flipcheck.cli", top) | {"flipcheck.cli"}
    assert not {p for m in loaded for p in ext[m]} & {"torch", "transformers", "lm_eval"}
