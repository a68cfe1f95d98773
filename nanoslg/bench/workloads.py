"""Bench workloads: what requests a run sends, and how (straight to the engine, or over HTTP).

Every number comes from `cfg.bench` (conf/bench/<workload>.yaml sets them):
- offline:        bench.num_requests prompts of uniform [input_len_min, input_len_max] random tokens,
                  uniform [output_len_min, output_len_max] output tokens, all sent at once, EOS ignored.
- batch1:         the same generator with one request (128 in, 256 out).
- shared_prefix:  every prompt = the same bench.shared_prefix_len tokens + its own random tokens.
- serving:        the same requests sent to the OpenAI endpoint (/v1/completions, streamed), at
                  Poisson arrivals of bench.request_rate per second and/or at most bench.concurrency
                  in flight.
Token ids are drawn with numpy's PCG64 from bench.seed, so a run's prompts are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nanoslg.core.config import BenchConfig
from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import BENCHMARKS
from nanoslg.core.sampling_params import SamplingParams


@dataclass
class BenchRequest:
    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the run starts
    structured: object = None  # StructuredOutputs of a constrained request (offline_json)


@dataclass
class TokenSpace:
    """Which token ids random prompts may use: [0, high) without the special ids."""

    high: int
    exclude: frozenset = frozenset()

    def __post_init__(self) -> None:
        if self.high - len([t for t in self.exclude if 0 <= t < self.high]) < 1:
            raise ConfigError(f"no ordinary token ids below {self.high}: cannot make random prompts")

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        ids = rng.integers(0, self.high, size=n)
        if self.exclude:
            bad = np.isin(ids, np.fromiter(self.exclude, dtype=np.int64))
            while bad.any():  # redraw specials; rare, so this converges at once
                ids[bad] = rng.integers(0, self.high, size=int(bad.sum()))
                bad = np.isin(ids, np.fromiter(self.exclude, dtype=np.int64))
        return ids.tolist()  # plain ints: the engine rejects numpy integers


def token_space(vocab_size: int, tokenizer=None, eos_token_ids: Iterable[int] = ()) -> TokenSpace:
    """Ordinary token ids of a model: below its vocab (and its tokenizer's length), no specials.

    Without a tokenizer (shape-only dummy models) the specials are unknown; Llama-3 and Qwen put
    them all at the top of the vocabulary, starting at the lowest EOS id, so when that id sits in
    the upper half, ids from it upwards are left out.
    """
    exclude = {int(t) for t in eos_token_ids}
    high = vocab_size
    if tokenizer is not None:
        high = min(high, len(tokenizer))
        exclude |= {int(t) for t in getattr(tokenizer, "all_special_ids", []) or []}
        exclude |= {int(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    elif exclude and min(exclude) > vocab_size // 2:
        high = min(exclude)
    return TokenSpace(high, frozenset(t for t in exclude if t < high))


def _check(b: BenchConfig) -> None:
    for lo, hi in (("input_len_min", "input_len_max"), ("output_len_min", "output_len_max")):
        a, z = getattr(b, lo), getattr(b, hi)
        if a < 0 or z < a:
            raise ConfigError(f"bench.{lo}={a} and bench.{hi}={z}: need 0 <= {lo} <= {hi}")
    if b.output_len_min < 1:
        raise ConfigError(f"bench.output_len_min={b.output_len_min}: must be >= 1")
    if b.shared_prefix_len < 0:
        raise ConfigError(f"bench.shared_prefix_len={b.shared_prefix_len}: must be >= 0")
    if b.shared_prefix_len + b.input_len_min < 1:
        raise ConfigError("bench.input_len_min=0 with bench.shared_prefix_len=0 makes empty prompts")
    if b.request_rate is not None and b.request_rate <= 0:
        raise ConfigError(f"bench.request_rate={b.request_rate}: must be > 0 (null sends all at once)")
    if b.concurrency is not None and b.concurrency < 1:
        raise ConfigError(f"bench.concurrency={b.concurrency}: must be >= 1 (null for no cap)")


def make_requests(b: BenchConfig, space: TokenSpace) -> list[BenchRequest]:
    """The requests of a run: lengths, then token ids, then arrival times, all from bench.seed."""
    _check(b)
    rng = np.random.default_rng(b.seed)
    n = b.num_requests
    in_lens = rng.integers(b.input_len_min, b.input_len_max + 1, size=n).tolist()
    out_lens = rng.integers(b.output_len_min, b.output_len_max + 1, size=n).tolist()
    prefix = space.draw(rng, b.shared_prefix_len) if b.shared_prefix_len else []
    reqs = [BenchRequest(prefix + space.draw(rng, k), int(o)) for k, o in zip(in_lens, out_lens)]
    if b.request_rate is not None:
        gaps = rng.exponential(1.0 / b.request_rate, size=n)
        t = 0.0
        for r, g in zip(reqs, gaps):
            r.arrival = t
            t += float(g)
    return reqs


class Workload:
    """A registered workload: how its requests are sent. Numbers are in cfg.bench."""

    name = "base"
    transport = "engine"  # "engine": engine.add_request streams; "http": the OpenAI endpoint
    description = ""

    def requests(self, b: BenchConfig, space: TokenSpace) -> list[BenchRequest]:
        return make_requests(b, space)


@BENCHMARKS.register("offline")
class Offline(Workload):
    name = "offline"
    description = "random prompts and output lengths, all sent at once (throughput)"


@BENCHMARKS.register("batch1")
class Batch1(Workload):
    name = "batch1"
    description = "one request at a time (latency, model-bandwidth utilization)"

    def requests(self, b: BenchConfig, space: TokenSpace) -> list[BenchRequest]:
        if b.num_requests != 1:
            raise ConfigError(f"bench.workload=batch1 runs one request; bench.num_requests={b.num_requests}")
        return make_requests(b, space)


@BENCHMARKS.register("shared_prefix")
class SharedPrefix(Workload):
    name = "shared_prefix"
    description = "one common prompt prefix plus each request's own tokens (prefix caching)"

    def requests(self, b: BenchConfig, space: TokenSpace) -> list[BenchRequest]:
        if b.shared_prefix_len < 1:
            raise ConfigError("bench.workload=shared_prefix needs bench.shared_prefix_len >= 1")
        return make_requests(b, space)


@BENCHMARKS.register("serving")
class Serving(Workload):
    name = "serving"
    transport = "http"
    description = "the OpenAI HTTP endpoint, streamed, Poisson arrivals or fixed concurrency"


def get_workload(name: str) -> Workload:
    return BENCHMARKS.get(name)()


def engine_requests(b: BenchConfig, engine) -> list[BenchRequest]:
    """The workload's requests for a built engine (its vocabulary, tokenizer and EOS ids)."""
    space = token_space(engine.vocab_size, engine.tokenizer, getattr(engine, "eos_token_ids", ()))
    return get_workload(b.workload).requests(b, space)


def warmup_requests(b: BenchConfig, reqs: list[BenchRequest]) -> list[BenchRequest]:
    """The bench's warm-up (bench.warmup requests): small ones that compile and allocate what the
    first real step would otherwise pay for, and cache no more than the first page of a prompt."""
    n = min(16, min(len(r.prompt) for r in reqs))
    # A constrained request's grammar compiles (and the grammar tokenizer is built) in the warm-up.
    return [
        BenchRequest(reqs[i % len(reqs)].prompt[:n], 8, structured=reqs[i % len(reqs)].structured)
        for i in range(b.warmup)
    ]


def warm_requests(llm, b: BenchConfig) -> tuple[list[BenchRequest], list]:
    """For the profiling scripts: the requests with greedy params (EOS ignored), after the bench's
    own warm-up, so the timed run starts as cold as the bench's."""

    reqs = engine_requests(b, llm.engine)
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    warm = warmup_requests(b, reqs)
    if warm:
        llm.generate([r.prompt for r in warm], [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in warm])
    return reqs, params
