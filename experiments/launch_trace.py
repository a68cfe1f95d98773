"""Why a step's launch takes as long as it does: host and device time of the first steps, and the
CUDA calls that block the host.

    python experiments/launch_trace.py +experiment=shared-prefix-on-off [overrides]
    NANOSLG_TRACE_STEPS=8 ...   # how many launches the timeline shows
    NANOSLG_TRACE_CPROFILE=1 ...   # also cProfile the first run's eager launches (slows them ~1.5x)

Runs the workload twice, after the bench's own short warm-up, emptying the prefix cache between:
first with CUDA events around every launch, then under torch.profiler (host ops with Python stacks,
and CUDA calls). Prints, per launch of the first run: when the host started and finished queuing
it, and when the device started and finished running it (ms since the requests were sent); then,
from the second, the host calls that may wait on the device (synchronize, copies, item), each with
the Python frames that made it.
"""

import cProfile
import os
import pstats
import sys
import time

import torch
from host_timers import wrap  # experiments/ is on the path when a script in it runs
from torch.profiler import ProfilerActivity, profile

from nanoslg import LLM
from nanoslg.bench.workloads import warm_requests
from nanoslg.core.compose import compose_config

BLOCKING = ("Synchronize", "cudaMemcpy", "cudaStreamWait", "aten::item", "aten::_local_scalar_dense")


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config(overrides)
    steps = int(os.environ.get("NANOSLG_TRACE_STEPS", "8"))
    cprofile = os.environ.get("NANOSLG_TRACE_CPROFILE") == "1"
    cuda = torch.cuda.is_available()
    with LLM(config=cfg) as llm:
        eng = llm.engine
        reqs, params = warm_requests(llm, cfg.bench)
        runner = eng.executor.rt.runner
        launch, rows, t0 = runner.launch, [], [0.0, None]
        host_prof = cProfile.Profile()  # the worker thread's eager launches (the first `steps`)
        spans: dict[str, list] = {"add_request": [], "schedule": [], "process": []}
        live = [True]  # the timeline and spans keep the first run only

        def traced(plan):
            if not live[0] or len(rows) >= steps:  # the first run only
                return launch(plan)
            ev = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)] if cuda else None
            if ev:
                ev[0].record()
            profiled = cprofile and not plan.decode
            start = time.perf_counter()
            if profiled:
                host_prof.enable()
            out = launch(plan)
            if profiled:
                host_prof.disable()
            end = time.perf_counter()
            if ev:
                ev[1].record()
            rows.append((plan.step_id, len(plan.seqs), plan.num_tokens, start, end, ev))
            return out

        runner.launch = traced

        def span(obj, attr):
            kept = spans[attr.strip("_")]

            def record(start: float, end: float) -> None:
                if live[0] and len(kept) < 4 * steps:
                    kept.append((start, end))

            wrap(obj, attr, record)

        span(eng, "add_request")
        span(eng.scheduler, "schedule")
        span(eng, "_process")
        if cuda:
            t0[1] = torch.cuda.Event(enable_timing=True)
        if cuda:
            torch.cuda.synchronize()
            t0[1].record()
        t0[0] = time.perf_counter()
        llm.generate([r.prompt for r in reqs], params)
        wall = time.perf_counter() - t0[0]
        if cuda:
            torch.cuda.synchronize()
        live[0] = False
        for k in spans:
            spans[k] = [(a - t0[0], b - t0[0]) for a, b in spans[k]]
        adds = spans["add_request"]
        eng.scheduler.kv.flush()  # the engine is idle: the second run starts as cold as the first
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, with_stack=True) as prof:
            t = time.perf_counter()
            llm.generate([r.prompt for r in reqs], params)
            print(f"\nunder the profiler: {time.perf_counter() - t:.3f} s")
    print(f"run: {len(reqs)} requests in {wall:.3f} s")
    print(
        "launch: step, seqs, tokens | host queued from .. to (ms) | device ran from .. to (ms), "
        "since the requests were sent; the device's start is the previous launch's end or this one's"
    )
    prev_end = 0.0
    for sid, nseq, ntok, start, end, ev in rows:
        h0, h1 = (start - t0[0]) * 1e3, (end - t0[0]) * 1e3
        line = f"  step {sid:4d} {nseq:4d} seqs {ntok:6d} tok | host {h0:8.2f} .. {h1:8.2f} ({h1 - h0:6.2f})"
        if ev:
            d0, d1 = t0[1].elapsed_time(ev[0]), t0[1].elapsed_time(ev[1])
            begin = max(d0, prev_end)
            line += f" | device {begin:8.2f} .. {d1:8.2f} ({d1 - begin:6.2f})"
            prev_end = d1
        print(line)
    print(
        f"\nadd_request x{len(adds)}: {adds[0][0] * 1e3:.2f} .. {adds[-1][1] * 1e3:.2f} ms, "
        f"{sum(b - a for a, b in adds) * 1e3:.2f} ms inside"
    )
    for k in ("schedule", "process"):
        print(
            f"{k} (loop thread), start .. end ms: "
            + ", ".join(f"{a * 1e3:.1f}..{b * 1e3:.1f}" for a, b in spans[k][: steps + 2])
        )
    if cprofile:
        print("\nthe eager launches of the first run, cProfile (worker thread), by cumulative time:")
        pstats.Stats(host_prof).sort_stats("cumulative").print_stats(28)
        print("by own time:")
        pstats.Stats(host_prof).sort_stats("tottime").print_stats(18)
    avg = prof.key_averages(group_by_stack_n=6)
    blocking = [e for e in avg if any(b in e.key for b in BLOCKING)]
    print("\nhost calls that may wait on the device (total ms, calls), with the frames that made them:")
    for e in sorted(blocking, key=lambda e: -e.cpu_time_total)[:14]:
        print(f"  {e.cpu_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key}")
        for frame in (e.stack or [])[:6]:
            if "site-packages/torch" not in frame:
                print(f"        {frame}")
    print("\nhost ops by own time (top 15):")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.self_cpu_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:100]}")


if __name__ == "__main__":
    main(sys.argv[1:])
