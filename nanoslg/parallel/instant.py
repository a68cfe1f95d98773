"""An executor without a model: every step answers at once, each sampling sequence drawing `token`.

What is left of a step is the host's share (scheduler, KV manager, output processing), so the
scheduler's tests and experiments/cpu_step_overhead.py drive the real engine loop with it. It is not
a registered strategy: no config selects it.
"""

from __future__ import annotations

from nanoslg.core.plan import StepPlan, StepResult


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

    def launch(self, plan: StepPlan) -> StepResult:
        if self.record:
            self.plans.append(plan)
        ids = [s.seq_id for s in plan.seqs if s.sample]
        return StepResult(plan.step_id, ids, [self.token] * len(ids))

    def collect(self, result: StepResult) -> StepResult:
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan)

    def check_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
