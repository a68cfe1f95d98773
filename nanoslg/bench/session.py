"""What the engine session (runner.py) and the HTTP session (serving.py) share: the bench.extra
options, `drive` (each request at its arrival offset, at most bench.concurrency in flight), the
warm-up and the timed run, and the roofline of what a run produced."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tqdm.auto import tqdm

from nanoslg.bench import roofline as rl
from nanoslg.bench.hardware import Figures
from nanoslg.bench.metrics import RequestTiming
from nanoslg.bench.workloads import BenchRequest, warmup_requests
from nanoslg.core.config import Config

log = logging.getLogger("nanoslg.bench")

# bench.extra keys the bench reads (documented in conf/bench/*.yaml)
EXTRA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.0,  # greedy: what the peer does too
    "progress": True,  # tqdm bars
    "bandwidth": "table",  # table | spec | measure (roofline figures)
    "bandwidth_tbs": None,  # given bandwidth per device, TB/s
    "peak_tflops": None,  # given peak per device, TFLOP/s
    "url": None,  # serving: an already running server (http://host:port)
    "server_start_timeout": 900,  # serving: seconds to wait for the subprocess server's /health
    "hf_method": "auto",  # peer=hf: auto | continuous | generate
    "hf_batch_size": 32,  # peer=hf with plain generate
    "aggregate": True,  # rewrite the experiment's table and plot after the run
    "name_max_length": 24,  # offline_json: maxLength of the schema's "name" string (None: unbounded)
}


def extra(cfg: Config, key: str) -> Any:
    ex = cfg.bench.extra or {}
    return ex.get(key, EXTRA_DEFAULTS[key])


# -- driving requests --------------------------------------------------------------------------
Send = Callable[[int, BenchRequest, RequestTiming], Awaitable[None]]


async def drive(
    reqs: list[BenchRequest], send: Send, concurrency: int | None = None, progress: bool = True, desc: str = "bench"
) -> tuple[list[RequestTiming], float]:
    """Sends each request at its arrival offset (at most `concurrency` in flight); returns timings, wall."""

    sem = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(reqs), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    timings = [RequestTiming(len(r.prompt)) for r in reqs]

    async def one(i: int, r: BenchRequest) -> None:
        if sem is None:
            await send(i, r, timings[i])
        else:
            async with sem:
                await send(i, r, timings[i])
        bar.update(1)

    start = time.perf_counter()
    tasks = []
    for i, r in enumerate(reqs):
        delay = start + r.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, r)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    bar.close()
    return timings, wall


async def warm_up(cfg: Config, reqs: list[BenchRequest], send: Send) -> list[RequestTiming]:
    """Sends the bench's warm-up requests (bench.warmup); one that fails stops the run. Returns their timings."""
    warm = warmup_requests(cfg.bench, reqs)
    if not warm:
        return []
    timings, _ = await drive(warm, send, progress=False)
    bad = [t.error for t in timings if t.error]
    if bad:
        raise RuntimeError(f"a warmup request failed: {bad[0]}")
    return timings


async def timed_run(cfg: Config, reqs: list[BenchRequest], send: Send) -> tuple[list[RequestTiming], float]:
    """The measured run of the workload's requests; a run in which every request failed stops here."""
    timings, wall = await drive(
        reqs, send, cfg.bench.concurrency, bool(extra(cfg, "progress")), desc=f"nanoslg {cfg.bench.workload}"
    )
    if timings and all(t.error for t in timings):
        raise RuntimeError(f"every bench request failed; the first: {timings[0].error}")
    return timings, wall


# -- what a run produced, against its roofline ---------------------------------------------------
def kv_pool(tokens: int | None, nbytes: int | None) -> dict:
    return {"tokens": tokens, "bytes": nbytes, "gib": (nbytes / 2**30) if nbytes else None}


def model_facts(make: Callable[[], rl.ModelFacts]) -> rl.ModelFacts | None:
    try:
        return make()
    except Exception as e:  # an unusual config.json: the run still reports, without a roofline
        log.warning("no roofline: could not read the model's shape (%s)", e)
        return None


def run_roofline(
    cfg: Config,
    reqs: list[BenchRequest],
    timings: list[RequestTiming],
    wall: float,
    facts: rl.ModelFacts | None,
    figures: Figures | None,
    kv_capacity: int | None,
    prefix_caching: bool | None,
    cascade: bool | None = False,
) -> dict | None:
    """The run set against its roofline (None without the model's shape or the hardware figures)."""
    if facts is None or figures is None:
        return None
    # What was actually produced (EOS may end requests early when bench.ignore_eos=false).
    shape = [(len(r.prompt), t.num_output if t.ok else r.max_tokens) for r, t in zip(reqs, timings)]
    steps = rl.simulate(
        shape,
        facts,
        max_num_seqs=cfg.scheduler.max_num_seqs,
        max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
        kv_capacity_tokens=kv_capacity,
        shared_prefix_len=cfg.bench.shared_prefix_len,
        prefix_caching=bool(prefix_caching),
        cascade=bool(cascade),
    )
    out = rl.roofline(steps, figures, facts)
    last_arrival = max((r.arrival for r in reqs), default=0.0)
    if last_arrival > out["limit_s"]:  # Poisson arrivals: nothing finishes before it has arrived
        out["limit_s"] = last_arrival
        out["bound_by"] = "arrivals"
    else:
        out["bound_by"] = "memory" if out["memory_bound_steps"] * 2 >= out["steps"] else "compute"
    frac = rl.fraction_of_limit(out["limit_s"], wall)
    out["percent_of_limit"] = 100 * frac if frac is not None else None
    out_tokens = sum(s[1] for s in shape)
    out["limit_output_tok_s"] = out_tokens / out["limit_s"] if out["limit_s"] > 0 else None
    out["model_note"] = (
        "per step: weights once + KV of each attended key, max(bytes/BW, FLOPs/peak); "
        "batch shape simulated from scheduler.max_num_seqs / max_num_batched_tokens"
    )
    if len(reqs) == 1 and timings[0].ok and timings[0].num_output >= 2:
        t = timings[0]
        decode_s = t.end - t.chunks[0][0]
        out["decode_tok_s"] = (t.num_output - 1) / decode_s if decode_s > 0 else None
        util = rl.mbu(facts, figures, len(reqs[0].prompt), t.num_output, decode_s)
        out["mbu_percent"] = 100 * util if util is not None else None
        steps_d = t.num_output - 1
        out["decode_limit_tok_s"] = steps_d / (
            rl.decode_bytes(facts, len(reqs[0].prompt), t.num_output) / figures.bandwidth
        )
    return out
