"""The request fields that constrain the output, mapped onto SamplingParams: OpenAI's response_format
(json_object, json_schema) and logit_bias, vLLM's guided_json / guided_regex / guided_choice /
guided_grammar. A spec that does not compile is a 400 naming the field it came from."""

from __future__ import annotations

from typing import Any

from nanoslg.core.errors import RequestError
from nanoslg.core.sampling_params import SamplingParams, StructuredOutputs
from nanoslg.server.errors import APIError

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def constraints(req) -> tuple[dict[str, Any], str | None]:
    """SamplingParams keywords (structured_outputs, logit_bias) and the request field that set the
    structured output (for error messages), from the request's fields."""
    found: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema is None:
            raise APIError(
                400,
                "response_format of type json_schema needs json_schema.schema",
                param="response_format.json_schema",
                code="invalid_value",
            )
        found.append(("response_format", {"json": rf.json_schema.schema}))
    for name, kind in GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {kind: value}))
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise APIError(400, f"{first} and {second} cannot be combined", param=second, code="invalid_value")
    kw: dict[str, Any] = {}
    field = None
    if found:
        field, spec = found[0]
        kw["structured_outputs"] = spec_of(spec, field)
    if req.logit_bias:
        kw["logit_bias"] = _bias(req.logit_bias)
    return kw, field


def spec_of(spec: dict, field: str) -> StructuredOutputs:
    try:
        return StructuredOutputs(**spec)
    except RequestError as e:
        raise RequestError(str(e), param=field) from None


def _bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            tok = int(key)
        except ValueError:
            msg = f"logit_bias key {key!r} is not a token id"
            raise APIError(400, msg, param="logit_bias", code="invalid_value") from None
        out[tok] = value
    return out


async def compile_for(engine, params: SamplingParams, field: str | None) -> None:
    """Compiles the request's grammar before it is added (off the loop, cached), so a bad schema,
    regex or grammar is a 400 naming `field`, not an error inside a stream."""
    if params.structured_outputs is None:
        return
    try:
        await engine.compile_structured(params)
    except RequestError as e:
        raise RequestError(str(e), param=field or e.param, code="invalid_value") from None
