"""The ctypes Structures in llmcore_cpu.native mirror decode.cpp's structs byte for byte.

decode.cpp reports every field's offset and size (``llmcore_struct_layout``, computed by the
compiler with offsetof/sizeof); a field added, moved or retyped on one side only would make the
step read the wrong bytes, so it must fail here first. Needs a C++ compiler, not AVX-512.
"""

from __future__ import annotations

import ctypes

import pytest

native = pytest.importorskip("llmcore_cpu.native")

STRUCTS = {"Linear": native._Linear, "Layer": native._Layer, "Model": native._Model, "Work": native._Work}


@pytest.fixture(scope="module")
def cpp_layout() -> dict[str, list[tuple[str, int, int]]]:
    try:
        lib = native.library()
    except native.NativeUnavailable as exc:  # no compiler on this machine: say so, do not fail
        pytest.skip(f"native step unavailable: {exc}")
    layout: dict[str, list[tuple[str, int, int]]] = {}
    for line in lib.llmcore_struct_layout().decode().splitlines():
        struct, field, *numbers = line.split()
        layout.setdefault(struct, []).append((field, *map(int, numbers)))
    return layout


def _ctypes_layout(cls) -> list[tuple[str, int, int]]:
    fields = [(name, getattr(cls, name).offset, getattr(cls, name).size) for name, _ in cls._fields_]
    return fields + [("-", ctypes.sizeof(cls))]


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_ctypes_struct_matches_the_cpp_struct(cpp_layout, name):
    # (field, offset, size) in declaration order, then ("-", sizeof), from both sides
    assert _ctypes_layout(STRUCTS[name]) == cpp_layout[name]


def test_every_mirrored_struct_is_reported(cpp_layout):
    assert sorted(cpp_layout) == sorted(STRUCTS)
