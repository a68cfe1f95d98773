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
    answer, the offline bench): the deltas are folded into one as they come and the reader is woken
    once, by the last (or by an error), so the loop spends no task switch per token on it and keeps
    no object per token. When each delta came, and how many tokens it brought, stays in `timeline`
    (perf_counter seconds, token counts: plain arrays)."""

    def __init__(self, request_id: str, each_delta: bool = True):
        self.request_id = request_id
        self.each_delta = each_delta
        self.timeline: tuple[array, array] | None = None if each_delta else (array("d"), array("l"))
        self._folded: RequestOutput | None = None
        self._texts: dict[int, list[str]] = {}  # the folded samples' text, in pieces
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if not self.each_delta and not isinstance(item, BaseException):
            times, counts = self.timeline
            times.append(time.perf_counter())
            outs = item.outputs
            counts.append(len(outs[0].token_ids) if len(outs) == 1 else sum(len(o.token_ids) for o in outs))
            self._fold(item)
            if not item.finished:
                return
            item = self._folded_result()
        self._items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _fold(self, delta: RequestOutput) -> None:
        """Appends delta to the folded result, sample by sample. The engine makes fresh objects for
        every delta, so the first delta's are this stream's to grow; text is kept in pieces and joined
        once, at the end (appending to a string would copy it at every token)."""
        acc = self._folded
        if acc is None:
            self._folded, self._texts = delta, {o.index: [o.text] for o in delta.outputs}
            return
        outs, texts = acc.outputs, self._texts
        for d in delta.outputs:
            o = outs[0] if outs[0].index == d.index else next((x for x in outs if x.index == d.index), None)
            if o is None:  # the first delta of this sample
                outs.append(d)
                texts[d.index] = [d.text]
                continue
            texts[d.index].append(d.text)
            o.token_ids += d.token_ids
            if d.logprobs:
                if o.logprobs is None:
                    o.logprobs = []
                o.logprobs += d.logprobs
            if d.finish_reason is not None:
                o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
        acc.finished, acc.num_cached_tokens = delta.finished, delta.num_cached_tokens

    def _folded_result(self) -> RequestOutput:
        acc, self._folded = self._folded, None
        for o in acc.outputs:
            o.text = "".join(self._texts[o.index])
        acc.outputs.sort(key=lambda o: o.index)
        return acc

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


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Accumulates a stream of deltas into one final RequestOutput."""
    final: RequestOutput | None = None
    outs: dict[int, CompletionOutput] = {}
    async for delta in stream:
        final = delta
        for d in delta.outputs:
            o = outs.setdefault(d.index, CompletionOutput(d.index, logprobs=[] if d.logprobs is not None else None))
            o.text += d.text
            o.token_ids += d.token_ids
            if d.logprobs:
                o.logprobs = (o.logprobs or []) + d.logprobs
            if d.finish_reason is not None:
                o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
    final.outputs = [outs[i] for i in sorted(outs)]
    return final
