"""Engine metrics as plain numbers; the server renders them (Prometheus), the bench reads them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

# Tokens per request and per step (vLLM's buckets: 1, 2, 5 per decade).
TOKEN_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class StepProfile:
    """Where a step's time goes (seconds, summed): the loop's scheduling and output processing, and
    the step thread's launch (inputs, kernel launches) and wait for the device. Overlapped, the
    device is the bottleneck when `wait` is large; the host is when it is near zero."""

    steps: int = 0
    schedule_s: float = 0.0
    process_s: float = 0.0
    launch_s: float = 0.0
    wait_s: float = 0.0
    # Grammar mask fills, on the mask threads: the loop waits for those made right after scheduling
    # (also counted in schedule_s); those of a sample_later step overlap its processing.
    masks_s: float = 0.0
    # speculative=draft: the draft model's proposals, inside the step (also counted in wait_s).
    draft_s: float = 0.0

    def per_step_ms(self) -> dict:
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            **{
                k[:-2] + "_ms": getattr(self, k) / n * 1e3
                for k in ("schedule_s", "process_s", "launch_s", "wait_s", "masks_s", "draft_s")
            },
        }


def _tokens() -> Histogram:
    return Histogram(TOKEN_BUCKETS)


@dataclass
class EngineMetrics:
    """Every per-request number counts each sample (sequence) of a request as one request, as vLLM
    counts the children of an n > 1 request: request_success, the latency histograms and the token
    histograms agree, and the token counters are the sums of the token histograms."""

    time_to_first_token: Histogram = field(default_factory=Histogram)  # seconds
    inter_token_latency: Histogram = field(default_factory=Histogram)
    e2e_request_latency: Histogram = field(default_factory=Histogram)
    request_queue_time: Histogram = field(default_factory=Histogram)  # arrival -> first scheduled
    time_per_output_token: Histogram = field(default_factory=Histogram)  # per request, after the first
    request_prompt_tokens: Histogram = field(default_factory=_tokens)
    request_generation_tokens: Histogram = field(default_factory=_tokens)
    iteration_tokens: Histogram = field(default_factory=_tokens)  # tokens fed per engine step
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were found
    # Speculative decoding: verify steps of a sequence, tokens proposed, proposals accepted.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    requests_finished: dict = field(default_factory=dict)  # finish_reason -> count
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV pages in use
    profile: StepProfile = field(default_factory=StepProfile)

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verify row emits on average: its accepted proposals and the target's own (0: none yet)."""
        return 1 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0
