"""Prompts, from the request to token ids, without stalling the event loop.

Tokenizing a long prompt or rendering a chat template is the heavy per-request work of a request:
it runs in a worker thread (the tokenizer's Rust core releases the GIL), so the loop keeps
answering and streaming meanwhile. A prompt that cannot fit the context is refused before any of
that work, as early as its size shows it: a token covers at most the tokenizer's longest token, so
a string longer than max_model_len of them, or a token-id list of max_model_len ids or more, can
never fit.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from nanoslg.core.errors import RequestError
from nanoslg.server.chat_template import render_chat
from nanoslg.server.errors import APIError

# A normalizer may shorten text before it is split (NFC merges a base letter with its combining
# marks), so the character bound leaves room for that where the tokenizer has one.
NORMALIZER_SLACK = 4


def char_limit(tokenizer, max_model_len: int) -> int | None:
    """Characters beyond which a string prompt has max_model_len tokens or more (None: no tokenizer)."""
    if tokenizer is None:
        return None
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    slack = 1 if backend is not None and backend.normalizer is None else NORMALIZER_SLACK
    return max_model_len * max(longest, 1) * slack


def too_long(what: str, param: str, max_model_len: int) -> RequestError:
    return RequestError(
        f"the {what} is longer than this model's context of {max_model_len} tokens can hold",
        param=param,
        code="context_length_exceeded",
    )


class PromptEncoder:
    """Turns completion prompts and chat messages into token ids, off the event loop."""

    def __init__(self, tokenizer, max_model_len: int, threads: int = 1):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_chars = char_limit(tokenizer, max_model_len)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nanoslg-prompt")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- /v1/completions -------------------------------------------------------------------------
    @staticmethod
    def completion_prompts(prompt) -> list:
        """The request's prompt as a list of prompts (strings or token-id lists), of one kind."""
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        kinds = {type(x) for x in prompt}
        if kinds == {int}:
            return [list(prompt)]
        if kinds in ({str}, {list}):
            return list(prompt)
        raise APIError(
            400,
            "prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists (not a mix)",
            param="prompt",
            code="invalid_type",
        )

    def check_size(self, prompt, param: str = "prompt") -> None:
        """Refuses, without tokenizing, a prompt whose size alone shows it cannot fit the context."""
        if isinstance(prompt, str):
            if self.max_chars is not None and len(prompt) > self.max_chars:
                raise too_long(f"prompt ({len(prompt)} characters)", param, self.max_model_len)
        elif len(prompt) >= self.max_model_len:
            raise too_long(f"prompt ({len(prompt)} token ids)", param, self.max_model_len)

    async def encode(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt; strings are tokenized in a worker thread."""
        for p in prompts:
            self.check_size(p)
        if not any(isinstance(p, str) for p in prompts):
            return prompts
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send token ids", param="prompt")
        return await self._off_loop(self._encode_all, prompts)

    def _encode_all(self, prompts: list) -> list[list[int]]:
        return [list(self.tokenizer.encode(p)) if isinstance(p, str) else p for p in prompts]

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self._off_loop(
            functools.partial(self.tokenizer.decode, skip_special_tokens=skip_special_tokens), ids
        )

    # -- /v1/chat/completions --------------------------------------------------------------------
    async def chat(self, req, tools: list[dict] | None = None) -> list[int]:
        """The messages rendered with the checkpoint's chat template (and tools), as token ids."""
        return await self._off_loop(self._render, req, tools)

    def _render(self, req, tools: list[dict] | None) -> list[int]:
        text = render_chat(self.tokenizer, req, tools)
        if self.max_chars is not None and len(text) > self.max_chars:
            raise too_long("conversation", "messages", self.max_model_len)
        # The template already holds the special tokens it wants (BOS...): add none again.
        return list(self.tokenizer.encode(text, add_special_tokens=False))
