"""The synchronous Python API: `LLM("model.path=/ckpt", "cache=sdpa").generate(prompts, params)`.

The engine runs on its own event loop in a background thread, so this works from plain scripts,
notebooks and inside other event loops alike.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence as Seq

from nanoslg.core.compose import compose_config, setup_logging
from nanoslg.core.config import Config
from nanoslg.core.loop import new_event_loop
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.async_engine import AsyncEngine
from nanoslg.engine.builder import build_engine
from nanoslg.engine.outputs import Prompt, RequestOutput
from nanoslg.engine.stream import collect


class LLM:
    def __init__(self, *overrides: str, config: Config | None = None):
        if config is None:
            config, _ = compose_config(list(overrides))
        self.config = config
        setup_logging(config.log_level)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nanoslg-loop", daemon=True)
        self._thread.start()
        self.engine: AsyncEngine = build_engine(config)
        self._call(self.engine.start())
        # A script that ends without shutdown(): stop the engine before the interpreter stops the
        # thread pools its steps run in (atexit handlers run only after that, too late).
        threading._register_atexit(_shutdown_at_exit, weakref.ref(self))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Generates for each prompt (a string or a list of token ids); returns results in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")

        async def run() -> list[RequestOutput]:
            for sp in params:  # a grammar that does not compile fails the call before anything runs
                await self.engine.compile_structured(sp)
            streams = []
            try:
                for p, sp in zip(prompts, params):
                    streams.append(self.engine.add_request(p, sp, each_delta=False))
            except Exception:
                for s in streams:  # a bad prompt fails the call; nothing keeps running behind it
                    self.engine.abort(s.request_id)
                raise
            return list(await asyncio.gather(*(collect(s) for s in streams)))

        return self._call(run())

    def shutdown(self) -> None:
        """Stops the engine (aborting what runs) and its loop; idempotent."""
        if self._loop.is_running():
            self._call(self.engine.shutdown(0.0))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _shutdown_at_exit(ref: weakref.ref) -> None:
    llm = ref()
    if llm is not None:
        llm.shutdown()
