"""Bodies and methods a client gets wrong, answered in-process (Litestar's TestClient over a stand-in
engine that records what reached it): each is a 4xx in OpenAI's shape naming what was wrong, never
a 500, and nothing reaches the engine."""

from __future__ import annotations

import pytest
from litestar.testing import TestClient

from nanoslg.engine.metrics import EngineMetrics
from nanoslg.server.app import create_app, server_config


class _RecordingEngine:
    """Enough of AsyncEngine for the app: it refuses nothing and records every request."""

    model_name, max_model_len, vocab_size, tokenizer, num_waiting, backlog = "tiny", 64, 100, None, 0, 0
    is_alive, accepting = True, True

    def __init__(self):
        self.metrics = EngineMetrics()
        self.added: list = []

    def add_request(self, prompt, params, request_id=None, each_delta=True):
        self.added.append((prompt, params))
        raise AssertionError("a bad body must not reach the engine")

    def abort(self, request_id):
        pass


@pytest.fixture
def client():
    engine = _RecordingEngine()
    with TestClient(create_app(engine, server_config())) as c:
        c.engine = engine
        yield c


def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


JSON = {"content-type": "application/json"}


def test_invalid_utf8_is_a_400(client):
    body = b'{"model":"tiny","prompt":"\xff\xfe","max_tokens":2}'
    err = _error(client.post("/v1/completions", content=body, headers=JSON), 400)
    assert "UTF-8" in err["message"]
    assert not client.engine.added


def test_deeply_nested_json_is_a_400(client):
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt":"a","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        err = _error(client.post("/v1/completions", content=body, headers=JSON), 400)
        assert err["message"]
    assert client.get("/health").status_code == 200


def test_empty_body_says_so(client):
    for path in ("/v1/completions", "/v1/chat/completions"):
        err = _error(client.post(path, content=b"", headers=JSON), 400)
        assert "empty" in err["message"] and "'data'" not in err["message"]


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", "16"), ("n", "2"), ("temperature", "0.5"), ("stream", "true"), ("echo", 1), ("logprobs", True)],
)
def test_wrong_json_types_are_refused_as_openai_does(client, field, value):
    err = _error(client.post("/v1/completions", json={"prompt": "hi", field: value}), 400)
    assert err["param"] == field and field in err["message"]


class _Done:
    """A request stream that ends at once with one token."""

    def __init__(self, rid: str, ids: list[int]):
        from nanoslg.engine.outputs import CompletionOutput, RequestOutput

        self.request_id = rid
        self._items = [RequestOutput(rid, ids, [CompletionOutput(0, "x", [7], finish_reason="length")], True)]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._items:
            raise StopAsyncIteration
        return self._items.pop(0)


def test_integral_numbers_are_integers(client):
    """JSON has one number type: 16.0 is 16 (JSON Schema's "integer" allows it), 16.5 is not."""
    engine = client.engine
    engine.add_request = lambda prompt, params, request_id=None, each_delta=True: (
        engine.added.append(params) or _Done(request_id, prompt)
    )
    r = client.post("/v1/completions", json={"prompt": [1.0, 2], "max_tokens": 16.0, "n": 1e0})
    assert r.status_code == 200 and engine.added[-1].max_tokens == 16 and engine.added[-1].n == 1
    assert (
        _error(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 16.5}), 400)["param"] == "max_tokens"
    )


def test_missing_field_names_it(client):
    assert _error(client.post("/v1/completions", json={"max_tokens": 3}), 400)["param"] == "prompt"
    assert _error(client.post("/v1/chat/completions", json={}), 400)["param"] == "messages"
    err = _error(client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert err["param"] == "messages[0].role"


def test_405_keeps_the_allow_header(client):
    for method, path, allowed in (("PUT", "/v1/models", "GET"), ("GET", "/v1/completions", "POST")):
        r = client.request(method, path)
        _error(r, 405)
        assert allowed in r.headers.get("allow", "").split(", "), r.headers
