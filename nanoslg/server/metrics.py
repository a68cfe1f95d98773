"""/metrics: the engine's numbers in Prometheus' text format, under the names vLLM users already graph."""

from __future__ import annotations


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(m, model: str) -> str:
    """EngineMetrics -> Prometheus text format, with the names vLLM users already graph."""
    lab = f'model_name="{_label(model)}"'
    lines: list[str] = []

    def head(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    def hist(name: str, h, help_: str) -> None:
        head(name, "histogram", help_)
        cum = 0
        for bound, count in zip(h.buckets, h.counts):
            cum += count
            lines.append(f'{name}_bucket{{{lab},le="{bound}"}} {cum}')
        cum += h.counts[-1]
        lines.append(f'{name}_bucket{{{lab},le="+Inf"}} {cum}')
        lines.append(f"{name}_sum{{{lab}}} {float(h.total)}")
        lines.append(f"{name}_count{{{lab}}} {h.n}")

    def scalar(name: str, kind: str, value, help_: str) -> None:
        head(name, kind, help_)
        lines.append(f"{name}{{{lab}}} {value}")

    hist("vllm:time_to_first_token_seconds", m.time_to_first_token, "Time to first token in seconds.")
    hist("vllm:inter_token_latency_seconds", m.inter_token_latency, "Time between output tokens in seconds.")
    hist("vllm:e2e_request_latency_seconds", m.e2e_request_latency, "End-to-end request latency in seconds.")
    hist("vllm:request_queue_time_seconds", m.request_queue_time, "Time from arrival to first schedule in seconds.")
    scalar("vllm:num_requests_running", "gauge", m.num_running, "Sequences running on the model.")
    scalar("vllm:num_requests_waiting", "gauge", m.num_waiting, "Sequences waiting to be scheduled.")
    scalar("vllm:kv_cache_usage_perc", "gauge", float(m.kv_cache_usage), "KV cache usage (1 = full).")
    scalar("vllm:prompt_tokens_total", "counter", m.prompt_tokens, "Prompt tokens received.")
    scalar("vllm:generation_tokens_total", "counter", m.generation_tokens, "Tokens generated.")
    scalar("vllm:num_preemptions_total", "counter", m.preemptions, "Sequences preempted.")
    scalar(
        "vllm:prefix_cache_queries_total",
        "counter",
        m.prefix_cache_queries,
        "Prompt tokens looked up in the prefix cache.",
    )
    scalar("vllm:prefix_cache_hits_total", "counter", m.prefix_cache_hits, "Prompt tokens found in the prefix cache.")
    head("vllm:request_success_total", "counter", "Finished sequences by finish reason.")
    for reason in sorted({"stop", "length", "abort"} | set(m.requests_finished)):
        count = m.requests_finished.get(reason, 0)
        lines.append(f'vllm:request_success_total{{{lab},finished_reason="{_label(str(reason))}"}} {count}')
    return "\n".join(lines) + "\n"
