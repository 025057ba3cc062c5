"""Embeddings: the inputs of an embeddings request, and each vector as a list of floats or base64.

The vectors are the model's mean-pooled last hidden state (``Engine.embed``), computed on the
engine thread by :func:`embed_all`.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from llmcore.server.errors import ApiError
from llmcore.server.protocol import MAX_BATCH_INPUTS, EmbeddingRequest


def embedding_inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    x = req.input
    if isinstance(x, str):
        items: list[Any] = [x]
    elif x and isinstance(x[0], int):
        items = [list(x)]
    else:
        items = list(x)
    if not items:
        raise ApiError(400, "input: must not be empty", param="input", code="invalid_value")
    if len(items) > MAX_BATCH_INPUTS:
        raise ApiError(400, f"input: at most {MAX_BATCH_INPUTS} inputs per request, got {len(items)}",
                       param="input", code="invalid_value")
    for i, it in enumerate(items):
        if (isinstance(it, str) and not it) or (isinstance(it, list) and not it):
            raise ApiError(400, f"input[{i}]: must not be empty", param="input", code="invalid_value")
    return items


def check_embedding_request(req: EmbeddingRequest, hidden_size: int) -> list[str | list[int]]:
    """The request's inputs, once ``dimensions`` is known to be the model's hidden size (or unset)."""
    items = embedding_inputs(req)
    if req.dimensions is not None and req.dimensions != hidden_size:
        raise ApiError(400, f"dimensions: only the model's hidden size ({hidden_size}) is supported",
                       param="dimensions", code="unsupported_parameter")
    return items


#: engine option -> API parameter, for an engine error about an input
INPUT_ALIASES = {"prompt": "input", "prompt_token_ids": "input"}


def encode_embedding(vec: list[float], fmt: str | None) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec


def embed_all(items: list[str | list[int]]):
    """An engine-thread function: ``[(vector, prompt tokens)]`` for each input."""

    def work(engine: Any) -> list[tuple[list[float], int]]:
        out = []
        for x in items:
            n = len(engine.tokenizer.encode(x)) if isinstance(x, str) else len(x)
            out.append((engine.embed(x), n))
        return out

    return work


def embeddings_response(model: str, results: list[tuple[list[float], int]], fmt: str | None) -> dict[str, Any]:
    ntok = sum(n for _, n in results)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, fmt)}
                 for i, (v, _) in enumerate(results)],
        "model": model,
        "usage": {"prompt_tokens": ntok, "total_tokens": ntok},
    }
