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

# (kind, name, EngineMetrics attribute, help)
METRICS = [
    ("histogram", "vllm:time_to_first_token_seconds", "time_to_first_token", "Time to first token in seconds."),
    ("histogram", "vllm:inter_token_latency_seconds", "inter_token_latency", "Time between output tokens in seconds."),
    ("histogram", "vllm:e2e_request_latency_seconds", "e2e_request_latency", "End-to-end request latency in seconds."),
    ("histogram", "vllm:request_queue_time_seconds", "request_queue_time", "Arrival to first schedule in seconds."),
    ("histogram", "vllm:time_per_output_token_seconds", "time_per_output_token", "Seconds per token after the first."),
    ("histogram", "vllm:request_prompt_tokens", "request_prompt_tokens", "Prompt tokens per request."),
    ("histogram", "vllm:request_generation_tokens", "request_generation_tokens", "Generated tokens per request."),
    ("histogram", "vllm:iteration_tokens_total", "iteration_tokens", "Tokens fed to the model per engine step."),
    ("counter", "vllm:prompt_tokens", "prompt_tokens", "Prompt tokens received."),
    ("counter", "vllm:generation_tokens", "generation_tokens", "Tokens generated (those returned to clients)."),
    ("counter", "vllm:num_preemptions", "preemptions", "Sequences preempted."),
    ("counter", "vllm:prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("counter", "vllm:prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("counter", "vllm:spec_decode_num_drafts", "spec_num_drafts", "Speculative verify steps, per sequence."),
    ("counter", "vllm:spec_decode_num_draft_tokens", "spec_num_draft_tokens", "Speculative tokens proposed."),
    ("counter", "vllm:spec_decode_num_accepted_tokens", "spec_num_accepted_tokens", "Speculative tokens accepted."),
    (
        "gauge",
        "nanoslg:spec_decode_mean_accepted_length",
        "spec_mean_accepted_length",
        "Tokens a speculative verify row emits on average (accepted proposals + 1).",
    ),
    ("gauge", "vllm:num_requests_running", "num_running", "Sequences running on the model."),
    ("gauge", "vllm:num_requests_waiting", "num_waiting", "Sequences waiting to be scheduled."),
    ("gauge", "vllm:kv_cache_usage_perc", "kv_cache_usage", "KV cache usage (1 = full)."),
]


class EngineCollector(Collector):
    """The engine's EngineMetrics as metric families, read at scrape time."""

    def __init__(self, engine, model: str):
        self.engine, self.labels = engine, [model]

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics
        for kind, name, attr, help_ in METRICS:
            value = getattr(m, attr)
            if kind == "histogram":
                fam = HistogramMetricFamily(name, help_, labels=LABELS)
                cum, buckets = 0, []
                for bound, count in zip(value.buckets, value.counts):
                    cum += count
                    buckets.append((floatToGoString(bound), cum))
                buckets.append(("+Inf", cum + value.counts[-1]))
                fam.add_metric(self.labels, buckets, float(value.total))
            elif kind == "counter":
                fam = CounterMetricFamily(name, help_, labels=LABELS)
                fam.add_metric(self.labels, value)
            else:
                fam = GaugeMetricFamily(name, help_, labels=LABELS)
                fam.add_metric(self.labels, float(value))
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
