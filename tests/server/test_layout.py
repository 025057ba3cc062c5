"""The server and the CLI import each other in one direction only, with imports at the top of files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("llmcore/server", "llmcore/cli")
# optional dependencies imported where they are used, each with a comment saying why
LAZY_OK = {"ray", "ray.serve", "ray.serve.config", "ray.serve.context", "llmcore.server.app"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = str(path.relative_to(ROOT).with_suffix("")).replace("/", ".").removesuffix(".__init__")
            out[name] = ast.parse(path.read_text())
    return out


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.AST, top_only: bool) -> list[tuple[str, int]]:
    """``(module, line)`` of each import; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    nodes = tree.body if top_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            found += [(name, node.lineno) for name in subs or [node.module]]
    return found


def test_no_import_cycle_between_server_and_cli_modules():
    mods = _modules()
    graph = {m: {name for name, _ in _imports(tree, top_only=False) if name in mods and name != m}
             for m, tree in mods.items()}

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])

    for m in graph:
        visit(m, [])


def test_function_level_imports_are_only_optional_dependencies():
    for m, tree in _modules().items():
        top = set(_imports(tree, top_only=True))
        late = [(name, line) for name, line in _imports(tree, top_only=False)
                if (name, line) not in top and name.split(".")[0] != "__future__"]
        bad = [f"{m}:{line} imports {name}" for name, line in late if name not in LAZY_OK
               and not any(name.startswith(ok + ".") for ok in LAZY_OK)]
        assert not bad, bad
