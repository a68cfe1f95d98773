"""Inclusive wall time per step of the host functions a decode step runs, without a profiler's
slowdown or its cross-thread blur: each named function is wrapped in a perf_counter timer.

    python experiments/host_timers.py +experiment=shared-prefix-on-off [overrides]

Prints ms per engine step for each wrapped function (nested timers include their children), the
garbage collector's share, then a timeline of the first steps: when each was launched and processed.
"""

import collections
import gc
import sys
import time

import torch

from nanoslg import LLM
from nanoslg.bench.workloads import warm_requests
from nanoslg.core.compose import compose_config

TOTALS: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def wrap(obj, attr: str, record) -> None:
    """Replaces obj.attr with a version that calls record(start, end) (perf_counter) after each call."""
    fn = getattr(obj, attr)

    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            record(t, time.perf_counter())

    setattr(obj, attr, run)


def timed(obj, attr: str, name: str) -> None:
    def record(start: float, end: float) -> None:
        TOTALS[name] += end - start
        CALLS[name] += 1

    wrap(obj, attr, record)


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config(overrides)
    with LLM(config=cfg) as llm:
        eng = llm.engine
        reqs, params = warm_requests(llm, cfg.bench)
        gc_start = [0.0]

        def gc_timer(phase, info):
            if phase == "start":
                gc_start[0] = time.perf_counter()
            else:
                TOTALS[f"gc.gen{info['generation']}"] += time.perf_counter() - gc_start[0]
                CALLS[f"gc.gen{info['generation']}"] += 1

        ex = eng.executor
        runner = ex.rt.runner
        import nanoslg.cache.flashinfer_graph as fg
        import nanoslg.core.tensors as tn
        import nanoslg.model.sampler as sm

        targets = [
            (ex, "launch", "launch"),
            (ex, "collect", "collect"),
            (runner, "input_ids", "launch.input_ids"),
            (runner, "begin", "launch.begin"),
            (runner.sampler, "sample_async", "launch.sample_async"),
            (sm.Sampled, "to_host", "launch.to_host"),
            (tn.STAGING, "next_step", "launch.staging_next"),
            (eng.scheduler, "schedule", "schedule"),
            (eng.scheduler, "_plan", "schedule._plan"),
            (eng.scheduler.policy, "order", "schedule.policy_order"),
            (eng.scheduler, "commit", "process.commit"),
            (eng, "_process", "process"),
            (eng.outputs, "_append", "process._append"),
            (eng.outputs, "_emit", "process._emit"),
            (eng, "_update_gauges", "process.gauges"),
        ]
        if runner.graphs is not None:
            g = runner.backend._graphs  # the FlashInfer backend's graph buffers (cache/flashinfer_graph.py)
            targets += [
                (runner.graphs, "run", "launch.graphs_run"),
                (g, "_plan", "launch.graphs_run._plan"),
                (fg, "shared_prefix_pages", "launch.graphs_run.shared_prefix"),
                (g.backend, "plan_shared", "launch.graphs_run.plan_shared"),
                (g.fi.BatchDecodeWithPagedKVCacheWrapper, "plan", "launch.graphs_run._plan.fi_plan"),
                (torch.cuda.CUDAGraph, "replay", "launch.graphs_run.replay"),
                (fg, "to_device", "launch.graphs_run._plan.to_device"),
            ]
        for obj, attr, name in targets:
            timed(obj, attr, name)
        timeline: list[tuple] = []  # (event, seconds since the run began, step id, sequences, tokens)
        t0 = [0.0]

        def note(obj, attr, event):
            fn = getattr(obj, attr)

            def run(plan, *a):
                out = fn(plan, *a)
                if len(timeline) < 14:
                    timeline.append((event, time.perf_counter() - t0[0], plan.step_id, len(plan.seqs), plan.num_tokens))
                return out

            setattr(obj, attr, run)

        note(ex, "launch", "launched")
        note(eng, "_process", "processed")
        eng.metrics.profile.steps = 0
        gc.callbacks.append(gc_timer)
        t = t0[0] = time.perf_counter()
        outs = llm.generate([r.prompt for r in reqs], params)
        wall = time.perf_counter() - t
        gc.callbacks.remove(gc_timer)
        steps = max(eng.metrics.profile.steps, 1)
        ntok = sum(len(o.token_ids) for o in outs)
        prof = eng.metrics.profile.per_step_ms()
    print(
        f"\n{ntok / wall:,.0f} output tok/s; "
        f"{steps} steps, {wall * 1e3 / steps:.3f} ms wall per step; step profile "
        + ", ".join(f"{k} {v:.2f}" for k, v in prof.items() if k != "steps")
    )
    for name in sorted(TOTALS):
        print(f"  {name:45s} {TOTALS[name] * 1e3 / steps:8.3f} ms/step  ({CALLS[name]} calls)")
    print("\nfirst steps: event, ms since the requests were sent, step, sequences, tokens")
    for event, at, sid, nseq, ntok in timeline:
        print(f"  {event:9s} {at * 1e3:8.2f}  step {sid:4d}  {nseq:4d} seqs  {ntok:6d} tokens")


if __name__ == "__main__":
    main(sys.argv[1:])
