"""docs/plugins.md, executed: its files are written out, its distribution installed, its commands run.

A block fenced as ```<lang> file=<path> is written to <path> under a temp dir;
```bash blocks are commands and ```python blocks without a file are scripts,
both run from that dir. `pip install -e ./X` is carried out as
`pip install --no-deps --no-build-isolation --target <site> ./X`: a real build
with real entry-point metadata (a .dist-info with entry_points.txt) placed on
the path of the commands, without touching the shared environment.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w+)(?:[ \t]+file=(\S+))?[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def doc_blocks() -> list[tuple[str, str | None, str]]:
    return [(lang, path, body) for lang, path, body in FENCE.findall(DOC.read_text())]


class Guide:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.site = root / "site"
        self.env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
                        PYTHONPATH=os.pathsep.join([str(self.site), *(p for p in sys.path if p)]))

    def run(self, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def command(self, line: str) -> subprocess.CompletedProcess:
        argv = shlex.split(line)
        if argv[:3] == ["pip", "install", "-e"]:
            argv = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(self.site), argv[3]]
        elif argv[0] == "llmcore":
            argv = [sys.executable, "-m", "llmcore.cli.main", *argv[1:]]
        elif argv[0] == "pytest":
            argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv[1:]]
        else:
            raise AssertionError(f"docs/plugins.md runs a command this test does not know: {line}")
        return self.run(argv)


@pytest.fixture(scope="module")
def guide(tmp_path_factory) -> Guide:
    g = Guide(tmp_path_factory.mktemp("plugin-guide"))
    for lang, path, body in doc_blocks():
        if path:
            target = g.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body)
    install = next(line for lang, _, body in doc_blocks() if lang == "bash" for line in body.splitlines()
                   if line.startswith("pip install"))
    proc = g.command(install)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return g


def commands(prefix: str) -> list[str]:
    return [line for lang, path, body in doc_blocks() if lang == "bash" and not path
            for line in body.splitlines() if line.startswith(prefix)]


def test_the_guide_is_short_and_complete():
    assert len(DOC.read_text().splitlines()) < 180, "the walkthrough must stay well under 200 lines"
    files = {path for _, path, _ in doc_blocks() if path}
    assert files == {"llmcore-toyaccel/pyproject.toml", "llmcore-toyaccel/llmcore_toyaccel/__init__.py",
                     "llmcore-toyaccel/llmcore_toyaccel/plugin.py", "llmcore-toyaccel/llmcore_toyaccel/device.py",
                     "llmcore-toyaccel/tests/test_conformance.py"}
    assert commands("pip install") and commands("llmcore devices") and commands("pytest")


def test_install_gives_real_entry_point_metadata(guide):
    (dist_info,) = guide.site.glob("llmcore_toyaccel-*.dist-info")
    assert "[llmcore.plugins]\ntoy = llmcore_toyaccel.plugin" in (dist_info / "entry_points.txt").read_text()
    proc = guide.run([sys.executable, "-c",
                      "from importlib.metadata import entry_points; "
                      "print([(e.name, e.value, e.dist.name) for e in entry_points(group='llmcore.plugins')])"])
    assert "('toy', 'llmcore_toyaccel.plugin', 'llmcore-toyaccel')" in proc.stdout, proc.stderr


def test_llmcore_devices_lists_the_toy_device(guide):
    (line,) = commands("llmcore devices")
    proc = guide.command(line)
    assert proc.returncode == 0, proc.stderr
    rows = {r.split()[0]: r.split() for r in proc.stdout.splitlines() if r.strip()}
    assert rows["toy"][1:3] == ["1", "usable"] and rows["toy"][3] == "float32,bfloat16"
    assert "toy: toy accelerator" in proc.stdout
    assert "REFUSED" not in proc.stdout


def test_the_python_example_generates_on_toy(guide):
    (script,) = [body for lang, path, body in doc_blocks() if lang == "python" and not path]
    proc = guide.run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr
    name, text = proc.stdout.strip().split(" ", 1)
    assert name == "toy" and len(text) > 2


def test_the_conformance_suite_passes_for_toy(guide):
    (line,) = commands("pytest")
    proc = guide.command(line)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary and "error" not in summary, summary
