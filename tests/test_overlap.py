"""Overlap scheduling under churn: requests arriving while others run, aborts mid-flight, stop
tokens, chunked prefill, prefix hits and preemption in a tiny pool, all at once. Overlapped steps
must give every surviving request the tokens of one-step-at-a-time decoding, and leak no page."""

import asyncio
import random

from nanoslg import LLM, SamplingParams
from nanoslg.core.plan import PLACEHOLDER
from nanoslg.engine.stream import collect

CHURN = [
    "cache=paged",
    "cache.page_size=4",
    "cache.max_num_tokens=96",
    "scheduler.max_num_batched_tokens=24",
    "scheduler.max_num_seqs=6",
]


def _workload(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    base = [rng.randrange(3, vocab) for _ in range(14)]
    reqs = []
    for i in range(24):
        own = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))]
        prompt = (base[: rng.choice((4, 9, 14))] + own) if i % 2 else own
        # Half arrive at once (a burst that cannot fit the pool: preemption), half trickle in.
        reqs.append(
            dict(
                prompt=prompt,
                max_tokens=rng.randrange(1, 24),
                delay=0.0 if i < 12 else rng.random() * 0.02,
                abort_after=rng.choice([None, None, None, None, 0.0, 0.01, 0.02]),
                stop_first=rng.random() < 0.2,
            )
        )
    return reqs


async def _drive(engine, reqs, stop_tok):
    async def one(i, r):
        await asyncio.sleep(r["delay"])
        sp = SamplingParams(
            temperature=0,
            max_tokens=r["max_tokens"],
            ignore_eos=True,
            stop_token_ids=[stop_tok] if r["stop_first"] else [],
        )
        stream = engine.add_request(r["prompt"], sp, request_id=f"r{i}")
        if r["abort_after"] is not None:
            await asyncio.sleep(r["abort_after"])
            engine.abort(f"r{i}")
        out = await collect(stream)
        return out.token_ids, out.finish_reason

    return await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))


def _run(path, overlap: bool, reqs, stop_tok):
    with LLM(f"model.path={path}", *CHURN, f"scheduler.overlap={str(overlap).lower()}") as llm:
        ex = llm.engine.executor
        launch, fed = ex.launch, []
        ex.launch = lambda plan: fed.append(sum(s.token_ids == [PLACEHOLDER] for s in plan.seqs)) or launch(plan)
        results = llm._call(_drive(llm.engine, reqs, stop_tok))
        kv = llm.engine.scheduler.kv
        assert not llm.engine.scheduler.has_work()
        kv.flush()
        kv.check()
        assert kv.num_free_pages() == kv.num_pages, "a page leaked"
        return results, sum(fed), llm.engine.metrics.preemptions


def test_overlap_under_churn_changes_no_token_and_leaks_nothing(tiny_llama, hf_greedy):
    with LLM(f"model.path={tiny_llama}", "cache=sdpa") as llm:
        vocab = llm.engine.vocab_size
    reqs = _workload(vocab)
    stop_tok = hf_greedy(tiny_llama, reqs[0]["prompt"], 4)[2]  # a token greedy decoding does produce
    overlapped, fed, preempted = _run(tiny_llama, True, reqs, stop_tok)
    serial, _, _ = _run(tiny_llama, False, reqs, stop_tok)
    assert fed > 0 and preempted > 0  # the churn really overlapped steps and ran out of pages
    for r, (toks, reason), (toks_s, reason_s) in zip(reqs, overlapped, serial):
        ref = hf_greedy(tiny_llama, r["prompt"], r["max_tokens"])
        if r["stop_first"] and stop_tok in ref:
            ref = ref[: ref.index(stop_tok) + 1]
        # An aborted request keeps a prefix of its greedy tokens (how long depends on timing).
        assert toks == ref[: len(toks)] and toks_s == ref[: len(toks_s)]
        if reason != "abort":
            assert toks == ref and reason == (
                "stop" if len(ref) < r["max_tokens"] or (r["stop_first"] and ref[-1] == stop_tok) else "length"
            )
        if reason_s != "abort":
            assert toks_s == ref


def test_finished_step_streams_while_the_next_prefill_launches(tiny_llama):
    """A step's tokens reach their request while the worker is still queuing the eager (prefill)
    step after it: the collector thread waits for the device, not the worker. Step 1 prefills A and
    part of B; step 2, scheduled before step 1 comes back, decodes A beside C's prefill. Its launch
    is held until A's first token arrives: waiting behind that launch would time out instead."""
    import threading

    with LLM(f"model.path={tiny_llama}", "cache=paged", "scheduler.max_num_batched_tokens=8") as llm:
        eng = llm.engine
        assert eng.overlap
        launch, launches, gate, held = eng.executor.launch, [], threading.Event(), []

        def gated(plan):
            launches.append(plan)
            if len(launches) == 2:
                held.append((len(plan.seqs), plan.decode, gate.wait(timeout=10)))
            return launch(plan)

        eng.executor.launch = gated

        async def run():
            greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            a = eng.add_request([5, 6, 7], greedy)
            b = eng.add_request(list(range(10, 40)), greedy)
            c = eng.add_request(list(range(50, 60)), greedy)
            first = await a.__anext__()
            gate.set()
            assert first.outputs[0].token_ids
            for s in (a, b, c):
                await collect(s)

        llm._call(run())
    assert held == [(2, False, True)]  # step 2 was eager (A and C), and A's token came while it was held
