"""bench.peer=hf: the same requests through Hugging Face transformers, in the same run.

transformers >= 4.56 has continuous batching (`model.init_continuous_batching()`, the manager
behind `generate_batch`); it is used when present, with each request's own max_new_tokens and EOS
disabled, and per-token timestamps so TTFT/ITL compare too. Older versions fall back to plain
batched `generate` (left-padded batches of bench.extra.hf_batch_size; throughput only).

The model is the same checkpoint (or, for load_format=dummy, the same config with random weights:
with EOS ignored the values do not change the work) in the same dtype on the same device.
"""

from __future__ import annotations

import inspect
import logging
import os
import time

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from nanoslg.bench.metrics import RequestTiming, summarize
from nanoslg.bench.workloads import BenchRequest
from nanoslg.core.machine import free_device_memory

log = logging.getLogger("nanoslg.bench")


def load_hf_model(path: str, dtype: str, device: str, dummy: bool, seed: int = 0):

    torch_dtype = getattr(torch, dtype)
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(path))
    if dummy or not has_weights:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(seed)
        with torch.device(device):  # initialise on the device: an 8B init on the CPU takes minutes
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    elif torch.device(device).type == "cpu":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    else:
        try:  # straight onto the GPU (needs accelerate)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device)
        except (ValueError, ImportError):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    return model.eval()


def has_continuous_batching(model) -> bool:
    return callable(getattr(model, "init_continuous_batching", None))


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def run_continuous(
    model, requests: list[BenchRequest], warmup: int = 1, progress: bool = True, timeout_s: float = 3600.0
) -> tuple[list[RequestTiming], float]:
    """Runs every request through transformers' continuous batching manager; returns timings, wall."""

    max_new = max(r.max_tokens for r in requests)
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)  # -1: EOS off
    init = model.init_continuous_batching
    kwargs = {"generation_config": gen}
    manager = init(**kwargs)
    manager.start()
    add = manager.add_request
    stamps = _accepts(add, "record_timestamps")
    try:
        if warmup:  # the manager builds its cache and kernels on first use; keep that out of the timing
            for i in range(warmup):
                add(requests[0].prompt[:16], request_id=f"warmup-{i}", max_new_tokens=4)
            _collect(manager, {f"warmup-{i}" for i in range(warmup)}, None, timeout_s)
        timings = {f"r{i}": RequestTiming(len(r.prompt)) for i, r in enumerate(requests)}
        start = time.perf_counter()
        for i, r in enumerate(requests):
            timings[f"r{i}"].arrival = time.perf_counter()
            extra = {"record_timestamps": True} if stamps else {}
            add(r.prompt, request_id=f"r{i}", max_new_tokens=r.max_tokens, **extra)
        bar = tqdm(total=len(requests), desc="transformers", unit="req", disable=not progress)
        results = _collect(manager, set(timings), bar, timeout_s)
        wall = time.perf_counter() - start
        bar.close()
    finally:
        manager.stop(block=True)
    for rid, t in timings.items():
        res = results.get(rid)
        if res is None or getattr(res, "error", None):
            t.finish(t.arrival, error=str(getattr(res, "error", "no result")))
            continue
        toks = list(res.generated_tokens)
        ts = getattr(res, "timestamps", None)
        if ts and len(ts) == len(toks):
            for x in ts:
                t.on_delta(1, x)
        else:  # no per-token times in this version: only the end is known
            t.on_delta(len(toks), res.lifespan[1] if res.lifespan[1] > 0 else time.perf_counter())
        end = res.lifespan[1] if getattr(res, "lifespan", (-1, -1))[1] > 0 else t.chunks[-1][0]
        t.finish(max(end, t.chunks[-1][0]))
    return list(timings.values()), wall


def _collect(manager, ids: set, bar, timeout_s: float) -> dict:
    out: dict = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < len(ids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"transformers did not finish {len(ids) - len(out)} requests in {timeout_s:.0f} s")
        res = manager.get_result(timeout=1)
        if res is None:
            alive = getattr(manager, "is_running", None)
            if alive is not None and not alive():
                raise RuntimeError("transformers' continuous batching thread stopped")
            continue
        if res.request_id in ids and res.is_finished():
            out[res.request_id] = res
            if bar is not None:
                bar.update(1)
    return out


def run_generate(
    model, requests: list[BenchRequest], batch_size: int = 32, progress: bool = True
) -> tuple[list[RequestTiming], float]:
    """Plain batched generate (no continuous batching): throughput only, TTFT = e2e."""

    device = next(model.parameters()).device
    timings = [RequestTiming(len(r.prompt)) for r in requests]
    start = time.perf_counter()
    for lo in tqdm(range(0, len(requests), batch_size), desc="transformers generate", disable=not progress):
        batch = requests[lo : lo + batch_size]
        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):  # left padding, so every row's last prompt token lines up
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, device=device)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        for i, r in enumerate(batch):  # a request is done when its batch is; only its own tokens count
            t = timings[lo + i]
            t.arrival = t0
            t.on_delta(r.max_tokens, t1)
            t.finish(t1)
    return timings, time.perf_counter() - start


def run_peer(
    path: str,
    dtype: str,
    device: str,
    dummy: bool,
    requests: list[BenchRequest],
    *,
    seed: int = 0,
    warmup: int = 1,
    batch_size: int = 32,
    method: str | None = None,
    progress: bool = True,
) -> dict:
    """Loads the model in transformers, runs the requests, returns the same summary as NanoSLG's."""

    # transformers' continuous batching logs every allocation decision at INFO; keep the report readable.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    model = load_hf_model(path, dtype, device, dummy, seed)
    try:
        use_cb = has_continuous_batching(model) if method in (None, "auto") else method == "continuous"
        if use_cb:
            timings, wall = run_continuous(model, requests, warmup=warmup, progress=progress)
        else:
            timings, wall = run_generate(model, requests, batch_size=batch_size, progress=progress)
    finally:
        del model
        free_device_memory()
    out = summarize(timings, wall)
    if not use_cb:  # a batch returns all at once: no first-token or inter-token times exist
        for key in ("ttft_ms", "itl_ms", "tpot_ms"):
            out[key] = None
    out["method"] = (
        "continuous batching (init_continuous_batching)"
        if use_cb
        else f"batched generate (batch {batch_size}, no continuous batching)"
    )
    out["transformers"] = transformers.__version__
    return out
