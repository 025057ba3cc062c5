"""CacheKey: every field is in the digest, the digest is canonical and stable."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from compile_cache import CacheKey
from cc_helpers import BASE_KEY, make_key, subprocess_env

# One alternative value per field; the parametrisation below fails if a new
# field is added to CacheKey without being covered here.
CHANGED = {
    "model_fingerprint": "sha256:" + "ef" * 32,
    "plugin": "neuron",
    "plugin_version": "0.1.1",
    "compiler": "neuronx-cc",
    "compiler_version": "2.13.1",
    "compiler_flags": {"mode": "default", "freezing": True},
    "dtype": "float16",
    "quantization": "int8",
    "static_shapes": {"batch_sizes": [1, 8], "max_seq_len": 2048, "block_size": 16},
    "tensor_parallel": 2,
    "extra": {"neuron_cores": 2},
    "target": "trn2",
}


def test_every_field_is_covered():
    assert {f.name for f in dataclasses.fields(CacheKey)} == set(CHANGED)


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_changing_any_field_changes_digest(field):
    base = make_key()
    changed = make_key(**{field: CHANGED[field]})
    assert changed.digest() != base.digest()
    assert changed.short() != base.short()


@pytest.mark.parametrize("field,value", [
    ("static_shapes", {"batch_sizes": [1, 4], "max_seq_len": 4096, "block_size": 16}),
    ("static_shapes", {"batch_sizes": [4, 1], "max_seq_len": 2048, "block_size": 16}),
    ("compiler_flags", {"mode": "max-autotune", "freezing": False}),
    ("compiler_flags", {"mode": "max-autotune", "freezing": 1}),  # bool vs int differ
    ("extra", {"x": None}),
])
def test_nested_changes_change_digest(field, value):
    assert make_key(**{field: value}).digest() != make_key().digest()


def test_flag_order_does_not_matter():
    a = make_key(compiler_flags={"a": 1, "b": {"y": 2, "x": 3}})
    b = make_key(compiler_flags={"b": {"x": 3, "y": 2}, "a": 1})
    assert a.digest() == b.digest()
    assert a == b and hash(a) == hash(b)


def test_digest_format():
    d = make_key().digest()
    assert len(d) == 64 and int(d, 16) >= 0
    assert make_key().short() == d[:16]


def test_same_digest_in_another_process():
    code = ("import json,sys; from compile_cache import CacheKey; "
            "print(CacheKey(**json.loads(sys.argv[1])).digest())")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(BASE_KEY)], capture_output=True,
                         text=True, env=subprocess_env(), check=True)
    assert out.stdout.strip() == make_key().digest()


def test_round_trip_and_unknown_fields():
    k = make_key(quantization="fp8", extra={"a": [1, 2]})
    d = k.to_dict()
    json.dumps(d)  # JSON-able
    assert CacheKey.from_dict(d) == k
    assert CacheKey.from_dict(d).digest() == k.digest()
    with pytest.raises(ValueError, match="unknown CacheKey field"):
        CacheKey.from_dict({**d, "new_field": 1})
    with pytest.raises(ValueError, match="key_schema"):
        CacheKey.from_dict({**d, "key_schema": 99})


def test_caller_mutation_does_not_change_key():
    flags = {"mode": "max-autotune"}
    k = make_key(compiler_flags=flags)
    before = k.digest()
    flags["mode"] = "default"
    assert k.digest() == before


@pytest.mark.parametrize("kw", [
    {"plugin": ""},
    {"tensor_parallel": 0},
    {"tensor_parallel": True},
    {"compiler_flags": {"f": object()}},
    {"static_shapes": {"x": float("nan")}},
    {"quantization": 8},
])
def test_invalid_fields_rejected(kw):
    with pytest.raises(TypeError):
        make_key(**kw)
