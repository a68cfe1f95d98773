"""The scheduler on its own: what each step's plan holds under a token budget, with lookahead, with a
prefix another sequence computes in the same step (held back), and under preemption; and the engine
loop over a model-less executor, every plan checked against the limits."""

from __future__ import annotations

import asyncio
import random

import pytest

from nanoslg.cache.paged import PagedKVManager
from nanoslg.cache.token_budget import TokenBudgetManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.plan import PLACEHOLDER, StepPlan, StepResult
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.sequence import SeqStatus, Sequence
from nanoslg.engine.async_engine import AsyncEngine
from nanoslg.engine.stream import collect
from nanoslg.parallel.instant import InstantExecutor
from nanoslg.scheduler.policy import FCFSPolicy
from nanoslg.scheduler.scheduler import Scheduler

PARAMS = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def make(kv, budget: int = 8, max_seqs: int = 8) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    return Scheduler(cfg, kv, FCFSPolicy(cfg))


def seq(tokens, t: float = 0.0) -> Sequence:
    return Sequence("r", list(tokens), PARAMS, arrival_time=t)


def steps(plan: StepPlan) -> dict[int, tuple[list[int], int, bool]]:
    return {s.seq_id: (s.token_ids, s.start, s.sample) for s in plan.seqs}


def answer(plan: StepPlan, token: int = 7) -> StepResult:
    ids = [s.seq_id for s in plan.seqs if s.sample]
    return StepResult(plan.step_id, ids, [token] * len(ids))


def tokenless_engine(cfg: SchedulerConfig, kv, executor, **kw) -> AsyncEngine:
    """The real engine loop without a model or tokenizer: ids in, ids out, a vocabulary of 1,000."""
    return AsyncEngine(
        Scheduler(cfg, kv, FCFSPolicy(cfg)),
        executor,
        None,
        model_name="none",
        max_model_len=128,
        vocab_size=1000,
        eos_token_ids=(),
        **kw,
    )


def test_chunked_prefill_under_the_token_budget():
    s = make(TokenBudgetManager(64, 4), budget=8)
    a, b = seq(range(10, 20)), seq(range(30, 33), t=1)
    s.add(a)
    s.add(b)
    p1 = s.schedule()
    assert steps(p1) == {a.seq_id: (list(range(10, 18)), 0, False)}  # a's first chunk fills the budget
    assert s.commit(p1, answer(p1)) == [] and a.inflight == 0
    p2 = s.schedule()  # a finishes its prompt and samples; b is admitted whole in what is left
    assert steps(p2) == {a.seq_id: ([18, 19], 8, True), b.seq_id: ([30, 31, 32], 0, True)}
    assert [x.seq_id for x in p2.new_seqs] == [a.seq_id, b.seq_id]
    got = s.commit(p2, answer(p2, token=5))
    assert [(x.seq_id, t) for x, t, _ in got] == [(a.seq_id, 5), (b.seq_id, 5)]
    assert a.token_ids[-1] == 5 and a.num_pending == 0 and a.num_computed_tokens == 10
    p3 = s.schedule()  # two decodes
    assert p3.decode and steps(p3) == {a.seq_id: ([5], 10, True), b.seq_id: ([5], 3, True)}


def test_lookahead_schedules_a_sequence_again_before_its_token_is_back():
    for lookahead in (False, True):
        s = make(TokenBudgetManager(64, 4), budget=16)
        s.lookahead = lookahead
        a = seq(range(10, 15))
        s.add(a)
        p1 = s.schedule()
        assert a.inflight == 1 and a.num_pending == 1
        p2 = s.schedule()  # p1 is still in flight
        if not lookahead:
            assert p2 is None  # nothing may run until p1's token is known
            continue
        # The decode input is the token p1 samples, read on the device (PLACEHOLDER).
        assert steps(p2) == {a.seq_id: ([PLACEHOLDER], 5, True)} and a.inflight == 2 and a.num_pending == 2
        assert s.schedule() is None  # never a third step ahead
        s.commit(p1, answer(p1, token=3))
        s.commit(p2, answer(p2, token=4))
        assert a.output_token_ids == [3, 4] and a.inflight == 0 and a.num_pending == 0
        assert a.num_computed_tokens == 6  # the prompt and the first sampled token


def test_a_prefix_computed_in_this_step_is_waited_for_not_computed_twice():
    kv = PagedKVManager(64, 4, prefix_caching=True)
    s = make(kv, budget=64)
    prefix = list(range(100, 108))  # two full pages
    a, b = seq(prefix + [1, 2], t=0), seq(prefix + [3], t=1)
    s.add(a)
    s.add(b)
    p1 = s.schedule()
    assert list(steps(p1)) == [a.seq_id]  # b waits: a computes their first page in this step
    assert b.status is SeqStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    s.commit(p1, answer(p1))
    p2 = s.schedule()
    ids, start, sample = steps(p2)[b.seq_id]
    assert start == 8 and ids == [3] and sample  # b reuses a's two cached pages
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]


def test_a_prompt_is_admitted_only_beside_the_rest_of_the_prompts_in_progress():
    """While a long prompt's chunk is in flight (overlap), the budget is free for admissions; a new
    prompt is admitted only if its whole prompt fits beside the pages the running prompts still need,
    so the long prompt's next chunks never have to preempt it (or be preempted)."""
    kv = TokenBudgetManager(10, 4)  # 40 tokens of KV
    s = make(kv, budget=8)
    s.lookahead = True
    a, b = seq(range(100, 124), t=0), seq(range(200, 220), t=1)  # 24 + 20 prompt tokens: 11 pages
    s.add(a)
    s.add(b)
    p1 = s.schedule()
    assert steps(p1) == {a.seq_id: (list(range(100, 108)), 0, False)}
    # a's chunk is in flight: a cannot run again, and b's first chunk (2 pages) would fit, but b's
    # 5 pages beside a's 4 still to come would not.
    assert s.schedule() is None and b in s.waiting
    s.commit(p1, answer(p1))
    admitted_at = None
    for _ in range(2, 40):
        plan = s.schedule()
        if plan is None:
            break
        if admitted_at is None and b.seq_id in steps(plan):
            admitted_at = a.num_computed_tokens  # a's computed tokens once this plan is made
        for x, _, _ in s.commit(plan, answer(plan)):
            if x.num_output_tokens >= 3:
                s.finish(x, "length")
    assert a.finished and b.finished and s.num_preemptions == 0
    assert admitted_at is not None and admitted_at >= 24  # b came in once a's prompt was computed


def test_preemption_frees_the_newest_and_it_recomputes_its_outputs():
    kv = TokenBudgetManager(4, 4)  # 16 tokens of KV; two sequences of 7 + 4 tokens need 6 pages
    s = make(kv, budget=32)
    a, b = seq(range(10, 17), t=0), seq(range(20, 27), t=1)
    s.add(a)
    s.add(b)
    snapshot, readmitted = None, None
    for step in range(1, 30):
        plan = s.schedule()
        if plan is None:
            break
        if snapshot is not None and readmitted is None and b.seq_id in steps(plan):
            readmitted = steps(plan)[b.seq_id]
        for x, _, _ in s.commit(plan, answer(plan, token=step)):
            if x.num_output_tokens >= 4:
                s.finish(x, "length")
        if snapshot is None and b.status is SeqStatus.WAITING:  # preempted while a grew
            assert b in s.preempted and b.num_computed_tokens == 0 and b.kv_tokens == 0
            assert a.status is SeqStatus.RUNNING  # the newest goes, the oldest keeps its KV
            assert plan.freed == [b.seq_id]  # the step that preempted it tells the ranks to free its KV
            snapshot = list(b.token_ids)
    assert s.num_preemptions == 1 and b.num_preemptions == 1 and snapshot is not None
    assert len(snapshot) > 7  # it had sampled before it was preempted
    # Re-admitted after a finished: prompt and its own outputs computed again from position 0.
    assert readmitted == (snapshot, 0, True)
    assert a.finished and b.finished and not s.has_work() and kv.used_pages == 0
    assert b.output_token_ids[: len(snapshot) - 7] == snapshot[7:]  # what it had sampled is kept


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_plans_respect_every_limit(overlap):
    """The real engine loop over an executor without a model: each plan stays inside the token
    budget and the sequence cap, a sequence appears at most once per plan, and every request gets
    exactly max_tokens of the executor's token."""
    cfg = SchedulerConfig(max_num_seqs=5, max_num_batched_tokens=24)
    kv = PagedKVManager(14, 4, prefix_caching=True)
    executor = InstantExecutor(overlap=overlap, token=9, record=True)
    rng = random.Random(0)
    shared = [rng.randrange(10, 500) for _ in range(12)]

    async def run():
        engine = tokenless_engine(cfg, kv, executor)
        await engine.start()
        lens = [rng.randrange(1, 30) for _ in range(12)]
        streams = [
            engine.add_request(
                shared[: rng.randrange(0, 12)] + [rng.randrange(10, 500) for _ in range(n)],
                SamplingParams(temperature=0.0, max_tokens=1 + i % 11, ignore_eos=True),
            )
            for i, n in enumerate(lens)
        ]
        outs = await asyncio.gather(*(collect(st) for st in streams))
        await engine.shutdown()
        return outs, engine

    outs, engine = asyncio.run(run())
    for i, out in enumerate(outs):
        assert out.token_ids == [9] * (1 + i % 11) and out.finish_reason == "length"
    assert executor.plans
    for plan in executor.plans:
        ids = [s.seq_id for s in plan.seqs]
        assert len(ids) == len(set(ids)) <= cfg.max_num_seqs
        assert plan.num_tokens <= cfg.max_num_batched_tokens
    assert engine.metrics.preemptions > 0, "the pool of 14 pages was meant to force preemption"
    assert kv.num_free_pages() + kv.num_evictable_pages() == kv.num_pages  # nothing leaked
