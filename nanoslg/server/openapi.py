"""The served OpenAPI schema, exact about what the server enforces.

Litestar's schema generation drops msgspec constraints it finds falsy or nested in a union (a
minimum of 0, exclusive bounds, list lengths), so the request bodies are described by msgspec's
own JSON Schema of the same Structs instead, plus the bounds of the model this server runs: the
served model's name, token ids below the vocabulary size, max_tokens and prompt sizes below the
context. What depends on the tokenized prompt cannot be a schema bound; each request body's
description states those rules (CROSS_FIELD_RULES), and a request breaking one gets a 400.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin

from nanoslg.core.sampling_params import LOGIT_BIAS_LIMIT
from nanoslg.server import protocol as P

CROSS_FIELD_RULES = (
    "Refused with a 400 although each field is in range, because they depend on the tokenized prompt, on "
    "another field, or on what a spec means: the prompt's tokens plus max_tokens must fit the model's context "
    "(code context_length_exceeded); n times the number of prompts must be at most {max_choices}; min_tokens "
    "must not exceed max_tokens; stream_options needs stream=true; top_logprobs needs logprobs=true (chat); "
    "response_format and the guided_* fields take one spec at most, and it must compile (a JSON schema, a "
    "regex, a grammar); logit_bias keys are token ids below the vocabulary; tool_choice other than none needs "
    "tools, a named one must be among them, tool names are unique, and a tool_choice that constrains the "
    "output takes no other spec (chat)."
)
REQUESTS = (P.CompletionRequest, P.ChatCompletionRequest)


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}], "default": None}


def request_schemas(model: str, vocab_size: int, max_model_len: int, max_chars: int | None) -> dict[str, dict]:
    """JSON Schemas of the request bodies (and the Structs they use), named as in components."""
    _, comps = msgspec.json.schema_components(REQUESTS, ref_template="#/components/schemas/{name}")
    token = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    ids = {"type": "array", "items": token, "minItems": 1, "maxItems": max_model_len - 1}
    text = {"type": "string", "minLength": 1, **({"maxLength": max_chars} if max_chars is not None else {})}
    max_new = {"type": "integer", "minimum": 1, "maximum": max_model_len - 1}
    rules = CROSS_FIELD_RULES.format(max_choices=P.MAX_CHOICES)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps[name]["properties"]
        props["model"] = _nullable({"type": "string", "enum": [model]})
        props["max_tokens"] = _nullable(max_new)
        # Bounds server/structured.py and SamplingParams enforce on these fields, where the Structs
        # carry none.
        if "guided_choice" in props:
            choice = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
            props["guided_choice"] = _nullable(choice)
        if "logit_bias" in props:
            bias = {"type": "number", "minimum": -LOGIT_BIAS_LIMIT, "maximum": LOGIT_BIAS_LIMIT}
            props["logit_bias"] = _nullable(
                {"type": "object", "propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"}, "additionalProperties": bias}
            )
        comps[name]["description"] = rules
    comps["ChatCompletionRequest"]["properties"]["max_completion_tokens"] = _nullable(max_new)
    # One kind of prompt per request: a string, token ids, or a list of either (not a mix).
    comps["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [
            text,
            ids,
            {"type": "array", "items": text, "minItems": 1},
            {"type": "array", "items": ids, "minItems": 1},
        ]
    }
    return comps


class ExactSchemaPlugin(JsonRenderPlugin):
    """Serves /schema/openapi.json with the request bodies of `request_schemas`."""

    def __init__(self, schemas: dict[str, dict], **kwargs: Any):
        super().__init__(**kwargs)
        self._schemas = schemas
        self._patched: dict | None = None

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        if self._patched is None:
            patched = dict(openapi_schema)
            components = dict(patched.get("components") or {})
            components["schemas"] = {**(components.get("schemas") or {}), **self._schemas}
            patched["components"] = components
            self._patched = patched
        return self.render_json(request, self._patched)
