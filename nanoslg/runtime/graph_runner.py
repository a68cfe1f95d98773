"""CUDA graphs for decode steps, over any cache backend that has graph hooks.

One graph per batch-size bucket and per variant the backend offers for it (FlashInfer: plain, and
cascade attention for larger buckets), captured at start. The token ids live in a fixed buffer
here; everything attention reads (positions, page tables) lives in the backend's own buffers, which
`prepare_replay` fills for the step before the graph replays. A bucket larger than the batch runs
padding rows the backend points at scratch memory; their logits are dropped.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from nanoslg.core.plan import StepPlan

log = logging.getLogger("nanoslg.graphs")
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class GraphRunner:
    def __init__(self, model, backend, max_bs: int, max_model_len: int):
        self.model, self.backend = model, backend
        self.buckets = [b for b in BUCKETS if b <= max_bs] or [1]
        self.max_bs = self.buckets[-1]
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=backend.spec.device)
        backend.init_graphs(self.max_bs, max_model_len)
        self.graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in tqdm(list(reversed(self.buckets)), desc="capturing CUDA graphs"):
            for variant in self.backend.graph_variants(bs):
                self.graphs[(bs, variant)] = self._capture_one(bs, self.backend.capture_context(bs, variant), pool)
        torch.cuda.synchronize()
        variants = sorted({v for _, v in self.graphs})
        log.info("captured decode CUDA graphs for batch sizes %s (%s)", self.buckets, ", ".join(variants))

    def _capture_one(self, bs: int, ctx, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One decode step of the bucket, run once outside the graph (warm-up), then captured."""
        ids = self.input_ids[:bs]
        self.model.compute_logits(self.model(ids, ctx.positions, ctx))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.model.compute_logits(self.model(ids, ctx.positions, ctx))
        return graph, logits

    def can_run(self, plan: StepPlan) -> bool:
        return 0 < len(plan.seqs) <= self.max_bs and not plan.copies and plan.is_sampled_decode

    def run(self, plan: StepPlan, input_ids: torch.Tensor) -> torch.Tensor:
        """Replays the smallest bucket that holds the batch; returns the real rows' logits."""
        n = len(plan.seqs)
        bs = next(b for b in self.buckets if b >= n)
        variant = self.backend.prepare_replay(bs, plan)
        self.input_ids[:n].copy_(input_ids)
        if bs > n:
            self.input_ids[n:bs].zero_()
        graph, logits = self.graphs[(bs, variant)]
        graph.replay()
        return logits[:n]
