"""Generated input over the served OpenAPI schema (schemathesis + hypothesis), through the runner of
experiments/fuzz_openapi.py (which runs 2,000 cases; here a few per operation): valid and invalid
bodies alike never get a 5xx, a body the schema allows is never refused (schemathesis'
positive_data_acceptance, except the cross-field rules the schema states in words), every error is
in OpenAI's shape, and the server stays healthy and keeps answering real requests afterwards.

A short context (model.max_model_len=64) bounds what a generated `n` x `max_tokens` can cost.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, metric

RUNNER = Path(__file__).resolve().parent.parent / "experiments" / "fuzz_openapi.py"
CASES = {"/v1/completions": 60, "/v1/chat/completions": 60}  # per generation mode


def _runner():
    spec = importlib.util.spec_from_file_location("fuzz_openapi", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fuzz_server(start_server, tiny_llama):
    return start_server(
        f"model.path={tiny_llama}", "cache=sdpa", "model.max_model_len=64", "server.max_body_bytes=65536"
    )


def test_fuzz_openapi_schema(fuzz_server, tiny_llama):
    from transformers import AutoTokenizer

    fz = _runner()
    url = fuzz_server.url
    schema = httpx.get(f"{url}/schema/openapi.json").json()
    assert set(schema["paths"]) >= {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
    stats = fz.fuzz(url, fz.CrossFieldRules(AutoTokenizer.from_pretrained(tiny_llama), 64), CASES)
    print(f"\n{stats.summary()}")
    assert not stats.server_errors, "5xx answers:\n" + "\n".join(stats.server_errors[:10])
    assert not stats.positive_rejections, "valid bodies refused:\n" + "\n".join(stats.positive_rejections[:10])
    assert not stats.bad_error_shape, "\n".join(stats.bad_error_shape[:10])
    assert stats.sent >= 150, stats.summary()
    # both valid (200) and invalid (400) requests were exercised on the generating endpoints
    for path in CASES:
        assert stats.statuses[(path, "positive", 200)] > 0 and stats.statuses[(path, "negative", 400)] > 0
    # still healthy and still serving; the streams schemathesis left mid-way were all released
    assert httpx.get(f"{url}/health").status_code == 200
    deadline = time.monotonic() + 10
    while metric(url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:kv_cache_usage_perc") == 0.0
    # ignore_eos: the request samples (temperature 1 by default), and a drawn EOS would end it early
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_schema_states_the_enforced_bounds(fuzz_server):
    """Bounds Litestar's generator dropped (falsy minimums, exclusive bounds, list lengths) and the
    model's own (vocabulary, context) are in the served schema."""
    comps = httpx.get(f"{fuzz_server.url}/schema/openapi.json").json()["components"]["schemas"]

    def branch(schema: dict) -> dict:
        return next(b for b in schema.get("anyOf", [schema]) if b.get("type") != "null")

    req = comps["CompletionRequest"]["properties"]
    assert branch(req["top_p"])["exclusiveMinimum"] == 0
    assert branch(req["temperature"])["minimum"] == 0 and branch(req["min_p"])["minimum"] == 0
    assert branch(req["repetition_penalty"])["exclusiveMinimum"] == 0
    assert branch(req["logprobs"])["minimum"] == 0 and branch(req["min_tokens"])["minimum"] == 0
    assert branch(req["stop_token_ids"])["items"]["minimum"] == 0
    assert max(b.get("maxItems", 0) for b in req["stop"]["anyOf"]) == 16
    assert branch(req["max_tokens"])["maximum"] == 63
    kinds = req["prompt"]["anyOf"]
    assert {k.get("minLength") or k.get("minItems") for k in kinds} == {1}
    ids = next(k for k in kinds if k["type"] == "array" and k["items"].get("type") == "integer")
    assert ids["items"]["maximum"] == 511 and ids["maxItems"] == 63  # the tiny model's vocabulary, context
    assert comps["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert "context" in comps["CompletionRequest"]["description"]
