"""The serving workload: the OpenAI endpoint over HTTP, streamed, at bench.request_rate arrivals and
at most bench.concurrency in flight.

The server is `bench.extra.url` when given, else `python run.py mode=serve` started here by
`ServerProcess` on a free loopback port with this run's model/cache/scheduler/parallel/server config.
`ServerProcess` is also how the server tests (tests/test_server*.py) run the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import httpx
from transformers import AutoTokenizer

from nanoslg.bench import roofline as rl
from nanoslg.bench.hardware import Figures
from nanoslg.bench.metrics import RequestTiming, summarize
from nanoslg.bench.record import config_dict
from nanoslg.bench.session import extra, kv_pool, model_facts, run_roofline, timed_run, warm_up
from nanoslg.bench.workloads import BenchRequest, TokenSpace, token_space
from nanoslg.core.compose import REPO_DIR
from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.core.machine import free_port
from nanoslg.model.checkpoint import resolve_checkpoint

log = logging.getLogger("nanoslg.bench")


# -- the server ---------------------------------------------------------------------------------
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
    """`python run.py <overrides>` from the checkout, in a subprocess whose output goes to a log file.

    It is ready when /health answers 200 at `url`: the one given (the overrides chose the port), else
    the one its start-up log line names (with `server.port=0` the server binds a free port itself, so
    nothing can take the port between choosing and binding it; the line is logged at INFO, so this
    needs log_level INFO or DEBUG).
    """

    def __init__(
        self,
        overrides: Sequence[str],
        start_timeout: float = 900.0,
        url: str | None = None,
        env: dict | None = None,
        keep_log: bool = False,
    ):
        self.overrides = list(overrides)
        self.start_timeout = start_timeout
        self.url = url
        self.env = dict(env or {})  # on top of this process's environment
        self.keep_log = keep_log  # else stop() keeps the output in memory and leaves nothing in /tmp
        self.proc: subprocess.Popen | None = None
        self.log_path: str | None = None
        self.final_output: str | None = None
        self.spawned: float | None = None  # perf_counter at the spawn: cold start counts from here
        self.ready_s: float | None = None  # spawn to the first /health 200

    def start(self) -> str:
        """Spawns the server and waits until it is ready; returns its URL. A server that exits or does
        not get ready within start_timeout is stopped and raises, with the tail of its log."""

        cmd = [sys.executable, str(REPO_DIR / "run.py"), *self.overrides]
        fd, self.log_path = tempfile.mkstemp(prefix="nanoslg-server-", suffix=".log")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log.info("starting the server: %s (log: %s)", " ".join(cmd), self.log_path)
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=env)
        os.close(fd)
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"the server exited with code {self.proc.returncode} before it was ready:\n{self.tail()}"
                    )
                url = self.url or self._logged_url()
                if url:
                    try:
                        if client.get(f"{url}/health").status_code == 200:
                            self.url = url
                            self.ready_s = time.perf_counter() - self.spawned
                            return url
                    except httpx.HTTPError:
                        pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"the server did not answer /health within {self.start_timeout:.0f} s:\n{self.tail()}"
                    )
                time.sleep(0.2)

    def _logged_url(self) -> str | None:
        m = re.search(r"serving model .* at (http://(?:[\d.]+|\[[\da-fA-F:.]+\]):\d+)", self.output())
        return m.group(1) if m else None

    def output(self) -> str:
        """What the server wrote so far (all of it, once stopped)."""
        if self.final_output is not None:
            return self.final_output
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def tail(self, n: int = 40) -> str:
        return "".join(self.output().splitlines(keepends=True)[-n:])

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> int | None:
        """Sends `sig` (on SIGINT or SIGTERM the server drains and exits 0) and kills the server if it
        has not exited after `timeout` s; returns its exit code (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.final_output is None and not self.keep_log:
            self.final_output = self.output()
            os.unlink(self.log_path)
        return self.proc.returncode


def startup_from_log(text: str) -> dict:
    """Where the spawned server's start-up went, from its own log: when it had read its config (imports,
    Hydra) and when it was serving, counted from run.py's first line (the rest of the cold start is the
    interpreter's own start and the wait for /health), and how long the engine took to build, phase by
    phase (engine/builder.py)."""
    out: dict = {}
    m = re.search(r"engine built in ([\d.]+) s since the config was read \((.*) s\)", text)
    if m:
        out["engine_built_s"] = float(m.group(1))
        out["engine_phases_s"] = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", m.group(2))}
    m = re.search(r"the config was read ([\d.]+) s after run\.py started", text)
    if m:
        out["config_read_after_run_py_s"] = float(m.group(1))
    m = re.search(r"NanoSLG serving model .*?([\d.]+) s after run\.py started", text)
    if m:
        out["serving_after_run_py_s"] = float(m.group(1))
    return out


def _start_server(cfg: Config) -> ServerProcess:
    """`run.py mode=serve` with this run's config on a free loopback port, ready (its log stays on disk)."""
    run_py = REPO_DIR / "run.py"
    if not run_py.exists():
        raise ConfigError(
            f"bench.workload=serving starts {run_py}, which is missing; or give bench.extra.url of a running server"
        )
    port = free_port()
    server = ServerProcess(
        server_overrides(config_dict(cfg), "127.0.0.1", port),
        float(extra(cfg, "server_start_timeout")),
        url=f"http://127.0.0.1:{port}",
        keep_log=True,
    )
    try:
        server.start()
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n(the wait is bench.extra.server_start_timeout)") from None
    return server


# -- the client ---------------------------------------------------------------------------------
def _checkpoint_space(cfg: Config) -> tuple[TokenSpace, dict, str]:
    """Token space and config.json of the served model, read from its checkpoint folder."""

    ckpt = resolve_checkpoint(cfg)
    with open(os.path.join(ckpt.path, "config.json")) as f:
        conf = json.load(f)
    tokenizer = None
    tok_path = cfg.model.tokenizer or (ckpt.path if ckpt.has_tokenizer else None)
    if tok_path:
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    text = rl.hf_text_config(conf)
    eos = text.get("eos_token_id", conf.get("eos_token_id"))
    eos_ids = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
    return token_space(text["vocab_size"], tokenizer, eos_ids), conf, ckpt.path


def run_http(cfg: Config, wl, figures: Figures | None) -> dict:
    """The serving workload's run: its requests against the server, summarized and set against the roofline."""
    url = extra(cfg, "url")
    space, model_conf, path = _checkpoint_space(cfg)
    reqs = wl.requests(cfg.bench, space)
    server = None
    if not url:
        server = _start_server(cfg)
        url = server.url
    try:
        timings, wall, served = asyncio.run(_http_session(cfg, url.rstrip("/"), reqs))
        first = served.get("first_token_at")
        cold = (
            {"server_ready_s": server.ready_s, "first_token_s": first - server.spawned if first else None}
            if server is not None
            else None
        )
    finally:
        code = server.stop() if server is not None else None
        if server is not None and code not in (0, None):
            log.warning("the server exited with code %s; its log tail:\n%s", code, server.tail())
    if cold is not None:
        cold["server_log"] = startup_from_log(server.output())
    results = summarize(timings, wall)
    results["server"] = {
        "url": url,
        "started_here": server is not None,
        "model": served.get("model"),
        "version": served.get("version"),
    }
    # Cold start: spawning `run.py mode=serve` (weights, KV pool, graph capture, warm JIT cache) to the
    # first streamed token of the first (warm-up) request.
    results["cold_start"] = cold
    ver = served.get("version_after") if isinstance(served.get("version_after"), dict) else {}
    # The engine runs in the server's process: pool size and peak memory only if /version reports them.
    results["kv_pool"] = kv_pool(ver.get("kv_capacity_tokens"), ver.get("kv_pool_bytes"))
    peak = ver.get("peak_gpu_memory_bytes")
    results["peak_gpu_memory"] = (
        {
            "max_allocated_bytes": peak,
            "max_allocated_gib": peak / 2**30,
            "max_reserved_gib": None,
            "source": "server /version",
        }
        if peak
        else None
    )
    # TTFT and ITL are per SSE chunk; they are per token only if the server sends one chunk per step.
    chunks = sum(len(t.chunks) for t in timings if t.ok)
    results["stream_chunks"] = chunks
    dtype = (
        cfg.model.dtype
        if cfg.model.dtype != "auto"
        else ("float32" if figures is not None and figures.device_name == "CPU" else "bfloat16")
    )
    facts = model_facts(
        lambda: rl.facts_from_hf_config(
            model_conf, rl.DTYPE_BYTES.get(dtype, 2), source=f"{path}/config.json ({dtype}, assumed)"
        )
    )
    kv = (ver.get("kv_capacity_tokens"), cfg.cache.prefix_caching, cfg.cache.cascade_attention)
    results["roofline"] = run_roofline(cfg, reqs, timings, wall, facts, figures, *kv)
    return results


async def _http_session(cfg: Config, url: str, reqs: list[BenchRequest]) -> tuple[list[RequestTiming], float, dict]:

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the report
    headers = {"Authorization": f"Bearer {cfg.server.api_key}"} if cfg.server.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=httpx.Timeout(None), limits=limits, trust_env=False
    ) as client:
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
            body = {
                "model": model,
                "prompt": req.prompt,
                "max_tokens": req.max_tokens,
                "temperature": float(extra(cfg, "temperature")),
                "ignore_eos": cfg.bench.ignore_eos,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
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

        wt = await warm_up(cfg, reqs, send)
        if wt:
            served["first_token_at"] = min((t.chunks[0][0] for t in wt if t.chunks), default=None)
        timings, wall = await timed_run(cfg, reqs, send)
        try:  # again after the run: a server that reports its peak memory has it now
            v = await client.get("/version")
            served["version_after"] = v.json() if v.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            served["version_after"] = None
    return timings, wall, served
