"""Per-request sampling parameters, validated on construction (OpenAI semantics)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nanoslg.core.errors import RequestError

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must match (exactly one kind), as vLLM names them. The engine compiles it into
    a grammar (engine/structured.py); a spec that does not compile is a RequestError there."""

    json: Any = None  # a JSON schema (a dict, or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # one of these strings, exactly
    grammar: str | None = None  # EBNF/GBNF (llama.cpp's) or Lark

    def __post_init__(self) -> None:
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise RequestError(
                f"structured outputs take exactly one of json, json_object, regex, choice, grammar; got {kinds}",
                param="structured_outputs",
            )
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except ValueError as e:
                raise RequestError(f"the JSON schema is not JSON: {e}", param="structured_outputs.json") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise RequestError("a JSON schema must be an object", param="structured_outputs.json")
        if self.choice is not None:
            choice = tuple(self.choice) if isinstance(self.choice, list | tuple) else None
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise RequestError(
                    "choice must be a non-empty list of non-empty strings", param="structured_outputs.choice"
                )
            object.__setattr__(self, "choice", choice)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError(f"{name} must be a non-empty string", param=f"structured_outputs.{name}")

    @property
    def kind(self) -> str:
        return (
            "json_object"
            if self.json_object
            else next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)
        )

    def key(self) -> str:
        """The spec as canonical text: equal specs compile once (the engine's grammar cache)."""
        value = getattr(self, self.kind)
        return self.kind + ":" + json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (0: only the chosen token)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # constrain the output to a grammar
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]  # an empty stop string would stop everything
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("min_tokens", self.min_tokens >= 0, "must be >= 0"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must be <= max_tokens"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (off) or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("stop", len(self.stop) <= 16, "at most 16 stop strings"),
            (
                "stop_token_ids",
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "must be non-negative token ids",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise RequestError(f"{name}={getattr(self, name)!r}: {why}", param=name)
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise RequestError("seed must fit in 64 bits", param="seed")
        if self.logit_bias is not None:
            self._check_logit_bias()

    def _check_logit_bias(self) -> None:
        """Keys are token ids (the vocabulary's bound is checked by the engine), values in [-100, 100]."""
        bias = {}
        for tok, value in dict(self.logit_bias).items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise RequestError(f"logit_bias key {tok!r} is not a token id", param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= LOGIT_BIAS_LIMIT:
                raise RequestError(f"logit_bias[{tok}]={value!r}: must be in [-100, 100]", param="logit_bias")
            bias[tok] = float(value)
        self.logit_bias = bias or None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
