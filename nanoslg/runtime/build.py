"""One rank's start-up: model, KV backend, sampler, GEMM library, KV pool size, CUDA graphs, stream.

Every parallel strategy calls this on each of its ranks; the rank's `core.dist` state must be set
first so the model builds only this rank's shard and stage.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanoslg.cache.auto import resolve_backend
from nanoslg.cache.backend import CacheBackend, KVSpec
from nanoslg.cache.kv_quant import resolve_kv_dtype
from nanoslg.cache.sdpa import NoCacheContext
from nanoslg.core.config import Config
from nanoslg.core.dist import get_state
from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import CACHE_BACKENDS
from nanoslg.model.checkpoint import Checkpoint
from nanoslg.model.loader import load_model, resolve_dtype
from nanoslg.model.sampler import Sampler
from nanoslg.runtime import piecewise
from nanoslg.runtime.draft import build_drafter
from nanoslg.runtime.piecewise import PiecewiseGraphs
from nanoslg.runtime.runner import ModelRunner

log = logging.getLogger("nanoslg.build")


@dataclass
class RankRuntime:
    runner: ModelRunner
    backend: CacheBackend
    backend_name: str
    backend_reason: str
    spec: KVSpec
    dtype_reason: str
    quant: str = "none"  # the quantization method, its settings and kernels (for the start-up log)
    weight_bytes: int = 0  # this rank's weights as stored
    kv_scales: str = ""  # where an FP8 pool's scales came from
    piecewise_tokens: int = 0  # prefill and mixed steps of up to this many tokens replay piecewise graphs
    piecewise_why: str = ""  # why they do, up to that count, or why not (for the log)


def step_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The CUDA stream a rank runs its steps on (None on the CPU). It starts after everything queued
    so far: the weights and the KV pool were written on the default stream."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.Stream(device)


def on_stream(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def build_runner(cfg: Config, ckpt: Checkpoint, device: torch.device, sample: bool) -> RankRuntime:
    """Loads this rank's model and KV backend (the pool is sized later by `size_kv_pool`)."""
    st = get_state()
    args = ckpt.args
    dtype, dtype_reason = resolve_dtype(cfg.model.dtype, args, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        set_blas(cfg.model.blas)
    model = load_model(
        ckpt.path,
        args,
        dtype=dtype,
        device=device,
        load_format="dummy" if cfg.model.load_format == "dummy" else "safetensors",
        seed=cfg.model.seed,
        quantization=cfg.model.quantization,
        dummy_init=cfg.model.dummy_init,
    )
    name, reason = resolve_backend(cfg.cache, device, dtype)
    backend_cls = CACHE_BACKENDS.get(name)
    first, last = st.stage_layers
    num_layers = (args.num_layers if last == -1 else last) - first
    kv_heads = max(1, args.num_kv_heads // st.tp_size)
    spec = KVSpec(num_layers, kv_heads, args.head_dim, dtype, device, args.num_heads // st.tp_size)
    spec.max_model_len = cfg.model.max_model_len or args.max_position_embeddings
    kv_scales = ""
    spec.kv_dtype = resolve_kv_dtype(cfg.cache.kv_dtype)
    if spec.kv_dtype is not None:
        spec.kv_scales = model.kv_scales()
        found = getattr(model, "kv_scales_loaded", 0)
        kv_scales = f"per-layer scales from the checkpoint ({found} tensors)" if found else "scale 1.0"
    backend = backend_cls(spec, cfg.cache.page_size)
    backend.cascade = bool(cfg.cache.cascade_attention and backend.paged)
    chosen = backend.configure(cfg.cache)
    reason = f"{reason}; {chosen}" if chosen else reason
    sampler = Sampler(device, kernels=cfg.model.sampling_kernels) if sample else None
    runner = ModelRunner(model, backend, sampler, device)
    # The engine's lookahead hold reads each step's device time; no other path pays for timing events.
    runner.time_steps = device.type == "cuda" and cfg.scheduler.overlap and cfg.scheduler.hold_lookahead
    # One rank only: the builder turns speculation off for tp/pp (this also covers ranks started alone).
    if cfg.speculative.method == "draft" and sampler is not None and st.tp_size == st.pp_size == 1:
        runner.drafter = build_drafter(cfg, ckpt, model, sampler)
    quant = model.quant.describe() if model.quant is not None else "none"
    rt = RankRuntime(runner, backend, name, reason, spec, dtype_reason, quant, stored_bytes(model), kv_scales)
    rt.piecewise_tokens, rt.piecewise_why = piecewise_choice(cfg, model, device)
    return rt


def piecewise_choice(cfg: Config, model, device: torch.device) -> tuple[int, str]:
    """(largest bucket, why) for model.piecewise_graphs: (0, why not) where they cannot run."""
    st, m = get_state(), cfg.model
    why_not = None
    if m.piecewise_graphs == "off" or m.enforce_eager:
        why_not = "model.piecewise_graphs=off" if m.piecewise_graphs == "off" else "model.enforce_eager=true"
    elif device.type != "cuda":
        why_not = f"no CUDA graphs on {device.type}"
    elif st.tp_size > 1 or st.pp_size > 1:
        why_not = "one GPU and one pipeline stage only"
    elif model.quant is not None:
        why_not = f"not captured with {model.quant.name} linears"
    else:
        why_not = piecewise.unavailable()
    if why_not is not None:
        return 0, why_not
    budget = cfg.scheduler.max_num_batched_tokens
    if m.piecewise_max_tokens is not None:
        n = min(m.piecewise_max_tokens, budget)
        return n, f"model.piecewise_max_tokens={m.piecewise_max_tokens}"
    params = sum(p.numel() for p in model.parameters())
    n = piecewise.auto_max_tokens(budget, params)
    return n, f"auto: up to where a step's GEMMs outlast its eager launch ({params / 1e9:.2f} B parameters)"


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's weights as they sit in memory (quantized ones at their own width)."""
    skip = ("cos_sin_cache", "k_scale", "v_scale")  # the rotary table and KV-cache scales are not weights
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if not n.endswith(skip))]
    seen, total = set(), 0
    for t in tensors:  # a tied LM head shares the embedding's tensor
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def blas_library(choice: str) -> str:
    """model.blas resolved. auto is cuBLAS: cuBLASLt takes much longer to pick an algorithm for each
    new shape, and eager prefill steps bring a new token count almost every step, while the kernels
    both pick run as fast (experiments/gemm_first_call.py; figures in experiments/README.md)."""
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
    # Piecewise graphs keep their own pool: about the activation peak of their largest bucket.
    pieces = int(peak * min(1.0, rt.piecewise_tokens / profile_tokens(cfg)))
    budget = int(total * cfg.cache.gpu_memory_utilization) - used - peak - pieces
    why = (
        f"{cfg.cache.gpu_memory_utilization:.2f} x {total / 2**30:.1f} GiB - {used / 2**30:.2f} GiB in use "
        f"- {peak / 2**30:.2f} GiB activation peak"
    )
    if pieces:
        why += f" - {pieces / 2**30:.2f} GiB for piecewise graphs"
    if budget <= 0:
        raise ConfigError(
            f"no GPU memory left for the KV cache ({why}); raise cache.gpu_memory_utilization "
            "or lower scheduler.max_num_batched_tokens"
        )
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


def warm_step_stream(cfg: Config, rt: RankRuntime, stream: torch.cuda.Stream | None) -> None:
    """One full-budget forward on the step stream, its memory left in the allocator's cache. The
    caching allocator keeps blocks per stream, and the profile forward ran on the default stream and
    gave its memory back: without this, the first big prefill a user sends waits on cudaMalloc."""
    if stream is None:
        return
    with on_stream(stream):
        full_budget_forward(cfg, rt)
    torch.cuda.synchronize()


def profile_tokens(cfg: Config) -> int:
    """The token count of the profile forward (full_budget_forward): the step budget, at most 8,192."""
    return min(cfg.scheduler.max_num_batched_tokens, 8192)


def full_budget_forward(cfg: Config, rt: RankRuntime) -> None:
    """A forward over scheduler.max_num_batched_tokens tokens (attention without any cache), and the
    logits of up to max_num_seqs rows: the most activation memory a step can take."""
    st, args = get_state(), rt.runner.model.args
    n = profile_tokens(cfg)
    dev = rt.spec.device
    ids = torch.zeros(n, dtype=torch.long, device=dev)
    # Positions wrap at the model's length: the rotary cache has no rows past it.
    ctx = NoCacheContext(torch.arange(n, device=dev) % args.max_position_embeddings, rt.spec.head_dim**-0.5)
    extra = {}
    if not st.is_first_stage:  # later pipeline stages start from the previous stage's hidden state
        zeros = torch.zeros(n, args.hidden_size, dtype=rt.spec.dtype, device=dev)
        extra = {"hidden": zeros, "residual": zeros.clone()}
    with torch.inference_mode():
        hidden = rt.runner.model(ids, ctx.positions, ctx, **extra)
        if st.is_last_stage:
            rt.runner.model.compute_logits(hidden[: min(n, cfg.scheduler.max_num_seqs)])


def num_pages_for(cfg: Config, rt: RankRuntime, budget_bytes: int | None) -> int:
    # A draft model's pool gets as many pages as the target's, so each page counts both.
    draft = rt.runner.drafter.spec.bytes_per_token if rt.runner.drafter is not None else 0
    page_bytes = (rt.spec.bytes_per_token + draft) * cfg.cache.page_size
    if cfg.cache.max_num_tokens is not None:
        return -(-cfg.cache.max_num_tokens // cfg.cache.page_size)
    return max(1, budget_bytes // page_bytes)


def capture_piecewise(rt: RankRuntime) -> None:
    """Captures the piecewise graphs of prefill and mixed steps where piecewise_choice allowed them."""
    if not rt.piecewise_tokens:
        log.info("prefill and mixed steps run eagerly (no piecewise CUDA graphs): %s", rt.piecewise_why)
        return
    log.info(
        "prefill and mixed steps of up to %d tokens: piecewise CUDA graphs (%s)", rt.piecewise_tokens, rt.piecewise_why
    )
    pieces = PiecewiseGraphs(rt.runner.model, rt.piecewise_tokens, rt.spec.device)
    pieces.capture()
    rt.runner.pieces = pieces


def allocate_kv(cfg: Config, rt: RankRuntime, num_pages: int, graphs: bool) -> None:
    """Allocates the KV pool, then captures decode CUDA graphs over it where they can run: a backend
    with graph hooks on a GPU, unless model.enforce_eager (and the strategy allows them)."""
    rt.backend.allocate(num_pages)
    if rt.runner.drafter is not None:
        rt.runner.drafter.backend.allocate(num_pages)
    if not graphs:
        return
    capture_piecewise(rt)
    if cfg.model.enforce_eager or rt.spec.device.type != "cuda" or not rt.backend.supports_graphs:
        why = (
            "model.enforce_eager=true"
            if cfg.model.enforce_eager
            else f"the {rt.backend_name} backend on {rt.spec.device.type} has no graph hooks"
        )
        log.info("decode runs eagerly (no CUDA graphs): %s", why)
        return
    max_len = cfg.model.max_model_len or rt.runner.model.args.max_position_embeddings
    rt.runner.capture_graphs(min(cfg.scheduler.max_num_seqs, 512), max_len)
