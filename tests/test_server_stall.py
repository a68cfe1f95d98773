"""No request stalls the others: huge prompts arrive while a stream runs and /health is probed.

The demo model on loopback. Ten 10 MB prompts are refused from their size alone while /health must
answer within 100 ms (p99) and a running stream must never go 100 ms without a chunk. Prompts just
under that size bound are tokenized in a worker thread (its tokenizer has long tokens, so the bound
is generous) and refused by the engine for their token count, while /health stays fast.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MODEL

from nanoslg.bench.metrics import percentile
from nanoslg.server.prompts import char_limit


@pytest.fixture(scope="module")
def demo_server(start_server, demo_model):
    return start_server(f"model.path={demo_model}", "cache=sdpa", "cache.max_num_tokens=8192")


def burst(url: str, bodies: list[bytes]) -> tuple[list, list[float], list[float]]:
    """Sends `bodies` at once (ten at a time) while a stream runs and /health is probed every 10 ms.
    Returns the answers, the /health latencies and the stream's gaps between chunks meanwhile."""
    stop = threading.Event()
    health: list[float] = []
    chunks: list[float] = []

    def probe() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get(f"{url}/health").status_code == 200
                health.append(time.perf_counter() - t)
                time.sleep(0.01)

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 2000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(time.perf_counter())
                if stop.is_set():
                    return

    def send(body: bytes) -> dict:
        with httpx.Client(timeout=300) as c:
            return c.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}).json()

    failed: list[BaseException] = []

    def watched(fn):  # a probe or stream that times out must fail the test, not end quietly
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                failed.append(e)
                stop.set()

        return threading.Thread(target=run)

    threads = [watched(probe), watched(stream)]
    for t in threads:
        t.start()
    while len(chunks) < 5 and not failed:  # the stream is running
        time.sleep(0.01)
    health.clear()
    begin = time.perf_counter()
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(send, bodies))
    end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    if failed:
        raise AssertionError(f"a probe or the stream failed during the burst: {failed[0]!r}")
    gaps = [b - a for a, b in zip(chunks, chunks[1:]) if b >= begin and a <= end]
    print(f"\n{len(bodies)} prompts in {end - begin:.2f} s: /health p99 {percentile(health, 99) * 1e3:.0f} ms", end="")
    print(f" ({len(health)} probes), largest gap between stream chunks {max(gaps, default=0) * 1e3:.0f} ms")
    return answers, health, gaps


# This machine's cores are shared (CI's may be too): a burst is tried up to three times and one
# within the bounds passes. A stall (a 10 MB prompt tokenized on the loop takes seconds) fails all.
ATTEMPTS = 3


def test_ten_10mb_prompts_stall_neither_health_nor_a_stream(demo_server):
    huge = json.dumps({"model": MODEL, "prompt": "a " * 5_000_000, "max_tokens": 4}).encode()
    assert len(huge) > 10_000_000
    for _ in range(ATTEMPTS):
        answers, health, gaps = burst(demo_server.url, [huge] * 10)
        for a in answers:  # refused from the size alone
            assert a["error"]["code"] == "context_length_exceeded" and a["error"]["param"] == "prompt", a
        assert gaps, "the stream must have run while the prompts arrived"
        if percentile(health, 99) < 0.1 and max(gaps) < 0.1:
            return
    pytest.fail(f"/health p99 {percentile(health, 99):.3f} s, largest stream gap {max(gaps):.3f} s")


def test_prompts_are_tokenized_off_the_loop(demo_server, demo_model):
    """Prompts just under the size bound are tokenized (in the worker thread): /health stays fast."""
    from transformers import AutoTokenizer

    limit = char_limit(AutoTokenizer.from_pretrained(demo_model), 2048)
    under = json.dumps({"model": MODEL, "prompt": ("a " * limit)[: limit - 1], "max_tokens": 4}).encode()
    for _ in range(ATTEMPTS):
        answers, health, _gaps = burst(demo_server.url, [under] * 10)
        for a in answers:  # tokenized, then refused for its token count
            assert a["error"]["code"] == "context_length_exceeded" and "tokens" in a["error"]["message"], a
        if percentile(health, 99) < 0.1:
            return
    pytest.fail(f"/health p99 {percentile(health, 99):.3f} s while prompts were tokenized")
