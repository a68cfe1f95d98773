"""Benchmarks: `python run.py mode=bench bench=<workload>` (offline, batch1, shared_prefix, serving).

They drive only the public API (engine.add_request streams, the OpenAI HTTP endpoint), report what
users compare engines by, set each result against the workload's roofline, and write one JSON
record per run under experiments/ (see runner.py, roofline.py, record.py).
"""
from nanoslg.bench import workloads  # noqa: F401  (registers the workloads in BENCHMARKS)


def run_bench(cfg, node=None) -> dict:
    from nanoslg.bench.runner import run_bench as _run

    return _run(cfg, node)


__all__ = ["run_bench"]
