"""What the engine takes (a Prompt) and returns: per request, one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field

Prompt = str | list[int]  # text, or token ids


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k (token id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: object | None = None  # the stop string or token id that matched, if any


@dataclass
class RequestOutput:
    """A whole result, or one streamed delta (then `text`/`token_ids` hold only the new part)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt: str | None = None

    # The single-sample view the API promises: .text, .token_ids, .finish_reason.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
