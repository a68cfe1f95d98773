"""The engine loop: one asyncio loop alternates scheduling with model steps run in a worker thread.

    schedule -> await step (worker thread, its own CUDA stream) -> update sequences -> push deltas

The loop never blocks on the model, so an HTTP server on the same loop keeps answering while a
step runs. With overlap scheduling (one GPU) two steps are in flight: the host prepares step N+1 while
the device runs step N. Each request owns a RequestStream of deltas.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import itertools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Optional, Union

import numpy as np

from nanoslg.engine.detokenizer import IncrementalDetokenizer
from nanoslg.engine.metrics import EngineMetrics
from nanoslg.engine.outputs import CompletionOutput, Logprob, RequestOutput
from nanoslg.engine.sampling_params import SamplingParams
from nanoslg.engine.sequence import Sequence, SeqStatus
from nanoslg.errors import EngineDeadError, RequestError
from nanoslg.scheduler.plan import StepPlan, StepResult
from nanoslg.scheduler.scheduler import Scheduler

log = logging.getLogger("nanoslg.engine")
Prompt = Union[str, list[int]]


class RequestStream:
    """Async iterator over one request's deltas; ends after the delta with finished=True.

    A deque and one waiter future rather than an asyncio.Queue: `put` runs once per token of every
    running request, on the loop, between steps."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._items: collections.deque = collections.deque()
        self._waiter: Optional[asyncio.Future] = None
        self._done = False

    def put(self, item: Union[RequestOutput, BaseException]) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def __aiter__(self) -> "RequestStream":
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


class _Request:
    def __init__(self, rid: str, prompt: Optional[str], prompt_ids: list[int], params: SamplingParams,
                 seqs: list[Sequence], stream: RequestStream):
        self.id, self.prompt, self.prompt_ids, self.params = rid, prompt, prompt_ids, params
        self.seqs, self.stream = seqs, stream
        # Characters held back from the stream while they may still begin a stop string.
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.arrival = time.monotonic()
        self.first_token_time: Optional[float] = None


class AsyncEngine:
    def __init__(self, scheduler: Scheduler, executor, tokenizer, *, model_name: str, max_model_len: int,
                 vocab_size: int, eos_token_ids: tuple[int, ...], kv_pool_bytes: int = 0, info: dict | None = None):
        self.scheduler = scheduler
        self.executor = executor  # a parallel strategy: execute(plan) -> StepResult, shutdown()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.kv_capacity_tokens = scheduler.kv.capacity_tokens
        self.kv_pool_bytes = kv_pool_bytes
        self.info = info or {}  # what the builder chose (backend, mode, dtype, ...) and why
        self.metrics = EngineMetrics()
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[int, tuple[Sequence, _Request]] = {}
        self._abort_pending: set[int] = set()  # aborted while a step holding them was in flight
        # Overlap needs an executor that splits a step into launch (no host sync) and collect.
        self.overlap = bool(getattr(executor, "overlap", False))
        scheduler.lookahead = self.overlap
        self.max_inflight = 1 if self.overlap else getattr(executor, "max_inflight", 1)
        self._thread = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="nanoslg-step")
        # Overlap: a second thread waits for the device, so the worker never holds a finished step's
        # tokens behind the launch of the next one.
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoslg-collect") \
            if self.overlap else None
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._accepting = True
        self._dead: Optional[BaseException] = None

    # -- public API ----------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead is None and (self._task is None or not self._task.done())

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    async def start(self) -> None:
        _tune_gc()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nanoslg-engine")

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> RequestStream:
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        params = params or SamplingParams()
        text, ids = self._tokenize(prompt)
        params = self._fit_max_tokens(ids, params)
        rid = request_id or uuid.uuid4().hex
        if rid in self._requests:
            raise RequestError(f"request id {rid!r} is already in use", param="request_id")
        stream = RequestStream(rid)
        # With a seed, sample i of n draws from seed + i: reproducible, yet independent samples.
        seqs = [Sequence(rid, i, ids, params if params.seed is None or i == 0 else
                         dataclasses.replace(params, seed=params.seed + i)) for i in range(params.n)]
        req = self._requests[rid] = _Request(rid, text, ids, params, seqs, stream)
        for seq in seqs:
            seq.eos_token_ids = self.eos_token_ids
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens) \
                if self.tokenizer is not None else None
            self._seqs[seq.seq_id] = (seq, req)
            self.scheduler.add(seq)
        self.metrics.prompt_tokens += len(ids)
        self._poke()
        return stream

    async def generate(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> RequestOutput:
        """Runs one request to the end and returns the accumulated result."""
        stream = self.add_request(prompt, params, request_id)
        return await collect(stream)

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.finished:
                continue
            if seq.inflight:
                self._abort_pending.add(seq.seq_id)  # finished when its step comes back
            else:
                self._finish(req, seq, "abort")
        self._poke()

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to `timeout` s; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._requests and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for rid in list(self._requests):
            self.abort(rid)
        while self._requests and self.is_alive and self._task is not None:
            await asyncio.sleep(0.01)  # let the loop release the aborted sequences' KV
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._thread.shutdown(wait=True)
        if self._collector is not None:
            self._collector.shutdown(wait=True)
        self.executor.shutdown()

    # -- input checks --------------------------------------------------------------------------
    def _tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty", param="prompt")
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids", param="prompt")
            return prompt, list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        if not self._ids_valid(ids):
            bad = next(t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size)
            if not isinstance(bad, int) or isinstance(bad, bool):
                raise RequestError(f"token ids must be integers, got {bad!r}", param="prompt")
            raise RequestError(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
        return None, ids

    def _ids_valid(self, ids: list[int]) -> bool:
        """All plain ints inside the vocabulary. C-level checks (a long prompt is thousands of ids and
        a burst of requests validates them all before the first step); a loop only names a culprit."""
        if set(map(type, ids)) != {int}:
            return False
        try:
            arr = np.fromiter(ids, np.int64, len(ids))
        except OverflowError:
            return False
        return bool(arr.min() >= 0 and arr.max() < self.vocab_size)

    def _fit_max_tokens(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        n, ctx = len(ids), self.max_model_len
        if n >= ctx:
            raise RequestError(f"the prompt has {n} tokens; this model's context is {ctx} tokens",
                               param="prompt", code="context_length_exceeded")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=ctx - n)
        elif n + params.max_tokens > ctx:
            raise RequestError(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is over this "
                               f"model's context of {ctx} tokens", param="max_tokens",
                               code="context_length_exceeded")
        cap = self.kv_capacity_tokens
        if n + params.max_tokens > cap:
            raise RequestError(f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) can never fit "
                               f"the KV cache of {cap} tokens", param="max_tokens")
        return params

    # -- the loop ------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        try:
            if self.overlap:
                await self._run_overlapped()
            else:
                await self._run_steps()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine cannot go on: fail every request, never hang
            log.exception("engine loop died")
            self._dead = e
            for req in list(self._requests.values()):
                req.stream.put(EngineDeadError(f"the engine stopped: {e!r}"))
            self._requests.clear()

    async def _idle(self) -> None:
        """Nothing to run: sleep until a request arrives (checking on worker ranks meanwhile)."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            check = getattr(self.executor, "check_alive", None)
            if check is not None:
                check()  # a dead worker rank raises here

    async def _run_overlapped(self) -> None:
        """Two steps in flight: while the device runs step N, the host processes step N-1's tokens,
        schedules step N+1 and launches it. The worker thread launches, then waits for the step
        before; when the step it launches is an eager one (a prefill: 17-47 ms of Python in the H100
        traces), the collector thread waits instead, so a finished step's tokens do not sit behind
        that launch. A decode launch is short, and waiting behind it keeps the two threads off the
        GIL at once."""
        inflight: collections.deque = collections.deque()  # (plan, future of its launch handle)
        while True:
            while len(inflight) < 2:
                plan = self._timed(self.scheduler.schedule, "schedule_s")
                if plan is None:
                    break
                inflight.append((plan, self._thread.submit(self._timed, self.executor.launch, "launch_s", plan)))
            self._wake.clear()
            if not inflight:
                await self._idle()
                continue
            plan, launched = inflight.popleft()
            waiter = self._collector if inflight and not inflight[0][0].decode else self._thread
            collected = waiter.submit(lambda h=launched: self._timed(self.executor.collect, "wait_s", h.result()))
            self._process_timed(plan, await asyncio.wrap_future(collected))

    def _timed(self, fn, key: str, *args):
        """fn(*args), its time added to the step profile's `key` (the bench swaps in a fresh profile)."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            setattr(self.metrics.profile, key, getattr(self.metrics.profile, key) + time.perf_counter() - t)

    def _process_timed(self, plan: StepPlan, result: StepResult) -> None:
        self._timed(self._process, "process_s", plan, result)
        self.metrics.profile.steps += 1

    async def _run_steps(self) -> None:
        """Keeps up to `executor.max_inflight` steps running (pipeline stages hold one each)."""
        loop = asyncio.get_running_loop()
        inflight: dict[asyncio.Future, StepPlan] = {}
        while True:
            while len(inflight) < self.max_inflight:
                plan = self._timed(self.scheduler.schedule, "schedule_s")
                if plan is None:
                    break
                inflight[loop.run_in_executor(self._thread, self._timed, self.executor.execute, "wait_s", plan)] = plan
            self._wake.clear()
            if not inflight:
                await self._idle()
                continue
            waits = set(inflight)
            if len(inflight) < self.max_inflight:  # new work may start another micro-batch
                waits.add(loop.create_task(self._wake.wait()))
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in waits - set(inflight):
                    fut.cancel()
            for fut in sorted(done & set(inflight), key=lambda f: inflight[f].step_id):
                self._process_timed(inflight.pop(fut), fut.result())

    def _process(self, plan: StepPlan, result: StepResult) -> None:
        """Appends a step's tokens and streams one delta per request. It runs once per step for every
        running sequence, so it is written for speed: one pass, a request of one sample emits at once."""
        now = time.monotonic()
        seqs = self._seqs
        for st in plan.seqs:
            entry = seqs.get(st.seq_id)
            if entry is not None:
                entry[0].inflight -= 1
        grouped: dict[str, list[CompletionOutput]] = {}  # requests of n > 1: one delta for all samples
        lps = result.logprobs or itertools.repeat(None)
        finished, aborting = SeqStatus.FINISHED, self._abort_pending
        for seq_id, tok, lp in zip(result.seq_ids, result.token_ids, lps):
            entry = seqs.get(seq_id)
            if entry is None:
                continue
            seq, req = entry
            if seq.status is finished:
                continue  # lookahead: finished while this step was in flight; its token is dropped
            seq.num_pending -= 1
            if seq_id in aborting:
                self._finish(req, seq, "abort")
                continue
            out = self._append(req, seq, tok, lp, now)
            if len(req.seqs) == 1:
                self._emit(req, [out])
            else:
                grouped.setdefault(req.id, []).append(out)
        self.metrics.generation_tokens += len(result.token_ids)
        if aborting:  # aborted mid-step without sampling
            for st in plan.seqs:
                entry = seqs.get(st.seq_id)
                if entry is not None and st.seq_id in aborting and not entry[0].finished:
                    self._finish(entry[1], entry[0], "abort")
        for rid, outs in grouped.items():
            req = self._requests.get(rid)
            if req is not None:
                self._emit(req, outs)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.scheduler
        m.num_running, m.num_waiting, m.kv_cache_usage = len(s.running), s.num_waiting, s.kv.usage()
        m.preemptions = s.num_preemptions
        m.prefix_cache_queries, m.prefix_cache_hits = s.kv.prefix_queries, s.kv.prefix_hits

    def _append(self, req: _Request, seq: Sequence, tok: int, lp, now: float) -> CompletionOutput:
        """Appends one sampled token to `seq`; returns the delta to stream for it."""
        seq.token_ids.append(tok)
        last = seq.last_token_time
        if last is None:
            seq.first_token_time = now
            if req.first_token_time is None:
                req.first_token_time = now
                self.metrics.time_to_first_token.observe(now - req.arrival)
                self.metrics.request_queue_time.observe((seq.first_scheduled_time or now) - req.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - last)
        seq.last_token_time = now
        out = CompletionOutput(seq.index, "", [tok])
        if lp is not None:
            logprob = Logprob(tok, lp[0], lp[1])
            seq.logprobs.append(logprob)
            if req.params.logprobs is not None:
                out.logprobs = [logprob]
        elif req.params.logprobs is not None:
            out.logprobs = []
        if seq.detok is not None:
            seq.text += seq.detok.add(tok)
        reason = self._stop_reason(seq, tok)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            out.finish_reason, out.stop_reason = reason, seq.stop_reason
        if seq.detok is not None:
            upto = max(seq.emitted, len(seq.text) - (0 if reason is not None else req.hold))
            out.text = seq.text[seq.emitted:upto]
            seq.emitted = upto
        return out

    def _stop_reason(self, seq: Sequence, tok: int) -> Optional[str]:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in seq.eos_token_ids:
                return "stop"
            if tok in p.stop_token_ids:
                seq.stop_reason = tok
                return "stop"
            if p.stop and seq.detok is not None:
                for stop in p.stop:
                    at = seq.text.find(stop, max(0, seq.emitted - len(stop)))
                    if at >= 0:
                        seq.text = seq.text[:at]
                        seq.stop_reason = stop
                        return "stop"
        if n_out >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: _Request, seq: Sequence, reason: str) -> None:
        """Ends one sequence outside the normal token path (abort) and emits its last delta."""
        self._abort_pending.discard(seq.seq_id)
        self.scheduler.finish(seq, reason)
        self._emit(req, [CompletionOutput(seq.index, finish_reason=reason)])
        self._update_gauges()
        self._poke()

    def _emit(self, req: _Request, outs: list[CompletionOutput]) -> None:
        done = req.seqs[0].finished if len(req.seqs) == 1 else all(s.finished for s in req.seqs)
        if len(outs) > 1:
            outs.sort(key=lambda o: o.index)
        req.stream.put(RequestOutput(req.id, req.prompt_ids, outs, done, req.seqs[0].num_cached_tokens, req.prompt))
        if done:
            now = time.monotonic()
            self.metrics.e2e_request_latency.observe(now - req.arrival)
            for seq in req.seqs:
                self.metrics.requests_finished[seq.finish_reason] = \
                    self.metrics.requests_finished.get(seq.finish_reason, 0) + 1
                self._seqs.pop(seq.seq_id, None)
            self._requests.pop(req.id, None)


def _tune_gc() -> None:
    """Each step makes a few short-lived objects per running sequence; at the default gen-0 threshold
    (700) the collector ran several times a step and doubled the host's share of a 256-sequence step
    (experiments/cpu_step_overhead.py on a 2-core CPU: 3.9 -> 2.0 ms). What start-up built (model, tokenizer) is frozen
    out of later full collections."""
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 < 10_000:
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, max(gen1, 10), max(gen2, 10))


async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    """Accumulates a stream of deltas into one final RequestOutput."""
    final: Optional[RequestOutput] = None
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
