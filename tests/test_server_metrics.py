"""/metrics, scraped as Prometheus does: the exposition parses, the vLLM names are there with the
histograms and counters vLLM users graph, the process metrics come from prometheus_client, and the
numbers agree with what the clients got (an n=4 request counts as four everywhere)."""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    return start_server(f"model.path={tiny_llama}", "cache=sdpa", "cache.max_num_tokens=4096")


def scrape(url: str) -> dict[str, float]:
    """Every sample, keyed `name{label=value,...}` (labels sorted, model_name left out)."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def complete(url: str, **body) -> dict:
    body = {"model": MODEL, "prompt": "Hello there", "temperature": 0, "ignore_eos": True, **body}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_generation_tokens_count_what_was_returned(server):
    url = server.url
    for body, returned, requests in (({"max_tokens": 1}, 1, 1), ({"max_tokens": 5, "n": 4}, 20, 4)):
        before = scrape(url)
        out = complete(url, **body)
        assert out["usage"]["completion_tokens"] == returned
        after = scrape(url)
        assert delta(after, before, "vllm:generation_tokens_total{}") == returned, body
        # each sample is a request in every per-request number
        assert delta(after, before, "vllm:request_generation_tokens_sum{}") == returned
        assert delta(after, before, "vllm:request_generation_tokens_count{}") == requests
        assert delta(after, before, "vllm:request_success_total{finished_reason=length}") == requests
        assert delta(after, before, "vllm:e2e_request_latency_seconds_count{}") == requests
        assert delta(after, before, "vllm:time_to_first_token_seconds_count{}") == requests
        assert delta(after, before, "vllm:request_prompt_tokens_count{}") == requests
        prompt = out["usage"]["prompt_tokens"]
        assert delta(after, before, "vllm:prompt_tokens_total{}") == prompt * requests
        assert delta(after, before, "vllm:request_prompt_tokens_sum{}") == prompt * requests
        tpot = delta(after, before, "vllm:time_per_output_token_seconds_count{}")
        assert tpot == (requests if returned // requests > 1 else 0)
        assert delta(after, before, "vllm:iteration_tokens_total_count{}") >= returned // requests


def test_process_metrics_and_rejections(server):
    url = server.url
    before = scrape(url)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 0}, timeout=10)
    assert r.status_code == 400
    httpx.get(f"{url}/no/such/route", timeout=10)
    after = scrape(url)
    assert delta(after, before, "nanoslg:request_rejected_total{status_code=400}") == 1
    assert delta(after, before, "nanoslg:request_rejected_total{status_code=404}") == 1
    for name in ("process_resident_memory_bytes{}", "process_cpu_seconds_total{}", "python_gc_collections_total{"):
        assert any(k.startswith(name) for k in after), name
    assert after["vllm:num_requests_running{}"] == 0 and after["vllm:kv_cache_usage_perc{}"] == 0


def test_two_apps_in_one_process_have_their_own_registries():
    from litestar.testing import TestClient

    from nanoslg.engine.metrics import EngineMetrics
    from nanoslg.server.app import create_app, server_config

    class Idle:
        model_name, max_model_len, vocab_size, tokenizer, num_waiting, backlog = "a", 64, 100, None, 0, 0
        is_alive, accepting = True, True

        def __init__(self, tokens: int):
            self.metrics = EngineMetrics(generation_tokens=tokens)

    seen = []
    for tokens in (3, 7):
        with TestClient(create_app(Idle(tokens), server_config())) as c:
            text = c.get("/metrics").text
        seen.append([ln for ln in text.splitlines() if ln.startswith("vllm:generation_tokens_total{")])
    assert seen == [
        ['vllm:generation_tokens_total{model_name="a"} 3.0'],
        ['vllm:generation_tokens_total{model_name="a"} 7.0'],
    ]
