"""What every rank of a tp/pp/hybrid run does per step, and the loop ranks > 0 run.

Per step: rank 0 broadcasts the plan's pickled bytes on the gloo `ctrl` group (one fixed-size
broadcast for a usual plan; a second one only for the rest of a large plan). Each rank then runs its
stage: the first stage embeds the plan's tokens, later stages receive hidden + residual from the same
TP rank of the previous stage; a non-last stage sends its output on; the last stage computes logits
(gathered over its TP group) and its TP rank 0 samples and sends the StepResult to rank 0.

Workers receive plans in a thread of their own, so a stage takes the next plan (and the next
micro-batch's hidden state) as soon as it is done with the current one: stages overlap.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from nanoslg.core.compose import setup_logging
from nanoslg.core.config import Config
from nanoslg.core.plan import StepPlan, StepResult
from nanoslg.model.checkpoint import Checkpoint, resolve_checkpoint
from nanoslg.parallel.auto import resolve_parallel
from nanoslg.parallel.launch import Layout, Rank, check_layout, init_rank, teardown, torchrun_env, watch_parent
from nanoslg.runtime.build import on_stream, step_stream

log = logging.getLogger("nanoslg.parallel")

HEAD = 64 * 1024  # bytes of the first broadcast: a decode plan of a few hundred sequences fits
_STOP = b"stop"
_BEAT = b""  # heartbeat: keeps the workers' waiting broadcast under the gloo timeout


# -- plan and result transport (CPU tensors over gloo) ---------------------------------------------
def send_bytes_bcast(data: bytes, group) -> None:
    """Rank 0: broadcast a length-prefixed payload (the rest in a second broadcast if it is large)."""
    n = len(data)
    head = torch.zeros(HEAD, dtype=torch.uint8)
    head[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
    first = data[: HEAD - 8]
    if first:
        head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
    dist.broadcast(head, src=0, group=group)
    if n > HEAD - 8:
        dist.broadcast(torch.frombuffer(bytearray(data[HEAD - 8 :]), dtype=torch.uint8), src=0, group=group)


def recv_bytes_bcast(group) -> bytes:
    head = torch.empty(HEAD, dtype=torch.uint8)
    dist.broadcast(head, src=0, group=group)
    n = int(head[:8].view(torch.int64).item())
    if n <= HEAD - 8:
        return head[8 : 8 + n].numpy().tobytes()
    rest = torch.empty(n - (HEAD - 8), dtype=torch.uint8)
    dist.broadcast(rest, src=0, group=group)
    return head[8:].numpy().tobytes() + rest.numpy().tobytes()


def send_obj(obj, dst: int, group) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=dst, group=group)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst, group=group)


def recv_obj(src: int, group):
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src=src, group=group)
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    dist.recv(buf, src=src, group=group)
    return pickle.loads(buf.numpy().tobytes())


def broadcast_plan(plan: StepPlan | None, group) -> None:
    """Rank 0. None sends a heartbeat."""
    send_bytes_bcast(_BEAT if plan is None else pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL), group)


def broadcast_stop(group) -> None:
    send_bytes_bcast(_STOP, group)


# -- one stage's step -------------------------------------------------------------------------------
class StageWorker:
    """Runs a plan on this rank's shard/stage (the same code on rank 0 and on the workers): the
    model runner's step, with the hidden state received from the previous stage and sent on."""

    def __init__(self, r: Rank):
        self.r = r
        self.runner = r.rt.runner
        st = r.state
        tp = r.layout.tp
        self.prev = (st.pp_rank - 1) * tp + st.tp_rank if not st.is_first_stage else None
        self.next = (st.pp_rank + 1) * tp + st.tp_rank if not st.is_last_stage else None
        self.samples = self.runner.sampler is not None  # the last stage's TP rank 0

    def step(self, plan: StepPlan) -> StepResult | None:
        """Returns the StepResult on the sampling rank (for a plan with sequences), else None."""
        if not plan.seqs:
            self.runner.launch(plan)  # bookkeeping only: frees what the plan released
            return None
        hidden_in = self._recv(plan.num_tokens) if self.prev is not None else None
        launched = self.runner.launch(plan, hidden_in)
        if launched.hidden_out is not None:
            hidden, residual = launched.hidden_out
            dist.send(hidden.contiguous(), dst=self.next)
            dist.send(residual.contiguous(), dst=self.next)
            return None
        return self.runner.collect(launched) if self.samples else None

    def _recv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.r.rt.spec
        shape = (num_tokens, self.r.hidden_size)
        hidden = torch.empty(shape, dtype=spec.dtype, device=spec.device)
        residual = torch.empty(shape, dtype=spec.dtype, device=spec.device)
        dist.recv(hidden, src=self.prev)
        dist.recv(residual, src=self.prev)
        return hidden, residual


# -- the loop of ranks > 0 ---------------------------------------------------------------------------
def run_worker(
    cfg: Config,
    ckpt: Checkpoint,
    layout: Layout,
    rank: int,
    local_rank: int,
    init_method: str,
    report: Callable[[tuple], None] | None,
) -> None:
    """Joins the groups, builds this rank's part, then runs plans until rank 0 says stop or is gone."""
    setup_logging(cfg.log_level)
    try:
        r = init_rank(cfg, ckpt, layout, rank, local_rank, init_method)
        stage = StageWorker(r)
    except BaseException as e:
        if report is not None:
            report(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise
    if report is not None:
        report(("ready", rank, os.getpid()))
    log.info(
        "rank %d ready: stage %d/%d, tp %d/%d, layers %s",
        rank,
        r.state.pp_rank,
        layout.pp,
        r.state.tp_rank,
        layout.tp,
        r.state.stage_layers,
    )
    plans: queue.Queue = queue.Queue()

    def receive() -> None:
        try:
            while True:
                data = recv_bytes_bcast(r.ctrl)
                if data == _BEAT:
                    continue
                if data == _STOP:
                    plans.put(None)
                    return
                plans.put(pickle.loads(data))
        except BaseException as e:  # rank 0 is gone: the main loop exits with it
            plans.put(e)

    threading.Thread(target=receive, name="nanoslg-plans", daemon=True).start()
    try:
        with on_stream(step_stream(r.device)):
            while True:
                item = plans.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                res = stage.step(item)
                if res is not None:
                    send_obj(res, 0, r.result)
    finally:
        teardown()


def spawn_entry(
    cfg: Config, ckpt: Checkpoint, layout: Layout, rank: int, init_method: str, parent_pid: int, errq
) -> None:
    """Target of the processes the engine spawns (ranks 1..world-1 on one machine)."""
    watch_parent(parent_pid)
    try:
        run_worker(cfg, ckpt, layout, rank, rank, init_method, report=errq.put)
    except BaseException as e:
        log.error("rank %d stopped: %s", rank, e)
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (CUDA/NCCL atexit hooks can hang in a child)


def maybe_run_worker(cfg: Config) -> bool:
    """Under torchrun, ranks > 0 run the worker loop here and return True when it ends.

    Call it first thing after the config is validated (cli.py does); rank 0 (or any run not started
    by torchrun, or parallel.mode=single) gets False and goes on to build the engine, which joins the
    same env:// rendezvous.
    """
    env = torchrun_env()
    if env is None or cfg.parallel.mode == "single" or env[0] == 0:
        return False
    rank, _world, local_rank = env
    ckpt = resolve_checkpoint(cfg)
    cfg = resolve_parallel(cfg, ckpt)  # every rank reaches rank 0's choice from the same inputs
    if cfg.parallel.mode == "single":
        return False
    layout = check_layout(cfg, ckpt)
    run_worker(cfg, ckpt, layout, rank, local_rank, "env://", report=None)
    return True
