"""One process, one device: the step runs in the engine's worker thread on its own CUDA stream."""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from nanoslg.config import Config
from nanoslg.parallel.build import RankRuntime, build_runner, kv_budget_bytes, num_pages_for, resolve_device
from nanoslg.registry import PARALLEL
from nanoslg.scheduler.plan import StepPlan, StepResult

log = logging.getLogger("nanoslg.parallel")


@PARALLEL.register("single")
class SingleExecutor:
    max_inflight = 1

    def __init__(self, cfg: Config, ckpt):
        self.device = resolve_device(cfg)
        self.rt: RankRuntime = build_runner(cfg, ckpt, self.device, sample=True)
        budget, self.budget_why = kv_budget_bytes(cfg, self.rt)
        self.num_pages = num_pages_for(cfg, self.rt, budget)
        self.rt.backend.allocate(self.num_pages)
        self.stream = None
        if self.device.type == "cuda":
            # Weights and the pool were written on the default stream: the step stream starts after them.
            torch.cuda.synchronize(self.device)
            self.stream = torch.cuda.Stream(self.device)

    @property
    def backend(self):
        return self.rt.backend

    def execute(self, plan: StepPlan) -> StepResult:
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            return self.rt.runner.execute(plan)

    def shutdown(self) -> None:
        """Drops the model and the KV pool so their GPU memory is free for whatever runs next."""
        import gc

        self.rt = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
