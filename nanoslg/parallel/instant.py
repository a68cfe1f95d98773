"""An executor without a model: every step answers at once, each sampling sequence drawing `token`
(a constrained one draws the lowest token its grammar mask allows, where `token` is not).

What is left of a step is the host's share (scheduler, KV manager, output processing), so the
scheduler's tests and experiments/cpu_step_overhead.py drive the real engine loop with it. It is not
a registered strategy: no config selects it.
"""

from __future__ import annotations

import numpy as np

from nanoslg.core.plan import StepPlan, StepResult, TokenMasks


class InstantExecutor:
    max_inflight = 1
    backend = None  # no KV tensors: the KV manager's accounting is all there is
    rt = None
    device = None
    budget_why = "no model"

    def __init__(self, overlap: bool = True, token: int = 7, record: bool = False):
        self.overlap = overlap
        self.token = token
        self.plans: list[StepPlan] = []  # with record: every plan run, in order (tests read them)
        self.record = record

    def launch(self, plan: StepPlan) -> StepResult | StepPlan:
        if self.record:
            self.plans.append(plan)
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
        return StepResult(plan.step_id, ids, tokens)

    def collect(self, result: StepResult) -> StepResult:
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan)

    def check_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
