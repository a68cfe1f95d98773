"""Benchmarks: `python run.py mode=bench bench=<workload>` (offline, batch1, shared_prefix, serving).

They drive only the public API (engine.add_request streams, the OpenAI HTTP endpoint), report what
users compare engines by, set each result against the workload's roofline, and write one JSON
record per run under experiments/. Workloads register in nanoslg.core.registry.BENCHMARKS.
"""
