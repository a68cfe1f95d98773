"""Per-request timings from streamed deltas, and the summary users compare engines by.

Definitions (those of vLLM's and SGLang's benchmark scripts, so numbers compare):
- TTFT: arrival (the request was sent) -> first delta carrying tokens.
- ITL: the gap between consecutive token-carrying deltas of one request (all requests pooled).
- TPOT: per request, (e2e - TTFT) / (output tokens - 1); requests with one output token have none.
- e2e: arrival -> last delta.
- output tok/s = output tokens of completed requests / wall time; total tok/s adds their prompt tokens.
Percentiles interpolate linearly between order statistics (numpy's default method).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    """What one request's stream showed. Times are `time.perf_counter()` seconds."""

    prompt_len: int
    arrival: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in the delta)
    end: float | None = None
    output_len: int | None = None  # exact count when the transport reports one (HTTP usage)
    error: str | None = None

    def on_delta(self, num_tokens: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if num_tokens > 0:
            self.chunks.append((now, num_tokens))

    def finish(self, now: float | None = None, error: str | None = None) -> None:
        self.end = time.perf_counter() if now is None else now
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and bool(self.chunks)

    @property
    def num_output(self) -> int:
        return self.output_len if self.output_len is not None else sum(n for _, n in self.chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.arrival if self.chunks else None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.arrival

    @property
    def itls(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.chunks, self.chunks[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.num_output
        if not self.chunks or self.end is None or n < 2:
            return None
        return (self.end - self.chunks[0][0]) / (n - 1)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks; None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Iterable[float], scale: float = 1000.0) -> dict:
    """mean / p50 / p90 / p99 / max of `values` times `scale` (seconds -> ms by default)."""
    xs = [v * scale for v in values]
    out: dict = {"n": len(xs), "mean": (sum(xs) / len(xs)) if xs else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["max"] = max(xs) if xs else None
    return out


def summarize(timings: list[RequestTiming], wall_time: float) -> dict:
    """The headline numbers of a run; wall_time is first arrival -> last completion in seconds."""
    done = [t for t in timings if t.ok]
    out_tokens = sum(t.num_output for t in done)
    in_tokens = sum(t.prompt_len for t in done)
    wall = max(wall_time, 1e-9)
    errors = sorted({t.error for t in timings if t.error})
    return {
        "num_requests": len(timings),
        "completed": len(done),
        "failed": len(timings) - len(done),
        "errors": errors[:5],
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "wall_time_s": wall_time,
        "request_throughput": len(done) / wall,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (in_tokens + out_tokens) / wall,
        "ttft_ms": distribution(t.ttft for t in done),
        "itl_ms": distribution(x for t in done for x in t.itls),
        "tpot_ms": distribution(t.tpot for t in done if t.tpot is not None),
        "e2e_ms": distribution(t.e2e for t in done),
    }


def peak_gpu_memory() -> dict | None:
    """Peak bytes torch allocated on each visible CUDA device of this process (None without CUDA)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    per = [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
    return {
        "max_allocated_bytes": max(per),
        "max_allocated_gib": max(per) / 2**30,
        "max_reserved_gib": max(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count())) / 2**30,
        "per_device_gib": [p / 2**30 for p in per],
    }
