"""Where the host time of a benchmark's steps goes: cProfile over the step thread's launches and the
loop's scheduling and output processing, the three parts of the bench's step profile.

    python experiments/host_profile.py +experiment=shared-prefix-on-off [overrides]

Runs the workload's requests through the Python API, then prints the functions with the most own
time in each part (cProfile slows Python down about 2x; the ranking is what counts).
"""
import cProfile
import io
import pstats
import sys

from nanoslg import LLM, SamplingParams
from nanoslg.bench.workloads import get_workload, token_space
from nanoslg.compose import compose_config


def profiled(fn, prof: cProfile.Profile):
    def run(*args):
        prof.enable()
        try:
            return fn(*args)
        finally:
            prof.disable()
    return run


def main(overrides: list[str]) -> None:
    cfg, _ = compose_config(overrides)
    with LLM(config=cfg) as llm:
        eng = llm.engine
        reqs = get_workload(cfg.bench.workload).requests(cfg.bench, token_space(eng.vocab_size, eng.tokenizer,
                                                                                eng.eos_token_ids))
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
        llm.generate([r.prompt for r in reqs[:4]], params[:4])  # warm-up
        parts = {"launch (step thread)": cProfile.Profile(), "schedule (loop)": cProfile.Profile(),
                 "process outputs (loop)": cProfile.Profile()}
        eng.executor.launch = profiled(eng.executor.launch, parts["launch (step thread)"])
        eng.scheduler.schedule = profiled(eng.scheduler.schedule, parts["schedule (loop)"])
        eng._process = profiled(eng._process, parts["process outputs (loop)"])
        llm.generate([r.prompt for r in reqs], params)
    for name, prof in parts.items():
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(22)
        text = out.getvalue()
        print(f"\n== {name} ==\n" + text[text.index("ncalls") - 3:] if "ncalls" in text else text)


if __name__ == "__main__":
    main(sys.argv[1:])
