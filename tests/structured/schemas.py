"""50 varied JSON schemas whose every instance is short (bounded strings, arrays and numbers).

Bounded so that a valid document always fits the tests' ``max_tokens``: whatever the model
writes inside the grammar, it must close the document in time. They cover nested objects,
arrays, enums, integer and number bounds, required and optional fields, const, anyOf, and
top-level arrays and enums.
"""

from __future__ import annotations

WORDS = ["name", "city", "color", "title", "code", "label", "brand", "team", "tag", "kind"]


def _string(i: int) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": 4 + i % 6}


def _integer(i: int) -> dict:
    return {"type": "integer", "minimum": -5 * (i % 3), "maximum": 10 + 7 * i}


def _number(i: int) -> dict:
    return {"type": "number", "minimum": 0, "maximum": 1 + i % 4}


def _boolean(i: int) -> dict:
    return {"type": "boolean"}


def _enum(i: int) -> dict:
    return {"enum": [["red", "green", "blue"], ["low", "mid", "high"], ["yes", "no"], [1, 2, 3]][i % 4]}


def _array(i: int) -> dict:
    items = [_enum, _integer, _boolean, _string][i % 4](i)
    return {"type": "array", "items": items, "minItems": i % 2, "maxItems": 2 + i % 3}


def _flat(i: int) -> dict:
    keys = [WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 3)]
    kinds = [_string, _integer, _enum, _boolean, _number]
    props = {k: kinds[(i + j) % len(kinds)](i + j) for j, k in enumerate(keys)}
    required = keys if i % 2 == 0 else keys[:1]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _nested(i: int) -> dict:
    inner = _flat(i + 1)
    return {"type": "object", "properties": {"id": _integer(i), "info": inner, "tags": _array(i)},
            "required": ["id", "info", "tags"], "additionalProperties": False}


def _deep(i: int) -> dict:
    leaf = {"type": "object", "properties": {"v": _enum(i), "n": _integer(i)}, "required": ["v", "n"],
            "additionalProperties": False}
    mid = {"type": "object", "properties": {"leaf": leaf, "ok": {"type": "boolean"}}, "required": ["leaf", "ok"],
           "additionalProperties": False}
    return {"type": "object", "properties": {"mid": mid, "items": {"type": "array", "items": leaf, "maxItems": 2}},
            "required": ["mid", "items"], "additionalProperties": False}


def _misc(i: int) -> dict:
    variants = [
        {"type": "array", "items": _flat(i), "minItems": 1, "maxItems": 2},
        {"type": "object", "properties": {"kind": {"const": "point"}, "x": _integer(i), "y": _integer(i + 1)},
         "required": ["kind", "x", "y"], "additionalProperties": False},
        {"type": "object", "properties": {"value": {"anyOf": [_integer(i), _enum(i + 1)]}, "note": _string(i)},
         "required": ["value"], "additionalProperties": False},
        {"enum": WORDS[i % 7: i % 7 + 3]},
        {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
            "type": "array", "items": _integer(i), "minItems": 1, "maxItems": 2}}},
         "required": ["matrix"], "additionalProperties": False},
    ]
    return variants[i % len(variants)]


def schemas() -> list[dict]:
    """50 schemas: 15 flat, 10 nested, 10 deep, 15 assorted."""
    return ([_flat(i) for i in range(15)] + [_nested(i) for i in range(10)] + [_deep(i) for i in range(10)]
            + [_misc(i) for i in range(15)])
