"""Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}` (several
separated by ";"), optionally after `<|python_tag|>`; text that starts otherwise is content."""

from __future__ import annotations

import json

from nanoslg.core.registry import TOOL_PARSERS
from nanoslg.server.tool_parsers.base import ParsedCall, ToolParser, call_from

TAG = "<|python_tag|>"


@TOOL_PARSERS.register("llama3_json")
class Llama3JsonParser(ToolParser):
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        if body.startswith(TAG):
            body = body[len(TAG) :].strip()
        if not body.startswith("{"):
            return text, []
        calls, decoder, at = [], json.JSONDecoder(), 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except ValueError:
                return text, []
            call = call_from(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \t\r\n;":
                at += 1
        return None, calls

    def content_until(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or TAG.startswith(body[: len(TAG)]) or body.startswith(TAG):
            return 0  # may be a call: nothing goes out as content until the end
        return len(text)
