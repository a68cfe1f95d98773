"""Where the GPU time of a benchmark goes: kernel time per step over windows of engine steps.

    python experiments/gpu_profile.py +experiment=offline-qwen3-0.6b [more overrides]
    NANOSLG_PROFILE_WINDOWS=5:25,300:330 ...   # [first, last) launches of each window

Runs the workload's requests through the Python API with torch.profiler (CUDA activity only) on
during each window, then prints, per window: wall time per step, GPU kernel time per step (the rest
is the GPU waiting for the host), and the kernels that take the most time.
"""

import os
import sys
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanoslg import LLM
from nanoslg.bench.workloads import warm_requests
from nanoslg.core.compose import compose_config


def _time(e) -> float:
    """Microseconds on the GPU (on a CPU: the op's own CPU time)."""
    return e.device_time_total if torch.cuda.is_available() else e.self_cpu_time_total


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config(overrides)
    windows = [
        tuple(map(int, w.split(":"))) for w in os.environ.get("NANOSLG_PROFILE_WINDOWS", "5:25,300:330").split(",")
    ]
    with LLM(config=cfg) as llm:
        eng = llm.engine
        reqs, params = warm_requests(llm, cfg.bench)
        ex, launch, n, lock = eng.executor, eng.executor.launch, [0], threading.Lock()
        results, state = [], {}
        cuda = torch.cuda.is_available()  # on a CPU the same table shows CPU ops (a dry run of this script)
        activity, sync = (
            (ProfilerActivity.CUDA, torch.cuda.synchronize) if cuda else (ProfilerActivity.CPU, lambda: None)
        )

        def traced_launch(plan):
            with lock:
                i = n[0]
                n[0] += 1
                for lo, hi in windows:
                    if i == lo:
                        sync()
                        state["prof"] = profile(activities=[activity])
                        state["prof"].start()
                        state["t"], state["lo"], state["tokens"] = time.perf_counter(), lo, 0
                    if i == hi and "prof" in state:
                        sync()
                        wall = time.perf_counter() - state["t"]
                        prof = state.pop("prof")
                        prof.stop()
                        results.append((lo, hi, wall, state["tokens"], prof.key_averages()))
                if "prof" in state:
                    state["tokens"] += plan.num_tokens
            return launch(plan)

        ex.launch = traced_launch
        t = time.perf_counter()
        llm.generate([r.prompt for r in reqs], params)
        print(f"\nrun: {len(reqs)} requests, {n[0]} launches, {time.perf_counter() - t:.2f} s")
    for lo, hi, wall, tokens, avg in results:
        steps = hi - lo
        kern = [e for e in avg if _time(e) > 0]
        busy = sum(_time(e) for e in kern) / 1e3  # ms
        print(
            f"\n== launches [{lo}, {hi}): wall {wall * 1e3 / steps:.2f} ms/step, GPU kernels "
            f"{busy / steps:.2f} ms/step ({100 * busy / (wall * 1e3):.0f}% busy)"
            + f", {tokens / steps:.0f} tokens/step"
        )
        for e in sorted(kern, key=lambda e: -_time(e))[:18]:
            print(f"  {_time(e) / 1e3 / steps:7.3f} ms/step  {e.count / steps:6.1f}/step  {e.key[:110]}")


if __name__ == "__main__":
    main(sys.argv[1:])
