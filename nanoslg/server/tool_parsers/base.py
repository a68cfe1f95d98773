"""What a tool parser gives: the text's content and its calls, and while streaming how much of the
text is surely content (not the start of a call)."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


class ToolParser:
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls); no calls: the whole text is content."""
        raise NotImplementedError

    def content_until(self, text: str) -> int:
        """While streaming: how many leading characters of `text` are content whatever comes next."""
        raise NotImplementedError


def call_from(obj, args_key: str = "arguments") -> ParsedCall | None:
    """A {"name": ..., "arguments": {...}} object as a call (arguments may come as a dict or as JSON
    text); None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    try:  # a number past float range (1e999) would come back as Infinity, which is not JSON
        return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False, allow_nan=False))
    except ValueError:
        return None


def held_back(text: str, marker: str) -> int:
    """How many characters of content may go out: up to the marker, or up to a tail that could
    still grow into it."""
    at = text.find(marker)
    if at >= 0:
        return at
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)
