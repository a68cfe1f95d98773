"""The workload's roofline: the least time its bytes and FLOPs need on this hardware.

The model of a run (an estimate: it is a lower bound, not a prediction):

1. Steps. A simulator replays the workload through the scheduler's batch shape: every step the
   running sequences go first (a decode is one token, an unfinished prompt its next chunk), then
   waiting ones are admitted in order while `scheduler.max_num_batched_tokens`,
   `scheduler.max_num_seqs` and the KV pool (`kv_capacity_tokens`, when known) allow. No preemption
   and no scheduling gaps are modelled; with prefix caching on, a shared prompt prefix is computed
   once. Requests all arrive at t=0 (for Poisson arrivals the limit is also at least the last
   arrival time; the runner applies that).
2. Bytes per step. The weights are read once per step: every parameter except an untied input
   embedding table (a lookup touches only the batch's rows). Attention reads the KV of every key a
   query attends to once per sequence per step (decode at context L reads L+1 tokens; a prompt chunk
   over `start` cached tokens reads start+n) and writes the KV of the step's new tokens.
   Activations are ignored (they stay in L2/registers in a good kernel).
3. FLOPs per step: 2 x (non-embedding parameters) per token, 2 x vocab x hidden per sampled row
   (the LM head runs only on rows that sample), and 4 x layers x q_heads x head_dim per
   (query, key) pair of attention.
4. Time per step = max(bytes / bandwidth, FLOPs / peak); the limit is the sum over steps, so
   decode steps are bound by memory and big prefill steps by compute, each where it belongs.

Bandwidth and peak (`Figures`) come from nanoslg/bench/hardware.py.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from nanoslg.bench.hardware import Figures
from nanoslg.cache.cascade import MIN_BATCH, MIN_SHARED_TOKENS
from nanoslg.core.errors import ConfigError


# -- model facts -------------------------------------------------------------------------------
@dataclass
class ModelFacts:
    num_params: int
    dtype_bytes: int  # bytes per weight element
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    kv_bytes_per_token: int  # K and V of every layer for one token (whole model, all shards)
    source: str = ""  # where the numbers came from, for the report
    weight_bytes: int | None = None  # bytes a step reads when the engine says (quantized weights)

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def body_params(self) -> int:
        """Parameters of the per-token matmuls (everything but input embedding and LM head)."""
        return self.num_params - self.embed_params * (1 if self.tied_embeddings else 2)

    @property
    def weight_bytes_per_step(self) -> int:
        """Weights a step reads: all of them, except an untied input table (only looked up)."""
        if self.weight_bytes is not None:
            return self.weight_bytes
        read = self.num_params - (0 if self.tied_embeddings else self.embed_params)
        return read * self.dtype_bytes

    @property
    def param_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


def hf_text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def count_params(cfg: dict) -> int:
    """Parameters of a Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) from its config.json."""
    c = hf_text_config(cfg)
    h, layers, v = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    nq = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nq
    hd = c.get("head_dim") or h // nq
    inter = c["intermediate_size"]
    attn = h * nq * hd + 2 * h * nkv * hd + nq * hd * h
    model_type = c.get("model_type", "")
    if c.get("attention_bias", False):  # Llama's flag biases q, k, v and o
        attn += nq * hd + 2 * nkv * hd + h
    elif model_type == "qwen2":  # Qwen2 always biases q, k, v
        attn += nq * hd + 2 * nkv * hd
    if model_type.startswith("qwen3"):  # per-head RMSNorm on q and k
        attn += 2 * hd
    mlp = 3 * h * inter + ((2 * inter + h) if c.get("mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * h
    tied = bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    return layers * per_layer + h + v * h * (1 if tied else 2)


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1}


def facts_from_hf_config(
    cfg: dict,
    dtype_bytes: int,
    num_params: int | None = None,
    kv_dtype_bytes: int | None = None,
    source: str = "config.json",
) -> ModelFacts:
    c = hf_text_config(cfg)
    nq = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nq
    hd = c.get("head_dim") or c["hidden_size"] // nq
    kvb = kv_dtype_bytes or dtype_bytes
    return ModelFacts(
        num_params=num_params if num_params is not None else count_params(cfg),
        dtype_bytes=dtype_bytes,
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        vocab_size=c["vocab_size"],
        num_heads=nq,
        num_kv_heads=nkv,
        head_dim=hd,
        tied_embeddings=bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        kv_bytes_per_token=2 * c["num_hidden_layers"] * nkv * hd * kvb,
        source=source + ("" if num_params is not None else " (parameters counted from the shapes)"),
    )


def facts_from_engine(engine) -> ModelFacts:
    """Model facts of a built engine: its info (what the builder chose) and its checkpoint's config."""
    info = getattr(engine, "info", {}) or {}
    path = info.get("path")
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(
            "the engine does not say where its checkpoint is (engine.info['path']); "
            "the roofline needs the model's shape"
        )
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    dtype_bytes = DTYPE_BYTES.get(str(info.get("dtype", "bfloat16")), 2)
    num_params = info.get("num_params")  # counted from the loaded parameters when the builder gives it
    facts = facts_from_hf_config(
        cfg,
        dtype_bytes,
        num_params,
        source=f"{path}/config.json" + (" + engine.info['num_params']" if num_params else ""),
    )
    if info.get("kv_bytes_per_token"):
        facts.kv_bytes_per_token = int(info["kv_bytes_per_token"])
    if info.get("weight_bytes_per_step"):  # quantized linears at their own width (engine/builder.py)
        facts.weight_bytes = int(info["weight_bytes_per_step"])
    return facts


# -- the step simulator ------------------------------------------------------------------------
@dataclass
class StepLoad:
    bytes: float
    flops: float
    tokens: int
    decodes: int


@dataclass
class _Sim:
    prompt: int
    output: int
    ctx: int = 0  # tokens with KV
    produced: int = 0


def step_load(
    facts: ModelFacts, tokens: int, sampled: int, decodes: int, kv_read: int, kv_write: int, pairs: int
) -> StepLoad:
    """One step's bytes and FLOPs (points 2 and 3 above) from its counts: tokens computed, rows
    sampled, decode rows, KV tokens read and written, and (query, key) pairs attended."""
    nbytes = facts.weight_bytes_per_step + (kv_read + kv_write) * facts.kv_bytes_per_token
    flops = (
        2 * facts.body_params * tokens
        + 2 * facts.vocab_size * facts.hidden_size * sampled
        + 4 * facts.num_layers * facts.num_heads * facts.head_dim * pairs
    )
    return StepLoad(nbytes, flops, tokens, decodes)


def simulate(
    requests: Sequence[tuple[int, int]],
    facts: ModelFacts,
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    kv_capacity_tokens: int | None = None,
    shared_prefix_len: int = 0,
    prefix_caching: bool = False,
    cascade: bool = False,
) -> list[StepLoad]:
    """Bytes and FLOPs of every step for requests given as (prompt tokens, output tokens). With prefix
    caching and cascade attention, a decode step of sequences that all share the cached prefix reads
    that prefix once (as the engine does: nanoslg/cache/cascade.py)."""

    waiting = deque(_Sim(p, max(1, o)) for p, o in requests)
    running: list[_Sim] = []
    steps: list[StepLoad] = []
    prefix_done = False
    while waiting or running:
        budget = max_num_batched_tokens
        tokens = sampled = decodes = 0
        kv_read = kv_write = pairs = 0

        def run(r: _Sim, n: int) -> None:
            nonlocal tokens, sampled, decodes, kv_read, kv_write, pairs, budget, prefix_done
            start = r.ctx
            kv_read += start + n
            kv_write += n
            pairs += n * start + n * (n + 1) // 2
            tokens += n
            budget -= n
            r.ctx += n
            if shared_prefix_len and r.ctx >= shared_prefix_len:
                prefix_done = True  # later admissions find the shared prefix cached
            if r.ctx >= r.prompt:  # the prompt is done (or this is a decode): a token is sampled
                if start >= r.prompt:
                    decodes += 1
                sampled += 1
                r.produced += 1

        for r in running:
            if budget == 0:
                break
            run(r, 1 if r.ctx >= r.prompt else min(r.prompt - r.ctx, budget))
        used = sum(r.ctx for r in running)
        while waiting and budget > 0 and len(running) < max_num_seqs:
            r = waiting[0]
            if prefix_caching and prefix_done and shared_prefix_len:
                r.ctx = min(shared_prefix_len, r.prompt - 1)  # a prompt always computes its last token
            n = min(r.prompt - r.ctx, budget)
            if kv_capacity_tokens is not None and running and used + r.ctx + n > kv_capacity_tokens:
                r.ctx = 0
                break
            waiting.popleft()
            running.append(r)
            used += r.ctx + n
            run(r, n)
        if (
            cascade
            and prefix_caching
            and shared_prefix_len >= MIN_SHARED_TOKENS
            and decodes == tokens
            and decodes >= MIN_BATCH
        ):
            kv_read -= (decodes - 1) * shared_prefix_len
        steps.append(step_load(facts, tokens, sampled, decodes, kv_read, kv_write, pairs))
        running = [r for r in running if r.produced < r.output]
    return steps


def roofline(steps: Sequence[StepLoad], figures: Figures, facts: ModelFacts) -> dict:
    mem = [s.bytes / figures.bandwidth for s in steps]
    comp = [s.flops / figures.peak_flops for s in steps]
    limit = sum(max(m, c) for m, c in zip(mem, comp))
    return {
        "limit_s": limit,
        "memory_s": sum(mem),
        "compute_s": sum(comp),
        "steps": len(steps),
        "memory_bound_steps": sum(1 for m, c in zip(mem, comp) if m >= c),
        "bytes": sum(s.bytes for s in steps),
        "weight_bytes": facts.weight_bytes_per_step * len(steps),
        "kv_bytes": sum(s.bytes for s in steps) - facts.weight_bytes_per_step * len(steps),
        "flops": sum(s.flops for s in steps),
        "bandwidth_Bps": figures.bandwidth,
        "peak_flops": figures.peak_flops,
        "figures": figures.describe(),
        "model": asdict(facts),
    }


def fraction_of_limit(limit_s: float, measured_s: float) -> float | None:
    """How close a run came to the limit: 1.0 means it ran at the limit."""
    return limit_s / measured_s if measured_s > 0 else None


def decode_bytes(facts: ModelFacts, prompt_len: int, output_len: int) -> float:
    """Bytes one sequence's decode steps read and write (weights each step, KV of its context)."""
    steps = max(0, output_len - 1)
    # Decode step t (1..steps) attends p + t keys and writes one token's KV.
    kv_tokens = sum(prompt_len + t + 1 for t in range(1, steps + 1))
    return steps * facts.weight_bytes_per_step + kv_tokens * facts.kv_bytes_per_token


def mbu(facts: ModelFacts, figures: Figures, prompt_len: int, output_len: int, decode_time_s: float) -> float | None:
    """Model-bandwidth utilization of a batch-1 decode: bytes moved per second over the bandwidth."""
    if decode_time_s <= 0 or output_len < 2:
        return None
    return decode_bytes(facts, prompt_len, output_len) / decode_time_s / figures.bandwidth
