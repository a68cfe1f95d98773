"""scheduler.hold_lookahead: with overlap, the step after a decode step is planned shortly before that
step ends, so a request arriving meanwhile joins it (engine/lookahead.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_scheduler import tokenless_engine

from nanoslg.cache.paged import PagedKVManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.plan import SeqStep, StepPlan, StepResult
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.lookahead import SLACK_S, LookaheadHold
from nanoslg.engine.stream import collect
from nanoslg.parallel.instant import InstantExecutor


def decode(n: int, step_id: int = 0) -> StepPlan:
    return StepPlan(step_id, [SeqStep(i, [5], 10, True, []) for i in range(n)], decode=True)


def prefill(step_id: int = 0) -> StepPlan:
    return StepPlan(step_id, [SeqStep(0, [5, 6, 7], 0, True, [])], decode=False)


def test_the_deadline_is_the_step_start_plus_its_device_time_less_the_host_lead():
    hold = LookaheadHold(True)
    assert hold.deadline(decode(4), waiting=0) is None  # nothing measured yet
    hold.collected(decode(4), StepResult(0, [0, 1, 2, 3], [1, 1, 1, 1], device_s=0.010))
    hold.host_time(decode(4), 0.002)
    at = hold._collected_at
    assert hold.deadline(decode(4), waiting=0) == pytest.approx(at + 0.010 - 0.002 - SLACK_S)
    # More rows than any measured step: the time of the largest measured step under it (errs early).
    assert hold.deadline(decode(9), waiting=0) == pytest.approx(at + 0.010 - 0.002 - SLACK_S)
    assert hold.deadline(decode(3), waiting=0) is None  # no step of at most 3 rows measured
    assert hold.deadline(decode(4), waiting=1) is None  # a request waits: plan now
    assert hold.deadline(prefill(), waiting=0) is None  # a prompt chunk's length is not predicted
    assert LookaheadHold(False).deadline(decode(4), waiting=0) is None
    # The host's lead jumps up at once and decays slowly.
    hold.host_time(decode(4), 0.004)
    assert hold._lead_s == 0.004
    hold.host_time(decode(4), 0.0)
    assert hold._lead_s == pytest.approx(0.0036)
    hold.host_time(prefill(), 0.5)  # an eager launch does not set a decode step's lead
    assert hold._lead_s == pytest.approx(0.0036)


def test_a_step_without_a_device_time_is_not_measured():
    hold = LookaheadHold(True)
    hold.collected(decode(2), StepResult(0, [0, 1], [1, 1]))
    hold.collected(prefill(), StepResult(1, [0], [1], device_s=0.2))
    assert hold.deadline(decode(2), waiting=0) is None


STEP_S = 0.1


class EagerLaunches(InstantExecutor):
    """A stand-in device whose prompt steps launch for half a step (an eager step's Python launch)
    while the device already runs them."""

    def launch(self, plan):
        out = super().launch(plan)
        if not plan.is_sampled_decode:
            time.sleep(0.5 * STEP_S)
        return out


def first_step_of(executor: InstantExecutor, seq_id: int) -> int:
    return next(i for i, p in enumerate(executor.plans) if any(s.seq_id == seq_id for s in p.seqs))


@pytest.mark.parametrize("hold", [True, False])
def test_a_request_arriving_during_a_decode_step_joins_the_next_step(hold):
    """A stand-in device takes STEP_S a step. B arrives early in decode step N of A: with the hold,
    B's prompt runs in step N+1; without it, N+1 was planned as N started, so B waits for N+2.
    With the hold the device still never waits between steps, and the host lead it keeps is a decode
    step's own planning and launch, not the wait of the decode queued behind B's eager launch."""
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)
    executor = EagerLaunches(overlap=True, record=True, step_s=STEP_S)

    async def run():
        engine = tokenless_engine(cfg, PagedKVManager(64, 4, True), executor, hold_lookahead=hold)
        await engine.start()
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        a = engine.add_request([11, 12, 13, 14], params)
        deadline = time.perf_counter() + 12 * STEP_S  # A's last step ends about then
        while time.perf_counter() < deadline:  # B arrives a fifth of the way into a decode step of A's, after a few
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            running = [i for i, (s, e) in enumerate(executor.spans) if s <= now < e]
            if running and running[0] >= 3 and 0.2 * STEP_S <= now - executor.spans[running[0]][0] < 0.5 * STEP_S:
                break
        else:
            raise AssertionError(f"no decode step of A's to arrive in: {executor.spans}")
        b = engine.add_request([21, 22, 23], params)
        outs = await asyncio.gather(collect(a), collect(b))
        await engine.shutdown()
        return running[0], outs, engine.hold

    n, outs, lookahead = asyncio.run(run())
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]
    b_id = max(s.seq_id for p in executor.plans for s in p.seqs)
    assert first_step_of(executor, b_id) == n + (1 if hold else 2)
    if hold:  # held steps were still queued before the step ahead ended
        gaps = [s2 - e1 for (_, e1), (s2, _) in zip(executor.spans, executor.spans[1:])]
        assert max(gaps) < 0.25 * STEP_S, gaps
        assert lookahead._lead_s < 0.05 * STEP_S
