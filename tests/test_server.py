"""The OpenAI-compatible server, for real: `python run.py` on loopback, driven by the official openai SDK
(unmodified, max_retries=0) and by raw HTTP for what the SDK hides (SSE framing, disconnects, 413).

The server runs the tiny Llama checkpoint (decisive logits, so greedy text is the same in any batch)
in a subprocess, exactly as a user starts it (conftest's `start_server`; port 0 and the logged URL avoid
port races).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import openai
import pytest
from conftest import KEY, MODEL, metric, sse_events


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    return start_server(
        f"model.path={tiny_llama}", "cache=sdpa", "cache.max_num_tokens=16384", "server.max_body_bytes=100000"
    )


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def keyed_server(start_server, tiny_llama):
    """api_key set; one running sequence and a waiting queue of one, for the overload case."""
    return start_server(
        f"model.path={tiny_llama}",
        "cache=sdpa",
        f"server.api_key={KEY}",
        "server.max_waiting=1",
        "scheduler.max_num_seqs=1",
        "server.shutdown_timeout=1",
        exit_code=None,
    )


GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


# --- plain endpoints ----------------------------------------------------------------------------


def test_models_health_version_metrics_schema(server):
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 512
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", httpx.get(f"{server.url}/version").json()["version"])
    text = httpx.get(f"{server.url}/metrics").text
    for name in [
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_sum",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:request_success_total",
    ]:
        assert f"\n{name}{{" in text, name
    schema = httpx.get(f"{server.url}/schema/openapi.json").json()
    post = schema["paths"]["/v1/chat/completions"]["post"]
    for status in ("200", "400", "401", "404", "413", "503"):
        assert status in post["responses"], status
    assert "ErrorResponse" in json.dumps(post["responses"]["400"])


# --- the SDK: completions -----------------------------------------------------------------------


def test_sdk_completions(client, tokenizer):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    (choice,) = out.choices
    assert out.object == "text_completion" and choice.finish_reason == "length" and choice.text
    n_prompt = len(tokenizer.encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        n_prompt,
        12,
        n_prompt + 12,
    )
    assert out.usage.prompt_tokens_details.cached_tokens == 0

    # the default max_tokens is OpenAI's 16
    assert client.completions.create(model=MODEL, prompt=prompt, **GREEDY).usage.completion_tokens == 16

    # streaming gives the same text, and include_usage a final usage-only chunk
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    # echo puts the prompt first
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, echo=True, **GREEDY)
    assert echo.choices[0].text == prompt + choice.text

    # token ids and a list of prompts: one choice per prompt, in order
    ids = tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, **GREEDY)
    assert by_ids.choices[0].text == choice.text
    both = client.completions.create(model=MODEL, prompt=[prompt, "Hello there"], max_tokens=12, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == choice.text
    lists = client.completions.create(
        model=MODEL, prompt=[ids, tokenizer.encode("Hello there")], max_tokens=12, **GREEDY
    )
    assert [c.text for c in lists.choices] == [c.text for c in both.choices]


def test_sdk_stop_seed_n_logprobs(client):
    prompt = "Once upon a time"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **GREEDY).choices[0].text
    stop = full[6:9]
    assert stop.strip(), f"pick another slice of {full!r}"
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]

    sampled = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**sampled)
    b = client.completions.create(**sampled)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices], "the same seed must give the same text"

    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, logprobs=3, **GREEDY).choices[0]
    assert len(lp.logprobs.tokens) == len(lp.logprobs.token_logprobs) == len(lp.logprobs.top_logprobs) == 8
    assert "".join(lp.logprobs.tokens) == lp.text
    assert lp.logprobs.text_offset == [sum(len(t) for t in lp.logprobs.tokens[:i]) for i in range(8)]
    for chosen, top in zip(lp.logprobs.token_logprobs, lp.logprobs.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy picks the top token


# --- the SDK: chat ------------------------------------------------------------------------------


def test_sdk_chat(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again"},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, **GREEDY)
    (choice,) = out.choices
    assert out.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 10

    stream = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == choice.message.content
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 10
    assert stream[-1].usage.prompt_tokens == out.usage.prompt_tokens

    lp = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2, **GREEDY
    ).choices[0]
    assert len(lp.logprobs.content) == 6
    assert "".join(t.token for t in lp.logprobs.content) == lp.message.content
    for t in lp.logprobs.content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
        assert bytes(t.bytes).decode() == t.token

    many = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=5, n=2, seed=3, temperature=0.9, stream=True
        )
    )
    firsts = {}
    for c in many:
        for ch in c.choices:
            firsts.setdefault(ch.index, ch.delta.role)
    assert firsts == {0: "assistant", 1: "assistant"}


def test_sse_framing_raw(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "temperature": 0,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True}, timeout=30)
    assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"


# --- errors -------------------------------------------------------------------------------------


def test_sdk_errors_are_typed(client):
    cases = [
        (dict(prompt="hi", temperature=-1), "temperature"),
        (dict(prompt="hi", top_p=0), "top_p"),
        (dict(prompt="hi", n=0), "n"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=[10**9]), "prompt"),  # outside the vocabulary
        (dict(prompt=[5] * 600), "prompt"),  # longer than the context
        (dict(prompt="hi", max_tokens=100_000), "max_tokens"),
        (dict(prompt="hi", stream_options={"include_usage": True}), "stream_options"),
        (dict(prompt="hi", extra_body={"top_k": "many"}), "top_k"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, **kwargs)
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value.body)
        assert e.value.type == "invalid_request_error" and e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert "role" in e.value.param
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi")
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])


def test_raw_errors_have_the_openai_shape(server):
    url = server.url

    def shape(r, status):
        assert r.status_code == status, (r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return err

    shape(httpx.get(f"{url}/v1/nothing"), 404)
    shape(httpx.get(f"{url}/nothing"), 404)
    shape(httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    shape(httpx.post(f"{url}/v1/completions", json=[1, 2]), 400)
    shape(httpx.post(f"{url}/v1/completions", json={"max_tokens": 3}), 400)  # no prompt
    assert shape(httpx.post(f"{url}/v1/completions", json={"prompt": ["a", 1]}), 400)["param"] == "prompt"
    assert shape(httpx.post(f"{url}/v1/completions", json={"prompt": "a", "seed": 10**30}), 400)["param"] == "seed"
    assert (
        shape(
            httpx.post(f"{url}/v1/completions", json={"prompt": "a", "n": 100, "max_tokens": 1, "stop": ["x"] * 17}),
            400,
        )["param"]
        == "stop"
    )
    shape(httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 200_000}), 413)
    # unknown fields are ignored (ignore_eos: a drawn EOS would end the sampled request early)
    body = {"prompt": "a", "max_tokens": 2, "ignore_eos": True, "frobnicate": {"x": [1]}, "logit_bias": {"5": 1}}
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_and_overload(keyed_server):
    url = keyed_server.url
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a"}).status_code == 401  # no key at all
    assert httpx.get(f"{url}/health").status_code == 200  # only /v1/* is guarded
    assert httpx.get(f"{url}/metrics").status_code == 200
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL

    # one running sequence (scheduler.max_num_seqs=1), one waiting (server.max_waiting=1): the next is 503
    async def overload():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        long = dict(model=MODEL, prompt="Hello", max_tokens=400, stream=True, **GREEDY)
        s1 = await aclient.completions.create(**long)
        first = await s1.__anext__()
        s2 = await aclient.completions.create(**long)
        for _ in range(100):
            if metric(url, "vllm:num_requests_waiting") >= 1:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as e:  # the SDK's type for 5xx
            await aclient.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        await s1.close()
        await s2.close()
        await aclient.close()
        return first, e.value

    first, err = asyncio.run(overload())
    assert first.choices[0].text is not None
    assert err.status_code == 503 and err.code == "server_overloaded"
    assert int(err.response.headers["retry-after"]) >= 1


# --- concurrency, disconnects, liveness ---------------------------------------------------------


def test_64_concurrent_streams_equal_llm_generate(server, tiny_llama):
    from nanoslg import LLM, SamplingParams

    prompts = [f"Request {i}: the {['cat', 'dog', 'bird', 'fish'][i % 4]} sat on" for i in range(64)]

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(p: str) -> str:
            stream = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=12, stream=True, **GREEDY)
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    with LLM(f"model.path={tiny_llama}", "cache=sdpa") as llm:
        expected = [
            o.text for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        ]
    assert all(texts) and texts == expected


def test_disconnects_free_kv_and_health_stays_fast(server):
    url = server.url
    idle = metric(url, "vllm:kv_cache_usage_perc")
    aborted_before = metric(url, "vllm:request_success_total", 'finished_reason="abort"')

    async def run() -> tuple[float, float, float]:
        body = {
            "model": MODEL,
            "prompt": "Tell me a long story",
            "max_tokens": 480,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        clients = [httpx.AsyncClient(timeout=60) for _ in range(20)]
        streams, readers = [], []

        async def open_one(c):
            cm = c.stream("POST", f"{url}/v1/completions", json=body)
            resp = await cm.__aenter__()
            streams.append(cm)
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            readers.append(lines)  # keep it referenced: a collected reader closes its connection
            while not (await lines.__anext__()).startswith("data: {"):
                pass

        try:
            await asyncio.gather(*(open_one(c) for c in clients))  # all 20 mid-stream at once
            busy = metric(url, "vllm:kv_cache_usage_perc")
            running = metric(url, "vllm:num_requests_running")
            # the loop is free while 20 sequences decode: /health answers at once
            worst = 0.0
            async with httpx.AsyncClient(timeout=10) as probe:
                for _ in range(10):
                    t = time.perf_counter()
                    assert (await probe.get(f"{url}/health")).status_code == 200
                    worst = max(worst, time.perf_counter() - t)
                    await asyncio.sleep(0.02)
            return busy, running, worst
        finally:
            for cm in streams:  # leave mid-stream: closes the connection
                await cm.__aexit__(None, None, None)
            for c in clients:
                await c.aclose()

    busy, running, worst = asyncio.run(run())
    assert busy > idle and running == 20
    assert worst < 0.5, f"/health took {worst:.3f} s during generation"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if metric(url, "vllm:kv_cache_usage_perc") == idle and metric(url, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(url, "vllm:kv_cache_usage_perc") == idle
    assert metric(url, "vllm:num_requests_running") == 0
    assert metric(url, "vllm:request_success_total", 'finished_reason="abort"') - aborted_before == 20


def test_non_streaming_disconnect_aborts(server):
    url = server.url
    aborted_before = metric(url, "vllm:request_success_total", 'finished_reason="abort"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "Go on", "max_tokens": 480, "n": 8, "temperature": 0, "ignore_eos": True},
            timeout=httpx.Timeout(10, read=0.3),
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(url, "vllm:num_requests_running") > 0:
        time.sleep(0.1)
    assert metric(url, "vllm:num_requests_running") == 0
    assert metric(url, "vllm:request_success_total", 'finished_reason="abort"') - aborted_before == 8


# --- shutdown -----------------------------------------------------------------------------------


def test_sigterm_during_a_stream_exits_zero(keyed_server):
    srv = keyed_server
    body = {
        "model": MODEL,
        "prompt": "Keep going",
        "max_tokens": 480,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    chunks = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", f"{srv.url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    break
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            done = False
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
    ended = time.monotonic() - t0
    assert done, "the stream must end with [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "abort")
    assert ended < 1 + 5  # server.shutdown_timeout=1, then the rest is aborted
    assert srv.proc.wait(timeout=20) == 0, srv.output()[-3000:]


# --- an engine that dies (in-process, a stand-in engine: a real one cannot be made to die on cue) --


class _DyingStream:
    def __init__(self, rid: str, ids: list[int]):
        from nanoslg.engine.outputs import CompletionOutput, RequestOutput

        self.request_id = rid
        self._items = [RequestOutput(rid, ids, [CompletionOutput(0, text="a", token_ids=[7])])]

    def __aiter__(self):
        return self

    async def __anext__(self):
        from nanoslg.core.errors import EngineDeadError

        if self._items:
            return self._items.pop(0)
        raise EngineDeadError("the engine stopped: worker rank 1 died")


class _DyingEngine:
    model_name, max_model_len, vocab_size, tokenizer, num_waiting, backlog, accepting = MODEL, 64, 100, None, 0, 0, True

    def __init__(self):
        from nanoslg.engine.metrics import EngineMetrics

        self.metrics = EngineMetrics()
        self.is_alive = True
        self.aborted: list[str] = []

    def add_request(self, prompt, params, request_id=None, each_delta=True):
        return _DyingStream(request_id, list(prompt))

    def abort(self, request_id):
        self.aborted.append(request_id)


def test_engine_death_is_reported_not_500():
    from litestar.testing import TestClient

    from nanoslg.server.app import create_app, server_config

    engine = _DyingEngine()
    with TestClient(create_app(engine, server_config())) as c:
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "stream": True})
        events = sse_events(r.text)
        assert r.status_code == 200 and json.loads(events[0])["choices"][0]["text"] == "a"
        assert "worker rank 1 died" in json.loads(events[1])["error"]["message"] and events[2] == "[DONE]"
        assert len(engine.aborted) == 2
        # no tokenizer: chat cannot render a template, and says so
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert c.get("/health").status_code == 200
        engine.is_alive = False
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["message"]
