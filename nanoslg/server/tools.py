"""Tool calls on chat completions. tool_choice decides what the output is: free text (none), free text
in which the configured parser finds calls (auto, server.tool_parser), or JSON constrained to the
tools' argument schemas (required: a list of {"name", "arguments"} calls; a named function: its
arguments), so those work with any model. Calls go out as OpenAI's tool_calls with
finish_reason "tool_calls", whole or as stream deltas the SDK assembles into the same calls."""

from __future__ import annotations

import dataclasses
import json
import uuid

import msgspec

from nanoslg.core.registry import TOOL_PARSERS
from nanoslg.core.sampling_params import SamplingParams, StructuredOutputs
from nanoslg.server import protocol as P
from nanoslg.server.errors import APIError
from nanoslg.server.protocol_tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, ToolChoiceFunction
from nanoslg.server.tool_parsers.base import ParsedCall

NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


class ToolUse:
    """One chat request's tools and tool_choice."""

    def __init__(self, req: P.ChatCompletionRequest, parser: str):
        self.tools = req.tools or []
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise _bad("tool function names must be unique", "tools")
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if self.tools else "none")
        self.named = None
        if isinstance(choice, ToolChoiceFunction):
            if choice.function.name not in names:
                raise _bad(f"tool_choice names {choice.function.name!r}, which is not in tools", "tool_choice")
            self.named = self.tools[names.index(choice.function.name)].function
            choice = "named"
        elif choice != "none" and not self.tools:
            raise _bad(f"tool_choice={choice!r} needs tools", "tool_choice")
        self.mode = choice  # none | auto | required | named
        self.parallel = req.parallel_tool_calls is not False  # false: at most one call
        self.parser = TOOL_PARSERS.get(parser)() if choice == "auto" else None

    def template_tools(self) -> list[dict] | None:
        return [{"type": "function", "function": msgspec.to_builtins(t.function)} for t in self.tools] or None

    def constrain(self, params: SamplingParams, other_field: str | None) -> SamplingParams:
        """required / a named function: the output's schema (a bad one is a 400 on `tools`)."""
        if self.mode not in ("required", "named"):
            return params
        if other_field is not None:
            raise _bad(f"{other_field} cannot be combined with tool_choice={self.mode!r}", other_field)
        if self.named is not None:
            schema = self.named.parameters or NO_ARGS
        else:
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters or NO_ARGS},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
        return dataclasses.replace(params, structured_outputs=StructuredOutputs(json=schema))

    @property
    def field(self) -> str | None:
        """The request field a constrained output's schema came from."""
        return "tools" if self.mode in ("required", "named") else None

    def finish(self, text: str, reason: str | None) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """A whole choice: (content, tool calls, finish_reason)."""
        calls = self._calls(text, reason)
        if calls is None:
            return text, None, reason
        content, parsed = calls
        out = [ToolCall(id=_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed]
        return content, out, "tool_calls" if reason == "stop" or self.mode == "auto" else reason

    def _calls(self, text: str, reason: str | None) -> tuple[str | None, list[ParsedCall]] | None:
        if self.mode == "named":
            return None, [ParsedCall(self.named.name, text)]
        if self.mode == "required":
            try:
                return None, [
                    ParsedCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)
                ]
            except (ValueError, TypeError, KeyError):  # cut by max_tokens: no calls, the text stays
                return None
        if self.mode == "auto":
            content, parsed = self.parser.parse(text)
            return (content, parsed if self.parallel else parsed[:1]) if parsed else None
        return None


def _listed_calls(text: str) -> list[ParsedCall]:
    """The calls of tool_choice=required's [{"name": ..., "arguments": {...}}, ...], each call's
    arguments as the model wrote them (a parse and dump would turn 1e999 into Infinity)."""
    dec, at, calls = json.JSONDecoder(), 0, []

    def skip(i: int, expect: str | None = None) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if expect is not None:
            if text[i : i + 1] != expect:
                raise ValueError(f"expected {expect!r} at {i}")
            i = skip(i + 1)
        return i

    at = skip(at, "[")
    while True:
        at, fields = skip(at, "{"), {}
        while True:
            key, at = dec.raw_decode(text, at)
            at = skip(at, ":")
            value, end = dec.raw_decode(text, at)
            fields[key] = (value, text[at:end])
            at = skip(end)
            if text[at : at + 1] == "}":
                break
            at = skip(at, ",")
        calls.append(ParsedCall(fields["name"][0], fields["arguments"][1]))
        at = skip(at + 1)
        if text[at : at + 1] == "]" and not text[at + 1 :].strip():
            return calls
        at = skip(at, ",")


class ToolStream:
    """One streamed choice: text deltas in, (content, tool-call deltas) out. A named function's
    arguments stream as they come; required and auto calls go out whole at the end (auto streams
    the content before them)."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.text = ""
        self.sent = 0  # characters of text already streamed as content (auto)
        self.call_id: str | None = None  # a named function's call, once opened

    def feed(self, text: str) -> tuple[str | None, list[DeltaToolCall] | None]:
        mode = self.use.mode
        if mode == "none" or not text:
            return text or None, None
        self.text += text
        if mode == "named":
            if self.call_id is None:
                self.call_id = _call_id()
                fn = DeltaFunctionCall(name=self.use.named.name, arguments=text)
                return None, [DeltaToolCall(index=0, id=self.call_id, type="function", function=fn)]
            return None, [DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))]
        if mode == "auto":
            upto = self.use.parser.content_until(self.text)
            if upto > self.sent:
                out, self.sent = self.text[self.sent : upto], upto
                return out, None
        return None, None

    def end(self, reason: str | None) -> tuple[str | None, list[DeltaToolCall] | None, str | None]:
        """At the choice's finish: what is left of its content, its calls, and the finish reason."""
        mode = self.use.mode
        if mode == "none":
            return None, None, reason
        if mode == "named":
            return None, None, "tool_calls" if reason == "stop" else reason
        _, calls, reason = self.use.finish(self.text, reason)
        if calls is None:
            return self.text[self.sent :] or None, None, reason
        deltas = [
            DeltaToolCall(
                index=i, id=c.id, type="function", function=DeltaFunctionCall(c.function.name, c.function.arguments)
            )
            for i, c in enumerate(calls)
        ]
        until = self.use.parser.content_until(self.text) if mode == "auto" else 0
        return self.text[self.sent : until] or None, deltas, reason
