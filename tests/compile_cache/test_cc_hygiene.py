"""The package stays light and safe: no torch import, no pickle-family deserialisation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from cc_helpers import REPO_ROOT, subprocess_env

PKG = REPO_ROOT / "compile_cache"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def test_import_does_not_pull_in_torch():
    code = ("import compile_cache, compile_cache.cli, sys; "
            "bad = {'torch', 'numpy', 'pickle'} & set(sys.modules); assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0, out.stderr


def _imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            yield "__import__"


def test_no_pickle_or_dynamic_imports_in_source():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) >= 6
    for f in files:
        mods = set(_imported_modules(f))
        assert not (mods & UNSAFE_MODULES), f"{f.name} imports {mods & UNSAFE_MODULES}"
        assert "__import__" not in mods, f"{f.name} uses __import__"
        text = f.read_text()
        assert "torch.load" not in text and "pickle" not in text.replace("no pickle", ""), f.name


def test_stdlib_only():
    stdlib = set(sys.stdlib_module_names) | {"compile_cache", "__future__"}
    for f in PKG.rglob("*.py"):
        third_party = set(_imported_modules(f)) - stdlib - {"__import__"}
        assert not third_party, f"{f.name} imports {third_party}"
