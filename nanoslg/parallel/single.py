"""One process, one device: steps run in the engine's worker thread on their own CUDA stream.

With overlap (`scheduler.overlap`, the default) the engine calls `launch` for step N+1 before it
`collect`s step N, so the device never waits for the host between steps.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from nanoslg.core.config import Config
from nanoslg.core.machine import free_device_memory, resolve_device
from nanoslg.core.plan import StepPlan, StepResult
from nanoslg.core.registry import PARALLEL
from nanoslg.model.checkpoint import Checkpoint
from nanoslg.runtime.build import (
    RankRuntime,
    allocate_kv,
    build_runner,
    kv_budget_bytes,
    num_pages_for,
    on_stream,
    step_stream,
    warm_step_stream,
)
from nanoslg.runtime.runner import Launched


@PARALLEL.register("single")
class SingleExecutor:
    max_inflight = 1

    def __init__(self, cfg: Config, ckpt: Checkpoint):
        self.overlap = cfg.scheduler.overlap
        self.device: torch.device = resolve_device(cfg.model.device)
        t = [time.perf_counter()]
        self.rt: RankRuntime = build_runner(cfg, ckpt, self.device, sample=True)
        t.append(time.perf_counter())
        budget, self.budget_why = kv_budget_bytes(cfg, self.rt)
        self.num_pages = num_pages_for(cfg, self.rt, budget)
        t.append(time.perf_counter())
        allocate_kv(cfg, self.rt, self.num_pages, graphs=True)
        t.append(time.perf_counter())
        self.stream = step_stream(self.device)
        warm_step_stream(cfg, self.rt, self.stream)
        t.append(time.perf_counter())
        # Where start-up went, for the log (cold start is a benchmark row).
        self.startup_s = dict(zip(("model", "kv_budget", "kv_pool_and_graphs", "warm_stream"), np.diff(t).tolist()))

    @property
    def backend(self):
        return self.rt.backend

    def launch(self, plan: StepPlan) -> Launched:
        with on_stream(self.stream):
            return self.rt.runner.launch(plan)

    def sample(self, launched: Launched, masks) -> Launched:
        with on_stream(self.stream):
            return self.rt.runner.sample(launched, masks)

    def collect(self, launched: Launched) -> StepResult:
        return self.rt.runner.collect(launched)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def check_alive(self) -> None:
        """One process: nothing to lose but itself."""

    def shutdown(self) -> None:
        """Drops the model and the KV pool so their GPU memory is free for whatever runs next."""
        self.rt = None
        free_device_memory()
