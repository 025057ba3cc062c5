"""What the native decode step needs from the machine, answered without torch (the probe uses it).

``LLMCORE_CPU_NATIVE``: ``0`` turns the native step off, ``1`` forces it on CPUs without
AVX-512, unset (or anything else) lets the engine decide.

``LLMCORE_CPU_ISA``: ``avx2`` builds the step's AVX2 + FMA kernels on a CPU that also has AVX-512
(``-mno-avx512f``), ``portable`` its portable loops; unset builds for the CPU (``-march=native``).
For tests and comparisons: the tests run both kernel sets on an AVX-512 machine this way.
"""

from __future__ import annotations

import os
import shutil

ENV = "LLMCORE_CPU_NATIVE"
ISA_ENV = "LLMCORE_CPU_ISA"
# extra compiler flags after -march=native, per LLMCORE_CPU_ISA value
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "portable": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}


def native_setting() -> str:
    """``"off"``, ``"force"`` or ``"auto"`` from ``LLMCORE_CPU_NATIVE``."""
    value = os.environ.get(ENV, "")
    return {"0": "off", "1": "force"}.get(value, "auto")


def isa_setting() -> str:
    """``"native"``, ``"avx2"`` or ``"portable"`` from ``LLMCORE_CPU_ISA``; anything else is an error
    that names the values that work."""
    value = os.environ.get(ISA_ENV, "").strip().lower() or "native"
    if value not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={os.environ[ISA_ENV]!r}: use one of {', '.join(ISA_FLAGS)} "
                         "(or leave it unset for the CPU's own kernels)")
    return value


def find_compiler() -> str | None:
    """``$CXX``, else the first of g++, c++, clang++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
