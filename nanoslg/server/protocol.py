"""The OpenAI wire format as msgspec Structs: requests (unknown fields ignored), responses, errors.

Field ranges that the engine also checks (temperature, top_p, penalties...) are left to
SamplingParams, so each rule lives in one place; the Structs check types, and the few limits that
guard the server itself (how many choices one request may ask for).
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Optional, Union

import msgspec
from msgspec import Meta, Struct, field

# One request may not fan out into more sequences than this (n x number of prompts).
MAX_CHOICES = 256

# --- requests -----------------------------------------------------------------------------------

# A prompt is a string, a list of strings, a list of token ids, or a list of token-id lists. msgspec
# allows one array type per union, so the list's items are a union and app.py checks they agree.
PromptItem = Union[str, int, list[int]]
PromptField = Union[str, list[PromptItem]]
StopField = Union[str, list[str], None]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _SamplingFields(Struct, kw_only=True):
    """The sampling fields both endpoints take, by their OpenAI (and vLLM extension) names."""

    model: Optional[str] = None  # optional: the one served model is used when left out
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[Annotated[int, Meta(ge=1, le=128)]] = None
    stop: StopField = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extensions, as vLLM and SGLang name them
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: PromptField
    max_tokens: Optional[int] = None  # OpenAI's default for completions is 16
    echo: Optional[bool] = None
    logprobs: Optional[Annotated[int, Meta(ge=0, le=20)]] = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: Optional[str] = None


class ChatMessage(Struct, kw_only=True):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None  # default: up to the context
    max_completion_tokens: Optional[int] = None  # the newer name; wins over max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Meta(ge=0, le=20)]] = None


# --- responses ----------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = field(default_factory=PromptTokensDetails)


class CompletionLogprobs(Struct):
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[Optional[float]] = field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(Struct):
    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    object: str = "text_completion"
    created: int = field(default_factory=now)
    system_fingerprint: Optional[str] = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


class ChatLogprobs(Struct):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatResponseMessage(Struct):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(Struct):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(Struct):
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None
    object: str = "chat.completion"
    created: int = field(default_factory=now)
    system_fingerprint: Optional[str] = None


class DeltaMessage(Struct, omit_defaults=True):
    # omit_defaults: later chunks carry only the new content, the first only the role.
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(Struct):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(Struct):
    id: str
    model: str
    choices: list[ChatChunkChoice]
    created: int
    object: str = "chat.completion.chunk"
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class CompletionChunk(Struct):
    id: str
    model: str
    choices: list[CompletionChoice]
    created: int
    object: str = "text_completion"
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(Struct):
    id: str
    max_model_len: int
    object: str = "model"
    created: int = field(default_factory=now)
    owned_by: str = "nanoslg"
    root: Optional[str] = None


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class HealthResponse(Struct):
    status: str


class VersionResponse(Struct):
    version: str


class ErrorInfo(Struct):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(Struct):
    error: ErrorInfo


# OpenAI's error `type` for each status the server returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
    500: "internal_server_error",
}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> ErrorResponse:
    return ErrorResponse(ErrorInfo(message, ERROR_TYPES.get(status, "invalid_request_error"), param, code))


class APIError(Exception):
    """An error answered in the OpenAI shape with its HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def sse(obj: Any) -> bytes:
    """One Server-Sent Event, framed exactly as load tools split it."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
