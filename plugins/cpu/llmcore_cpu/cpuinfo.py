"""What this machine's CPU and memory are, read from /proc without torch (the probe, the compile
key and the native build's cache key all use it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo_line(prefixes: tuple[str, ...]) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``; empty where /proc/cpuinfo has none)."""
    line = _cpuinfo_line(("flags",))
    return set(line.split(":", 1)[1].split()) if line else set()


def cpu_id() -> str:
    """One line that changes when the CPU's features do (x86 ``flags``, arm ``Features``)."""
    return _cpuinfo_line(("flags", "Features")) or platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    """Available memory (``MemAvailable``), else the physical memory, else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
