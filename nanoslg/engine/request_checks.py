"""What a request must satisfy before it is queued: a prompt of valid ids (or text the tokenizer
turns into ids), logit_bias keys inside the vocabulary, and prompt + max_tokens within the context
and the KV pool. Each failure is a RequestError naming the field."""

from __future__ import annotations

import dataclasses

import numpy as np

from nanoslg.core.errors import RequestError
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.outputs import Prompt


class RequestChecks:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, kv_capacity_tokens: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty", param="prompt")
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids", param="prompt")
            return prompt, list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        if not self.ids_valid(ids):
            bad = next(t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size)
            if not isinstance(bad, int) or isinstance(bad, bool):
                raise RequestError(f"token ids must be integers, got {bad!r}", param="prompt")
            raise RequestError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
        return None, ids

    def ids_valid(self, ids: list[int]) -> bool:
        """All plain ints inside the vocabulary. C-level checks (a long prompt is thousands of ids and
        a burst of requests validates them all before the first step); a loop only names a culprit."""
        if set(map(type, ids)) != {int}:
            return False
        try:
            arr = np.fromiter(ids, np.int64, len(ids))
        except OverflowError:
            return False
        return bool(arr.min() >= 0 and arr.max() < self.vocab_size)

    def logit_bias(self, params: SamplingParams) -> None:
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise RequestError(
                f"logit_bias key {max(params.logit_bias)} is outside the vocabulary [0, {self.vocab_size})",
                param="logit_bias",
            )

    def fit_max_tokens(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        n, ctx = len(ids), self.max_model_len
        if n >= ctx:
            raise RequestError(
                f"the prompt has {n} tokens; this model's context is {ctx} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=ctx - n)
        elif n + params.max_tokens > ctx:
            raise RequestError(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is over this "
                f"model's context of {ctx} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        cap = self.kv_capacity_tokens
        if n + params.max_tokens > cap:
            raise RequestError(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) can never fit "
                f"the KV cache of {cap} tokens",
                param="max_tokens",
            )
        return params
