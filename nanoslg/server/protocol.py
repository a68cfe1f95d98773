"""The OpenAI wire format as msgspec Structs: requests (unknown fields ignored), responses, errors.

The request Structs carry the ranges SamplingParams enforces (so the served OpenAPI schema documents
them and a bad value is refused before any work), plus the limits that guard the server itself (how
many choices one request may ask for). SamplingParams stays the authority: it checks again, for the
Python API too.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from nanoslg.server.protocol_tools import DeltaToolCall, ResponseFormat, Tool, ToolCall, ToolChoice

# One request may not fan out into more sequences than this (n x number of prompts).
MAX_CHOICES = 256

# --- requests -----------------------------------------------------------------------------------

# A prompt is a string, a list of strings, a list of token ids, or a list of token-id lists. msgspec
# allows one array type per union, so the list's items are a union and app.py checks they agree.
TokenId = Annotated[int, Meta(ge=0)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
PromptItem = NonEmptyStr | TokenId | Annotated[list[TokenId], Meta(min_length=1)]
PromptField = NonEmptyStr | Annotated[list[PromptItem], Meta(min_length=1)]
StopField = str | Annotated[list[str], Meta(max_length=16)] | None


def _range(kind: type, **bounds: float) -> Any:
    return Annotated[kind, Meta(**bounds)] | None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _SamplingFields(Struct, kw_only=True):
    """The sampling fields both endpoints take, by their OpenAI (and vLLM extension) names."""

    model: str | None = None  # optional: the one served model is used when left out
    temperature: _range(float, ge=0.0, le=100.0) = None
    top_p: _range(float, gt=0.0, le=1.0) = None
    n: _range(int, ge=1, le=128) = None
    stop: StopField = None
    seed: _range(int, ge=-(2**63), le=2**63 - 1) = None
    presence_penalty: _range(float, ge=-2.0, le=2.0) = None
    frequency_penalty: _range(float, ge=-2.0, le=2.0) = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions, as vLLM and SGLang name them
    top_k: _range(int, ge=-1) = None  # -1 or 0: off
    min_p: _range(float, ge=0.0, le=1.0) = None
    repetition_penalty: _range(float, gt=0.0, le=10.0) = None
    min_tokens: _range(int, ge=0) = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    # structured outputs: OpenAI's response_format, vLLM's guided_* (server/structured.py maps them)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: PromptField
    max_tokens: _range(int, ge=1) = None  # OpenAI's default for completions is 16
    echo: bool | None = None
    logprobs: _range(int, ge=0, le=20) = None


class ContentPart(Struct, kw_only=True):
    type: Literal["text"]  # only text parts: a model here reads no images or audio
    text: str


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer is OpenAI's newer system
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back in the history
    tool_call_id: str | None = None  # a tool message: the call it answers


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: _range(int, ge=1) = None  # default: up to the context
    max_completion_tokens: _range(int, ge=1) = None  # the newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: _range(int, ge=0, le=20) = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: auto with tools, else none
    parallel_tool_calls: bool | None = None


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
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(Struct):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaMessage(Struct, omit_defaults=True):
    # omit_defaults: later chunks carry only the new content, the first only the role.
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class _ChatChoiceBase(Struct, kw_only=True):
    index: int
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChoice(_ChatChoiceBase, kw_only=True):
    message: ChatResponseMessage


class ChatChunkChoice(_ChatChoiceBase, kw_only=True):
    delta: DeltaMessage


class _Envelope(Struct, kw_only=True):
    """What every completion response and stream chunk carries around its choices; the four kinds
    differ in their choices and their `object` name."""

    id: str
    model: str
    created: int = field(default_factory=now)
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionResponse(_Envelope, kw_only=True):
    choices: list[CompletionChoice]
    object: str = "text_completion"


CompletionChunk = CompletionResponse  # OpenAI streams completions as partial responses: the same object


class ChatCompletionResponse(_Envelope, kw_only=True):
    choices: list[ChatChoice]
    object: str = "chat.completion"


class ChatCompletionChunk(_Envelope, kw_only=True):
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"


class ModelCard(Struct):
    id: str
    max_model_len: int
    object: str = "model"
    created: int = field(default_factory=now)
    owned_by: str = "nanoslg"
    root: str | None = None


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class HealthResponse(Struct):
    status: str


class VersionResponse(Struct):
    version: str


def sse(obj: Any) -> bytes:
    """One Server-Sent Event, framed exactly as load tools split it."""
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
