"""The OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``.

Each handler is the same four steps: find the model, convert the request (checked once, here,
where it enters), start a :class:`~llmcore.server.jobs.Job` on the model's engine, answer it as
a stream or one body.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llmcore.errors import ConfigError
from llmcore.server.convert import PromptInfo, chat_messages, completion_prompts, make_prepare, sampling_params
from llmcore.server.embeddings import INPUT_ALIASES, check_embedding_request, embed_all, embeddings_response
from llmcore.server.errors import ApiError, config_error_to_api
from llmcore.server.jobs import Job
from llmcore.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from llmcore.server.registry import ServedModel
from llmcore.server.responses import ResponseBuilder, new_id
from llmcore.server.state import lookup_model, server_state
from llmcore.server.streaming import respond
from llmcore.server.structured import chat_tools, precompile

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad request: `param` names the offending parameter"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body larger than the server's --max-body-bytes"},
    503: {"model": ErrorResponse, "description": "Model at capacity; retry after `Retry-After` seconds"},
    504: {"model": ErrorResponse, "description": "Request timeout"},
}

router = APIRouter()


def _card(m: ServedModel) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "llmcore"}


@router.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(m) for m in server_state(request).registry]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]})
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    m = server_state(request).registry.find(model_id)
    if m is None:
        raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return _card(m)


@router.post(
    "/v1/completions", response_model=None,
    responses={200: {"model": CompletionResponse, "description": "A completion, or with `stream` an SSE stream",
                     "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    m = lookup_model(request, body.model)
    conv = sampling_params(body, state.default_max_tokens)
    await precompile(m.engine.engine, conv)
    prompts = completion_prompts(body)
    rid = new_id("cmpl")
    infos = [PromptInfo() for _ in prompts]
    prepares = [make_prepare(p, conv, chat=False, info=info, want_prompt_text=bool(body.echo))
                for p, info in zip(prompts, infos)]
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    rb = ResponseBuilder("completion", m.name, rid, len(prompts), conv.params.n, conv.params, decode=m.decode,
                         echo=bool(body.echo), include_usage=include_usage, infos=infos)
    job = Job(m, rid, len(prompts), state.metrics)
    await job.start(prepares, conv.aliases)
    return await respond(request, job, rb, bool(body.stream), include_usage)


@router.post(
    "/v1/chat/completions", response_model=None,
    responses={200: {"model": ChatCompletionResponse,
                     "description": "A chat completion, or with `stream` an SSE stream of chunks",
                     "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    m = lookup_model(request, body.model)
    conv = sampling_params(body, state.default_max_tokens)
    messages = chat_messages(body)
    tools, messages, template_tools, conv = chat_tools(body, messages, conv, m.engine.engine.tokenizer,
                                                       m.tool_call_parser)
    await precompile(m.engine.engine, conv)
    rid = new_id("chatcmpl")
    info = PromptInfo()
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    rb = ResponseBuilder("chat", m.name, rid, 1, conv.params.n, conv.params, decode=m.decode,
                         top_logprobs=body.top_logprobs or 0, include_usage=include_usage, infos=[info],
                         tools=tools)
    job = Job(m, rid, 1, state.metrics)
    await job.start([make_prepare(messages, conv, chat=True, info=info, tools=template_tools)], conv.aliases)
    return await respond(request, job, rb, bool(body.stream), include_usage)


@router.post("/v1/embeddings", response_model=EmbeddingResponse,
             responses={k: v for k, v in ERROR_RESPONSES.items() if k != 504})
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    """Embeddings are the model's **mean-pooled last hidden state** (not a trained embedding model)."""
    state = server_state(request)
    m = lookup_model(request, body.model)
    items = check_embedding_request(body, m.engine.engine.model_config.hidden_size)
    with m.admitted(len(items), "input"):
        try:
            results = await m.engine.call(embed_all(items))
        except ConfigError as exc:
            raise config_error_to_api(exc, INPUT_ALIASES) from exc
    state.metrics.prompt_tokens.labels(m.name).inc(sum(n for _, n in results))
    return JSONResponse(embeddings_response(m.name, results, body.encoding_format))
