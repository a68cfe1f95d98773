"""Generated input over the served OpenAPI schema (schemathesis + hypothesis): valid and invalid
bodies alike must never get a 5xx, every error must be in OpenAI's shape, and the server must stay
healthy and keep answering real requests afterwards.

A short context (model.max_model_len=64) bounds what a generated `n` x `max_tokens` can cost.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from conftest import MODEL, metric
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

# examples per operation and generation mode; the GET endpoints have no inputs (one case each)
EXAMPLES = {"/v1/completions": 90, "/v1/chat/completions": 90}


@pytest.fixture(scope="module")
def fuzz_server(start_server, tiny_llama):
    return start_server(
        f"model.path={tiny_llama}", "cache=sdpa", "model.max_model_len=64", "server.max_body_bytes=65536"
    )


def test_fuzz_openapi_schema_no_5xx(fuzz_server):
    url = fuzz_server.url
    schema = schemathesis.openapi.from_url(f"{url}/schema/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/health",
        "/metrics",
        "/version",
    }
    seen: dict[tuple[str, int], int] = {}
    failures: list[str] = []

    for op in ops:
        modes = (
            [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
            if op.method.upper() == "POST"
            else [GenerationMode.POSITIVE]
        )
        for mode in modes:

            @settings(
                max_examples=EXAMPLES.get(op.path, 5),
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                resp = case.call(base_url=url, timeout=60)
                key = (op.path, resp.status_code)  # noqa: B023 (run is called in this iteration)
                seen[key] = seen.get(key, 0) + 1
                if resp.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {resp.status_code} {resp.text[:300]}")
                elif resp.status_code >= 400:
                    err = json.loads(resp.text)["error"]
                    assert set(err) == {"message", "type", "param", "code"}, resp.text
                elif case.method == "POST" and isinstance(case.body, dict) and case.body.get("stream") is True:
                    # schemathesis reads at most 20 events and then hangs up (a mid-stream disconnect
                    # for the server): only a stream read to its end must end with [DONE]
                    if resp.text.count("\n\n") < 20:
                        assert resp.text.endswith("data: [DONE]\n\n"), resp.text[-300:]

            run()

    total = sum(seen.values())
    assert not failures, "5xx answers:\n" + "\n".join(failures[:10])
    assert total >= 300, f"only {total} cases ran: {seen}"
    # both valid (200) and invalid (400) requests were exercised on the generating endpoints
    for path in EXAMPLES:
        assert seen.get((path, 200), 0) > 0 and seen.get((path, 400), 0) > 0, seen
    print(f"\n{total} generated requests; (path, status) counts: {sorted(seen.items())}")
    # still healthy and still serving; the streams schemathesis left mid-way were all released
    assert httpx.get(f"{url}/health").status_code == 200
    deadline = time.monotonic() + 10
    while metric(url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:kv_cache_usage_perc") == 0.0
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
