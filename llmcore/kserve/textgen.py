"""The tensors of a text-generation model, as Triton's vLLM backend defines them.

Inputs (each of shape ``[1]``): ``text_input`` (BYTES, required), ``stream`` (BOOL),
``sampling_parameters`` (BYTES: a JSON object such as ``{"max_tokens": 64, "temperature": 0}``;
without it the request's own ``parameters`` are the sampling parameters),
``exclude_input_in_output`` (BOOL) and the ``return_*`` flags (BOOL) that add outputs.

Outputs: ``text_output`` (BYTES, one element per sample); ``finish_reason``, ``cumulative_logprob``,
``num_input_tokens`` and ``num_output_tokens`` when asked for (a ``return_*`` flag, or naming them
in the request's ``outputs``).

Streaming (``stream`` true, only on gRPC ``ModelStreamInfer`` and HTTP ``generate_stream``)
sends one response per engine step with the text added since the previous one; the prompt is
never prepended there. Otherwise one response carries the whole text, the prompt first unless
``exclude_input_in_output`` is true (the backend's default).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

from llmcore.errors import ConfigError
from llmcore.kserve.errors import KServeError, invalid
from llmcore.kserve.tensors import Tensor
from llmcore.outputs import RequestOutput
from llmcore.sampling_params import SamplingParams

PLATFORM = "llmcore"
BACKEND = "llmcore"
RETURN_FLAGS = {  # input flag -> the output it adds
    "return_finish_reason": "finish_reason",
    "return_cumulative_logprob": "cumulative_logprob",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
}
# name -> (datatype, shape, optional)
INPUTS: dict[str, tuple[str, list[int], bool]] = {
    "text_input": ("BYTES", [1], False),
    "stream": ("BOOL", [1], True),
    "sampling_parameters": ("BYTES", [1], True),
    "exclude_input_in_output": ("BOOL", [1], True),
    **{flag: ("BOOL", [1], True) for flag in RETURN_FLAGS},
}
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "text_output": ("BYTES", [-1]),
    "finish_reason": ("BYTES", [-1]),
    "cumulative_logprob": ("FP32", [-1]),
    "num_input_tokens": ("UINT32", [1]),
    "num_output_tokens": ("UINT32", [-1]),
}
# request parameters that belong to the protocol, never to sampling
RESERVED_PARAMETERS = frozenset({
    "binary_data_output", "binary_data_size", "triton_enable_empty_final_response", "priority", "timeout",
    "sequence_id", "sequence_start", "sequence_end", "headers", "stream", "exclude_input_in_output",
})
_SAMPLING_FIELDS = {f.name: f for f in dataclasses.fields(SamplingParams) if f.init}
_FIELD_TYPES = typing.get_type_hints(SamplingParams)


@dataclass
class TextRequest:
    prompt: str
    params: SamplingParams
    stream: bool = False
    prepend_input: bool = True
    outputs: list[str] = field(default_factory=lambda: ["text_output"])


def _scalar(t: Tensor, datatype: str) -> Any:
    if t.datatype != datatype:
        raise invalid(f"{t.where}: datatype must be {datatype}, got {t.datatype}")
    if t.size != 1:
        raise invalid(f"{t.where}: shape must hold one element (e.g. [1]), got {t.shape}; "
                      "send one prompt per request")
    return t.data[0]


def _coerce(key: str, value: Any, where: str) -> Any:
    """Convert a sampling value the way the vLLM backend does (numbers may come as strings)."""
    hint = _FIELD_TYPES.get(key)
    base = {int: int, float: float, bool: bool}.get(hint) if hint in (int, float, bool) else None
    if base is None and hint == (int | None):
        base = int
    if base is None or isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise invalid(f"{where}.{key}: {value!r} is not {'an integer' if base is int else 'a ' + base.__name__}")


def sampling_params(obj: Any, where: str) -> SamplingParams:
    """SamplingParams from a vLLM-style dict; every error names ``where.key``."""
    if not isinstance(obj, dict):
        raise invalid(f"{where}: must be a JSON object such as {{\"max_tokens\": 64, \"temperature\": 0}}, "
                      f"got {type(obj).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in obj.items():
        if value is None:
            continue
        if key not in _SAMPLING_FIELDS:
            raise invalid(f"{where}.{key}: not a sampling parameter llmcore knows; use "
                          f"{', '.join(sorted(_SAMPLING_FIELDS))}")
        value = _coerce(key, value, where)
        if key == "top_k" and value == -1:  # vLLM's "disabled"
            value = 0
        kwargs[key] = value
    try:
        return SamplingParams(**kwargs)
    except ConfigError as exc:
        raise invalid(f"{where}.{exc}") from None
    except TypeError as exc:
        raise invalid(f"{where}: {exc}") from None


def parse_request(inputs: list[Tensor], parameters: dict[str, Any], requested: list[str],
                  *, streaming_call: bool) -> TextRequest:
    """Validate a request's tensors and turn them into a :class:`TextRequest`.

    :param parameters: the request's ``parameters`` (plain values).
    :param requested: the names in the request's ``outputs`` (empty: the default outputs).
    :param streaming_call: the call can carry several responses (``ModelStreamInfer``, ``generate_stream``).
    """
    by_name: dict[str, Tensor] = {}
    for t in inputs:
        if t.name not in INPUTS:
            raise invalid(f"{t.where}: unknown input {t.name!r}; this model takes {', '.join(INPUTS)}")
        if t.name in by_name:
            raise invalid(f"{t.where}: input {t.name!r} is given twice")
        by_name[t.name] = t
    if "text_input" not in by_name:
        raise invalid("text_input: missing; send the prompt as a BYTES tensor named text_input of shape [1]")
    raw = _scalar(by_name["text_input"], "BYTES")
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"{by_name['text_input'].where}: the prompt is not valid UTF-8") from None
    flags = {name: bool(_scalar(t, "BOOL")) for name, t in by_name.items() if INPUTS[name][0] == "BOOL"}
    stream = flags.get("stream", bool(parameters.get("stream", False)) if streaming_call else False)
    if stream and not streaming_call:
        raise invalid("stream: true needs a streaming call (gRPC ModelStreamInfer or HTTP generate_stream); "
                      "set stream false for infer and generate")
    exclude = flags.get("exclude_input_in_output", parameters.get("exclude_input_in_output"))
    if exclude is None:
        exclude = stream
    if stream and not exclude:
        raise invalid("exclude_input_in_output: false is not allowed when streaming (the prompt is never "
                      "prepended to streamed text)")
    if "sampling_parameters" in by_name:
        t = by_name["sampling_parameters"]
        text = _scalar(t, "BYTES")
        try:
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid(f"sampling_parameters: not valid JSON ({exc}); send an object such as "
                          "{\"max_tokens\": 64, \"temperature\": 0}") from None
        params = sampling_params(obj, "sampling_parameters")
    else:
        params = sampling_params({k: v for k, v in parameters.items() if k not in RESERVED_PARAMETERS},
                                 "parameters")
    for name in requested:
        if name not in OUTPUTS:
            raise invalid(f"outputs: unknown output {name!r}; this model has {', '.join(OUTPUTS)}")
    outputs = list(requested) or ["text_output"] + [out for flag, out in RETURN_FLAGS.items() if flags.get(flag)]
    return TextRequest(prompt, params, stream, not exclude, outputs)


class OutputBuilder:
    """Output tensors of one request, from its cumulative :class:`RequestOutput` s."""

    def __init__(self, req: TextRequest) -> None:
        self.req = req
        self.text_sent: list[int] = []
        self.tokens_sent: list[int] = []

    def tensors(self, out: RequestOutput, *, delta: bool) -> list[Tensor]:
        """``delta``: only what is new since the previous call (streaming); else everything."""
        samples = out.outputs
        n = len(samples)
        if not self.text_sent:
            self.text_sent, self.tokens_sent = [0] * n, [0] * n
        prefix = "" if delta or not self.req.prepend_input else (out.prompt or "")
        texts = [prefix + s.text[self.text_sent[i] if delta else 0:] for i, s in enumerate(samples)]
        ntok = [len(s.token_ids) - (self.tokens_sent[i] if delta else 0) for i, s in enumerate(samples)]
        self.text_sent = [len(s.text) for s in samples]
        self.tokens_sent = [len(s.token_ids) for s in samples]
        values: dict[str, list[Any]] = {
            "text_output": [t.encode("utf-8") for t in texts],
            "finish_reason": [str(s.finish_reason).encode() for s in samples],
            "cumulative_logprob": [float(s.cumulative_logprob) for s in samples],
            "num_input_tokens": [len(out.prompt_token_ids)],
            "num_output_tokens": ntok,
        }
        return [Tensor(name, OUTPUTS[name][0], [len(values[name])], values[name]) for name in self.req.outputs]


def model_metadata(name: str, versions: Iterable[int]) -> dict[str, Any]:
    """The protocol's model metadata (JSON shape; the gRPC reply carries the same fields)."""
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": n, "datatype": dt, "shape": shape} for n, (dt, shape, _) in INPUTS.items()],
        "outputs": [{"name": n, "datatype": dt, "shape": shape} for n, (dt, shape) in OUTPUTS.items()],
    }


def model_config(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Triton's model configuration (a subset): the tensors, decoupled, and the engine settings as parameters."""
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": 0,  # the engine batches by itself
        "input": [{"name": n, "data_type": "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}", "dims": shape,
                   "optional": opt} for n, (dt, shape, opt) in INPUTS.items()],
        "output": [{"name": n, "data_type": "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}", "dims": shape}
                   for n, (dt, shape) in OUTPUTS.items()],
        "model_transaction_policy": {"decoupled": True},
        "parameters": {k: {"string_value": str(v)} for k, v in settings.items()},
    }


def not_found(name: str, version: str | None, available: Iterable[str]) -> KServeError:
    what = f"model {name!r}" + (f" version {version}" if version else "")
    shown = ", ".join(available) or "none"
    return KServeError("not_found", f"{what} is not loaded (unknown, or unloaded). Loaded: {shown}")
