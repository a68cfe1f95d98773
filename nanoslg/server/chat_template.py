"""A chat request's messages as the checkpoint's chat template renders them: text parts joined, the
developer role as system, an assistant's tool calls (arguments as objects, as templates expect
them) and tool results, and the tools through the template's `tools` argument."""

from __future__ import annotations

import json

from nanoslg.server import protocol as P
from nanoslg.server.errors import APIError


def template_messages(messages: list[P.ChatMessage]) -> list[dict]:
    out = []
    for m in messages:
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            content = "".join(part.text for part in m.content)
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in m.tool_calls
            ]
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _args(call: P.ToolCall):
    """A call's arguments as an object where they parse (templates write them with tojson)."""
    try:
        value = json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments
    return value if isinstance(value, dict) else call.function.arguments


def render_chat(tokenizer, req: P.ChatCompletionRequest, tools: list[dict] | None) -> str:
    """The prompt's text (server/prompts.py tokenizes it, off the event loop)."""
    if tokenizer is None:
        raise APIError(
            400,
            "this model has no tokenizer, so chat is not available; use /v1/completions with token ids",
            param="messages",
            code="invalid_value",
        )
    msgs = template_messages(req.messages)
    extra = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as e:  # no template, or the template refused the messages
        raise APIError(
            400, f"the chat template could not render the messages: {e}", param="messages", code="invalid_value"
        ) from None
