"""The house's rules, checked from the code's own imports (read with ``ast``, nothing imported).

- No import cycle inside ``llmcore/`` between files, counting imports inside functions and those
  made for type checkers only.
- No import cycle between rooms (a room is a sub-package such as ``llmcore.engine``, or a
  top-level module), and every import points down the floors listed in docs/architecture.md,
  never back up. Imports under ``if TYPE_CHECKING:`` do not count here: they name a type for the
  annotations and run nothing (the contract in hookspecs.py names ``Device``, say).
- No function in ``llmcore/`` imports another ``llmcore`` module: such an import hides a dependency
  (and usually a cycle). Imports inside functions are kept for optional packages (triton: the
  modules under ``llmcore.quantization.triton`` define Triton kernels at import), and for a
  module's lazy attributes (PEP 562 ``__getattr__``): ``llmcore.Engine`` keeps ``import llmcore``
  (every plugin does) free of torch, ``llmcore.server.create_app`` keeps its parsers free of
  FastAPI.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llmcore"

# Floors, lowest first: a room may import rooms on its own floor and on the floors below, never
# above. docs/architecture.md draws the same picture, with what each room is for.
FLOORS: list[tuple[str, ...]] = [
    # 0, the contract floor: data passed between the pieces, and errors (no torch)
    ("llmcore.errors", "llmcore.version", "llmcore.capabilities", "llmcore.outputs", "llmcore.config",
     "llmcore.structured", "llmcore.sampling_params", "llmcore.contract"),
    # 1, the plugin contract and discovery
    ("llmcore.hookspecs", "llmcore.plugins"),
    # 2, model code and weight formats
    ("llmcore.models", "llmcore.quantization"),
    # 3, what runs a model on a device: runners, tensor parallel, compiled graphs, device choice
    ("llmcore.parallel", "llmcore.runtime", "llmcore.selection", "llmcore.compiled", "llmcore.device"),
    # 4, the engine
    ("llmcore.engine",),
    # 5, front ends and tools over the engine
    ("llmcore.kserve", "llmcore.testing", "llmcore.bench", "llmcore.cli"),
    # 6, the server and the package's public face
    ("llmcore.server", "llmcore", "llmcore.__main__"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


OPTIONAL = ("llmcore.quantization.triton",)  # imported where used: they need triton


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[tuple[str, bool, bool]]:
    """(imported llmcore module, inside a function, for type checkers only) per import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = {id(fn) for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__"}
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              and id(fn) not in lazy
              for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block)
                   for node in ast.walk(block) if isinstance(node, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                here = here[: len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _target(name) if name.split(".")[0] == PACKAGE else None
            if target and target != module:
                out.append((target, id(node) in inside, id(node) in typing_only))
    return out


EDGES = {m: _imports(m, p) for m, p in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return module
    if len(parts) > 2 or MODULES[module].name == "__init__.py":
        return ".".join(parts[:2])
    return module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    result.append(sorted(members))
    return result


def _explain(cycle: list[str], graph: dict[str, set[str]]) -> str:
    inside = set(cycle)
    return "; ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & inside))


def test_no_import_cycle_between_files():
    graph = {m: {t for t, _, _ in edges} for m, edges in EDGES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + " | ".join(_explain(c, graph) for c in cycles)


def test_no_import_cycle_between_rooms():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, edges in EDGES.items():
        graph[room(module)]  # every room is a node
        for target, _, typing_only in edges:
            if room(target) != room(module) and not typing_only:
                graph[room(module)].add(room(target))
    cycles = _cycles(graph)
    assert not cycles, "rooms import each other: " + " | ".join(_explain(c, graph) for c in cycles)


def test_no_llmcore_import_inside_a_function():
    hidden = sorted(f"{m} imports {t}" for m, edges in EDGES.items() for t, inner, _ in edges
                    if inner and not t.startswith(OPTIONAL))
    assert not hidden, "move these to the top of the file: " + "; ".join(hidden)


def _floor(module: str) -> int:
    r = room(module)
    for level, rooms in enumerate(FLOORS):
        if r in rooms:
            return level
    pytest.fail(f"{r} is on no floor: add it to FLOORS here and to docs/architecture.md")


def test_every_import_points_down_or_across():
    up = sorted(f"{m} (floor {_floor(m)}) imports {t} (floor {_floor(t)})"
                for m, edges in EDGES.items() for t, _, typing_only in edges
                if room(t) != room(m) and not typing_only and _floor(t) > _floor(m))
    assert not up, "imports that run back up: " + "; ".join(up)
