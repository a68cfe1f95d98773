"""RequestStream: a reader that wants the whole result (each_delta=False) is woken once, gets exactly
what `collect` folds from the same deltas read one by one, and keeps each delta's time and size."""

from __future__ import annotations

import asyncio

import pytest

from nanoslg.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nanoslg.engine.stream import RequestStream, collect


def deltas() -> list[RequestOutput]:
    """Two samples, streamed unevenly (a step may bring one sample's token and not the other's; the
    second sample's first), with logprobs and each sample's own end; fresh objects on every call."""

    def out(i, text, ids, finish=None):
        lp = [Logprob(t, -0.5, [(t, -0.5)]) for t in ids]
        return CompletionOutput(i, text, list(ids), lp, finish, "x" if finish == "stop" else None)

    return [
        RequestOutput("r", [1, 2], [out(1, "b", [6])], False, 0),
        RequestOutput("r", [1, 2], [out(0, "a", [5])], False, 0),
        RequestOutput("r", [1, 2], [out(1, "cd", [7, 8])], False, 2),
        RequestOutput("r", [1, 2], [out(0, "e", [9], "stop")], False, 2),
        RequestOutput("r", [1, 2], [out(1, "", [10], "length")], True, 2),
    ]


def test_a_whole_result_reader_is_woken_once_and_gets_what_collect_folds():
    async def run():
        eager, lazy = RequestStream("r"), RequestStream("r", each_delta=False)
        wakes = {"eager": 0, "lazy": 0}

        async def read(name, stream):
            got = []
            async for d in stream:
                wakes[name] += 1
                got.append(d)
            return got

        readers = [asyncio.ensure_future(read("eager", eager)), asyncio.ensure_future(read("lazy", lazy))]
        await asyncio.sleep(0)
        for a, b in zip(deltas(), deltas()):
            eager.put(a)
            lazy.put(b)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if not b.finished:
                assert not readers[1].done() and wakes["lazy"] == 0  # nothing woke the whole-result reader
        got_eager, got_lazy = await asyncio.gather(*readers)
        return got_eager, got_lazy, lazy, wakes

    got_eager, got_lazy, lazy, wakes = asyncio.run(run())
    assert wakes == {"eager": 5, "lazy": 1} and len(got_lazy) == 1 and got_lazy[0].finished

    async def fold(items):
        s = RequestStream("r")
        for d in items:
            s.put(d)
        return await collect(s)

    want = asyncio.run(fold(got_eager))
    have = got_lazy[0]
    assert [vars(o) for o in have.outputs] == [vars(o) for o in want.outputs]  # in sample order
    assert have.outputs[0].text == "ae" and have.outputs[1].token_ids == [6, 7, 8, 10]
    assert (have.outputs[0].finish_reason, have.outputs[1].finish_reason) == ("stop", "length")
    assert have.num_cached_tokens == 2
    times, counts = lazy.timeline
    assert list(counts) == [1, 1, 2, 1, 1] and list(times) == sorted(times) and len(times) == 5
    # collect() of a whole-result stream is the same result
    s = RequestStream("r", each_delta=False)
    for d in deltas():
        s.put(d)
    assert [vars(o) for o in asyncio.run(collect(s)).outputs] == [vars(o) for o in want.outputs]


def test_an_error_wakes_a_whole_result_reader_at_once():
    async def run():
        s = RequestStream("r", each_delta=False)
        task = asyncio.ensure_future(collect(s))
        s.put(deltas()[0])
        await asyncio.sleep(0)
        assert not task.done()
        s.put(RuntimeError("the engine stopped"))
        with pytest.raises(RuntimeError, match="the engine stopped"):
            await task

    asyncio.run(run())


def test_one_sample_deltas_folded_in_place_give_what_collect_folds():
    """put_one (the output processor's path for a one-sample request's deltas before its last) folds
    the bare CompletionOutput; the result and the timeline are those of putting whole deltas."""

    def outs():
        lp = lambda t: [Logprob(t, -0.25, [(t, -0.25)])]  # noqa: E731
        return [
            CompletionOutput(0, "a", [5], lp(5)),
            CompletionOutput(0, "bc", [6], lp(6)),
            CompletionOutput(0, "", [7], lp(7)),
            CompletionOutput(0, "d", [8], lp(8), "stop", "x"),
        ]

    async def run():
        whole, folded = RequestStream("r", each_delta=False), RequestStream("r", each_delta=False)
        for o in outs():
            whole.put(RequestOutput("r", [1, 2], [o], o.finish_reason is not None, 1))
        *first, last = outs()
        for o in first:
            assert folded.put_one(o)
        folded.put(RequestOutput("r", [1, 2], [last], True, 1))
        return await collect(whole), await collect(folded), folded

    want, have, folded = asyncio.run(run())
    assert [vars(o) for o in have.outputs] == [vars(o) for o in want.outputs]
    assert have.text == "abcd" and have.token_ids == [5, 6, 7, 8] and have.finish_reason == "stop"
    assert have.num_cached_tokens == 1 and have.finished
    assert list(folded.timeline[1]) == [1, 1, 1, 1]
    assert not RequestStream("r").put_one(outs()[0])  # a streamed reader gets every delta itself
