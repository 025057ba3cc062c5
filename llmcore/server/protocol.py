"""Request and response bodies of the OpenAI-compatible API (pydantic models).

These models are the served OpenAPI schema. Requests are validated strictly:
a wrong JSON type (``"temperature": "hot"``, ``"max_tokens": 1.5``,
``"stream": "yes"``) and an unknown top-level field are 400 errors naming the
parameter, as the OpenAI API does. Fields beyond OpenAI's (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens``)
use vLLM's names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1

# A request is refused (400) above these sizes rather than tying up the engine.
MAX_N = 128
MAX_STOP = 16
MAX_BATCH_INPUTS = 2048

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptInput = NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1)]

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_LENIENT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = Field(False, description="Send a last chunk with token usage (and `choices: []`).")
    continuous_usage_stats: bool = Field(False, description="Ignored; accepted for vLLM compatibility.")


class _SamplingFields(BaseModel):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _STRICT

    model: str = Field(..., description="Name of a served model (see GET /v1/models).", max_length=256)
    temperature: float | None = Field(
        1.0, ge=0.0, le=2.0, description="0 = greedy decoding (values below 1e-5 are treated as 0).")
    top_p: float | None = Field(1.0, ge=0.0, le=1.0, description="Nucleus sampling; 0 is treated as greedy.")
    n: int | None = Field(1, ge=1, le=MAX_N, description="How many completions to generate for each prompt.")
    stop: str | list[str] | None = Field(
        None, description="Up to 16 strings; generation stops before (or with, see include_stop_str_in_output) them."
    )
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Per-request RNG seed.")
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be absent, null or {}.")
    user: str | None = Field(None, description="Ignored.", max_length=256)
    stream: bool | None = Field(False, description="Stream Server-Sent Events ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    # vLLM-style extensions
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="0 or -1 disables top-k.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0, description="1 = none; <1 favours repeats.")
    min_tokens: int | None = Field(None, ge=0, le=1_000_000)
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(None, max_length=256)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    # structured output, vLLM's names (llmcore/structured/openai.py); at most one per request
    structured_outputs: dict[str, Any] | None = Field(
        None, description='{"json": schema} | {"regex": ...} | {"choice": [...]} | {"grammar": ...} | {"json_object": true}')
    guided_json: dict[str, Any] | str | None = Field(None, description="A JSON schema the output follows.")
    guided_regex: str | None = Field(None, description="A regular expression the output matches.")
    guided_choice: list[str] | None = Field(None, description="The output is one of these strings.")
    guided_grammar: str | None = Field(None, description="A GBNF (root ::= ...) or Lark (start: ...) grammar.")
    guided_decoding_backend: str | None = Field(None, description="Only 'xgrammar' (or 'auto').")


class CompletionRequest(_SamplingFields):
    """POST /v1/completions"""

    prompt: PromptInput = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    max_tokens: int | None = Field(16, ge=1, le=10_000_000, description="Tokens to generate per completion (default 16).")
    echo: bool | None = Field(False, description="Prepend the prompt to each completion's text.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return log-probabilities of the top N tokens.")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, description="Not supported: must be absent or null.")


class TextPart(BaseModel):
    model_config = _LENIENT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _LENIENT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions"""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation, rendered with the model's chat template.")
    max_tokens: int | None = Field(None, ge=1, le=10_000_000, description="Default: the rest of the context window.")
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000, description="Alias of max_tokens.")
    logprobs: bool | None = Field(False, description="Return log-probabilities of the chosen tokens.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: also the top N alternatives.")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name": ..., "schema": {...}, "strict": true}}.')
    tools: list[dict[str, Any]] | None = Field(None, description='Functions the model may call: '
                                               '[{"type": "function", "function": {"name", "description", "parameters"}}].')
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto" (default with tools), "required", or {"type": "function", "function": '
                          '{"name": ...}}; the last two constrain decoding to the functions\' parameters.')
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply.")


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings"""

    model_config = _STRICT
    model: str = Field(..., max_length=256)
    input: PromptInput = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="base64 = little-endian float32 bytes, as the openai client expects."
    )
    dimensions: int | None = Field(None, ge=1, description="Only the model's hidden size is supported.")
    user: str | None = Field(None, max_length=256)


# ------------------------------------------------------------------ responses
# Declared for the OpenAPI schema; handlers build plain dicts of this shape.


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmcore"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelHealth(BaseModel):
    device: str
    max_model_len: int
    num_running: int
    num_waiting: int
    in_flight: int
    kv_blocks_used: int
    kv_blocks_total: int
    requests_aborted: int = Field(0, description="Requests aborted so far (client gone, timeout)")
    alive: bool


class HealthResponse(BaseModel):
    status: Literal["ok", "error"]
    models: dict[str, ModelHealth]


# messages for union-typed fields, where pydantic's per-member errors mislead
UNION_HINTS = {
    "prompt": "must be a non-empty string, list of strings, list of token ids, or list of token-id lists",
    "input": "must be a non-empty string, list of strings, list of token ids, or list of token-id lists",
    "stop": "must be a string or a list of strings",
    "tool_choice": 'must be a string or an object',
}
