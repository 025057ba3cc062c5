"""Tensors of the KServe v2 protocol: read from JSON, binary and protobuf, written back the same ways.

A :class:`Tensor` holds its elements flat, in row-major order, as Python values (``bytes`` for
BYTES, ``bool``, ``int``, ``float``). Three encodings exist on the wire:

- JSON ``data`` (HTTP): a list, nested or flat; BYTES elements are strings.
- Raw bytes (HTTP binary-data extension, gRPC ``raw_*_contents``): little-endian elements back
  to back; a BYTES element is a 4-byte little-endian length followed by its bytes.
- Typed ``contents`` (gRPC): the repeated field of the datatype.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmcore.kserve.errors import invalid

# datatype -> numpy dtype of its raw form (BYTES has none: length-prefixed)
NUMPY_TYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
DATATYPES = frozenset(NUMPY_TYPES) | {"BYTES", "BF16"}

# datatype -> the field of InferTensorContents that carries it (gRPC)
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] = field(default_factory=list)
    where: str = ""  # how errors name it: "inputs[0] (text_input)"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _check_header(name: Any, datatype: Any, shape: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.name: every tensor needs a name")
    if datatype not in DATATYPES:
        raise invalid(f"{where} ({name}).datatype: {datatype!r} is not a protocol datatype; use one of "
                      f"{', '.join(sorted(DATATYPES))}")
    if not isinstance(shape, (list, tuple)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0
                                                  for d in shape):
        raise invalid(f"{where} ({name}).shape: {shape!r} must be a list of non-negative integers")


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _check_size(t: Tensor) -> Tensor:
    if len(t.data) != t.size:
        raise invalid(f"{t.where}: shape {t.shape} holds {t.size} element(s) but {len(t.data)} were sent")
    return t


def decode_raw(raw: bytes, datatype: str, where: str) -> list[Any]:
    """Elements of a raw buffer (binary-data extension, gRPC raw contents)."""
    if datatype == "BYTES":
        out, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise invalid(f"{where}: raw BYTES data ends inside an element's 4-byte length")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise invalid(f"{where}: raw BYTES element of {n} bytes runs past the end of the data")
            out.append(bytes(raw[pos:pos + n]))
            pos += n
        return out
    if datatype == "BF16":
        raise invalid(f"{where}: BF16 tensors are not accepted by llmcore's text models")
    dt = np.dtype(NUMPY_TYPES[datatype])
    if len(raw) % dt.itemsize:
        raise invalid(f"{where}: {len(raw)} raw bytes is not a whole number of {datatype} elements")
    return np.frombuffer(raw, dtype=dt).tolist()


def encode_raw(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in t.data)
    return np.asarray(t.data, dtype=NUMPY_TYPES[t.datatype]).tobytes()


# ------------------------------------------------------------------ JSON (HTTP)


def from_json(obj: Any, index: int, binary: bytes | None) -> Tensor:
    """One entry of a JSON request's ``inputs``; ``binary`` is its slice of the binary data, if any."""
    where = f"inputs[{index}]"
    if not isinstance(obj, dict):
        raise invalid(f"{where}: must be an object with name, shape, datatype and data")
    name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
    _check_header(name, datatype, shape, where)
    t = Tensor(name, datatype, list(shape), where=f"{where} ({name})")
    if binary is not None:
        t.data = decode_raw(binary, datatype, t.where)
    elif "data" not in obj:
        raise invalid(f"{t.where}.data: missing (and no binary_data_size parameter)")
    else:
        t.data = [_json_value(x, datatype, t.where) for x in _flatten(obj["data"])]
    return _check_size(t)


def _json_value(x: Any, datatype: str, where: str) -> Any:
    if datatype == "BYTES":
        if isinstance(x, str):
            return x.encode("utf-8")
        raise invalid(f"{where}.data: BYTES elements must be strings, got {type(x).__name__}")
    if datatype == "BOOL":
        if isinstance(x, bool):
            return x
        raise invalid(f"{where}.data: BOOL elements must be true or false, got {x!r}")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise invalid(f"{where}.data: {datatype} elements must be numbers, got {x!r}")
    if datatype.startswith(("INT", "UINT")) and not isinstance(x, int):
        raise invalid(f"{where}.data: {datatype} elements must be integers, got {x!r}")
    return x


def to_json(t: Tensor, binary: bool) -> tuple[dict[str, Any], bytes]:
    """A response output as JSON; with ``binary`` its data goes into the returned bytes instead."""
    out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
    if binary:
        raw = encode_raw(t)
        out["parameters"] = {"binary_data_size": len(raw)}
        return out, raw
    out["data"] = [x.decode("utf-8", "replace") for x in t.data] if t.datatype == "BYTES" else list(t.data)
    return out, b""


# ------------------------------------------------------------------ protobuf (gRPC)


def from_proto(msg: Any, index: int, raw: bytes | None) -> Tensor:
    """One ``ModelInferRequest.InferInputTensor``; ``raw`` is its ``raw_input_contents`` entry, if sent."""
    where = f"inputs[{index}]"
    _check_header(msg.name, msg.datatype, list(msg.shape), where)
    t = Tensor(msg.name, msg.datatype, list(msg.shape), where=f"{where} ({msg.name})")
    if raw is not None:
        t.data = decode_raw(raw, msg.datatype, t.where)
    else:
        fld = CONTENTS_FIELD.get(msg.datatype)
        if fld is None:
            raise invalid(f"{t.where}: {msg.datatype} data must come as raw_input_contents")
        t.data = list(getattr(msg.contents, fld))
    return _check_size(t)


def to_proto(t: Tensor, out: Any) -> bytes:
    """Fill an ``InferOutputTensor`` header and return the raw contents that go with it."""
    out.name = t.name
    out.datatype = t.datatype
    out.shape.extend(t.shape)
    return encode_raw(t)
