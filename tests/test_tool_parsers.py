"""The tool parsers of tool_choice=auto on crafted text (each model family's format), and the stream
of one choice: content goes out as it comes, calls whole at the end, the same as the whole answer."""

from __future__ import annotations

import json

import msgspec
import pytest

from nanoslg.core.registry import TOOL_PARSERS
from nanoslg.server import protocol as P
from nanoslg.server.tools import ToolStream, ToolUse

HERMES = [
    # (text, content, [(name, arguments)])
    ("Just words.", "Just words.", []),
    (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Let me check.",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>',
        None,
        [("a", {}), ("b", {"x": 1})],
    ),
    ('<tool_call>{"name": "a", "arguments": {"k": [1, 2]}}', None, [("a", {"k": [1, 2]})]),  # no closing tag
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),  # not a call: content
]
LLAMA3 = [
    ("The answer is 4.", "The answer is 4.", []),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    (
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"y": 2}}',
        None,
        [("a", {}), ("b", {"y": 2})],
    ),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ('{"name": "a", "parameters": {"x": 1}', '{"name": "a", "parameters": {"x": 1}', []),  # cut short
]


@pytest.mark.parametrize("name,cases", [("hermes", HERMES), ("llama3_json", LLAMA3)])
def test_parsers_on_crafted_text(name, cases):
    parser = TOOL_PARSERS.get(name)()
    for text, content, calls in cases:
        got_content, got_calls = parser.parse(text)
        assert got_content == content, text
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls, text


def _use(parser: str) -> ToolUse:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    return ToolUse(msgspec.convert(body, P.ChatCompletionRequest), parser)


@pytest.mark.parametrize("name,cases", [("hermes", HERMES), ("llama3_json", LLAMA3)])
def test_streamed_auto_calls_equal_the_whole_answer(name, cases):
    """Fed a few characters at a time, a choice streams the content before any call (never a piece of
    a call's marker) and the calls at the end, which the SDK's assembly turns into the same calls."""
    use = _use(name)
    for text, _, _ in cases:
        whole_content, whole_calls, whole_reason = use.finish(text, "stop")
        stream = ToolStream(use)
        content, calls = "", {}
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
        for i, piece in enumerate(pieces):
            c, deltas = stream.feed(piece)
            if i == len(pieces) - 1:
                rest, ends, reason = stream.end("stop")
                c, deltas = (c or "") + (rest or ""), (deltas or []) + (ends or [])
            content += c or ""
            for d in deltas or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            assert "<tool_call" not in content and "python_tag" not in content or not whole_calls
        assert reason == whole_reason
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
            (c.function.name, c.function.arguments) for c in whole_calls or []
        ]
        if whole_calls:
            assert content.strip() == (whole_content or "")
        else:
            assert content == text
