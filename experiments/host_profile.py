"""Where the host time of a benchmark's steps goes: cProfile over the step thread's launches and the
loop's scheduling and output processing, the three parts of the bench's step profile.

    python experiments/host_profile.py +experiment=shared-prefix-on-off [overrides]

Runs the workload's requests through the Python API, then prints the functions with the most own
time in each part (cProfile slows Python down about 2x; the ranking is what counts). On Python 3.12+
only one profiler may be on at a time, and it sees every thread: there one profile covers the whole
run (both threads), printed by own time and by cumulative time.
"""

import cProfile
import io
import pstats
import sys

from nanoslg import LLM
from nanoslg.bench.workloads import warm_requests
from nanoslg.core.compose import compose_config


def profiled(fn, prof: cProfile.Profile):
    def run(*args):
        prof.enable()
        try:
            return fn(*args)
        finally:
            prof.disable()

    return run


def _table(prof: cProfile.Profile, key: str, rows: int) -> str:
    """The profile's top rows by `key`, from the column header on (pstats' preamble dropped)."""
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(key).print_stats(rows)
    text = out.getvalue()
    return text[text.index("ncalls") - 3 :] if "ncalls" in text else text


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config(overrides)
    with LLM(config=cfg) as llm:
        eng = llm.engine
        reqs, params = warm_requests(llm, cfg.bench)
        if sys.version_info >= (3, 12):
            whole = cProfile.Profile()
            whole.enable()
            llm.generate([r.prompt for r in reqs], params)
            whole.disable()
            for key in ("tottime", "cumulative"):
                print(f"\n== whole run, by {key} ==\n" + _table(whole, key, 45))
            return
        parts = {
            "launch (step thread)": cProfile.Profile(),
            "schedule (loop)": cProfile.Profile(),
            "process outputs (loop)": cProfile.Profile(),
        }
        eng.executor.launch = profiled(eng.executor.launch, parts["launch (step thread)"])
        eng.scheduler.schedule = profiled(eng.scheduler.schedule, parts["schedule (loop)"])
        eng._process = profiled(eng._process, parts["process outputs (loop)"])
        llm.generate([r.prompt for r in reqs], params)
    for name, prof in parts.items():
        print(f"\n== {name} ==\n" + _table(prof, "tottime", 22))


if __name__ == "__main__":
    main(sys.argv[1:])
