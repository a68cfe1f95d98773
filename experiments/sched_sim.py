"""The scheduler's steps for a benchmark's workload, priced by the roofline's cost model, without a GPU.

    python experiments/sched_sim.py [preset] [kv_tokens] [overrides...]
    python experiments/sched_sim.py longctx-llama3-8b 440576

Drives the real engine loop (scheduler, paged KV manager, output processing) with an executor that
answers at once, records every step's plan, and prices each step as the roofline does (weights once,
the KV of every attended key, FLOPs; max of bytes over bandwidth and FLOPs over peak, H100 figures).
Prints the steps, the preemptions, the prompt tokens computed (recompute included) and the priced
time of the engine's steps against the roofline's own simulation (which never preempts): what the
scheduling policy costs on the device, before any kernel runs.
"""

import asyncio
import json
import sys
from pathlib import Path

from nanoslg.bench.hardware import Figures
from nanoslg.bench.roofline import StepLoad, facts_from_hf_config, roofline, simulate, step_load
from nanoslg.bench.workloads import make_requests, token_space
from nanoslg.cache.paged import PagedKVManager
from nanoslg.core.compose import compose_config
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.async_engine import AsyncEngine
from nanoslg.engine.stream import collect
from nanoslg.parallel.instant import InstantExecutor
from nanoslg.scheduler.policy import FCFSPolicy
from nanoslg.scheduler.scheduler import Scheduler

H100 = Figures(3.0e12, 989e12, "measured copy", "dense bf16", "H100 SXM")


def price(plans, facts) -> list[StepLoad]:
    """Each plan's load, counted as the roofline's simulation counts its own steps."""
    loads = []
    for plan in plans:
        tokens = sampled = decodes = kv_read = pairs = 0
        for st in plan.seqs:
            n = len(st.token_ids)
            tokens += n
            kv_read += st.start + n
            pairs += n * st.start + n * (n + 1) // 2
            if st.sample:
                sampled += 1
                decodes += n == 1
        loads.append(step_load(facts, tokens, sampled, decodes, kv_read, tokens, pairs))
    return loads


async def run(cfg, kv_tokens: int, reqs) -> tuple[list, Scheduler]:
    ps = cfg.cache.page_size
    kv = PagedKVManager(kv_tokens // ps, ps, cfg.cache.prefix_caching)
    sched = Scheduler(cfg.scheduler, kv, FCFSPolicy(cfg.scheduler))
    ex = InstantExecutor(record=True)
    engine = AsyncEngine(
        sched,
        ex,
        None,
        model_name="sim",
        max_model_len=cfg.model.max_model_len or 1 << 20,
        vocab_size=1000,
        eos_token_ids=(),
    )
    await engine.start()
    streams = [
        engine.add_request(r.prompt, SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True))
        for r in reqs
    ]
    await asyncio.gather(*(collect(s) for s in streams))
    await engine.shutdown()
    return ex.plans, sched


def main(preset: str, kv_tokens: int, overrides: list[str]) -> None:
    cfg, _ = compose_config([f"+experiment={preset}", *overrides])
    shapes = Path(__file__).parent.parent / "nanoslg/model/shapes" / f"{cfg.model.name}.json"
    facts = facts_from_hf_config(json.loads(shapes.read_text()), 2)
    reqs = make_requests(cfg.bench, token_space(1000))
    plans, sched = asyncio.run(run(cfg, kv_tokens, reqs))
    steps = price(plans, facts)
    prompt = sum(len(r.prompt) for r in reqs)
    computed = sum(s.tokens - s.decodes for s in steps)
    got = roofline(steps, H100, facts)
    ref = roofline(
        simulate(
            [(len(r.prompt), r.max_tokens) for r in reqs],
            facts,
            max_num_seqs=cfg.scheduler.max_num_seqs,
            max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
            kv_capacity_tokens=kv_tokens,
        ),
        H100,
        facts,
    )
    print(
        f"{preset} {' '.join(overrides)}: {len(steps)} steps, {sched.num_preemptions} preemptions, "
        f"{computed:,} non-decode tokens computed for {prompt:,} prompt tokens ({computed / prompt:.3f}x); "
        f"priced {got['limit_s']:.2f} s (compute {got['compute_s']:.2f}, memory {got['memory_s']:.2f}) "
        f"against the roofline's {ref['limit_s']:.2f} s"
    )


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "longctx-llama3-8b",
        int(sys.argv[2]) if len(sys.argv) > 2 else 440576,
        sys.argv[3:],
    )
