"""`run_bench(cfg)`: what `python run.py mode=bench ...` runs.

    figures (bandwidth, peak) -> engine (or server) -> warmup -> workload with a progress bar
    -> summary + roofline -> [transformers peer] -> report -> JSON record -> sweep table and plot

Engine workloads (offline, batch1, shared_prefix) build the engine in this process and drive it
through `engine.add_request` streams on one asyncio loop (here). The serving workload talks HTTP to the
OpenAI endpoint (serving.py). What both sessions share is in session.py; the printed report in report.py.
"""

from __future__ import annotations

import logging
import time

import torch

from nanoslg.bench import roofline as rl
from nanoslg.bench.aggregate import aggregate
from nanoslg.bench.hardware import Figures, resolve_figures
from nanoslg.bench.metrics import RequestTiming, peak_gpu_memory, summarize
from nanoslg.bench.peer_hf import run_peer
from nanoslg.bench.record import experiment_dir, make_record, unswept_params, write_record
from nanoslg.bench.report import format_report
from nanoslg.bench.serving import run_http
from nanoslg.bench.session import EXTRA_DEFAULTS, extra, kv_pool, model_facts, run_roofline, timed_run, warm_up
from nanoslg.bench.workloads import BenchRequest, engine_requests, get_workload
from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.core.loop import new_event_loop
from nanoslg.core.machine import free_device_memory, resolve_device
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.builder import build_engine
from nanoslg.engine.metrics import StepProfile
from nanoslg.model.checkpoint import resolve_checkpoint
from nanoslg.parallel.auto import resolve_parallel

log = logging.getLogger("nanoslg.bench")


# -- the entry point ---------------------------------------------------------------------------
def run_bench(cfg: Config, node=None) -> dict:
    """Runs cfg.bench.workload, prints the report, writes the record; returns the results."""
    unknown = set(cfg.bench.extra or {}) - set(EXTRA_DEFAULTS)
    if unknown:
        raise ConfigError(
            f"bench.extra.{sorted(unknown)[0]} is not a known key; allowed: {', '.join(sorted(EXTRA_DEFAULTS))}"
        )
    sweep = unswept_params()
    if sweep:  # e.g. shared-prefix-on-off without -m measures only its "on" half
        log.warning(
            "this preset is a sweep (%s) but ran without -m: one run with the config's own values; "
            "`python run.py -m ...` runs every point of it",
            ", ".join(f"{k}={v}" for k, v in sweep.items()),
        )
    wl = get_workload(cfg.bench.workload)
    if cfg.bench.peer == "hf" and wl.transport != "engine":
        raise ConfigError(
            f"bench.peer=hf runs engine workloads (offline, batch1, shared_prefix); "
            f"bench.workload={cfg.bench.workload!r} goes over HTTP"
        )
    cfg = resolve_parallel(cfg, resolve_checkpoint(cfg))  # the roofline counts the GPUs auto chooses
    figures = _figures(cfg)
    if wl.transport == "http":
        results = run_http(cfg, wl, figures)
    else:
        results = _run_engine(cfg, figures)
    results["workload"] = cfg.bench.workload
    folder = experiment_dir(cfg.bench)
    record = make_record(node if node is not None else cfg, results)
    path = write_record(record, folder)
    results["record"] = str(path)
    if extra(cfg, "aggregate"):
        try:
            agg = aggregate(folder)
            results["aggregate"] = agg
        except Exception as e:  # a plot must never lose a run: the record is written already
            log.warning("could not aggregate %s: %s", folder, e)
    print(format_report(cfg, results), flush=True)
    return results


# -- hardware figures --------------------------------------------------------------------------
def _figures(cfg: Config) -> Figures | None:
    """Taken before the engine exists: a measured copy needs memory the KV pool would hold."""

    dev = resolve_device(cfg.model.device).type
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("float32" if dev == "cpu" else "bfloat16")
    n = cfg.parallel.tp_size * cfg.parallel.pp_size if dev == "cuda" else 1
    try:
        return resolve_figures(
            dev,
            name,
            dtype,
            n,
            bandwidth=str(extra(cfg, "bandwidth")),
            bandwidth_tbs=extra(cfg, "bandwidth_tbs"),
            peak_tflops=extra(cfg, "peak_tflops"),
        )
    except ConfigError:
        raise
    except Exception as e:  # a roofline is a nicety; the run goes on without it
        log.warning("no roofline figures: %s", e)
        return None


# -- engine workloads --------------------------------------------------------------------------
def _sampling(cfg: Config, max_tokens: int, structured=None):

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(extra(cfg, "temperature")),
        ignore_eos=cfg.bench.ignore_eos,
        structured_outputs=structured,
    )


def _check_lengths(reqs: list[BenchRequest], max_model_len: int) -> None:
    worst = max(len(r.prompt) + r.max_tokens for r in reqs)
    if worst > max_model_len:
        raise ConfigError(
            f"the longest bench request needs {worst} tokens (prompt + output) but the model's "
            f"context is {max_model_len}; lower bench.input_len_max / bench.output_len_max / "
            "bench.shared_prefix_len, or raise model.max_model_len"
        )


def _run_engine(cfg: Config, figures: Figures | None) -> dict:

    engine = build_engine(cfg)
    loop = new_event_loop()
    try:
        reqs = engine_requests(cfg.bench, engine)
        _check_lengths(reqs, engine.max_model_len)
        timings, wall, cascade_steps, spec = loop.run_until_complete(_engine_session(cfg, engine, reqs))
        info = dict(getattr(engine, "info", {}) or {})
        facts = model_facts(lambda e=engine: rl.facts_from_engine(e))
        m = engine.metrics
        results = summarize(timings, wall)
        results["engine"] = {
            "info": info,
            "preemptions": m.preemptions,
            "prefix_cache_hit_rate": (m.prefix_cache_hits / m.prefix_cache_queries) if m.prefix_cache_queries else None,
            # Per step, over the timed run (in the non-overlapped loop, "wait" is the whole step).
            "step_profile": m.profile.per_step_ms(),
            # Decode steps that ran cascade attention over a prefix every sequence shared.
            "cascade_steps": cascade_steps,
            "speculative": _speculative(info, spec),
        }
        results["kv_pool"] = kv_pool(engine.kv_capacity_tokens, engine.kv_pool_bytes)
        results["peak_gpu_memory"] = peak_gpu_memory()
        kv = (
            engine.kv_capacity_tokens,
            info.get("prefix_caching", cfg.cache.prefix_caching),
            info.get("cascade_attention"),
        )
        results["roofline"] = run_roofline(cfg, reqs, timings, wall, facts, figures, *kv)
        peer_where = (info.get("path"), info.get("dtype"), info.get("device"))
    finally:
        try:
            loop.run_until_complete(engine.shutdown(0.0))
        except Exception as e:  # a dead engine has nothing left to stop
            log.debug("engine shutdown: %s", e)
        loop.close()
        del engine
        free_device_memory()
    if cfg.bench.peer == "hf":
        results["peer"] = _run_peer(cfg, reqs, results, *peer_where)
    return results


async def _engine_session(
    cfg: Config, engine, reqs: list[BenchRequest]
) -> tuple[list[RequestTiming], float, int, tuple[int, ...]]:
    await engine.start()

    async def send(i: int, r: BenchRequest, t: RequestTiming) -> None:
        params = _sampling(cfg, r.max_tokens, r.structured)
        t.arrival = time.perf_counter()
        try:
            # Read once, at the end, as LLM.generate is; each delta's time is when the engine put it.
            stream = engine.add_request(r.prompt, params, request_id=f"bench-{i}", each_delta=False)
            async for _ in stream:
                pass
            for at, n in zip(*stream.timeline):
                t.on_delta(n, at)
            t.finish()
        except Exception as e:  # one failed request is reported, not fatal
            t.finish(error=f"{type(e).__name__}: {e}")

    await warm_up(cfg, reqs, send)

    engine.metrics.profile = StepProfile()  # the timed run only
    cascade_before, spec_before = engine.cascade_steps, _spec_counts(engine.metrics)
    timings, wall = await timed_run(cfg, reqs, send)
    spec = tuple(b - a for a, b in zip(spec_before, _spec_counts(engine.metrics)))
    return timings, wall, engine.cascade_steps - cascade_before, spec


def _spec_counts(m) -> tuple[int, int, int]:
    return m.spec_num_drafts, m.spec_num_draft_tokens, m.spec_num_accepted_tokens


def _speculative(info: dict, counts: tuple[int, ...]) -> dict | None:
    """Speculative decoding over the timed run: verify rows (a sequence in a step), tokens proposed and
    accepted, and the mean accepted length (tokens a verify row emits: accepted + the target's own)."""
    if info.get("speculative", "none") == "none":
        return None
    drafts, proposed, accepted = counts
    return {
        "method": info["speculative"],
        "num_tokens": info.get("speculative_tokens"),
        "drafts": drafts,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
    }


def _run_peer(
    cfg: Config, reqs: list[BenchRequest], results: dict, path: str | None, dtype: str | None, device: str | None
) -> dict:

    if not path:
        raise ConfigError("bench.peer=hf needs the engine's checkpoint folder (engine.info['path'])")
    log.info("running the same %d requests through transformers", len(reqs))
    peer = run_peer(
        path,
        dtype or "float32",
        device or "cpu",
        cfg.model.load_format == "dummy",
        reqs,
        seed=cfg.model.seed,
        warmup=cfg.bench.warmup,
        batch_size=int(extra(cfg, "hf_batch_size")),
        method=str(extra(cfg, "hf_method")),
        progress=bool(extra(cfg, "progress")),
    )
    ours, theirs = results["output_tok_s"], peer["output_tok_s"]
    peer["speedup_output_tok_s"] = ours / theirs if theirs else None
    return peer
