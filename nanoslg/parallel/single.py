"""One process, one device: steps run in the engine's worker thread on their own CUDA stream.

With overlap (`scheduler.overlap`, the default) the engine calls `launch` for step N+1 before it
`collect`s step N, so the device never waits for the host between steps.
"""
from __future__ import annotations

import logging

import torch

from nanoslg.config import Config
from nanoslg.model.runner import Launched
from nanoslg.parallel.build import (RankRuntime, build_runner, kv_budget_bytes, num_pages_for, on_stream,
                                    resolve_device, step_stream, warm_step_stream)
from nanoslg.registry import PARALLEL
from nanoslg.scheduler.plan import StepPlan, StepResult

log = logging.getLogger("nanoslg.parallel")


@PARALLEL.register("single")
class SingleExecutor:
    max_inflight = 1

    def __init__(self, cfg: Config, ckpt):
        self.overlap = cfg.scheduler.overlap
        self.device = resolve_device(cfg)
        self.rt: RankRuntime = build_runner(cfg, ckpt, self.device, sample=True)
        budget, self.budget_why = kv_budget_bytes(cfg, self.rt)
        self.num_pages = num_pages_for(cfg, self.rt, budget)
        self.rt.backend.allocate(self.num_pages)
        self._maybe_capture(cfg)
        self.stream = step_stream(self.device)
        warm_step_stream(cfg, self.rt, self.stream)

    def _maybe_capture(self, cfg: Config) -> None:
        """CUDA graphs for decode: FlashInfer on one GPU, unless model.enforce_eager."""
        if cfg.model.enforce_eager or self.device.type != "cuda" or self.rt.backend_name != "flashinfer":
            why = ("model.enforce_eager=true" if cfg.model.enforce_eager
                   else "they need the flashinfer backend on a GPU")
            log.info("decode runs eagerly (no CUDA graphs): %s", why)
            return
        from nanoslg.cache.flashinfer_graph import DecodeGraphs

        max_len = cfg.model.max_model_len or self.rt.runner.model.args.max_position_embeddings
        graphs = DecodeGraphs(self.rt.runner.model, self.rt.backend, min(cfg.scheduler.max_num_seqs, 512), max_len)
        graphs.capture()
        self.rt.runner.graphs = graphs

    @property
    def backend(self):
        return self.rt.backend

    def launch(self, plan: StepPlan) -> Launched:
        with on_stream(self.stream):
            return self.rt.runner.launch(plan)

    def collect(self, launched: Launched) -> StepResult:
        return self.rt.runner.collect(launched)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def shutdown(self) -> None:
        """Drops the model and the KV pool so their GPU memory is free for whatever runs next."""
        import gc

        self.rt = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
