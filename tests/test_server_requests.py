"""Requests as real clients send them, on loopback against the tiny model: logprobs' offsets index
the returned text, prompts that cannot fit are refused from their size, a burst an idle engine can
take is taken, overload and shutdown are 503s a client may retry (with Retry-After)."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MODEL, metric


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    return start_server(f"model.path={tiny_llama}", "cache=sdpa", "cache.max_num_tokens=8192")


def post(url: str, path: str = "/v1/completions", **body) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=60)


def check_offsets(text: str, lp: dict, tokenizer) -> None:
    """Each token starts at its text_offset; the offsets never go back and stay inside the text."""
    offs = lp["text_offset"]
    assert offs == sorted(offs) and all(0 <= o <= len(text) for o in offs)
    for tok, off in zip(lp["tokens"], offs):
        # a special token the text leaves out has no width; a token holding part of a character
        # decodes alone to U+FFFD and starts where that character does
        if tok not in tokenizer.all_special_tokens and "\ufffd" not in tok:
            assert text[off:].startswith(tok), (tok, off, text)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", ["hi", "Hello world, café ünïcödé"])
def test_echo_logprobs_offsets_index_the_returned_text(server, tiny_llama, prompt, stream):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    body = dict(prompt=prompt, max_tokens=6, logprobs=1, echo=True, temperature=0, stream=stream)
    r = post(server.url, **body)
    assert r.status_code == 200, r.text
    if stream:
        import json

        choices = [json.loads(ln[6:])["choices"][0] for ln in r.text.splitlines() if ln.startswith("data: {")]
        text = "".join(c["text"] for c in choices)
        lp = {k: sum((c["logprobs"][k] for c in choices if c["logprobs"]), []) for k in ("tokens", "text_offset")}
    else:
        choice = r.json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
    assert text.startswith(prompt)
    assert tok.bos_token in lp["tokens"]  # the prompt's BOS is listed, though the text leaves it out
    check_offsets(text, lp, tok)


def test_oversized_prompts_are_refused_from_their_size(server):
    url = server.url
    t = time.perf_counter()
    r = post(url, prompt="a " * 1_000_000, max_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt" and "characters" in r.json()["error"]["message"]
    r = post(url, prompt=[5] * 100_000, max_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "token ids" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "a " * 1_000_000}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert time.perf_counter() - t < 10  # tokenizing these would take far longer


@pytest.fixture(scope="module")
def small_queue_server(start_server, tiny_llama):
    return start_server(f"model.path={tiny_llama}", "cache=sdpa", "server.max_waiting=8")


def test_a_burst_an_idle_engine_can_take_is_taken(small_queue_server):
    """12 requests at once, server.max_waiting=8: the engine's batch has room for all of them."""

    def one(i: int) -> int:
        return post(small_queue_server.url, prompt=f"Request {i}", max_tokens=8).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(one, range(12)))
    assert statuses == [200] * 12


def test_shutdown_answers_503s_to_retry(start_server, tiny_llama):
    """During the drain the port still answers: new requests and /health get 503 with Retry-After,
    and a whole answer the drain cut short is a 503 too, not a 200 with finish_reason "abort"."""
    srv = start_server(
        f"model.path={tiny_llama}", "cache=sdpa", "scheduler.max_num_seqs=1", "server.shutdown_timeout=2"
    )
    url = srv.url
    long = {}

    def long_request() -> None:  # four samples of 480 tokens, one at a time: longer than the drain
        long["r"] = post(url, prompt="Go on", max_tokens=480, n=4, temperature=0, ignore_eos=True)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while metric(url, "vllm:num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    for r in (post(url, prompt="hi", max_tokens=2), httpx.get(f"{url}/health", timeout=10)):
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
        assert int(r.headers["retry-after"]) >= 1
    t.join(timeout=60)
    r = long["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text[:300]
    assert int(r.headers["retry-after"]) >= 1
    assert srv.proc.wait(timeout=30) == 0, srv.output()[-3000:]
