"""Requests as real clients send them, on loopback against the tiny model: logprobs' offsets index
the returned text, prompts that cannot fit are refused from their size, a burst an idle engine can
take is taken, overload and shutdown are 503s a client may retry (with Retry-After)."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import MODEL


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
