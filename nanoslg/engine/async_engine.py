"""The engine loop: one asyncio loop alternates scheduling with model steps run in a worker thread.

    schedule -> await step (worker thread, its own CUDA stream) -> commit tokens -> process outputs

The loop never blocks on the model, so an HTTP server on the same loop keeps answering while a
step runs. With overlap scheduling (one GPU) two steps are in flight: the host prepares step N+1 while
the device runs step N. Each request owns a RequestStream of deltas (stream.py); what a token means
for its request (text, stops) is the output processor's (output_processor.py).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from nanoslg.core.errors import EngineDeadError, RequestError
from nanoslg.core.plan import StepPlan, StepResult
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.lookahead import LookaheadHold
from nanoslg.engine.metrics import EngineMetrics
from nanoslg.engine.output_processor import OutputProcessor
from nanoslg.engine.outputs import Prompt, RequestOutput
from nanoslg.engine.request_checks import RequestChecks
from nanoslg.engine.stream import RequestStream, collect
from nanoslg.engine.structured import Grammars
from nanoslg.parallel.executor import Executor
from nanoslg.scheduler.scheduler import Scheduler

log = logging.getLogger("nanoslg.engine")


class AsyncEngine:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        tokenizer,
        *,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        kv_pool_bytes: int = 0,
        info: dict | None = None,
        hold_lookahead: bool = False,
    ):
        self.scheduler = scheduler
        self.executor = executor
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.kv_capacity_tokens = scheduler.kv.capacity_tokens
        self.checks = RequestChecks(tokenizer, vocab_size, max_model_len, self.kv_capacity_tokens)
        self.kv_pool_bytes = kv_pool_bytes
        self.info = info or {}  # what the builder chose (backend, mode, dtype, ...) and why
        self.metrics = EngineMetrics()
        self.outputs = OutputProcessor(tokenizer, eos_token_ids, max_model_len, self.metrics, scheduler.finish)
        self._abort_pending: set[int] = set()  # aborted while a step holding them was in flight
        self.grammars = Grammars(tokenizer, vocab_size, eos_token_ids, self.metrics)  # structured outputs
        # Overlap needs an executor that splits a step into launch (no host sync) and collect.
        self.overlap = executor.overlap
        scheduler.lookahead = self.overlap
        self.max_inflight = 1 if self.overlap else executor.max_inflight
        self.hold = LookaheadHold(hold_lookahead and self.overlap)  # when to plan the step after a decode
        self._launch_ended = 0.0  # perf_counter time the step thread's last launch ended
        self._thread = ThreadPoolExecutor(max_workers=self.max_inflight, thread_name_prefix="nanoslg-step")
        # Overlap: a second thread waits for the device, so the worker never holds a finished step's
        # tokens behind the launch of the next one.
        self._collector = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoslg-collect") if self.overlap else None
        )
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._accepting = True
        self._gc_before: tuple[int, int, int] | None = None  # what _tune_gc replaced, restored at shutdown
        self._dead: BaseException | None = None

    # -- public API ----------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead is None and (self._task is None or not self._task.done())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.outputs.eos_token_ids

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def backlog(self) -> int:
        """Waiting sequences the running batch has no place for (Scheduler.backlog)."""
        return self.scheduler.backlog

    @property
    def accepting(self) -> bool:
        """False once shutdown began: new requests are refused."""
        return self._accepting and self.is_alive

    @property
    def cascade_steps(self) -> int:
        """Decode steps so far that read a prefix every sequence shared once (rank 0's backend)."""
        return self.executor.backend.cascade_steps

    async def start(self) -> None:
        if self._task is None:
            self._gc_before = _tune_gc()
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nanoslg-engine")

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        each_delta: bool = True,
    ) -> RequestStream:
        """Queues a request; its deltas come on the returned stream (`each_delta=False`: the reader
        wakes once, at the end, and reads them all; see RequestStream)."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down")
        params = params or SamplingParams()
        text, ids = self.checks.tokenize(prompt)
        params = self.checks.fit_max_tokens(ids, params)
        self.checks.logit_bias(params)
        rid = request_id or uuid.uuid4().hex
        if rid in self.outputs.requests or rid in self.grammars.waiting:
            raise RequestError(f"request id {rid!r} is already in use", param="request_id")
        stream = RequestStream(rid, each_delta)
        spec = params.structured_outputs
        compiled = self.grammars.cached(spec) if spec is not None else None
        if spec is not None and compiled is None:  # compiled off the loop; the request starts after
            start = lambda c: self._start(rid, text, ids, params, stream, c)  # noqa: E731
            self.grammars.start_when_compiled(rid, spec, stream, ids, params.n, start)
            return stream
        self._start(rid, text, ids, params, stream, compiled)
        return stream

    def _start(self, rid: str, text, ids: list[int], params: SamplingParams, stream, compiled) -> None:
        if self._dead is not None or not self._accepting:
            raise EngineDeadError("the engine stopped")
        req = self.outputs.add_request(rid, text, ids, params, stream)
        if compiled is not None:
            self.outputs.constrain(req, lambda: self.grammars.new_matcher(compiled))
        for so in req.outs:
            self.scheduler.add(so.seq)
        self._poke()

    async def compile_structured(self, params: SamplingParams) -> None:
        """Compiles the request's grammar (off the loop) ahead of add_request, so a spec that does not
        compile is refused (RequestError) before anything is streamed."""
        if params.structured_outputs is not None:
            await self.grammars.compile(params.structured_outputs)

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Runs one request to the end and returns the accumulated result."""
        stream = self.add_request(prompt, params, request_id, each_delta=False)
        return await collect(stream)

    def abort(self, request_id: str) -> None:
        if self.grammars.abort(request_id):  # still compiling its grammar: never scheduled
            return
        req = self.outputs.requests.get(request_id)
        if req is None:
            return
        for so in req.outs:
            if so.seq.finished:
                continue
            if so.seq.inflight:
                self._abort_pending.add(so.seq.seq_id)  # finished when its step comes back
            else:
                self._end(so, "abort")
        self._poke()

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting; let running requests finish for up to `timeout` s; abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        requests = self.outputs.requests
        while requests and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for rid in [*requests, *self.grammars.waiting]:
            self.abort(rid)
        while requests and self.is_alive and self._task is not None:
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
        self.grammars.shutdown()
        if held := self.hold.summary():
            log.info("lookahead: %s", held)
        _restore_gc(self._gc_before)
        self.executor.shutdown()

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
            self.outputs.fail_all(EngineDeadError(f"the engine stopped: {e!r}"))

    async def _idle(self) -> None:
        """Nothing to run: sleep until a request arrives (checking on worker ranks meanwhile)."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=1.0)
        except TimeoutError:
            self.executor.check_alive()  # a dead worker rank raises here

    async def _run_overlapped(self) -> None:
        """Two steps in flight: while the device runs step N, the host processes step N-1's tokens,
        schedules step N+1 and launches it. The worker thread launches, then waits for the step
        before; when the step it launches is an eager one (a prefill, whose Python launch is long),
        the collector thread waits instead, so a finished step's tokens do not sit behind that
        launch. A decode launch is short, and waiting behind it keeps the two threads off the
        GIL at once."""
        inflight: collections.deque = collections.deque()  # (plan, future of its launch handle)
        while True:
            while len(inflight) < 2:
                if inflight:  # step N+1: plan it shortly before step N ends, if N is a decode (lookahead.py)
                    await self.hold.wait(inflight[0][0], self.scheduler.num_waiting, self._wake)
                t = time.perf_counter()
                plan = self._timed(self._schedule, "schedule_s")
                if plan is None:
                    break
                inflight.append((plan, self._thread.submit(self._launch_timed, plan, t, time.perf_counter())))
            self._wake.clear()
            if not inflight:
                await self._idle()
                continue
            plan, launched = inflight.popleft()
            waiter = self._collector if inflight and not inflight[0][0].decode else self._thread
            collected = waiter.submit(lambda h=launched: self._timed(self.executor.collect, "wait_s", h.result()))
            result = await asyncio.wrap_future(collected)
            self.hold.collected(plan, result)
            if inflight and inflight[0][0].sample_later:  # its masks need the grammars this step advances
                nxt, fwd = inflight[0]

                def sample_when_masked(ended: dict, nxt=nxt, fwd=fwd) -> None:
                    masks = self.grammars.fill_later(nxt, self.outputs.outs, ended)
                    sample = self._thread.submit(lambda: self.executor.sample(fwd.result(), masks and masks.result()))
                    inflight[0] = (nxt, sample)

                self._process_timed(plan, result, sample_when_masked)
            else:
                self._process_timed(plan, result)

    def _launch_timed(self, plan: StepPlan, planned_at: float, submitted_at: float):
        """executor.launch(plan) in the step thread. The hold's host lead is the time from planning to
        launched (the thread's wake-up included) less any wait behind the launch before it: an eager
        step's launch is long, and a held step never queues behind one."""
        try:
            return self._timed(self.executor.launch, "launch_s", plan)
        finally:
            end = time.perf_counter()
            queued = max(0.0, self._launch_ended - submitted_at)
            self._launch_ended = end
            self.hold.host_time(plan, end - planned_at - queued)

    def _schedule(self) -> StepPlan | None:
        """The scheduler's next plan, with the grammar masks of its constrained rows (or sample_later)."""
        plan = self.scheduler.schedule()
        if plan is not None and self.outputs.num_constrained:
            self.grammars.attach(plan, self.outputs.outs, self.overlap)
        return plan

    def _timed(self, fn, key: str, *args):
        """fn(*args), its time added to the step profile's `key` (the bench swaps in a fresh profile)."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            setattr(self.metrics.profile, key, getattr(self.metrics.profile, key) + time.perf_counter() - t)

    def _process_timed(self, plan: StepPlan, result: StepResult, grammars_done=None) -> None:
        self._timed(self._process, "process_s", plan, result, grammars_done)
        self.metrics.profile.steps += 1

    async def _run_steps(self) -> None:
        """Keeps up to `executor.max_inflight` steps running (pipeline stages hold one each)."""
        loop = asyncio.get_running_loop()
        inflight: dict[asyncio.Future, StepPlan] = {}
        while True:
            while len(inflight) < self.max_inflight:
                plan = self._timed(self._schedule, "schedule_s")
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

    def _process(self, plan: StepPlan, result: StepResult, grammars_done=None) -> None:
        """A step came back: the scheduler appends its tokens, the output processor streams them
        (`grammars_done`: OutputProcessor.process)."""
        sampled = self.scheduler.commit(plan, result)
        if self._abort_pending:  # aborted while this step ran: they end now, their tokens unsent
            outs, aborting = self.outputs.outs, self._abort_pending
            for st in plan.seqs:
                so = outs.get(st.seq_id)
                if so is not None and st.seq_id in aborting and not so.seq.finished:
                    self._end(so, "abort")
        self.outputs.process(sampled, time.monotonic(), grammars_done)
        self.metrics.iteration_tokens.observe(plan.num_tokens)
        self.metrics.profile.draft_s += result.draft_s
        self._update_gauges()

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.scheduler
        m.num_running, m.num_waiting, m.kv_cache_usage = len(s.running), s.num_waiting, s.kv.usage()
        m.preemptions = s.num_preemptions
        m.prefix_cache_queries, m.prefix_cache_hits = s.kv.prefix_queries, s.kv.prefix_hits
        if s.speculator is not None:
            sp = s.speculator
            m.spec_num_drafts, m.spec_num_draft_tokens = sp.num_drafts, sp.num_draft_tokens
            m.spec_num_accepted_tokens = sp.num_accepted

    def _end(self, so, reason: str) -> None:
        """Ends one sequence outside the normal token path (abort)."""
        self._abort_pending.discard(so.seq.seq_id)
        self.outputs.end(so, reason)
        self._update_gauges()
        self._poke()


def _tune_gc() -> tuple[int, int, int] | None:
    """Each step makes a few short-lived objects per running sequence; at the default gen-0 threshold
    (700) the collector ran several times a step and doubled the host's share of a 256-sequence step
    (experiments/cpu_step_overhead.py; experiments/README.md has the figures). What start-up built
    (model, tokenizer) is frozen out of later full collections. Returns the thresholds it replaced
    (None if an engine in this process already tuned them), for `_restore_gc` at shutdown."""
    before = gc.get_threshold()
    if before[0] >= 10_000:
        return None
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, max(before[1], 10), max(before[2], 10))
    return before


def _restore_gc(before: tuple[int, int, int] | None) -> None:
    """Undoes _tune_gc: frozen objects are never collected, so an engine's own reference cycles (its
    KV pool among them) would outlive it and keep the GPU memory the next engine needs."""
    if before is not None:
        gc.unfreeze()
        gc.set_threshold(*before)
