"""A request's stream of deltas, and `collect`, which folds one into the final result."""

from __future__ import annotations

import asyncio
import collections
import time
from array import array
from collections.abc import AsyncIterator

from nanoslg.engine.outputs import CompletionOutput, RequestOutput


class RequestStream:
    """Async iterator over one request's deltas; ends after the delta with finished=True.

    A deque and one waiter future rather than an asyncio.Queue: `put` runs once per token of every
    running request, on the loop, between steps.

    `each_delta=False` is for a caller that wants the whole result (LLM.generate, a non-streamed HTTP
    answer, the offline bench): the deltas are folded into one as they come (as `collect` folds them)
    and the reader is woken once, by the last (or by an error), so the loop spends no task switch per
    token on it and keeps no object per token; a one-sample request's deltas before its last come in
    bare (`put_one`), without a RequestOutput made for each. When each delta came, and how many tokens
    it brought, stays in `timeline` (perf_counter seconds, token counts: plain arrays)."""

    def __init__(self, request_id: str, each_delta: bool = True):
        self.request_id = request_id
        self.each_delta = each_delta
        self.timeline: tuple[array, array] | None = None if each_delta else (array("d"), array("l"))
        self._fold: _Fold | None = None  # each_delta=False: the deltas so far
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if not self.each_delta and not isinstance(item, BaseException):
            outs = item.outputs
            fold = self._folding(len(outs[0].token_ids) if len(outs) == 1 else sum(len(o.token_ids) for o in outs))
            fold.add(item)
            if not item.finished:
                return
            item, self._fold = fold.result(), None
        self._items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def put_one(self, out: CompletionOutput) -> bool:
        """A delta of a one-sample request that is not its last: folded in place, without a
        RequestOutput around it, when this stream folds (each_delta=False). False: put() it instead."""
        if self.each_delta:
            return False
        self._folding(len(out.token_ids)).add_output(out)
        return True

    def put_token(self, index: int, tok: int) -> None:
        """put_one of a token-ids-only delta of one token, not the sample's first (its fold has it)."""
        self._folding(1).outs[index].token_ids.append(tok)

    def _folding(self, num_tokens: int) -> _Fold:
        """A delta of num_tokens tokens arrives now: its place in the timeline, and the fold it joins."""
        times, counts = self.timeline
        times.append(time.perf_counter())
        counts.append(num_tokens)
        fold = self._fold = self._fold or _Fold()
        return fold

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item


class _Fold:
    """One request's deltas folded into its whole result, sample by sample (n > 1 samples may come in
    any order). Each sample's first delta is copied, so what the fold grows is its own; text is kept
    in pieces and joined once, at the end (appending to a string would copy it at every token)."""

    __slots__ = ("last", "outs", "texts")

    def __init__(self):
        self.last: RequestOutput | None = None
        self.outs: dict[int, CompletionOutput] = {}
        self.texts: dict[int, list[str]] = {}

    def add(self, delta: RequestOutput) -> None:
        self.last = delta
        for d in delta.outputs:
            self.add_output(d)

    def add_output(self, d: CompletionOutput) -> None:
        o = self.outs.get(d.index)
        if o is None:
            lps = list(d.logprobs) if d.logprobs is not None else None
            self.outs[d.index] = CompletionOutput(d.index, "", list(d.token_ids), lps, d.finish_reason, d.stop_reason)
            self.texts[d.index] = [d.text]
            return
        self.texts[d.index].append(d.text)
        o.token_ids += d.token_ids
        if d.logprobs:
            if o.logprobs is None:
                o.logprobs = []
            o.logprobs += d.logprobs
        if d.finish_reason is not None:
            o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason

    def result(self) -> RequestOutput:
        """The last delta (finished, cached tokens) carrying every sample's whole output, by index."""
        for i, o in self.outs.items():
            o.text = "".join(self.texts[i])
        self.last.outputs = [self.outs[i] for i in sorted(self.outs)]
        return self.last


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Accumulates a stream of deltas into one final RequestOutput."""
    fold = _Fold()
    async for delta in stream:
        fold.add(delta)
    return fold.result()
