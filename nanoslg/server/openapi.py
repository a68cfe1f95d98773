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

from nanoslg.server import protocol as P

CROSS_FIELD_RULES = (
    "Refused with a 400 although each field is in range, because they depend on the tokenized prompt or on "
    "another field: the prompt's tokens plus max_tokens must fit the model's context (code "
    "context_length_exceeded); n times the number of prompts must be at most {max_choices}; min_tokens must "
    "not exceed max_tokens; stream_options needs stream=true; top_logprobs needs logprobs=true (chat)."
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
