"""The protocol's pieces without a server: tensors, the text-generation contract, the repository
layout, the live model set (with stand-in engines), and the generated gRPC modules."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmcore.errors import ConfigError
from llmcore.kserve import tensors as T
from llmcore.kserve.errors import KServeError
from llmcore.kserve.registry import LiveModels
from llmcore.kserve.repository import read_model
from llmcore.kserve.textgen import OutputBuilder, parse_request, sampling_params
from llmcore.outputs import CompletionOutput, RequestOutput

from .conftest import write_config


def bytes_tensor(name: str, *values: str) -> T.Tensor:
    return T.Tensor(name, "BYTES", [len(values)], [v.encode() for v in values], where=name)


def bool_tensor(name: str, value: bool) -> T.Tensor:
    return T.Tensor(name, "BOOL", [1], [value], where=name)


# ------------------------------------------------------------------ tensors


def test_raw_bytes_are_length_prefixed_and_round_trip():
    t = T.Tensor("x", "BYTES", [2], [b"ab", "é".encode()])
    raw = T.encode_raw(t)
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + "é".encode()
    assert T.decode_raw(raw, "BYTES", "x") == [b"ab", "é".encode()]
    assert T.decode_raw(T.encode_raw(T.Tensor("b", "BOOL", [2], [True, False])), "BOOL", "b") == [True, False]
    with pytest.raises(KServeError, match="runs past the end"):
        T.decode_raw(struct.pack("<I", 9) + b"ab", "BYTES", "x")
    with pytest.raises(KServeError, match="not a whole number of INT32"):
        T.decode_raw(b"abc", "INT32", "x")


def test_json_tensors_check_type_shape_and_values():
    t = T.from_json({"name": "p", "datatype": "BYTES", "shape": [1, 1], "data": [["hi"]]}, 0, None)
    assert (t.data, t.where) == ([b"hi"], "inputs[0] (p)")
    with pytest.raises(KServeError, match=r"inputs\[2\] \(p\)\.datatype: 'TEXT' is not a protocol datatype"):
        T.from_json({"name": "p", "datatype": "TEXT", "shape": [1], "data": ["x"]}, 2, None)
    with pytest.raises(KServeError, match="BOOL elements must be true or false, got 1"):
        T.from_json({"name": "s", "datatype": "BOOL", "shape": [1], "data": [1]}, 0, None)
    with pytest.raises(KServeError, match=r"shape \[2\] holds 2 element\(s\) but 1 were sent"):
        T.from_json({"name": "s", "datatype": "BOOL", "shape": [2], "data": [True]}, 0, None)
    js, raw = T.to_json(T.Tensor("o", "UINT32", [1], [7]), binary=True)
    assert js["parameters"] == {"binary_data_size": 4} and raw == struct.pack("<I", 7)


# ------------------------------------------------------------------ text-generation contract


def test_defaults_follow_the_vllm_backend():
    req = parse_request([bytes_tensor("text_input", "Hi")], {"max_tokens": "5", "temperature": 0}, [],
                        streaming_call=False)
    assert (req.prompt, req.stream, req.prepend_input, req.outputs) == ("Hi", False, True, ["text_output"])
    assert (req.params.max_tokens, req.params.temperature) == (5, 0)
    req = parse_request([bytes_tensor("text_input", "Hi"), bool_tensor("stream", True),
                         bool_tensor("return_finish_reason", True)], {}, [], streaming_call=True)
    assert (req.stream, req.prepend_input, req.outputs) == (True, False, ["text_output", "finish_reason"])
    assert sampling_params({"top_k": -1, "ignore_eos": "true", "stop": ["\n"]}, "p").top_k == 0
    with pytest.raises(KServeError, match=r"p\.n: 1\.5 is not an integer"):
        sampling_params({"n": 1.5}, "p")
    with pytest.raises(KServeError, match=r"outputs: unknown output 'logits'"):
        parse_request([bytes_tensor("text_input", "Hi")], {}, ["logits"], streaming_call=False)


def out(text: str, tokens: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", "Hi ", [1, 2], [CompletionOutput(0, text, list(range(tokens)),
                                                               "length" if finished else None)], finished)


def test_streamed_outputs_are_deltas_and_whole_outputs_carry_the_prompt():
    req = parse_request([bytes_tensor("text_input", "Hi "), bool_tensor("stream", True),
                         bool_tensor("return_num_output_tokens", True)], {}, [], streaming_call=True)
    b = OutputBuilder(req)
    first = b.tensors(out("a", 1), delta=True)
    second = b.tensors(out("abc", 3, True), delta=True)
    assert [(t.name, t.data) for t in first] == [("text_output", [b"a"]), ("num_output_tokens", [1])]
    assert [(t.name, t.data) for t in second] == [("text_output", [b"bc"]), ("num_output_tokens", [2])]
    whole = OutputBuilder(parse_request([bytes_tensor("text_input", "Hi ")], {}, [], streaming_call=False))
    assert whole.tensors(out("abc", 3, True), delta=False)[0].data == [b"Hi abc"]


# ------------------------------------------------------------------ repository


def test_repository_versions_policy_and_overrides(tmp_path: Path):
    for v in (1, 2, 3):
        (tmp_path / "m" / str(v)).mkdir(parents=True)
        (tmp_path / "m" / str(v) / "model.gguf").write_text("")
    (tmp_path / "m" / "notes").mkdir()
    write_config(tmp_path / "m", device="cpu", max_queue=4, version_policy=[1, 3], unload="abort",
                 versions={3: {"dtype": "float32"}})
    entry = read_model(tmp_path, "m")
    assert [s.version for s in entry.versions] == [1, 3] and entry.unload == "abort"
    assert entry.versions[0].model == str(tmp_path / "m" / "1" / "model.gguf")
    assert entry.versions[1].engine_kwargs == {"device": "cpu", "dtype": "float32"}
    assert entry.versions[1].max_queue == 4 and entry.versions[1].key == "m:3"
    write_config(tmp_path / "m", version_policy="latest", model=None)
    assert [(s.version, s.model) for s in read_model(tmp_path, "m").versions] == [(3, None)]


@pytest.mark.parametrize("settings,words", [
    ({"devize": "cpu"}, "config.yaml: devize"),
    ({"version_policy": [4]}, "names version(s) [4] with no folder"),
    ({"unload": "later"}, "is not an unload mode"),
])
def test_repository_errors_name_the_file_and_setting(tmp_path: Path, settings, words):
    (tmp_path / "m" / "1").mkdir(parents=True)
    write_config(tmp_path / "m", model=None, **settings)
    with pytest.raises(ConfigError) as ei:
        read_model(tmp_path, "m")
    assert words in str(ei.value)


def test_an_empty_version_folder_says_what_to_put_there(tmp_path: Path):
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds no model.*config.json \+ \*.safetensors.*or set 'model:'"):
        read_model(tmp_path, "m")


# ------------------------------------------------------------------ live models (stand-in engines)


class StandInEngine:
    """Stands in for an AsyncEngine: only what loading and unloading touch."""

    def __init__(self) -> None:
        self.is_running = True

    def shutdown(self) -> None:
        self.is_running = False


@dataclass
class StandInServed:
    name: str
    engine: StandInEngine
    in_flight: int = 0
    request_timeout: float | None = 5.0


def make_repo(tmp_path: Path) -> Path:
    for name, versions in (("a", (1, 2)), ("b", (1,))):
        for v in versions:
            (tmp_path / name / str(v)).mkdir(parents=True)
        write_config(tmp_path / name, model=None)
    return tmp_path


def test_live_models_resolve_versions_and_unload(tmp_path: Path):
    built: list[str] = []

    def build(spec):
        built.append(spec.key)
        if spec.name == "b" and (tmp_path / "b" / "FAIL").exists():
            raise RuntimeError("out of memory")
        return StandInServed(spec.key, StandInEngine())

    live = LiveModels(build, make_repo(tmp_path))
    live.load_startup()
    assert built == ["a:1", "a:2", "b:1"] and list(live.by_name) == ["a:1", "a:2", "b:1"]
    assert live.find("a").name == "a:2" and live.find("a:1").name == "a:1" and "b" in live.by_name
    assert live.resolve("a", "1")[1] == 1 and live.resolve("a")[1] == 2
    with pytest.raises(KServeError, match=r"model 'a' version '3' is not loaded; its loaded versions: \[1, 2\]"):
        live.resolve("a", "3")

    async def scenario() -> None:
        engine = live.find("b").engine
        live.find("b").in_flight = 1  # a request still running: drain waits for it
        unload = asyncio.ensure_future(live.unload("b"))
        await asyncio.sleep(0.2)
        assert not unload.done() and live.find("b") is None and engine.is_running
        live._slots[("b", 1)].served.in_flight = 0
        await unload
        assert not engine.is_running
        (tmp_path / "b" / "FAIL").touch()
        with pytest.raises(KServeError, match=r"failed to load \(version 1: RuntimeError: out of memory\)"):
            await live.load("b")
        assert live.find("a") is not None and live.find("b") is None
        (tmp_path / "b" / "FAIL").unlink()
        assert await live.load("b") == [1]
        with pytest.raises(KServeError, match="parameters.mode: 'now' is not an unload mode"):
            await live.unload("a", "now")
        await live.unload("a", "abort")

    asyncio.run(scenario())
    fixed = LiveModels(build, tmp_path)
    fixed.add(StandInServed("b", StandInEngine()))
    with pytest.raises(ConfigError, match="holds a model named 'b', the name of a model given with --model"):
        fixed.load_startup()
    rows = {(r["name"], r["version"]): (r["state"], r["reason"]) for r in live.index()}
    assert rows == {("a", "1"): ("UNAVAILABLE", "unloaded"), ("a", "2"): ("UNAVAILABLE", "unloaded"),
                    ("b", "1"): ("READY", "")}


# ------------------------------------------------------------------ generated modules


def test_shipped_grpc_modules_match_the_proto():
    pytest.importorskip("grpc_tools")
    from llmcore.kserve.proto import regenerate

    assert regenerate.main(["--check"]) == 0


def test_messages_are_wire_compatible_with_tritons_client():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from llmcore.kserve.proto import grpc_service_pb2 as pb

    ours = pb.ModelInferRequest(model_name="m", model_version="2", id="x")
    ours.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    ours.raw_input_contents.append(b"\x02\x00\x00\x00hi")
    ours.parameters["max_tokens"].int64_param = 3
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert (theirs.model_name, theirs.inputs[0].name, theirs.parameters["max_tokens"].int64_param) == ("m", "text_input", 3)
    cfg = service_pb2.ModelConfigResponse.FromString(pb.ModelConfigResponse(config=pb.ModelConfig(
        name="m", model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True))).SerializeToString())
    assert cfg.config.model_transaction_policy.decoupled
