"""`run_bench(cfg)`: what `python run.py mode=bench ...` runs.

    figures (bandwidth, peak) -> engine (or server) -> warmup -> workload with a progress bar
    -> summary + roofline -> [transformers peer] -> report -> JSON record -> sweep table and plot

Engine workloads (offline, batch1, shared_prefix) build the engine in this process and drive it
through `engine.add_request` streams on one asyncio loop. The serving workload talks HTTP to the
OpenAI endpoint: to `bench.extra.url` when given, else to `python run.py mode=serve` started here as
a subprocess on a free loopback port with this run's model/cache/scheduler/parallel/server config.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from nanoslg.bench import roofline as rl
from nanoslg.bench.metrics import RequestTiming, peak_gpu_memory, summarize
from nanoslg.bench.record import aggregate, experiment_dir, make_record, write_record
from nanoslg.bench.workloads import (BenchRequest, TokenSpace, engine_requests, get_workload, token_space,
                                     warmup_requests)
from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.core.loop import new_event_loop

log = logging.getLogger("nanoslg.bench")
REPO_DIR = Path(__file__).resolve().parent.parent.parent

# bench.extra keys this module reads (documented in conf/bench/*.yaml)
EXTRA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.0,  # greedy: what the peer does too
    "progress": True,  # tqdm bars
    "bandwidth": "table",  # table | spec | measure (roofline figures)
    "bandwidth_tbs": None,  # given bandwidth per device, TB/s
    "peak_tflops": None,  # given peak per device, TFLOP/s
    "url": None,  # serving: an already running server (http://host:port)
    "server_start_timeout": 900,  # serving: seconds to wait for the subprocess server's /health
    "hf_method": "auto",  # peer=hf: auto | continuous | generate
    "hf_batch_size": 32,  # peer=hf with plain generate
    "aggregate": True,  # rewrite the experiment's table and plot after the run
}


def extra(cfg: Config, key: str) -> Any:
    ex = cfg.bench.extra or {}
    return ex.get(key, EXTRA_DEFAULTS[key])


# -- the entry point ---------------------------------------------------------------------------
def run_bench(cfg: Config, node=None) -> dict:
    """Runs cfg.bench.workload, prints the report, writes the record; returns the results."""
    unknown = set(cfg.bench.extra or {}) - set(EXTRA_DEFAULTS)
    if unknown:
        raise ConfigError(f"bench.extra.{sorted(unknown)[0]} is not a known key; allowed: "
                          f"{', '.join(sorted(EXTRA_DEFAULTS))}")
    wl = get_workload(cfg.bench.workload)
    if cfg.bench.peer == "hf" and wl.transport != "engine":
        raise ConfigError(f"bench.peer=hf runs engine workloads (offline, batch1, shared_prefix); "
                          f"bench.workload={cfg.bench.workload!r} goes over HTTP")
    figures = _figures(cfg)
    if wl.transport == "http":
        results = _run_http(cfg, wl, figures)
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
def _device_type(cfg: Config) -> str:
    import torch

    want = cfg.model.device
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def _figures(cfg: Config) -> Optional[rl.Figures]:
    """Taken before the engine exists: a measured copy needs memory the KV pool would hold."""
    import torch

    dev = _device_type(cfg)
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("float32" if dev == "cpu" else "bfloat16")
    n = cfg.parallel.tp_size * cfg.parallel.pp_size if dev == "cuda" else 1
    try:
        return rl.resolve_figures(dev, name, dtype, n, bandwidth=str(extra(cfg, "bandwidth")),
                                  bandwidth_tbs=extra(cfg, "bandwidth_tbs"), peak_tflops=extra(cfg, "peak_tflops"))
    except ConfigError:
        raise
    except Exception as e:  # a roofline is a nicety; the run goes on without it
        log.warning("no roofline figures: %s", e)
        return None


# -- driving requests --------------------------------------------------------------------------
Send = Callable[[int, BenchRequest, RequestTiming], Awaitable[None]]


async def drive(reqs: list[BenchRequest], send: Send, concurrency: Optional[int] = None,
                progress: bool = True, desc: str = "bench") -> tuple[list[RequestTiming], float]:
    """Sends each request at its arrival offset (at most `concurrency` in flight); returns timings, wall."""
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency) if concurrency else None
    bar = tqdm(total=len(reqs), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
    timings = [RequestTiming(len(r.prompt)) for r in reqs]

    async def one(i: int, r: BenchRequest) -> None:
        if sem is None:
            await send(i, r, timings[i])
        else:
            async with sem:
                await send(i, r, timings[i])
        bar.update(1)

    start = time.perf_counter()
    tasks = []
    for i, r in enumerate(reqs):
        delay = start + r.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, r)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    bar.close()
    return timings, wall


def _sampling(cfg: Config, max_tokens: int):
    from nanoslg.core.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=float(extra(cfg, "temperature")),
                          ignore_eos=cfg.bench.ignore_eos)


def _check_lengths(reqs: list[BenchRequest], max_model_len: int) -> None:
    worst = max(len(r.prompt) + r.max_tokens for r in reqs)
    if worst > max_model_len:
        raise ConfigError(f"the longest bench request needs {worst} tokens (prompt + output) but the model's "
                          f"context is {max_model_len}; lower bench.input_len_max / bench.output_len_max / "
                          "bench.shared_prefix_len, or raise model.max_model_len")


# -- engine workloads --------------------------------------------------------------------------
def _run_engine(cfg: Config, figures: Optional[rl.Figures]) -> dict:
    from nanoslg.engine.builder import build_engine

    engine = build_engine(cfg)
    loop = new_event_loop()
    try:
        reqs = engine_requests(cfg.bench, engine)
        _check_lengths(reqs, engine.max_model_len)
        timings, wall, cascade_steps = loop.run_until_complete(_engine_session(cfg, engine, reqs))
        info = dict(getattr(engine, "info", {}) or {})
        facts = _facts(lambda: rl.facts_from_engine(engine))
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
        }
        results["kv_pool"] = _kv_pool(getattr(engine, "kv_capacity_tokens", None), getattr(engine, "kv_pool_bytes", None))
        results["peak_gpu_memory"] = peak_gpu_memory()
        results["roofline"] = _roofline(cfg, reqs, timings, wall, facts, figures,
                                        kv_capacity=getattr(engine, "kv_capacity_tokens", None),
                                        prefix_caching=bool(info.get("prefix_caching", cfg.cache.prefix_caching)),
                                        cascade=bool(info.get("cascade_attention")))
        peer_where = (info.get("path"), info.get("dtype"), info.get("device"))
    finally:
        try:
            loop.run_until_complete(engine.shutdown(0.0))
        except Exception as e:  # a dead engine has nothing left to stop
            log.debug("engine shutdown: %s", e)
        loop.close()
        del engine
        _free_memory()
    if cfg.bench.peer == "hf":
        results["peer"] = _run_peer(cfg, reqs, results, *peer_where)
    return results


async def _engine_session(cfg: Config, engine, reqs: list[BenchRequest]) -> tuple[list[RequestTiming], float, int]:
    await engine.start()
    progress = bool(extra(cfg, "progress"))

    async def send(i: int, r: BenchRequest, t: RequestTiming) -> None:
        params = _sampling(cfg, r.max_tokens)
        t.arrival = time.perf_counter()
        try:
            stream = engine.add_request(r.prompt, params, request_id=f"bench-{i}")
            async for out in stream:
                t.on_delta(sum(len(o.token_ids) for o in out.outputs))
            t.finish()
        except Exception as e:  # one failed request is reported, not fatal
            t.finish(error=f"{type(e).__name__}: {e}")

    warm = warmup_requests(cfg.bench, reqs)
    if warm:
        wt, _ = await drive(warm, send, progress=False)
        bad = [t.error for t in wt if t.error]
        if bad:
            raise RuntimeError(f"a warmup request failed: {bad[0]}")
    from nanoslg.engine.metrics import StepProfile

    engine.metrics.profile = StepProfile()  # the timed run only
    cascade_before = engine.cascade_steps
    timings, wall = await drive(reqs, send, cfg.bench.concurrency, progress, desc=f"nanoslg {cfg.bench.workload}")
    if timings and all(t.error for t in timings):
        raise RuntimeError(f"every bench request failed; the first: {timings[0].error}")
    return timings, wall, engine.cascade_steps - cascade_before


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _kv_pool(tokens: Optional[int], nbytes: Optional[int]) -> dict:
    return {"tokens": tokens, "bytes": nbytes, "gib": (nbytes / 2**30) if nbytes else None}


def _facts(make: Callable[[], rl.ModelFacts]) -> Optional[rl.ModelFacts]:
    try:
        return make()
    except Exception as e:  # an unusual config.json: the run still reports, without a roofline
        log.warning("no roofline: could not read the model's shape (%s)", e)
        return None


def _roofline(cfg: Config, reqs: list[BenchRequest], timings: list[RequestTiming], wall: float,
              facts: Optional[rl.ModelFacts], figures: Optional[rl.Figures], kv_capacity: Optional[int],
              prefix_caching: bool, cascade: bool = False) -> Optional[dict]:
    if facts is None or figures is None:
        return None
    # What was actually produced (EOS may end requests early when bench.ignore_eos=false).
    shape = [(len(r.prompt), t.num_output if t.ok else r.max_tokens) for r, t in zip(reqs, timings)]
    steps = rl.simulate(shape, facts, max_num_seqs=cfg.scheduler.max_num_seqs,
                        max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
                        kv_capacity_tokens=kv_capacity, shared_prefix_len=cfg.bench.shared_prefix_len,
                        prefix_caching=prefix_caching, cascade=cascade)
    out = rl.roofline(steps, figures, facts)
    last_arrival = max((r.arrival for r in reqs), default=0.0)
    if last_arrival > out["limit_s"]:  # Poisson arrivals: nothing finishes before it has arrived
        out["limit_s"] = last_arrival
        out["bound_by"] = "arrivals"
    else:
        out["bound_by"] = "memory" if out["memory_bound_steps"] * 2 >= out["steps"] else "compute"
    frac = rl.fraction_of_limit(out["limit_s"], wall)
    out["percent_of_limit"] = 100 * frac if frac is not None else None
    out_tokens = sum(s[1] for s in shape)
    out["limit_output_tok_s"] = out_tokens / out["limit_s"] if out["limit_s"] > 0 else None
    out["model_note"] = ("per step: weights once + KV of each attended key, max(bytes/BW, FLOPs/peak); "
                         "batch shape simulated from scheduler.max_num_seqs / max_num_batched_tokens")
    if len(reqs) == 1 and timings[0].ok and timings[0].num_output >= 2:
        t = timings[0]
        decode_s = t.end - t.chunks[0][0]
        out["decode_tok_s"] = (t.num_output - 1) / decode_s if decode_s > 0 else None
        util = rl.mbu(facts, figures, len(reqs[0].prompt), t.num_output, decode_s)
        out["mbu_percent"] = 100 * util if util is not None else None
        steps_d = t.num_output - 1
        out["decode_limit_tok_s"] = steps_d / (rl.decode_bytes(facts, len(reqs[0].prompt), t.num_output)
                                               / figures.bandwidth)
    return out


def _run_peer(cfg: Config, reqs: list[BenchRequest], results: dict, path: Optional[str],
              dtype: Optional[str], device: Optional[str]) -> dict:
    from nanoslg.bench.peer_hf import run_peer

    if not path:
        raise ConfigError("bench.peer=hf needs the engine's checkpoint folder (engine.info['path'])")
    log.info("running the same %d requests through transformers", len(reqs))
    peer = run_peer(path, dtype or "float32", device or "cpu", cfg.model.load_format == "dummy", reqs,
                    seed=cfg.model.seed, warmup=cfg.bench.warmup, batch_size=int(extra(cfg, "hf_batch_size")),
                    method=str(extra(cfg, "hf_method")), progress=bool(extra(cfg, "progress")))
    ours, theirs = results["output_tok_s"], peer["output_tok_s"]
    peer["speedup_output_tok_s"] = ours / theirs if theirs else None
    return peer


# -- the serving workload ----------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def hydra_value(v: Any) -> str:
    """A value in Hydra's override grammar."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{s}'"


SERVER_GROUPS = ("model", "cache", "scheduler", "parallel", "server")


def server_overrides(conf: dict, host: str, port: int) -> list[str]:
    """Overrides that make `run.py mode=serve` compose this run's engine config, key by key."""
    out = ["mode=serve", f"log_level={conf.get('log_level', 'INFO')}"]
    for group in SERVER_GROUPS:
        for k, v in (conf.get(group) or {}).items():
            if group == "server" and k in ("host", "port"):
                continue
            out.append(f"{group}.{k}={hydra_value(v)}")
    return out + [f"server.host={host}", f"server.port={port}"]


class ServerProcess:
    """`python run.py mode=serve ...` on a free loopback port; its output goes to a log file."""

    def __init__(self, conf: dict, start_timeout: float = 900.0):
        self.conf = conf
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[str] = None
        self.url: Optional[str] = None
        self.spawned: Optional[float] = None  # perf_counter at the spawn: cold start counts from here
        self.ready_s: Optional[float] = None  # spawn to the first /health 200

    def start(self) -> str:
        import httpx

        run_py = REPO_DIR / "run.py"
        if not run_py.exists():
            raise ConfigError(f"bench.workload=serving starts {run_py}, which is missing; "
                              "or give bench.extra.url of a running server")
        port = free_port()
        cmd = [sys.executable, str(run_py), *server_overrides(self.conf, "127.0.0.1", port)]
        fd, self.log_path = tempfile.mkstemp(prefix="nanoslg-bench-server-", suffix=".log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log.info("starting the server: %s (log: %s)", " ".join(cmd), self.log_path)
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=env)
        os.close(fd)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was "
                                       f"ready:\n{self.tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.ready_s = time.perf_counter() - self.spawned
                        return self.url
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"the server did not answer /health within {self.start_timeout:.0f} s "
                                       f"(bench.extra.server_start_timeout):\n{self.tail()}")
                time.sleep(0.25)

    def tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)  # graceful: the server drains and exits 0
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def _checkpoint_space(cfg: Config) -> tuple[TokenSpace, dict, str]:
    """Token space and config.json of the served model, read from its checkpoint folder."""
    from nanoslg.model.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(cfg)
    with open(os.path.join(ckpt.path, "config.json")) as f:
        conf = json.load(f)
    tokenizer = None
    tok_path = cfg.model.tokenizer or (ckpt.path if ckpt.has_tokenizer else None)
    if tok_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    text = rl.hf_text_config(conf)
    eos = text.get("eos_token_id", conf.get("eos_token_id"))
    eos_ids = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
    return token_space(text["vocab_size"], tokenizer, eos_ids), conf, ckpt.path


def _run_http(cfg: Config, wl, figures: Optional[rl.Figures]) -> dict:
    from nanoslg.bench.record import config_dict

    url = extra(cfg, "url")
    space, model_conf, path = _checkpoint_space(cfg)
    reqs = wl.requests(cfg.bench, space)
    server = None
    if not url:
        server = ServerProcess(config_dict(cfg), float(extra(cfg, "server_start_timeout")))
        url = server.start()
    try:
        timings, wall, served = asyncio.run(_http_session(cfg, url.rstrip("/"), reqs))
        first = served.get("first_token_at")
        cold = {"server_ready_s": server.ready_s, "first_token_s": first - server.spawned if first else None} \
            if server is not None else None
    finally:
        code = server.stop() if server is not None else None
        if server is not None and code not in (0, None):
            log.warning("the server exited with code %s; its log tail:\n%s", code, server.tail())
    results = summarize(timings, wall)
    results["server"] = {"url": url, "started_here": server is not None, "model": served.get("model"),
                         "version": served.get("version")}
    # Cold start: spawning `run.py mode=serve` (weights, KV pool, graph capture, warm JIT cache) to the
    # first streamed token of the first (warm-up) request.
    results["cold_start"] = cold
    ver = served.get("version_after") if isinstance(served.get("version_after"), dict) else {}
    # The engine runs in the server's process: pool size and peak memory only if /version reports them.
    results["kv_pool"] = _kv_pool(ver.get("kv_capacity_tokens"), ver.get("kv_pool_bytes"))
    peak = ver.get("peak_gpu_memory_bytes")
    results["peak_gpu_memory"] = {"max_allocated_bytes": peak, "max_allocated_gib": peak / 2**30,
                                  "max_reserved_gib": None, "source": "server /version"} if peak else None
    # TTFT and ITL are per SSE chunk; they are per token only if the server sends one chunk per step.
    chunks = sum(len(t.chunks) for t in timings if t.ok)
    results["stream_chunks"] = chunks
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else (
        "float32" if figures is not None and figures.device_name == "CPU" else "bfloat16")
    facts = _facts(lambda: rl.facts_from_hf_config(model_conf, rl.DTYPE_BYTES.get(dtype, 2),
                                                   source=f"{path}/config.json ({dtype}, assumed)"))
    results["roofline"] = _roofline(cfg, reqs, timings, wall, facts, figures, ver.get("kv_capacity_tokens"),
                                    cfg.cache.prefix_caching, cfg.cache.cascade_attention)
    return results


async def _http_session(cfg: Config, url: str, reqs: list[BenchRequest]) -> tuple[list[RequestTiming], float, dict]:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the report
    headers = {"Authorization": f"Bearer {cfg.server.api_key}"} if cfg.server.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(None), limits=limits,
                                 trust_env=False) as client:
        served: dict = {}
        r = await client.get("/v1/models")
        r.raise_for_status()
        models = r.json().get("data") or []
        model = models[0]["id"] if models else (cfg.server.served_model_name or cfg.model.name)
        served["model"] = model
        try:
            v = await client.get("/version")
            served["version"] = v.json() if v.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            served["version"] = None

        async def send(i: int, req: BenchRequest, t: RequestTiming) -> None:
            body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                    "temperature": float(extra(cfg, "temperature")), "ignore_eos": cfg.bench.ignore_eos,
                    "stream": True, "stream_options": {"include_usage": True}}
            t.arrival = time.perf_counter()
            try:
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        text = (await resp.aread()).decode(errors="replace")
                        t.finish(error=f"HTTP {resp.status_code}: {text[:200]}")
                        return
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        now = time.perf_counter()
                        chunk = json.loads(data)
                        if chunk.get("choices"):  # one chunk per engine step: vLLM's convention
                            t.on_delta(1, now)
                        usage = chunk.get("usage")
                        if usage and usage.get("completion_tokens") is not None:
                            t.output_len = int(usage["completion_tokens"])
                t.finish()
            except (httpx.HTTPError, ValueError) as e:
                t.finish(error=f"{type(e).__name__}: {e}")

        warm = warmup_requests(cfg.bench, reqs)
        if warm:
            wt, _ = await drive(warm, send, progress=False)
            bad = [t.error for t in wt if t.error]
            if bad:
                raise RuntimeError(f"a warmup request failed: {bad[0]}")
            served["first_token_at"] = min((t.chunks[0][0] for t in wt if t.chunks), default=None)
        timings, wall = await drive(reqs, send, cfg.bench.concurrency, bool(extra(cfg, "progress")),
                                    desc=f"nanoslg {cfg.bench.workload}")
        try:  # again after the run: a server that reports its peak memory has it now
            v = await client.get("/version")
            served["version_after"] = v.json() if v.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            served["version_after"] = None
    if timings and all(t.error for t in timings):
        raise RuntimeError(f"every bench request failed; the first: {timings[0].error}")
    return timings, wall, served


# -- the report --------------------------------------------------------------------------------
def _ms(d: Optional[dict], key: str) -> str:
    v = (d or {}).get(key)
    return "–" if v is None else f"{v:,.2f}"


def format_report(cfg: Config, r: dict) -> str:
    b = cfg.bench
    eng = (r.get("engine") or {}).get("info") or {}
    lines = [
        "",
        f"== NanoSLG bench: {b.workload} | model {cfg.model.name} | cache {eng.get('cache_backend', cfg.cache.backend)}"
        f" | parallel {cfg.parallel.mode} (tp={cfg.parallel.tp_size}, pp={cfg.parallel.pp_size}) ==",
        f"requests         {r['completed']} completed, {r['failed']} failed"
        + (f"  (first error: {r['errors'][0]})" if r.get("errors") else ""),
        f"tokens           {r['input_tokens']:,} in, {r['output_tokens']:,} out",
        f"wall time        {r['wall_time_s']:.2f} s",
        f"throughput       {r['output_tok_s']:,.1f} output tok/s | {r['total_tok_s']:,.1f} total tok/s | "
        f"{r['request_throughput']:.2f} req/s",
        f"{'latency (ms)':<16} {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10}",
    ]
    for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("e2e", "e2e_ms")):
        d = r.get(key)
        lines.append(f"{name:<16} {_ms(d, 'mean'):>10} {_ms(d, 'p50'):>10} {_ms(d, 'p90'):>10} {_ms(d, 'p99'):>10}")
    mem = r.get("peak_gpu_memory")
    if mem and mem.get("source"):
        lines.append(f"peak GPU memory  {mem['max_allocated_gib']:.2f} GiB allocated ({mem['source']})")
    else:
        lines.append("peak GPU memory  " + (f"{mem['max_allocated_gib']:.2f} GiB allocated "
                                            f"({mem['max_reserved_gib']:.2f} GiB reserved; torch, this process)"
                                            if mem else "– (no CUDA in this process)"))
    kv = r.get("kv_pool") or {}
    lines.append("KV pool          " + (f"{kv['tokens']:,} tokens" if kv.get("tokens") else "–")
                 + (f", {kv['gib']:.2f} GiB" if kv.get("gib") else ""))
    roof = r.get("roofline")
    if roof:
        pct = roof.get("percent_of_limit")
        lines.append(f"roofline         limit {roof['limit_s']:.3f} s ({roof['bound_by']}-bound; memory "
                     f"{roof['memory_s']:.3f} s, compute {roof['compute_s']:.3f} s, no-overlap sum "
                     f"{roof['memory_s'] + roof['compute_s']:.3f} s; {roof['steps']:,} steps est.)")
        lines.append(f"                 -> {pct:.1f}% of the limit"
                     + (f" (limit {roof['limit_output_tok_s']:,.0f} output tok/s)"
                        if roof.get("limit_output_tok_s") else ""))
        lines.append(f"                 figures: {roof['figures']}")
        m = roof["model"]
        n = m["num_params"]
        size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        lines.append(f"                 model: {size} params x {m['dtype_bytes']} bytes, "
                     f"KV {m['kv_bytes_per_token'] / 1024:.1f} KiB/token ({m['source']})")
        if roof.get("mbu_percent") is not None:
            lines.append(f"batch-1 decode   {roof['decode_tok_s']:,.1f} tok/s; MBU {roof['mbu_percent']:.1f}% "
                         f"(limit {roof['decode_limit_tok_s']:,.0f} tok/s)")
    else:
        lines.append("roofline         – (no model shape or hardware figures)")
    peer = r.get("peer")
    if peer:
        ratio = peer.get("speedup_output_tok_s")
        lines.append(f"transformers     {peer['output_tok_s']:,.1f} output tok/s, TTFT p50 "
                     f"{_ms(peer.get('ttft_ms'), 'p50')} ms ({peer['transformers']}, {peer['method']})")
        if ratio:
            lines.append(f"                 -> NanoSLG is {ratio:.2f}x transformers in output tok/s")
    prof = (r.get("engine") or {}).get("step_profile")
    if prof and prof.get("steps"):
        lines.append(f"step profile     {prof['steps']:,} steps; per step: schedule {prof['schedule_ms']:.2f} ms, "
                     f"process outputs {prof['process_ms']:.2f} ms, launch {prof['launch_ms']:.2f} ms, "
                     f"wait for the device {prof['wait_ms']:.2f} ms")
    cascade = (r.get("engine") or {}).get("cascade_steps")
    if cascade:
        lines.append(f"cascade attention {cascade:,} decode steps read a prefix every sequence shared once")
    cold = r.get("cold_start")
    if cold and cold.get("first_token_s") is not None:
        lines.append(f"cold start       {cold['first_token_s']:.1f} s from spawning the server to its first token "
                     f"(/health after {cold['server_ready_s']:.1f} s)")
    chunks = r.get("stream_chunks")
    if chunks is not None and chunks < 0.9 * r["output_tokens"]:
        lines.append(f"note             the server sent {chunks:,} stream chunks for {r['output_tokens']:,} tokens: "
                     "TTFT/ITL are per chunk (it holds back deltas without text)")
    lines.append(f"record           {r.get('record')}")
    if r.get("aggregate"):
        lines.append(f"sweep table      {r['aggregate']['table']} (plot {r['aggregate']['plot']})")
    return "\n".join(lines) + "\n"
