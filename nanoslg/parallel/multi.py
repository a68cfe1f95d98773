"""The tp, pp and hybrid executors: rank 0 of a multi-process run, inside the engine process.

One class serves the three modes (they differ only in tp_size/pp_size, which the config checks).
Rank 0 computes its own shard of stage 0 in a dedicated stage thread that takes plans in step
order: broadcast the plan, run the stage, send hidden + residual on (PP) or sample (TP only).
`execute` may be called by up to `max_inflight` engine threads at once (pp_size for pipelines, so
every stage holds a micro-batch); each waits for its own step's result, matched by step_id, which
the last stage sends back and a receiver thread collects. Waits poll worker liveness, so a dead
rank turns into EngineDeadError within a fraction of a second instead of a hang.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch
import torch.multiprocessing as mp

from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError, EngineDeadError
from nanoslg.core.machine import free_port, resolve_device
from nanoslg.core.plan import StepPlan, StepResult
from nanoslg.core.registry import PARALLEL
from nanoslg.model.checkpoint import Checkpoint
from nanoslg.parallel.launch import HEARTBEAT_S, check_layout, init_rank, teardown, torchrun_env
from nanoslg.parallel.worker import StageWorker, broadcast_plan, broadcast_stop, recv_obj, spawn_entry
from nanoslg.runtime.build import on_stream, step_stream

log = logging.getLogger("nanoslg.parallel")

POLL_S = 0.2  # how often a waiting step checks that every rank is alive
ORDER_WAIT_S = 5.0  # a step waits this long for its predecessor before going anyway


@PARALLEL.register("tp", "pp", "hybrid")
class MultiExecutor:
    overlap = False  # a step's plan goes to every rank first: steps run whole, pipelined across stages

    def __init__(self, cfg: Config, ckpt: Checkpoint):
        self.cfg = cfg
        self.layout = layout = check_layout(cfg, ckpt)
        self.max_inflight = layout.pp  # a micro-batch per stage
        self._procs: list[tuple[int, object]] = []  # (rank, multiprocessing.Process)
        self._dead: str | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._order = threading.Condition(self._lock)
        self._next_step = 0
        self._inflight = 0
        self.peak_inflight = 0  # most steps seen in flight at once (pipelines: up to pp_size)
        self._futures: dict[int, Future] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._expect: queue.Queue = queue.Queue()  # step ids whose results the last stage will send
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._threads_before = torch.get_num_threads()
        self._receiver: threading.Thread | None = None
        env = torchrun_env()
        if env is not None:
            rank, _, local_rank = env
            if rank != 0:
                raise ConfigError(
                    f"torchrun rank {rank} tried to build the engine; ranks > 0 must call "
                    "nanoslg.parallel.worker.maybe_run_worker(cfg) first (run.py does)"
                )
            init_method = "env://"
        else:
            local_rank = 0
            host = cfg.parallel.master_addr
            init_method = f"tcp://{host}:{cfg.parallel.master_port or free_port(host)}"
        if resolve_device(cfg.model.device).type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.world))
        self._stage_thread = threading.Thread(
            target=self._stage_main, args=(cfg, ckpt, init_method, local_rank), name="nanoslg-stage0", daemon=True
        )
        try:
            if env is None:
                self._spawn(cfg, ckpt, init_method)
            self._stage_thread.start()
            self._wait_started()
        except BaseException:
            self._abort_start()
            raise
        r = self.rank
        self.rt, self.device, self.num_pages, self.budget_why = r.rt, r.device, r.num_pages, r.budget_why
        if layout.pp > 1:
            self._receiver = threading.Thread(target=self._receive_main, name="nanoslg-results", daemon=True)
            self._receiver.start()
        log.info(
            "%s: %d ranks (tp=%d x pp=%d), stages %s, %d KV pages (min over ranks)",
            cfg.parallel.mode,
            layout.world,
            layout.tp,
            layout.pp,
            layout.stages,
            self.num_pages,
        )

    # -- start ---------------------------------------------------------------------------------
    def _spawn(self, cfg: Config, ckpt, init_method: str) -> None:
        ctx = mp.get_context("spawn")
        self._errq = ctx.Queue()
        for rank in range(1, self.layout.world):
            p = ctx.Process(
                target=spawn_entry,
                name=f"nanoslg-rank{rank}",
                daemon=True,
                args=(cfg, ckpt, self.layout, rank, init_method, os.getpid(), self._errq),
            )
            p.start()
            self._procs.append((rank, p))

    def _wait_started(self) -> None:
        ready: set[int] = set()
        need = {rank for rank, _ in self._procs}
        while True:
            while self._procs:
                try:
                    msg = self._errq.get_nowait()
                except queue.Empty:
                    break
                if msg[0] == "ready":
                    ready.add(msg[1])
                else:
                    raise ConfigError(f"parallel worker rank {msg[1]} failed to start: {msg[2]}")
            for rank, p in self._procs:
                if p.exitcode is not None and rank not in ready:
                    raise ConfigError(
                        f"parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode} "
                        "while starting; see its log above (workers are spawned: a script that "
                        'builds a parallel LLM needs an `if __name__ == "__main__":` guard)'
                    )
            if self._start_error is not None:
                e = self._start_error
                if isinstance(e, ConfigError):
                    raise e
                raise ConfigError(
                    f"rank 0 failed to start the {self.cfg.parallel.mode} run: {type(e).__name__}: {e}"
                ) from e
            if self._ready.is_set() and ready >= need:
                return
            self._ready.wait(0.05)

    def _abort_start(self) -> None:
        self._closing = True
        self._kill_workers()
        if self._stage_thread.ident is not None:
            self._stage_thread.join(timeout=10)
        if not self._stage_thread.is_alive():
            teardown()
        self._close_queue()
        self._restore_threads()

    # -- rank 0's stage thread ------------------------------------------------------------------
    def _stage_main(self, cfg: Config, ckpt, init_method: str, local_rank: int) -> None:
        try:
            self.rank = init_rank(cfg, ckpt, self.layout, 0, local_rank, init_method)
            self.stage = StageWorker(self.rank)
        except BaseException as e:
            self._start_error = e
            return
        self._ready.set()
        ctrl, pp = self.rank.ctrl, self.layout.pp
        with on_stream(step_stream(self.rank.device)):
            while True:
                try:
                    job = self._jobs.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    job = "beat"
                try:
                    if job == "beat":
                        broadcast_plan(None, ctrl)
                        continue
                    if job is None:
                        broadcast_stop(ctrl)
                        return
                    plan, fut = job
                    broadcast_plan(plan, ctrl)
                    if plan.seqs and pp > 1:
                        self._expect.put(plan.step_id)
                    res = self.stage.step(plan)
                    if not plan.seqs:
                        fut.set_result(StepResult(plan.step_id, [], []))
                    elif pp == 1:
                        fut.set_result(res)
                except BaseException as e:
                    self._fatal(f"rank 0 failed in a step: {type(e).__name__}: {e}")
                    if isinstance(job, tuple) and not job[1].done():
                        job[1].set_exception(EngineDeadError(self._dead))
                    return

    def _receive_main(self) -> None:
        src, group = self.layout.sampler_rank, self.rank.result
        while True:
            step_id = self._expect.get()
            if step_id is None:
                return
            try:
                res: StepResult = recv_obj(src, group)
            except BaseException as e:
                self._fatal(f"lost the last pipeline stage (rank {src}): {type(e).__name__}: {e}")
                return
            with self._lock:
                fut = self._futures.pop(res.step_id, None)
            if fut is not None:
                fut.set_result(res)

    # -- the executor interface -----------------------------------------------------------------
    @property
    def backend(self):
        return self.rt.backend

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for _, p in self._procs]

    def launch(self, plan: StepPlan) -> StepResult:
        """Without overlap a launch is the whole step; collect hands its result on."""
        return self.execute(plan)

    def collect(self, result: StepResult) -> StepResult:
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        self.check_alive()
        fut: Future = Future()
        with self._order:
            # Ranks must see plans in the scheduler's order (a plan may free what a later one reuses).
            deadline = time.monotonic() + ORDER_WAIT_S
            while plan.step_id > self._next_step and self._dead is None and time.monotonic() < deadline:
                self._order.wait(POLL_S)
            self._next_step = max(self._next_step, plan.step_id + 1)
            if plan.seqs and self.layout.pp > 1:
                self._futures[plan.step_id] = fut
            self._jobs.put((plan, fut))
            self._order.notify_all()
        with self._lock:
            self._inflight += 1
            self.peak_inflight = max(self.peak_inflight, self._inflight)
        try:
            while True:
                try:
                    return fut.result(timeout=POLL_S)
                except FutureTimeout:
                    self.check_alive()
        finally:
            with self._lock:
                self._inflight -= 1

    def check_alive(self) -> None:
        if self._dead is None and not self._closing:
            if any(p.exitcode is not None for _, p in self._procs):
                self._fatal("found while checking the ranks")
            if self._dead is None and not self._stage_thread.is_alive():
                self._fatal("rank 0's stage thread stopped")
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _fatal(self, why: str) -> None:
        """The run cannot go on: fail every waiting step and stop the other ranks."""
        if not self._closing and self._procs:
            # A lost connection usually means a worker died: name it (its exit lags the socket a little).
            for _ in range(10):
                gone = [(r, p) for r, p in self._procs if p.exitcode is not None]
                if gone:
                    r, p = gone[0]
                    why = f"parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode} ({why})"
                    break
                time.sleep(0.05)
        with self._lock:
            if self._dead is None:
                self._dead = why
                log.error("%s; failing in-flight requests", why)
            futs, self._futures = list(self._futures.values()), {}
        for f in futs:
            if not f.done():
                f.set_exception(EngineDeadError(why))
        if not self._closing:
            self._kill_workers()  # ranks stuck in a collective with the dead one would wait for ever

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._stage_thread.is_alive():
            self._jobs.put(None)  # broadcasts stop: workers leave their loops and exit
            self._stage_thread.join(timeout=10)
        self._expect.put(None)
        if self._receiver is not None:
            self._receiver.join(timeout=5)
        for _, p in self._procs:
            p.join(timeout=10)
        self._kill_workers()
        if not self._stage_thread.is_alive():
            teardown()
        self._close_queue()
        self._restore_threads()

    def _close_queue(self) -> None:
        q = getattr(self, "_errq", None)
        if q is not None:
            q.close()
            q.join_thread()

    def _kill_workers(self) -> None:
        for _, p in self._procs:
            if p.exitcode is None:
                p.kill()
        for _, p in self._procs:
            p.join(timeout=5)

    def _restore_threads(self) -> None:
        if torch.get_num_threads() != self._threads_before:
            torch.set_num_threads(self._threads_before)
