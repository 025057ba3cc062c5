"""The protocol's operations, once, for both transports (HTTP in ``http.py``, gRPC in ``grpc_server.py``).

Requests come in as :class:`~llmcore.kserve.tensors.Tensor` s and plain parameters; answers go out
as :class:`InferReply` s and dicts; errors are :class:`~llmcore.kserve.errors.KServeError` s.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

from llmcore.kserve import textgen
from llmcore.kserve.errors import KServeError
from llmcore.kserve.generation import generate
from llmcore.kserve.registry import LiveModels
from llmcore.kserve.tensors import Tensor
from llmcore.version import __version__

SERVER_NAME = "llmcore"
EXTENSIONS = ["model_repository", "model_configuration", "generate", "binary_tensor_data", "parameters"]


@dataclass
class InferReply:
    model_name: str
    model_version: str
    tensors: list[Tensor]
    final: bool = True


class KServeService:
    """The models (a :class:`LiveModels`), the shared metrics and the API keys, behind the protocol.

    :param metrics: the server's Prometheus series (``ttft``, ``itl``, ``e2e``, ``prompt_tokens``,
        ``generation_tokens``, ``requests``), shared with the OpenAI routes.
    :param api_keys: accepted keys (``Authorization: Bearer KEY``); empty = no authentication.
    """

    def __init__(self, live: LiveModels, metrics: Any, api_keys: Iterable[str] = ()) -> None:
        self.live = live
        self.metrics = metrics
        self.keys = [k.encode() for k in api_keys if k]

    def check_key(self, authorization: str | None) -> None:
        """Raise UNAUTHENTICATED unless ``authorization`` is ``Bearer <one of the keys>`` (or no keys are set)."""
        if not self.keys:
            return
        auth = (authorization or "").encode()
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if token and any(hmac.compare_digest(token, k) for k in self.keys):
            return
        raise KServeError("unauthenticated", "incorrect API key" if token else
                          "missing API key: send 'authorization: Bearer KEY' (HTTP header or gRPC metadata)")

    # ------------------------------------------------------------ health and metadata

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def server_ready(self) -> bool:
        return all(s.served is not None and s.served.engine.is_running
                   for s in self.live.slots() if s.state == "READY")

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.live.resolve(name, version or None)
        except KServeError:
            return False
        return True

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        _, v = self.live.resolve(name, version or None)
        return textgen.model_metadata(name, self.live.versions(name) if not version else [v])

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        _, v = self.live.resolve(name, version or None)
        return textgen.model_config(name, self.live.settings(name, v))

    # ------------------------------------------------------------ inference

    async def infer(self, name: str, version: str | None, inputs: list[Tensor], parameters: dict[str, Any],
                    requested: list[str], *, streaming: bool) -> AsyncIterator[InferReply]:
        """Run one request; a streaming call yields one reply per step (the last ``final``), else one reply."""
        served, v = self.live.resolve(name, version or None)
        req = textgen.parse_request(inputs, parameters, requested, streaming_call=streaming)
        out_builder = textgen.OutputBuilder(req)
        async for out in generate(served, self.metrics, req.prompt, req.params):
            if req.stream:
                tensors = out_builder.tensors(out, delta=True)
                texts = [x for t in tensors if t.name == "text_output" for x in t.data]
                if out.finished or not texts or any(texts):  # steps that add no text are skipped
                    yield InferReply(name, str(v), tensors, final=out.finished)
            elif out.finished:
                yield InferReply(name, str(v), out_builder.tensors(out, delta=False))

    # ------------------------------------------------------------ repository

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.live.index(ready_only)

    async def load(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        for key in parameters or {}:
            if key == "config" or key.startswith("file:"):
                raise KServeError("unsupported", f"parameters.{key}: a load request cannot override the model's "
                                                 f"settings; edit {name}/config.yaml in the repository instead")
        await self.live.load(name)

    async def unload(self, name: str, mode: str | None = None) -> None:
        await self.live.unload(name, mode)
