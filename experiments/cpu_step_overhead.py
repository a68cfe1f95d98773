"""Host-side cost of one engine step, without a model: scheduler + KV manager + output processing.

    python experiments/cpu_step_overhead.py [num_seqs] [prompt_len] [steps] [shared_prefix_len] [each_delta 0|1]

each_delta=1 wakes each request's reader at every token (a streamed answer); 0, the default, once at the
end (LLM.generate, a non-streamed answer, the offline bench).

The executor returns a token at once, so the time per step is what the CPU adds to every decode
step (and what overlap scheduling would hide behind the GPU).
"""

import asyncio
import random
import sys
import time

from nanoslg.cache.paged import PagedKVManager
from nanoslg.core.config import SchedulerConfig
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.async_engine import AsyncEngine
from nanoslg.engine.stream import collect
from nanoslg.parallel.instant import InstantExecutor
from nanoslg.scheduler.policy import FCFSPolicy
from nanoslg.scheduler.scheduler import Scheduler


async def main(num_seqs: int, prompt_len: int, steps: int, shared: int = 0, each_delta: int = 0) -> None:
    cfg = SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=num_seqs * prompt_len)
    kv = PagedKVManager(num_seqs * (prompt_len + steps) // 16 + num_seqs, 16, True)
    engine = AsyncEngine(
        Scheduler(cfg, kv, FCFSPolicy(cfg)),
        InstantExecutor(),
        None,
        model_name="none",
        max_model_len=prompt_len + steps + 1,
        vocab_size=1000,
        eos_token_ids=(),
    )
    await engine.start()
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    prefix = [rng.randrange(2, 1000) for _ in range(shared)]  # the first `shared` prompt tokens of all
    streams = [
        engine.add_request(
            prefix + [rng.randrange(2, 1000) for _ in range(prompt_len - shared)], params, each_delta=bool(each_delta)
        )
        for _ in range(num_seqs)
    ]
    t = time.perf_counter()
    await asyncio.gather(*(collect(s) for s in streams))
    dt = time.perf_counter() - t
    prof = engine.metrics.profile.per_step_ms()
    print(
        f"{num_seqs} sequences, {steps} steps, each_delta={each_delta}: {dt / steps * 1e3:.2f} ms of host work "
        "per step "
        f"(schedule {prof['schedule_ms']:.2f} ms, process outputs {prof['process_ms']:.2f} ms, "
        f"the rest is the request streams' consumers and the loop)"
    )
    await engine.shutdown()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] + [256, 600, 300, 0, 0][len(sys.argv) - 1 :]
    asyncio.run(main(*args[:5]))
