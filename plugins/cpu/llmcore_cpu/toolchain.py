"""What the native decode step needs from the machine, answered without torch (the probe uses it).

``LLMCORE_CPU_NATIVE``: ``0`` turns the native step off, ``1`` forces it on CPUs without
AVX-512, unset (or anything else) lets the engine decide.
"""

from __future__ import annotations

import os
import shutil

ENV = "LLMCORE_CPU_NATIVE"


def native_setting() -> str:
    """``"off"``, ``"force"`` or ``"auto"`` from ``LLMCORE_CPU_NATIVE``."""
    value = os.environ.get(ENV, "")
    return {"0": "off", "1": "force"}.get(value, "auto")


def find_compiler() -> str | None:
    """``$CXX``, else the first of g++, c++, clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
