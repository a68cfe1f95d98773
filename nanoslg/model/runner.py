"""Runs one step's plan on this rank: build the cache context, forward, sample (on the last stage)."""
from __future__ import annotations

from typing import Optional

import torch

from nanoslg.scheduler.plan import StepPlan, StepResult


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend, sampler, device: torch.device):
        self.model = model
        self.backend = backend  # a CacheBackend: builds the step's CacheContext
        self.sampler = sampler  # None on ranks that do not sample
        self.device = device
        self.graphs = None  # captured decode graphs (nanoslg.cache.flashinfer_graph), when enabled

    def inputs(self, plan: StepPlan):
        """The step's flattened input ids, its cache context, and the rows whose logits are sampled."""
        ctx = self.backend.prepare(plan)
        ids = [t for s in plan.seqs for t in s.token_ids]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        rows, end = [], 0
        for s in plan.seqs:
            end += len(s.token_ids)
            if s.sample:
                rows.append(end - 1)
        return input_ids, ctx, rows

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Optional[StepResult]:
        if self.sampler is not None:
            self.sampler.remove(plan.finished)
            for ns in plan.new_seqs:
                self.sampler.add(ns)
        if not plan.seqs:
            self.backend.prepare(plan)  # still releases what the plan freed
            return StepResult(plan.step_id, [], [])
        if self.graphs is not None and self.graphs.can_run(plan):
            logits = self.graphs.run(plan)
            tokens, logprobs = self.sampler.sample(logits, [s.seq_id for s in plan.seqs])
            return StepResult(plan.step_id, [s.seq_id for s in plan.seqs], tokens, logprobs)
        input_ids, ctx, rows = self.inputs(plan)
        hidden = self.model(input_ids, ctx.positions, ctx)
        seq_ids = [s.seq_id for s in plan.seqs if s.sample]
        if not rows:
            return StepResult(plan.step_id, [], [])
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        tokens, logprobs = self.sampler.sample(logits, seq_ids)
        return StepResult(plan.step_id, seq_ids, tokens, logprobs)
