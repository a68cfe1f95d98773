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

Bandwidth and peak come from a table of known GPUs (figures below, dense bf16 tensor-core peak),
from a device-to-device copy measured now (`bench.extra.bandwidth=measure`), or from numbers given
as `bench.extra.bandwidth_tbs` / `bench.extra.peak_tflops`. On the CPU both are measured (a memcpy
and an fp32 matmul). With several GPUs the figures scale by their count.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

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


def facts_from_hf_config(cfg: dict, dtype_bytes: int, num_params: Optional[int] = None,
                         kv_dtype_bytes: Optional[int] = None, source: str = "config.json") -> ModelFacts:
    c = hf_text_config(cfg)
    nq = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nq
    hd = c.get("head_dim") or c["hidden_size"] // nq
    kvb = kv_dtype_bytes or dtype_bytes
    return ModelFacts(
        num_params=num_params if num_params is not None else count_params(cfg),
        dtype_bytes=dtype_bytes, num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        vocab_size=c["vocab_size"], num_heads=nq, num_kv_heads=nkv, head_dim=hd,
        tied_embeddings=bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        kv_bytes_per_token=2 * c["num_hidden_layers"] * nkv * hd * kvb,
        source=source + ("" if num_params is not None else " (parameters counted from the shapes)"),
    )


def facts_from_engine(engine) -> ModelFacts:
    """Model facts of a built engine: its info (what the builder chose) and its checkpoint's config."""
    info = getattr(engine, "info", {}) or {}
    path = info.get("path")
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError("the engine does not say where its checkpoint is (engine.info['path']); "
                          "the roofline needs the model's shape")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    dtype_bytes = DTYPE_BYTES.get(str(info.get("dtype", "bfloat16")), 2)
    num_params = info.get("num_params")  # counted from the loaded parameters when the builder gives it
    facts = facts_from_hf_config(cfg, dtype_bytes, num_params, source=f"{path}/config.json"
                                 + (" + engine.info['num_params']" if num_params else ""))
    if info.get("kv_bytes_per_token"):
        facts.kv_bytes_per_token = int(info["kv_bytes_per_token"])
    if info.get("weight_bytes_per_step"):  # quantized linears at their own width (engine/builder.py)
        facts.weight_bytes = int(info["weight_bytes_per_step"])
    return facts


# -- hardware figures --------------------------------------------------------------------------
@dataclass
class GpuSpec:
    name: str
    bandwidth_spec: float  # bytes/s, datasheet
    bandwidth_copy: Optional[float]  # bytes/s, what a device-to-device copy reaches (when known)
    flops_bf16: float  # dense bf16 tensor-core FLOP/s
    flops_fp32: float


TB, TF = 1e12, 1e12
# (substrings that must all appear in the lower-cased device name, spec); the first match wins.
GPU_TABLE: list[tuple[tuple[str, ...], GpuSpec]] = [
    (("h100", "pcie"), GpuSpec("H100 PCIe", 2.0 * TB, None, 756 * TF, 51 * TF)),
    (("h100", "nvl"), GpuSpec("H100 NVL", 3.9 * TB, None, 835 * TF, 60 * TF)),
    (("h100",), GpuSpec("H100 SXM", 3.35 * TB, 3.0 * TB, 989 * TF, 67 * TF)),
    (("h200",), GpuSpec("H200", 4.8 * TB, None, 989 * TF, 67 * TF)),
    (("a100", "80"), GpuSpec("A100-80G", 2.0 * TB, None, 312 * TF, 19.5 * TF)),
    (("a100",), GpuSpec("A100-40G", 1.555 * TB, None, 312 * TF, 19.5 * TF)),
    (("l40s",), GpuSpec("L40S", 0.864 * TB, None, 362 * TF, 91.6 * TF)),
]


def lookup_gpu(device_name: str) -> Optional[GpuSpec]:
    name = device_name.lower()
    for keys, spec in GPU_TABLE:
        if all(k in name for k in keys):
            return spec
    return None


@dataclass
class Figures:
    bandwidth: float  # bytes/s for all devices together
    peak_flops: float  # FLOP/s for all devices together
    bandwidth_source: str
    flops_source: str
    device_name: str
    num_devices: int = 1

    def describe(self) -> str:
        per = f" x {self.num_devices} devices" if self.num_devices > 1 else ""
        return (f"{self.device_name}{per}: {self.bandwidth / self.num_devices / TB:.2f} TB/s "
                f"({self.bandwidth_source}), {self.peak_flops / self.num_devices / TF:.1f} TFLOP/s "
                f"({self.flops_source})")


def measure_bandwidth(device: str = "cuda", nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy (each copied byte is read once and written once)."""
    import torch

    dev = torch.device(device)
    nbytes = nbytes or (256 << 20 if dev.type == "cuda" else 64 << 20)  # far above any L2 cache
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000.0
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        best = min(best, dt)
    del src, dst
    return 2 * nbytes / best


def measure_matmul_flops(device: str = "cpu", n: int = 1024, dtype=None, repeats: int = 3) -> float:
    """FLOP/s of a square matmul (the CPU has no table entry)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def resolve_figures(device_type: str, device_name: str, dtype: str = "bfloat16", num_devices: int = 1,
                    bandwidth: str = "table", bandwidth_tbs: Optional[float] = None,
                    peak_tflops: Optional[float] = None, device: Optional[str] = None) -> Figures:
    """Picks bandwidth and peak FLOP/s: given numbers first, then `bandwidth` (table|spec|measure)."""
    if bandwidth not in ("table", "spec", "measure"):
        raise ConfigError(f"bench.extra.bandwidth={bandwidth!r} is not allowed; allowed: table, spec, measure")
    spec = lookup_gpu(device_name) if device_type == "cuda" else None
    dev = device or device_type
    if bandwidth_tbs:
        bw, bw_src = bandwidth_tbs * TB, "bench.extra.bandwidth_tbs"
    elif device_type != "cuda" or spec is None or bandwidth == "measure":
        bw = measure_bandwidth(dev)
        bw_src = "measured now: device-to-device copy" if device_type == "cuda" else "measured now: memcpy"
    elif bandwidth == "table" and spec.bandwidth_copy:
        bw, bw_src = spec.bandwidth_copy, f"table: {spec.name} measured copy"
    else:
        bw, bw_src = spec.bandwidth_spec, f"table: {spec.name} datasheet"
    if peak_tflops:
        fl, fl_src = peak_tflops * TF, "bench.extra.peak_tflops"
    elif spec is not None:
        fp32 = dtype == "float32"
        fl = spec.flops_fp32 if fp32 else spec.flops_bf16
        fl_src = f"table: {spec.name} dense {'fp32' if fp32 else 'bf16'}"
    else:
        fl, fl_src = measure_matmul_flops(dev), "measured now: fp32 matmul"
    return Figures(bw * num_devices, fl * num_devices, bw_src, fl_src, device_name, num_devices)


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


def simulate(requests: Sequence[tuple[int, int]], facts: ModelFacts, *, max_num_seqs: int,
             max_num_batched_tokens: int, kv_capacity_tokens: Optional[int] = None,
             shared_prefix_len: int = 0, prefix_caching: bool = False, cascade: bool = False) -> list[StepLoad]:
    """Bytes and FLOPs of every step for requests given as (prompt tokens, output tokens). With prefix
    caching and cascade attention, a decode step of sequences that all share the cached prefix reads
    that prefix once (as the engine does: nanoslg/cache/cascade.py)."""
    from nanoslg.cache.cascade import MIN_BATCH, MIN_SHARED_TOKENS

    waiting = deque(_Sim(p, max(1, o)) for p, o in requests)
    running: list[_Sim] = []
    steps: list[StepLoad] = []
    prefix_done = False
    attn_flops_per_pair = 4 * facts.num_layers * facts.num_heads * facts.head_dim
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
        if (cascade and prefix_caching and shared_prefix_len >= MIN_SHARED_TOKENS and decodes == tokens
                and decodes >= MIN_BATCH):
            kv_read -= (decodes - 1) * shared_prefix_len
        nbytes = facts.weight_bytes_per_step + (kv_read + kv_write) * facts.kv_bytes_per_token
        flops = (2 * facts.body_params * tokens + 2 * facts.vocab_size * facts.hidden_size * sampled
                 + attn_flops_per_pair * pairs)
        steps.append(StepLoad(nbytes, flops, tokens, decodes))
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


def fraction_of_limit(limit_s: float, measured_s: float) -> Optional[float]:
    """How close a run came to the limit: 1.0 means it ran at the limit."""
    return limit_s / measured_s if measured_s > 0 else None


def decode_bytes(facts: ModelFacts, prompt_len: int, output_len: int) -> float:
    """Bytes one sequence's decode steps read and write (weights each step, KV of its context)."""
    steps = max(0, output_len - 1)
    # Decode step t (1..steps) attends p + t keys and writes one token's KV.
    kv_tokens = sum(prompt_len + t + 1 for t in range(1, steps + 1))
    return steps * facts.weight_bytes_per_step + kv_tokens * facts.kv_bytes_per_token


def mbu(facts: ModelFacts, figures: Figures, prompt_len: int, output_len: int, decode_time_s: float) -> Optional[float]:
    """Model-bandwidth utilization of a batch-1 decode: bytes moved per second over the bandwidth."""
    if decode_time_s <= 0 or output_len < 2:
        return None
    return decode_bytes(facts, prompt_len, output_len) / decode_time_s / figures.bandwidth
