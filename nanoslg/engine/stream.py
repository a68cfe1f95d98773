"""A request's stream of deltas, and `collect`, which folds one into the final result."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from nanoslg.engine.outputs import CompletionOutput, RequestOutput


class RequestStream:
    """Async iterator over one request's deltas; ends after the delta with finished=True.

    A deque and one waiter future rather than an asyncio.Queue: `put` runs once per token of every
    running request, on the loop, between steps."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

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
