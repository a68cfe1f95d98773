"""`python run.py` (mode=serve): the engine and the HTTP server on one (uv)loop, run by uvicorn.

SIGINT/SIGTERM: the engine stops taking requests and lets those in flight run for up to
`server.shutdown_timeout` seconds, then aborts the rest (their streams end with finish_reason
"abort"; a whole answer cut short is a 503). Meanwhile the port stays open and new requests get a
503 with Retry-After, so clients are told rather than refused; once the engine is done, uvicorn
stops and the process exits 0. A second Ctrl+C forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from nanoslg.core.config import Config, ServerConfig
from nanoslg.core.errors import ConfigError
from nanoslg.core.loop import loop_factory
from nanoslg.engine.builder import build_engine
from nanoslg.server.app import create_app

log = logging.getLogger("nanoslg.server")


class _Server(uvicorn.Server):
    """uvicorn's server with signal handling that drains the engine and does not re-raise the signal
    afterwards (uvicorn's default re-raises it, so the process would die by the signal, not exit 0)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[int], None], banner: Callable[[str], None]):
        super().__init__(config)
        self._on_exit = on_exit  # starts the drain, which sets should_exit when the engine is done
        self._banner = banner
        self.draining = False

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, self._signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):  # no loop signal support
                    pass
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _signal(self, sig: int) -> None:
        if self.draining:
            if sig == signal.SIGINT:
                self.should_exit = self.force_exit = True  # a second Ctrl+C: stop waiting
            return
        log.info(
            "%s: stopping; in-flight requests get up to server.shutdown_timeout to finish", signal.Signals(sig).name
        )
        self.draining = True
        self._on_exit(sig)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            if ":" in host:
                host = f"[{host}]"
            self._banner(f"http://{host}:{port}")


def bind(scfg: ServerConfig) -> socket.socket:
    """The server's socket, bound (not yet listening) before the model loads: a port in use fails
    at once, naming server.port, and nothing can take the port while the model loads."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(scfg.host, scfg.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"server.host={scfg.host!r} cannot be resolved here ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"server.port={scfg.port}: cannot listen on {scfg.host}:{scfg.port} ({e.strerror}); another process "
            "holds it? Pick another server.port (0 picks a free one)"
        ) from None
    return sock


async def serve_engine(engine, cfg: Config, sock: socket.socket | None = None) -> int:
    """Serves a built engine on the running loop until a signal; returns the exit code."""
    scfg = cfg.server
    await engine.start()
    app = create_app(engine, scfg)
    drain: list[asyncio.Task] = []

    async def drain_then_stop() -> None:
        try:
            await engine.shutdown(scfg.shutdown_timeout)
        finally:
            server.should_exit = True

    def on_exit(_sig: int) -> None:
        drain.append(asyncio.ensure_future(drain_then_stop()))

    def banner(url: str) -> None:
        info = getattr(engine, "info", {}) or {}
        started = os.environ.get("NANOSLG_STARTED")
        log.info(
            "NanoSLG serving model %r at %s (OpenAI API under %s/v1; cache backend %s, parallel %s, device %s)%s",
            engine.model_name,
            url,
            url,
            info.get("cache_backend", "?"),
            info.get("parallel", "?"),
            info.get("device", "?"),
            f", {time.time() - float(started):.1f} s after run.py started" if started else "",
        )

    ucfg = uvicorn.Config(
        app,
        host=scfg.host,
        port=scfg.port,
        log_level=scfg.log_level,
        access_log=scfg.log_level == "debug",
        # The engine starts before the server and drains after it: the app has no lifespan hooks,
        # and with "on" uvicorn leaves a lifespan task that the loop's close cancels noisily.
        lifespan="off",
        # A backstop only: the engine ends every request by shutdown_timeout (aborts count as ends).
        timeout_graceful_shutdown=scfg.shutdown_timeout + 10.0,
    )
    server = _Server(ucfg, on_exit, banner)
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        if drain:
            await drain[0]
        else:
            await engine.shutdown(0.0)
    log.info("NanoSLG stopped")
    return 0


def serve(cfg: Config) -> int:
    sock = bind(cfg.server)
    with sock:
        engine = build_engine(cfg)  # loads weights and sizes the KV pool: blocking work, before the loop
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve_engine(engine, cfg, sock))
