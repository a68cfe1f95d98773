"""Starting the ranks of a tp/pp/hybrid run and wiring their process groups.

Rank layout: rank = pp_rank * tp_size + tp_rank, so each PP stage is a block of tp_size consecutive
ranks (one TP group) and rank 0 (the engine process) is stage 0, TP rank 0. The last stage's TP
rank 0 samples.

Groups every rank holds:
- the default group (NCCL on GPUs, gloo on the CPU): TP all-reduces/gathers (through the per-stage TP
  group) and the stage-to-stage send/recv of hidden + residual;
- `ctrl` (gloo, all ranks): rank 0 broadcasts each step's plan as pickled bytes;
- `result` (gloo, all ranks): the sampling rank sends each step's tokens back to rank 0.
Separate groups let a worker receive the next plan while it computes the current one.

One machine: the engine process spawns ranks 1.. (torch.multiprocessing, spawn). Several machines:
`torchrun` starts every rank; rank 0 builds the engine as usual, the others call
`worker.maybe_run_worker`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nanoslg.core.config import Config
from nanoslg.core.dist import ParallelState, set_state
from nanoslg.core.errors import ConfigError
from nanoslg.core.machine import resolve_device
from nanoslg.model.checkpoint import Checkpoint
from nanoslg.runtime.build import RankRuntime, allocate_kv, build_runner, kv_budget_bytes, num_pages_for

log = logging.getLogger("nanoslg.parallel")

# Gloo ops wait at most this long; rank 0 sends a heartbeat on `ctrl` well within it when idle.
GLOO_TIMEOUT = timedelta(minutes=30)
HEARTBEAT_S = 60.0


@dataclass
class Layout:
    tp: int
    pp: int
    stages: list[tuple[int, int]]  # [first, last) layer of each stage

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def sampler_rank(self) -> int:
        return (self.pp - 1) * self.tp

    def coords(self, rank: int) -> tuple[int, int]:
        """(pp_rank, tp_rank) of a global rank."""
        return rank // self.tp, rank % self.tp


def split_layers(num_layers: int, pp: int, counts: list | None = None) -> list[tuple[int, int]]:
    """[first, last) per stage: an even split (earlier stages take the remainder) or the given counts."""
    if counts is None:
        base, rem = divmod(num_layers, pp)
        counts = [base + (1 if s < rem else 0) for s in range(pp)]
    else:
        counts = list(counts)
        if len(counts) != pp or any(not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != num_layers:
            raise ConfigError(
                f"parallel.stage_layers={counts} must list {pp} positive layer counts (one per "
                f"stage, parallel.pp_size={pp}) summing to the model's {num_layers} layers"
            )
    stages, first = [], 0
    for c in counts:
        stages.append((first, first + c))
        first += c
    return stages


def check_layout(cfg: Config, ckpt: Checkpoint) -> Layout:
    """Validates tp/pp against the model and the machine; raises ConfigError naming the key."""
    p, a = cfg.parallel, ckpt.args
    tp, pp = p.tp_size, p.pp_size
    if a.num_heads % tp:
        raise ConfigError(
            f"parallel.tp_size={tp} does not divide the model's {a.num_heads} attention "
            f"heads; pick a tp_size that divides {a.num_heads}"
        )
    kv = a.num_kv_heads
    if kv % tp and tp % kv:
        raise ConfigError(
            f"parallel.tp_size={tp} and the model's {kv} KV heads: one must divide the other "
            "(KV heads are split across TP ranks, or replicated when tp_size exceeds them)"
        )
    inter = getattr(a, "intermediate_size", None)
    if isinstance(inter, int) and inter % tp:
        raise ConfigError(f"parallel.tp_size={tp} does not divide the model's intermediate_size={inter}")
    if pp > a.num_layers:
        raise ConfigError(
            f"parallel.pp_size={pp} is more than the model's {a.num_layers} layers; "
            f"each pipeline stage needs at least one layer (pp_size <= {a.num_layers})"
        )
    stages = split_layers(a.num_layers, pp, p.stage_layers)
    world = tp * pp
    device = resolve_device(cfg.model.device)
    backend = dist_backend(cfg, device)
    if device.type == "cuda":
        env = torchrun_env()
        if env is not None and env[1] != world:
            raise ConfigError(
                f"torchrun started WORLD_SIZE={env[1]} ranks but parallel.tp_size x parallel.pp_size "
                f"= {tp} x {pp} = {world}; start {world} ranks in total (nnodes x nproc_per_node)"
            )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if env is not None else world
        have = torch.cuda.device_count()
        if local > have:
            raise ConfigError(
                f"parallel.tp_size x parallel.pp_size = {tp} x {pp} = {world} ranks need {local} GPUs "
                f"on this machine, but only {have} are visible; lower tp_size/pp_size (or use "
                "torchrun across nodes)"
            )
    elif backend == "nccl":
        raise ConfigError("parallel.dist_backend=nccl needs CUDA devices; on the CPU use gloo (or auto)")
    return Layout(tp, pp, stages)


def dist_backend(cfg: Config, device: torch.device) -> str:
    want = cfg.parallel.dist_backend
    if want == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return want


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun (env:// rendezvous), else None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))


@dataclass
class Rank:
    """One rank's share of the run: its groups, its model shard/stage and KV pool."""

    rank: int
    layout: Layout
    state: ParallelState
    rt: RankRuntime
    device: torch.device
    ctrl: object  # gloo group, all ranks: plans
    result: object  # gloo group, all ranks: sampled tokens back to rank 0
    num_pages: int
    budget_why: str
    hidden_size: int  # width of what stages send each other


def init_rank(cfg: Config, ckpt: Checkpoint, layout: Layout, rank: int, local_rank: int, init_method: str) -> Rank:
    """Joins the process groups, sets ParallelState, builds this rank's model and KV pool.

    Every rank calls this in the same order of collective calls (group creation, the page-count MIN).
    """
    device = resolve_device(cfg.model.device, local_rank)
    backend = dist_backend(cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif rank > 0:
        # Ranks share the CPU cores: one process each with every core spins threads against the others.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // layout.world))
    timeout = GLOO_TIMEOUT if backend == "gloo" else timedelta(minutes=10)
    if dist.is_initialized():  # an engine before this one shut down with its stage thread stuck by a dead rank
        log.warning("leaving the process group an earlier engine in this process left behind")
        teardown()
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=layout.world, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=GLOO_TIMEOUT)
    result = dist.new_group(backend="gloo", timeout=GLOO_TIMEOUT)
    pp_rank, tp_rank = layout.coords(rank)
    tp_group = None
    for s in range(layout.pp):  # every rank creates every group, in the same order
        ranks = list(range(s * layout.tp, (s + 1) * layout.tp))
        g = dist.new_group(ranks=ranks) if layout.tp > 1 else None
        if s == pp_rank:
            tp_group = g
    state = ParallelState(
        tp_rank=tp_rank,
        tp_size=layout.tp,
        pp_rank=pp_rank,
        pp_size=layout.pp,
        tp_group=tp_group,
        stage_layers=layout.stages[pp_rank],
    )
    set_state(state)
    rt = build_runner(cfg, ckpt, device, sample=rank == layout.sampler_rank)
    if cfg.cache.max_num_tokens is not None:  # the pool size is given: skip the memory profile
        budget, why = None, "cache.max_num_tokens"
    else:
        budget, why = kv_budget_bytes(cfg, rt)
    pages = torch.tensor([num_pages_for(cfg, rt, budget)], dtype=torch.long)
    dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=ctrl)  # the scheduler's pool must fit every rank
    allocate_kv(cfg, rt, int(pages.item()), graphs=False)
    return Rank(rank, layout, state, rt, device, ctrl, result, int(pages.item()), why, ckpt.args.hidden_size)


def teardown() -> None:
    """Leaves the process groups and resets ParallelState (another engine may start in this process)."""
    set_state(ParallelState())
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a dead peer can leave a group unusable; nothing left to save
            log.debug("destroy_process_group: %s", e)


def watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    """Exits this worker when the engine process is gone (no orphans even after a SIGKILL of rank 0)."""

    def loop():
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=loop, name="nanoslg-parent-watch", daemon=True).start()
