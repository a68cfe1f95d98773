"""Hermes / Qwen: calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after optional
content (a last block may miss its closing tag when the model stops right after the JSON)."""

from __future__ import annotations

import json
import re

from nanoslg.core.registry import TOOL_PARSERS
from nanoslg.server.tool_parsers.base import ParsedCall, ToolParser, call_from, held_back

START, END = "<tool_call>", "</tool_call>"
BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@TOOL_PARSERS.register("hermes")
class HermesParser(ToolParser):
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        at = text.find(START)
        if at < 0:
            return text, []
        calls = []
        for body in BLOCK.findall(text[at:]):
            try:
                call = call_from(json.loads(body))
            except ValueError:
                call = None
            if call is None:  # not a call after all: the text stays content
                return text, []
            calls.append(call)
        content = text[:at].strip()
        return content or None, calls

    def content_until(self, text: str) -> int:
        return held_back(text, START)
