"""CacheKey: everything a compiled artifact depends on, hashed canonically.

Other compile caches go wrong by keying on too little (e.g. model name but
not weights, or not the compiler version), so a stale artifact is reused.
Here every field is part of the digest, the encoding is canonical JSON
(sorted keys, fixed separators, ASCII, no NaN) so the digest is stable
across processes, machines and dict insertion order, and a ``key_schema``
number is hashed in so a future change to the field set can never collide
with old digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .paths import SHORT_LEN

KEY_SCHEMA = 1

_STR_FIELDS = ("model_fingerprint", "plugin", "plugin_version", "compiler", "compiler_version", "dtype")
_OPT_STR_FIELDS = ("quantization", "target")
_DICT_FIELDS = ("compiler_flags", "static_shapes", "extra")


def canonical_json(obj: Any) -> str:
    """The one serialisation used for hashing; raises TypeError/ValueError if not JSON-able."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _normalise(name: str, value: Any) -> Any:
    """Deep-copy through JSON so later mutation by the caller cannot change the key."""
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"CacheKey.{name} must be JSON-serialisable (str/int/float/bool/None/list/dict): {exc}") from None


@dataclass(frozen=True)
class CacheKey:
    """Identity of a compiled artifact. Change any field and the digest changes.

    ``target`` is for the hardware the artifact was compiled for when it is
    not implied by the plugin (CPU ISA such as "x86_64-avx512", Neuron core
    version "trn2", RBLN NPU type); a shared cache on mixed hosts needs it.
    Anything else a plugin depends on goes in ``extra``.
    """

    model_fingerprint: str
    plugin: str
    plugin_version: str
    compiler: str
    compiler_version: str
    compiler_flags: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    quantization: Optional[str] = None
    static_shapes: Dict[str, Any] = field(default_factory=dict)
    tensor_parallel: int = 1
    extra: Dict[str, Any] = field(default_factory=dict)
    target: Optional[str] = None

    def __post_init__(self) -> None:
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"CacheKey.{name} must be a non-empty str, got {value!r}")
        for name in _OPT_STR_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"CacheKey.{name} must be a str or None, got {value!r}")
        for name in _DICT_FIELDS:
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise TypeError(f"CacheKey.{name} must be a dict, got {type(value).__name__}")
            object.__setattr__(self, name, _normalise(name, dict(value)))
        tp = self.tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise TypeError(f"CacheKey.tensor_parallel must be an int >= 1, got {tp!r}")

    # dict fields make the generated hash unusable; the digest is the identity.
    def __hash__(self) -> int:
        return hash(self.digest())

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able dict of every field plus ``key_schema``."""
        d: Dict[str, Any] = {"key_schema": KEY_SCHEMA}
        for f in dataclasses.fields(self):
            d[f.name] = _normalise(f.name, getattr(self, f.name))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheKey":
        """Inverse of ``to_dict``. Unknown fields or another key_schema raise ValueError,
        so a key written by a newer version is never silently truncated."""
        data = dict(d)
        schema = data.pop("key_schema", KEY_SCHEMA)
        if schema != KEY_SCHEMA:
            raise ValueError(f"unsupported key_schema {schema!r} (this version reads {KEY_SCHEMA})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown CacheKey field(s): {', '.join(unknown)}")
        return cls(**data)

    def canonical(self) -> str:
        return canonical_json(self.to_dict())

    def digest(self) -> str:
        """Hex sha256 of the canonical JSON of every field."""
        return hashlib.sha256(self.canonical().encode("ascii")).hexdigest()

    def short(self) -> str:
        """First 16 hex chars of the digest; the entry's directory name."""
        return self.digest()[:SHORT_LEN]

    def summary(self) -> str:
        """One-line human description (for logs and ``cache ls``)."""
        parts = [f"{self.plugin}/{self.compiler}", self.dtype]
        if self.quantization:
            parts.append(self.quantization)
        if self.tensor_parallel != 1:
            parts.append(f"tp{self.tensor_parallel}")
        shapes = self.static_shapes
        if "batch_sizes" in shapes:
            bs = shapes["batch_sizes"]
            parts.append("bs=" + (",".join(str(b) for b in bs) if isinstance(bs, list) else str(bs)))
        if "max_seq_len" in shapes:
            parts.append(f"seq={shapes['max_seq_len']}")
        if self.target:
            parts.append(self.target)
        return " ".join(parts)
