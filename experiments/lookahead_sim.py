"""TTFT with and without `scheduler.hold_lookahead`, on the CPU: the real engine loop, scheduler and
output processing over a stand-in device (parallel/instant.py's InstantExecutor with `step_s`) whose
steps each take STEP_S, and whose prompt steps launch for EAGER_S of host time while the device
already runs them (as an eager step's Python launch does). Requests arrive as a Poisson process, as
in W7 (`serving-llama3-8b`); each prints the TTFT p50 and the engine's hold line.

    python experiments/lookahead_sim.py [rate_per_s] [step_ms] [eager_ms]
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import sys
import time

from nanoslg.cache.paged import PagedKVManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.async_engine import AsyncEngine
from nanoslg.parallel.instant import InstantExecutor
from nanoslg.scheduler.policy import FCFSPolicy
from nanoslg.scheduler.scheduler import Scheduler

RATE, STEP_S, EAGER_S = 8.0, 0.007, 0.010
REQUESTS, PROMPT, OUTPUT = 60, 64, 40


class EagerLaunches(InstantExecutor):
    def launch(self, plan):
        out = super().launch(plan)
        if not plan.is_sampled_decode:
            time.sleep(EAGER_S)
        return out


async def one(engine: AsyncEngine, rng: random.Random, ttfts: list[float]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, ignore_eos=True)
    t = time.perf_counter()
    first = None
    async for _ in engine.add_request([rng.randrange(10, 900) for _ in range(PROMPT)], params):
        if first is None:
            first = time.perf_counter() - t
    ttfts.append(first)


async def run(hold: bool) -> float:
    cfg = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192)
    engine = AsyncEngine(
        Scheduler(cfg, PagedKVManager(4096, 16, True), FCFSPolicy(cfg)),
        EagerLaunches(overlap=True, step_s=STEP_S),
        None,
        model_name="none",
        max_model_len=PROMPT + OUTPUT + 1,
        vocab_size=1000,
        eos_token_ids=(),
        hold_lookahead=hold,
    )
    await engine.start()
    rng, ttfts, tasks = random.Random(0), [], []
    for _ in range(REQUESTS):
        await asyncio.sleep(rng.expovariate(RATE))
        tasks.append(asyncio.ensure_future(one(engine, rng, ttfts)))
    await asyncio.gather(*tasks)
    await engine.shutdown()
    return statistics.median(ttfts)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = [float(a) for a in sys.argv[1:]]
    RATE = args[0] if args else RATE
    STEP_S = args[1] / 1e3 if len(args) > 1 else STEP_S
    EAGER_S = args[2] / 1e3 if len(args) > 2 else EAGER_S
    print(f"{REQUESTS} requests at {RATE}/s, steps of {STEP_S * 1e3:.1f} ms, prompt launches {EAGER_S * 1e3:.1f} ms")
    for hold in (False, True):
        print(f"hold_lookahead={hold}: TTFT p50 {1e3 * asyncio.run(run(hold)):.1f} ms")
