"""/metrics through prometheus_client, under the names vLLM users already graph.

Each app has its own CollectorRegistry (several engines and apps may live in one process, as in the
tests). The engine keeps plain numbers (engine/metrics.py); a collector turns them into metric
families when scraped, so the engine never calls into Prometheus on its hot path. The registry
also carries the library's process, platform and GC collectors and the server's own counter of
rejected requests.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LABELS = ["model_name"]

# (name, EngineMetrics attribute, help)
HISTOGRAMS = [
    ("vllm:time_to_first_token_seconds", "time_to_first_token", "Time to first token in seconds."),
    ("vllm:inter_token_latency_seconds", "inter_token_latency", "Time between output tokens in seconds."),
    ("vllm:e2e_request_latency_seconds", "e2e_request_latency", "End-to-end request latency in seconds."),
    ("vllm:request_queue_time_seconds", "request_queue_time", "Time from arrival to first schedule in seconds."),
    (
        "vllm:time_per_output_token_seconds",
        "time_per_output_token",
        "Per request: seconds per output token after the first.",
    ),
    ("vllm:request_prompt_tokens", "request_prompt_tokens", "Prompt tokens per request."),
    ("vllm:request_generation_tokens", "request_generation_tokens", "Generated tokens per request."),
    ("vllm:iteration_tokens_total", "iteration_tokens", "Tokens fed to the model per engine step."),
]
COUNTERS = [
    ("vllm:prompt_tokens", "prompt_tokens", "Prompt tokens received."),
    ("vllm:generation_tokens", "generation_tokens", "Tokens generated (those returned to clients)."),
    ("vllm:num_preemptions", "preemptions", "Sequences preempted."),
    ("vllm:prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("vllm:prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
]
GAUGES = [
    ("vllm:num_requests_running", "num_running", "Sequences running on the model."),
    ("vllm:num_requests_waiting", "num_waiting", "Sequences waiting to be scheduled."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV cache usage (1 = full)."),
]


class EngineCollector(Collector):
    """The engine's EngineMetrics as metric families, read at scrape time."""

    def __init__(self, engine, model: str):
        self.engine, self.labels = engine, [model]

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics
        for name, attr, help_ in HISTOGRAMS:
            h = getattr(m, attr)
            fam = HistogramMetricFamily(name, help_, labels=LABELS)
            cum, buckets = 0, []
            for bound, count in zip(h.buckets, h.counts):
                cum += count
                buckets.append((floatToGoString(bound), cum))
            buckets.append(("+Inf", cum + h.counts[-1]))
            fam.add_metric(self.labels, buckets, float(h.total))
            yield fam
        for name, attr, help_ in COUNTERS:
            fam = CounterMetricFamily(name, help_, labels=LABELS)
            fam.add_metric(self.labels, getattr(m, attr))
            yield fam
        for name, attr, help_ in GAUGES:
            fam = GaugeMetricFamily(name, help_, labels=LABELS)
            fam.add_metric(self.labels, float(getattr(m, attr)))
            yield fam
        fam = CounterMetricFamily(
            "vllm:request_success", "Finished requests by finish reason.", labels=LABELS + ["finished_reason"]
        )
        for reason in sorted({"stop", "length", "abort"} | set(m.requests_finished)):
            fam.add_metric(self.labels + [str(reason)], m.requests_finished.get(reason, 0))
        yield fam


class ServerMetrics:
    """One app's registry: the engine's numbers, the process's, and the requests the server refused."""

    def __init__(self, engine, model: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.rejected = Counter(
            "nanoslg:request_rejected",
            "Requests answered with an error status, by status code.",
            ["model_name", "status_code"],
            registry=self.registry,
        )
        self.model = model

    def reject(self, status: int) -> None:
        self.rejected.labels(self.model, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
