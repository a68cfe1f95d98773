"""Structured outputs, tool calls and logit_bias over HTTP, through the official openai SDK, against the
demo model served by `python run.py` (random weights: what parses is the grammar's doing)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import structured_cases as sc
from conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CLOCK]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(start_server, demo_model):
    return start_server(f"model.path={demo_model}", "cache=sdpa", "cache.max_num_tokens=32768")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _rf(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def test_response_format_and_guided_fields_streamed_and_not(server):
    """Generated schemas over chat and completions, greedy and sampled, streamed and not; regexes and
    choices as guided_regex / guided_choice: every completion that stops validates."""
    schemas = sc.schemas(24, seed=11)
    cases = []  # (kind, request kwargs, check, expected)
    for sch in schemas:
        cases.append(("chat", {"response_format": _rf(sch)}, sc.check_json, sch))
        cases.append(("completions", {"extra_body": {"guided_json": sch}}, sc.check_json, sch))
    for rx in sc.REGEXES[:6]:
        cases.append(("chat", {"extra_body": {"guided_regex": rx}}, sc.check_regex, rx))
    for ch in sc.choices(6, seed=5):
        cases.append(("completions", {"extra_body": {"guided_choice": ch}}, sc.check_choice, ch))
    cases.append(("chat", {"response_format": {"type": "json_object"}}, lambda t, _: json.loads(t), None))

    async def one(aclient, i, kind, kw, stream):
        sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 1.0, "seed": i}
        common = dict(model=MODEL, max_tokens=48, stream=stream, **sampling, **kw)
        if kind == "chat":
            r = await aclient.chat.completions.create(messages=USER, **common)
            if not stream:
                return r.choices[0].message.content, r.choices[0].finish_reason
            text, reason = "", None
            async for c in r:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
            return text, reason
        r = await aclient.completions.create(prompt="Data:", **common)
        if not stream:
            return r.choices[0].text, r.choices[0].finish_reason
        text, reason = "", None
        async for c in r:
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        return text, reason

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            jobs = [one(aclient, i, k, kw, stream) for stream in (False, True) for i, (k, kw, _, _) in enumerate(cases)]
            return await asyncio.gather(*jobs)
        finally:
            await aclient.close()

    results = asyncio.run(run())
    stops = 0
    for (text, reason), (kind, kw, check, expected) in zip(results, cases + cases):
        assert reason in ("stop", "length"), (kind, kw, text, reason)
        if reason == "stop":
            stops += 1
            check(text, expected)
    assert stops >= len(results) * 0.6
    # greedy is greedy: the streamed text equals the whole answer
    n = len(cases)
    for i in range(0, n, 2):
        assert results[i] == results[n + i], cases[i]


def test_tool_choice_required_and_named(client):
    one = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    for seed in range(3):
        out = client.chat.completions.create(max_tokens=120, temperature=0.8, seed=seed, **one)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_") and choice.message.content is None
        sc.check_json(call.function.arguments, PARAMS[call.function.name])
    # a list of calls cut by max_tokens is no calls but the text, with "length"
    many = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=6)
    cut = many.choices[0]
    assert cut.finish_reason == "length" and cut.message.tool_calls is None and cut.message.content.startswith("[{")

    named = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, max_tokens=60)
    (call,) = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    sc.check_json(call.function.arguments, PARAMS["get_time"])


def test_streamed_tool_calls_assemble_into_the_same_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0)
        kw["parallel_tool_calls"] = False
        whole = client.chat.completions.create(**kw).choices[0]
        calls: dict[int, dict] = {}
        reason = None
        for chunk in client.chat.completions.create(stream=True, **kw):
            delta = chunk.choices[0].delta
            reason = chunk.choices[0].finish_reason or reason
            for tc in delta.tool_calls or []:  # assembled as the SDK's docs do it
                c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = tc.id or c["id"]
                c["name"] += tc.function.name or "" if tc.function else ""
                c["arguments"] += tc.function.arguments or "" if tc.function else ""
        assert reason == whole.finish_reason == "tool_calls"
        assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
            (t.function.name, t.function.arguments) for t in whole.message.tool_calls
        ]
        assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())

    # the SDK's own stream helper assembles them too
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=named, max_tokens=120, temperature=0)
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    sc.check_json(call.function.arguments, PARAMS["get_weather"])


def test_a_history_with_a_tool_result_round_trips(client):
    first = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=120
    ).choices[0]
    call = first.message.tool_calls[0]
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    short = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=4)
    out = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and the result are in the prompt: the demo's template renders them
    assert out.usage.prompt_tokens > short.usage.prompt_tokens + len(call.function.arguments) // 8
    none = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_over_http(client, demo_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    kw = dict(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    forced = client.completions.create(logit_bias={"77": 100}, **kw).choices[0].text
    assert forced == tok.decode([77, 77, 77])
    greedy = tok.encode(client.completions.create(**{**kw, "max_tokens": 1}).choices[0].text, add_special_tokens=False)
    moved = client.completions.create(**{**kw, "max_tokens": 1}, logit_bias={str(greedy[0]): -100}).choices[0].text
    assert tok.encode(moved, add_special_tokens=False)[:1] != greedy[:1]


def test_bad_input_is_a_400_naming_the_field(server, client):
    url = server.url
    chat = {"model": MODEL, "messages": USER, "max_tokens": 4}
    cases = [
        ({"response_format": _rf({"type": "nonsense"})}, "response_format"),
        ({"response_format": _rf({"type": "array", "uniqueItems": True})}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"guided_regex": "(("}, "guided_regex"),
        ({"guided_grammar": 'root ::= "a" )'}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": {"type": 5}, "guided_regex": "a"}, "guided_regex"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ]
    for extra, param in cases:
        for stream in (False, True):  # a stream is refused before it starts, with the same 400
            r = httpx.post(f"{url}/v1/chat/completions", json={**chat, **extra, "stream": stream}, timeout=60)
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", (extra, err)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "guided_json": "{bad"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, response_format=_rf({"not": {"type": "string"}}))
    assert e.value.param == "response_format"
    assert httpx.get(f"{url}/health").status_code == 200
