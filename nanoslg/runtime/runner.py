"""Runs one step's plan on this rank: build the cache context, forward, sample (on the last stage).

A step is split in two so the engine can overlap steps: `launch` queues the whole step on the device
and starts the copy of its tokens to the host without waiting for anything; `collect` waits for that
copy. A decode fed a PLACEHOLDER reads the token the previous launch sampled, on the device. Every
parallel mode runs its steps through here: a pipeline stage passes the previous stage's hidden state
in, and gets its own out to send on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoslg.core.plan import PLACEHOLDER, StepPlan, StepResult
from nanoslg.core.tensors import STAGING, to_device
from nanoslg.model.sampler import Sampled
from nanoslg.runtime.graph_runner import GraphRunner
from nanoslg.runtime.piecewise import PiecewiseGraphs
from nanoslg.runtime.speculative import verify_step


@dataclass
class Launched:
    """A step queued on the device; its sampled tokens arrive in `sampled` once `event` fires. A
    pipeline stage before the last holds its (hidden, residual) output in `hidden_out` instead."""

    step_id: int
    seq_ids: list[int]
    sampled: Sampled | None = None
    event: torch.cuda.Event | None = None
    hidden_out: tuple[torch.Tensor, torch.Tensor] | None = None
    logits: torch.Tensor | None = None  # a plan with sample_later: the rows waiting for their masks
    result: StepResult | None = None  # a speculative step, verified at launch (it needs the host anyway)
    started: torch.cuda.Event | None = None  # time_steps: recorded as the launch began; with `event`, the device time


def _event(timing: bool) -> torch.cuda.Event:
    """An event recorded on the current stream now; `timing`: with a timestamp (a step's device time)."""
    event = torch.cuda.Event(enable_timing=timing)
    event.record()
    return event


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend, sampler, device: torch.device):
        self.model = model
        self.backend = backend  # a CacheBackend: builds the step's CacheContext
        self.sampler = sampler  # None on ranks that do not sample
        self.device = device
        self.graphs: GraphRunner | None = None  # captured decode graphs, once capture_graphs ran
        self.pieces: PiecewiseGraphs | None = None  # piecewise graphs for the other steps (runtime/build.py)
        self.time_steps = False  # on a GPU: time each step on the device (StepResult.device_s)
        self._last_ids: list[int] = []  # the sequences the last launch sampled, in row order
        self._last_tokens: torch.Tensor | None = None  # and its draws, on the device
        self.drafter = None  # speculative=draft: the DraftRunner that fills a plan's proposals

    def capture_graphs(self, max_bs: int, max_model_len: int) -> None:
        """Captures decode CUDA graphs up to `max_bs` sequences (the backend must have graph hooks)."""
        self.graphs = GraphRunner(self.model, self.backend, max_bs, max_model_len)
        self.graphs.capture()

    def input_ids(self, plan: StepPlan, seq_ids: list[int] | None = None) -> torch.Tensor:
        """The step's flattened input ids; PLACEHOLDERs take the last launch's draws on the device.
        seq_ids: the plan's sequence ids when the caller has them (a decode step)."""
        if plan.decode and seq_ids == self._last_ids and all(s.token_ids[0] == PLACEHOLDER for s in plan.seqs):
            return self._last_tokens  # the steady decode step: the same batch feeds its own draws
        ids = [t for s in plan.seqs for t in s.token_ids]
        holes = [i for i, t in enumerate(ids) if t == PLACEHOLDER]
        if not holes:
            return to_device(ids, torch.long, self.device)
        rows, tokens = {i: r for r, i in enumerate(self._last_ids)}, self._last_tokens
        owners = [s.seq_id for s in plan.seqs for t in s.token_ids if t == PLACEHOLDER]
        missing = [i for i in owners if i not in rows]
        if missing:
            raise RuntimeError(f"sequence {missing[0]} is fed the token of a step that did not sample it")
        src = [rows[i] for i in owners]
        if len(holes) == len(ids):  # a pure decode step of the same batch: the draws are the inputs
            return tokens if src == list(range(len(tokens))) else tokens[to_device(src, torch.long, self.device)]
        input_ids = to_device(ids, torch.long, self.device)
        input_ids[to_device(holes, torch.long, self.device)] = tokens[to_device(src, torch.long, self.device)]
        return input_ids

    def inputs(self, plan: StepPlan, seq_ids: list[int] | None = None):
        """The step's input ids, its cache context, and the rows whose logits are sampled."""
        ctx = self.backend.prepare(plan)
        rows, end = [], 0
        for s in plan.seqs:
            end += len(s.token_ids)
            if s.sample:
                rows.extend(range(end - 1 - s.spec, end))  # a verify step: every proposal's position too
        return self.input_ids(plan, seq_ids), ctx, rows

    def begin(self, plan: StepPlan) -> bool:
        """Sampler bookkeeping for the plan; False (after releasing what it freed) if it runs nothing."""
        if self.drafter is not None:
            self.drafter.release(plan.freed)
        if self.sampler is not None:
            self.sampler.remove(plan.finished)
            for ns in plan.new_seqs:
                self.sampler.add(ns)
        if not plan.seqs:
            self.backend.prepare(plan)  # still releases what the plan freed
            return False
        return True

    @torch.inference_mode()
    def launch(self, plan: StepPlan, hidden_in: tuple[torch.Tensor, torch.Tensor] | None = None) -> Launched:
        """Queues this rank's part of the step. hidden_in: (hidden, residual) from the previous
        pipeline stage, on every stage but the first."""
        STAGING.next_step()
        started = _event(timing=True) if self.time_steps else None
        if not self.begin(plan):
            return Launched(plan.step_id, [])
        drafts = self.drafter.propose(plan) if self.drafter is not None else None  # fills the proposals
        if plan.spec_masks is not None:
            plan.masks.spec.update(plan.spec_masks())
        seq_ids = [s.seq_id for s in plan.seqs] if plan.decode else None
        if self.graphs is not None and hidden_in is None and self.graphs.can_run(plan):
            seq_ids = seq_ids or [s.seq_id for s in plan.seqs]
            logits = self.graphs.run(plan, self.input_ids(plan, seq_ids))
        else:
            input_ids, ctx, rows = self.inputs(plan, seq_ids)
            stage_in = {} if hidden_in is None else {"hidden": hidden_in[0], "residual": hidden_in[1]}
            if self.pieces is not None and hidden_in is None and self.pieces.can_run(input_ids.shape[0]):
                out = self.pieces.run(input_ids, ctx)
            else:
                out = self.model(input_ids, ctx.positions, ctx, **stage_in)
            if self.model.lm_head is None:  # a pipeline stage before the last: its output goes on
                return Launched(plan.step_id, [], hidden_out=out)
            seq_ids = [s.seq_id for s in plan.seqs if s.sample]
            if not rows:
                return Launched(plan.step_id, [])
            # Every TP rank of the last stage joins the logits gather; only the sampling rank samples.
            logits = self.model.compute_logits(out[to_device(rows, torch.long, self.device)])
        if self.sampler is None:
            return Launched(plan.step_id, [])
        if plan.spec:
            result = verify_step(self.sampler, plan, logits, drafts)
            result.draft_s = self.drafter.elapsed if self.drafter is not None else 0.0
            return Launched(plan.step_id, seq_ids, result=result)
        if plan.sample_later:
            return Launched(plan.step_id, seq_ids, logits=logits, started=started)
        return self._sample(plan.step_id, logits, seq_ids, plan.masks, started)

    @torch.inference_mode()
    def sample(self, launched: Launched, masks) -> Launched:
        """Samples a step launched with sample_later, now that its grammar masks are known. Stream
        order keeps its logits intact: a later step (a graph replay) is queued after this."""
        if launched.logits is None:
            return launched
        return self._sample(launched.step_id, launched.logits, launched.seq_ids, masks, launched.started)

    def _sample(self, step_id: int, logits: torch.Tensor, seq_ids: list[int], masks, started=None) -> Launched:
        sampled = self.sampler.sample_async(logits, seq_ids, masks)
        self._last_ids, self._last_tokens = seq_ids, sampled.tokens
        host = sampled.to_host()
        event = _event(timing=started is not None) if self.device.type == "cuda" else None
        return Launched(step_id, seq_ids, host, event, started=started)

    def collect(self, launched: Launched) -> StepResult:
        if launched.result is not None:
            return launched.result
        if launched.sampled is None:
            return StepResult(launched.step_id, [], [])
        device_s = None
        if launched.event is not None:
            launched.event.synchronize()
            if launched.started is not None:
                device_s = launched.started.elapsed_time(launched.event) / 1e3
        tokens, logprobs = launched.sampled.result()
        return StepResult(launched.step_id, launched.seq_ids, tokens, logprobs, device_s=device_s)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))
