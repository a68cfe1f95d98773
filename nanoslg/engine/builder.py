"""Turns a validated config into a running-ready AsyncEngine, through the registries."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch

from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.core.registry import PARALLEL, SCHEDULERS
from nanoslg.engine.async_engine import AsyncEngine
from nanoslg.model.checkpoint import resolve_checkpoint
from nanoslg.model.loader import weight_bytes
from nanoslg.parallel.auto import resolve_parallel
from nanoslg.parallel.executor import Executor
from nanoslg.runtime.build import blas_library
from nanoslg.scheduler.scheduler import Scheduler
from nanoslg.scheduler.speculative import Speculator

log = logging.getLogger("nanoslg")


def build_engine(cfg: Config) -> AsyncEngine:
    t0 = time.perf_counter()
    started = os.environ.get("NANOSLG_STARTED")  # set by run.py: where a cold start's time goes
    if started:
        log.info("building the engine: the config was read %.1f s after run.py started", time.time() - float(started))
    ckpt = resolve_checkpoint(cfg)
    cfg = resolve_parallel(cfg, ckpt)
    cfg = _speculative(cfg)
    args = ckpt.args
    max_len = cfg.model.max_model_len or args.max_position_embeddings
    if max_len > args.max_position_embeddings:
        raise ConfigError(
            f"model.max_model_len={max_len} is over the checkpoint's "
            f"max_position_embeddings={args.max_position_embeddings}"
        )
    t1 = time.perf_counter()
    executor: Executor = PARALLEL.get(cfg.parallel.mode)(cfg, ckpt)
    t2 = time.perf_counter()
    backend = executor.backend
    kv = backend.make_manager(executor.num_pages, cfg.cache.page_size, cfg.cache.prefix_caching)
    scheduler = Scheduler(cfg.scheduler, kv, SCHEDULERS.get(cfg.scheduler.policy)(cfg.scheduler))
    if cfg.speculative.method != "none":
        scheduler.speculator = Speculator(cfg.speculative, executor.num_pages, cfg.cache.page_size)
    tokenizer = _tokenizer(cfg, ckpt)
    t3 = time.perf_counter()
    _check_draft_tokenizer(cfg, ckpt, tokenizer)
    eos = _eos_ids(ckpt.path, args, tokenizer)
    pool_bytes = executor.num_pages * cfg.cache.page_size * backend.spec.bytes_per_token
    rt = executor.rt
    model = rt.runner.model
    whole_weights, step_weights = weight_bytes(args, model.quant, _elem(backend.spec.dtype))
    name = cfg.server.served_model_name or (
        os.path.basename(os.path.normpath(cfg.model.path)) if cfg.model.path else cfg.model.name
    )
    info = {
        "model": name,
        "path": ckpt.path,
        "architecture": args.architecture,
        "load_format": "dummy" if cfg.model.load_format == "dummy" else "safetensors",
        "device": str(executor.device),
        "dtype": str(backend.spec.dtype).replace("torch.", ""),
        "dtype_reason": rt.dtype_reason,
        "cache_backend": rt.backend_name,
        "cache_reason": rt.backend_reason,
        "parallel": f"{cfg.parallel.mode} (tp={cfg.parallel.tp_size}, pp={cfg.parallel.pp_size})",
        "kv_pages": executor.num_pages,
        "kv_tokens": kv.capacity_tokens,
        "kv_gib": pool_bytes / 2**30,
        "kv_budget": executor.budget_why if cfg.cache.max_num_tokens is None else "cache.max_num_tokens",
        "prefix_caching": bool(cfg.cache.prefix_caching and kv.paged),
        "max_model_len": max_len,
        "cascade_attention": bool(backend.cascade),
        "overlap": executor.overlap,
        "speculative": cfg.speculative.method,
        "speculative_tokens": cfg.speculative.num_tokens if cfg.speculative.method != "none" else 0,
        # Resolved by rank 0's sampler (None where sampling runs in worker processes).
        "sampling_kernels": rt.runner.sampler.kernels if rt.runner.sampler else None,
        "blas": blas_library(cfg.model.blas) if executor.device.type == "cuda" else None,
        "cuda_graphs": rt.runner.graphs is not None,
        "quantization": model.quant.name if model.quant is not None else "none",
        "quantization_detail": rt.quant,
        "kv_dtype": str(backend.spec.cache_dtype).replace("torch.", ""),
        # The whole model's KV per token (every layer and KV head), whatever the sharding.
        "kv_bytes_per_token": 2 * args.num_layers * args.num_kv_heads * args.head_dim * _elem(backend.spec.cache_dtype),
        # The whole model's weights as stored (quantized linears at their width), and what a step reads
        # of them (all but an untied input embedding): the roofline's weight bytes.
        "weight_bytes": whole_weights,
        "weight_bytes_per_step": step_weights,
        "weight_gib_rank0": rt.weight_bytes / 2**30,
        # Seconds per start-up phase (the executor's own where it reports them).
        "startup_s": {
            "checkpoint": t1 - t0,
            **(getattr(executor, "startup_s", None) or {"executor": t2 - t1}),
            "tokenizer": t3 - t2,
        },
    }
    log.info(
        "model %s (%s, %s) on %s, dtype %s: %s",
        info["model"],
        args.architecture,
        info["load_format"],
        info["device"],
        info["dtype"],
        info["dtype_reason"],
    )
    log.info("parallel %s; cache backend %s: %s", info["parallel"], info["cache_backend"], info["cache_reason"])
    log.info(
        "weights: %.2f GiB on rank 0 (%.2f GiB for the whole model); quantization %s",
        info["weight_gib_rank0"],
        whole_weights / 2**30,
        info["quantization_detail"],
    )
    log.info(
        "overlap scheduling %s; decode CUDA graphs %s; sampling kernels %s (model.sampling_kernels=%s)%s",
        _overlap_why(cfg, info["overlap"]),
        "on" if info["cuda_graphs"] else "off",
        info["sampling_kernels"] or "on the workers",
        cfg.model.sampling_kernels,
        f"; GEMMs {info['blas']} (model.blas={cfg.model.blas})" if info["blas"] else "",
    )
    log.info(
        "KV pool: %d pages x %d = %d tokens, %.2f GiB, %s (budget: %s); prefix caching %s; cascade attention %s",
        executor.num_pages,
        cfg.cache.page_size,
        kv.capacity_tokens,
        info["kv_gib"],
        _kv_dtype_why(backend.spec, rt.kv_scales),
        info["kv_budget"],
        _prefix_caching_why(cfg, info),
        "on" if info["cascade_attention"] else "off",
    )
    phases = ", ".join(f"{k} {v:.2f}" for k, v in info["startup_s"].items())
    log.info("engine built in %.1f s since the config was read (%s s)", time.perf_counter() - t0, phases)
    return AsyncEngine(
        scheduler,
        executor,
        tokenizer,
        model_name=name,
        max_model_len=max_len,
        vocab_size=args.vocab_size,
        eos_token_ids=eos,
        kv_pool_bytes=pool_bytes,
        info=info,
        hold_lookahead=cfg.scheduler.hold_lookahead,
    )


def _speculative(cfg: Config) -> Config:
    """Speculative decoding runs on one device, without overlap scheduling (each step's accepted
    length must reach the host before the next is planned); its verify steps run eagerly, while
    decode steps of sequences that do not speculate may still replay CUDA graphs."""
    spec = cfg.speculative
    if spec.method == "none":
        return cfg
    if cfg.parallel.mode != "single":
        log.warning("speculative=%s is off: parallel=%s does not support it yet", spec.method, cfg.parallel.mode)
        return dataclasses.replace(cfg, speculative=dataclasses.replace(spec, method="none"))
    detail = f"ngram sizes {spec.ngram.min_n}..{spec.ngram.max_n}" if spec.method == "ngram" else spec.draft.path
    log.info(
        "speculative=%s (%s), %d proposals a step; overlap scheduling off while it is on; verify steps "
        "run eagerly (decode steps without proposals may replay CUDA graphs); requests with penalties, "
        "or min_tokens still to reach, decode without proposals",
        spec.method,
        detail,
        spec.num_tokens,
    )
    return dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, overlap=False))


def _check_draft_tokenizer(cfg: Config, ckpt, tokenizer) -> None:
    """A draft with a tokenizer of its own must have the target's vocabulary, token for token."""
    path = cfg.speculative.draft.path
    if cfg.speculative.method != "draft" or path == "target" or tokenizer is None:
        return
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return
    if _load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"speculative.draft.path={path!r} has another tokenizer than the target {ckpt.path}")


def _prefix_caching_why(cfg: Config, info: dict) -> str:
    if info["prefix_caching"]:
        return "on"
    if not cfg.cache.prefix_caching:
        return "off (cache.prefix_caching=false)"
    picked = " (cache=auto picks it on the CPU)" if cfg.cache.backend == "auto" else ""
    return (
        f"off (the {info['cache_backend']} backend{picked} keeps its pages private, with no prefix tree "
        "to share them; cache=paged turns it on)"
    )


def _overlap_why(cfg: Config, on: bool) -> str:
    if on:
        hold = (
            "after a decode step, shortly before it ends: scheduler.hold_lookahead=true"
            if cfg.scheduler.hold_lookahead
            else "as soon as step N starts: scheduler.hold_lookahead=false"
        )
        return f"on (the host prepares step N+1 while the device runs step N; {hold})"
    if cfg.speculative.method != "none":
        return f"off (speculative={cfg.speculative.method})"
    if not cfg.scheduler.overlap:
        return "off (scheduler.overlap=false)"
    return f"off (parallel={cfg.parallel.mode} runs steps one at a time per stage; overlap needs parallel=single)"


def _kv_dtype_why(spec, scales: str) -> str:
    name = str(spec.cache_dtype).replace("torch.", "")
    if spec.kv_dtype is None:
        return name
    ratio = _elem(spec.dtype) / _elem(spec.cache_dtype)
    model = str(spec.dtype).replace("torch.", "")
    return f"{name} ({scales}; {ratio:g}x the tokens {model} would hold in the same memory)"


def _elem(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tokenizer(cfg: Config, ckpt):
    path = cfg.model.tokenizer or (ckpt.path if ckpt.has_tokenizer else None)
    if path is None:
        log.info("no tokenizer in %s: prompts must be token ids, outputs carry no text", ckpt.path)
        return None
    return _load_tokenizer(path)


def _load_tokenizer(path: str):
    # Imported here, not with the module: transformers takes seconds to import (with the torch
    # modules it pulls in), and a checkpoint without a tokenizer never needs it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _eos_ids(path: str, args, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(x for x in v if isinstance(x, int))

    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        with open(gen) as f:
            add(json.load(f).get("eos_token_id"))
    add(args.eos_token_id)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
