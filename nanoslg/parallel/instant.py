"""An executor without a model: every step answers at once, each sampling sequence drawing `token`
(a constrained one draws the lowest token its grammar mask allows, where `token` is not).

What is left of a step is the host's share (scheduler, KV manager, output processing), so the
scheduler's tests and experiments/cpu_step_overhead.py drive the real engine loop with it. It is not
a registered strategy: no config selects it.

With `step_s` it stands in for a device as well: steps queue behind each other, each taking `step_s`
from when the one before it ended, and `collect` waits for that end (the engine's timing tests).
"""

from __future__ import annotations

import time

import numpy as np

from nanoslg.core.plan import StepPlan, StepResult, TokenMasks


class InstantExecutor:
    max_inflight = 1
    backend = None  # no KV tensors: the KV manager's accounting is all there is
    rt = None
    device = None
    budget_why = "no model"

    def __init__(self, overlap: bool = True, token: int = 7, record: bool = False, step_s: float = 0.0):
        self.overlap = overlap
        self.token = token
        self.plans: list[StepPlan] = []  # with record: every plan run, in order (tests read them)
        self.spans: list[tuple[float, float]] = []  # with record: each plan's (start, end) on the stand-in device
        self.record = record
        self.step_s = step_s
        self._free_at = 0.0  # perf_counter time the stand-in device finishes its queued steps
        self._ends: dict[int, float] = {}  # step id -> when it ends on the stand-in device

    def launch(self, plan: StepPlan) -> StepResult | StepPlan:
        start = max(time.perf_counter(), self._free_at)
        self._free_at = start + self.step_s
        if self.step_s:
            self._ends[plan.step_id] = self._free_at
        if self.record:
            self.plans.append(plan)
            self.spans.append((start, self._free_at))
        if plan.sample_later:
            return plan  # answered by sample(), once the engine has the masks
        return self._answer(plan, plan.masks)

    def sample(self, plan: StepPlan, masks: TokenMasks | None) -> StepResult:
        return self._answer(plan, masks)

    def _answer(self, plan: StepPlan, masks: TokenMasks | None) -> StepResult:
        ids = [s.seq_id for s in plan.seqs if s.sample]
        tokens = [self.token] * len(ids)
        if masks is not None:
            row_of = {sid: r for r, sid in enumerate(ids)}
            for sid, words in zip(masks.seq_ids, masks.bits):
                bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little")
                if not bits[self.token]:
                    tokens[row_of[sid]] = int(np.argmax(bits))  # 0 when nothing is allowed
        return StepResult(plan.step_id, ids, tokens, device_s=self.step_s or None)

    def collect(self, result: StepResult) -> StepResult:
        wait = self._ends.pop(result.step_id, 0.0) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan)

    def check_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
