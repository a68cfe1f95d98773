"""Builds this rank's model runner from the config: checkpoint, device, dtype, model, KV backend.

Every parallel strategy calls this on each of its ranks; `parallel.state` must be set first so the
model builds only this rank's shard and stage.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from nanoslg.cache.auto import resolve_backend
from nanoslg.cache.base import CacheBackend, KVSpec
from nanoslg.config import Config
from nanoslg.errors import ConfigError
from nanoslg.model.hf_config import ModelArgs, load_args, shape_path
from nanoslg.model.loader import load_model, resolve_dtype
from nanoslg.model.runner import ModelRunner
from nanoslg.model.sampler import Sampler
from nanoslg.parallel.state import get_state
from nanoslg.registry import CACHE_BACKENDS

log = logging.getLogger("nanoslg.build")


@dataclass
class Checkpoint:
    path: str  # folder with config.json (and weights unless dummy)
    args: ModelArgs
    has_weights: bool
    has_tokenizer: bool


def resolve_checkpoint(cfg: Config) -> Checkpoint:
    m = cfg.model
    if m.path:
        path = os.path.expanduser(m.path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model.path={m.path!r} is not a checkpoint folder (no config.json there)")
    elif m.shape:
        path = _shape_dir(m.shape)
    elif m.name == "demo":
        from nanoslg.model.demo import ensure_demo_checkpoint

        path = ensure_demo_checkpoint()
    else:
        raise ConfigError(f"model.path is required for model={m.name!r} (a Hugging Face checkpoint folder)")
    args = load_args(path)
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(path))
    has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    if m.load_format != "dummy" and not has_weights:
        raise ConfigError(f"no *.safetensors in {path}; set model.path to a checkpoint with weights, "
                          "or model.load_format=dummy for random weights")
    return Checkpoint(path, args, has_weights, has_tok)


def _shape_dir(shape: str) -> str:
    """A bundled shape is one json file; the loader wants a folder with config.json, so make one."""
    src = shape_path(shape)
    cache = os.path.join(os.environ.get("NANOSLG_CACHE", os.path.expanduser("~/.cache/nanoslg")), "shapes", shape)
    os.makedirs(cache, exist_ok=True)
    dst = os.path.join(cache, "config.json")
    with open(src) as f:
        text = f.read()
    if not os.path.exists(dst) or open(dst).read() != text:
        tmp = f"{dst}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, dst)
    return cache


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.model.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but CUDA is not available; allowed here: auto, cpu")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


@dataclass
class RankRuntime:
    runner: ModelRunner
    backend: CacheBackend
    backend_name: str
    backend_reason: str
    spec: KVSpec
    dtype_reason: str


def step_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The CUDA stream a rank runs its steps on (None on the CPU). It starts after everything queued
    so far: the weights and the KV pool were written on the default stream."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.Stream(device)


def on_stream(stream: Optional[torch.cuda.Stream]):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def build_runner(cfg: Config, ckpt: Checkpoint, device: torch.device, sample: bool) -> RankRuntime:
    """Loads this rank's model and KV backend (the pool is sized later by `size_kv_pool`)."""
    st = get_state()
    args = ckpt.args
    dtype, dtype_reason = resolve_dtype(cfg.model.dtype, args, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        set_blas(cfg.model.blas)
    model = load_model(ckpt.path, args, dtype=dtype, device=device,
                       load_format="dummy" if cfg.model.load_format == "dummy" else "safetensors",
                       seed=cfg.model.seed)
    name, reason = resolve_backend(cfg.cache, device, dtype)
    backend_cls = CACHE_BACKENDS.get(name)
    first, last = st.stage_layers
    num_layers = (args.num_layers if last == -1 else last) - first
    kv_heads = max(1, args.num_kv_heads // st.tp_size)
    spec = KVSpec(num_layers, kv_heads, args.head_dim, dtype, device, args.num_heads // st.tp_size)
    backend = backend_cls(spec, cfg.cache.page_size)
    backend.cascade = bool(cfg.cache.cascade_attention and backend.paged)
    sampler = Sampler(device, kernels=cfg.model.sampling_kernels) if sample else None
    return RankRuntime(ModelRunner(model, backend, sampler, device), backend, name, reason, spec, dtype_reason)


def blas_library(choice: str) -> str:
    """model.blas resolved. auto is cuBLAS: cuBLASLt takes about 4 ms to pick an algorithm for each
    new shape (measured on an H100, torch 2.11), and eager prefill steps bring a new token count
    almost every step; cuBLAS picks in about 0.25 ms, and its kernels ran as fast."""
    return "cublas" if choice == "auto" else choice


def set_blas(choice: str) -> None:
    """Makes model.blas this process's GEMM library (every rank calls it)."""
    torch.backends.cuda.preferred_blas_library(blas_library(choice))


def kv_budget_bytes(cfg: Config, rt: RankRuntime) -> tuple[int, str]:
    """Bytes this rank can give the KV pool, and how that was decided (for the log)."""
    if rt.spec.device.type == "cpu":
        return int(cfg.cache.cpu_kv_gib * 2**30), f"cache.cpu_kv_gib={cfg.cache.cpu_kv_gib}"
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    # Always run the profile forward on the GPU: it also loads every kernel once, on this thread,
    # before the engine's step thread and stream take over.
    peak = profile_activation_bytes(cfg, rt)
    if cfg.cache.max_num_tokens is not None:
        return 0, f"cache.max_num_tokens={cfg.cache.max_num_tokens}"
    used = total - free
    budget = int(total * cfg.cache.gpu_memory_utilization) - used - peak
    why = (f"{cfg.cache.gpu_memory_utilization:.2f} x {total / 2**30:.1f} GiB - {used / 2**30:.2f} GiB in use "
           f"- {peak / 2**30:.2f} GiB activation peak")
    if budget <= 0:
        raise ConfigError(f"no GPU memory left for the KV cache ({why}); raise cache.gpu_memory_utilization "
                          "or lower scheduler.max_num_batched_tokens")
    return budget, why


def profile_activation_bytes(cfg: Config, rt: RankRuntime) -> int:
    """Peak extra memory of a forward over a full token budget (attention without any cache)."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    full_budget_forward(cfg, rt)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    return peak


def warm_step_stream(cfg: Config, rt: RankRuntime, stream: Optional[torch.cuda.Stream]) -> None:
    """One full-budget forward on the step stream, its memory left in the allocator's cache. The
    caching allocator keeps blocks per stream, and the profile forward ran on the default stream and
    gave its memory back: without this, the first big prefill a user sends waits on cudaMalloc."""
    if stream is None:
        return
    with on_stream(stream):
        full_budget_forward(cfg, rt)
    torch.cuda.synchronize()


def full_budget_forward(cfg: Config, rt: RankRuntime) -> None:
    """A forward over scheduler.max_num_batched_tokens tokens (attention without any cache), and the
    logits of up to max_num_seqs rows: the most activation memory a step can take."""
    from nanoslg.cache.sdpa import NoCacheContext

    st, args = get_state(), rt.runner.model.args
    n = min(cfg.scheduler.max_num_batched_tokens, 8192)
    dev = rt.spec.device
    ids = torch.zeros(n, dtype=torch.long, device=dev)
    # Positions wrap at the model's length: the rotary cache has no rows past it.
    ctx = NoCacheContext(torch.arange(n, device=dev) % args.max_position_embeddings, rt.spec.head_dim ** -0.5)
    extra = {}
    if not st.is_first_stage:  # later pipeline stages start from the previous stage's hidden state
        zeros = torch.zeros(n, args.hidden_size, dtype=rt.spec.dtype, device=dev)
        extra = {"hidden": zeros, "residual": zeros.clone()}
    with torch.inference_mode():
        hidden = rt.runner.model(ids, ctx.positions, ctx, **extra)
        if st.is_last_stage:
            rt.runner.model.compute_logits(hidden[:min(n, cfg.scheduler.max_num_seqs)])


def num_pages_for(cfg: Config, rt: RankRuntime, budget_bytes: Optional[int]) -> int:
    page_bytes = rt.spec.bytes_per_token * cfg.cache.page_size
    if cfg.cache.max_num_tokens is not None:
        return -(-cfg.cache.max_num_tokens // cfg.cache.page_size)
    return max(1, budget_bytes // page_bytes)
