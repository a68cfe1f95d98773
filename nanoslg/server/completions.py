"""The OpenAI completions and chat completions endpoints over an AsyncEngine on the same event loop.

Every client mistake is answered in OpenAI's error shape with a 4xx status; a client that goes away
(mid-stream or while waiting for a whole answer) aborts its engine request so its KV is freed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from nanoslg.core.errors import EngineDeadError, RequestError
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.engine.outputs import RequestOutput
from nanoslg.engine.stream import collect
from nanoslg.server import protocol as P
from nanoslg.server.admission import Admission
from nanoslg.server.errors import APIError, error_body
from nanoslg.server.logprobs import Logprobs
from nanoslg.server.prompts import PromptEncoder
from nanoslg.server.structured import compile_for, constraints
from nanoslg.server.tools import ToolStream, ToolUse

log = logging.getLogger("nanoslg.server")


async def _merge(streams: list) -> AsyncIterator[tuple[int, Any]]:
    """Yields (stream index, delta) from several engine streams as they come."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s) -> None:
        try:
            async for d in s:
                queue.put_nowait((i, d))
            queue.put_nowait((i, None))
        except Exception as e:  # EngineDeadError: hand it to the reader
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, d = await queue.get()
            if d is None:
                left -= 1
            elif isinstance(d, BaseException):
                raise d
            else:
                yield i, d
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the client going away.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> P.Usage:
    return P.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, P.PromptTokensDetails(cached))


class OpenAIServer:
    def __init__(self, engine, server_cfg):
        self.engine = engine
        self.cfg = server_cfg
        self.model = engine.model_name
        self.prompts = PromptEncoder(engine.tokenizer, engine.max_model_len)
        self.lp = Logprobs(engine.tokenizer)
        self.admission = Admission(engine, server_cfg)

    # -- request checks --------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model}`",
                param="model",
                code="model_not_found",
            )

    def check_capacity(self) -> None:
        self.admission.check()

    def sampling(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        kw: dict[str, Any] = {"n": req.n or 1, "max_tokens": max_tokens, "logprobs": logprobs}
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "min_tokens",
            "ignore_eos",
            "skip_special_tokens",
            "stop_token_ids",
        ):
            value = getattr(req, name)
            if value is not None:
                kw[name] = value
        if req.top_k is not None:
            # A top_k at or over the vocabulary keeps every token: the same as off, and it keeps
            # huge values away from tensor code.
            kw["top_k"] = -1 if req.top_k >= self.engine.vocab_size else req.top_k
        if req.stop is not None:
            kw["stop"] = req.stop  # a string or a list: SamplingParams normalises it
        kw.update(constraints(req)[0])  # response_format, guided_*, logit_bias
        if req.stream_options is not None and not req.stream:
            raise APIError(
                400, "stream_options is only allowed with stream=true", param="stream_options", code="invalid_value"
            )
        return SamplingParams(**kw)

    def add_all(self, prompts: list, params: SamplingParams, base_id: str, stream: bool, param: str = "prompt") -> list:
        """Adds one engine request per prompt; all or none (`stream`: the answer is streamed, so each
        delta wakes its reader; else the reader wakes once, with the whole result)."""
        self.check_capacity()
        streams = []
        try:
            for i, p in enumerate(prompts):
                streams.append(self.engine.add_request(p, params, f"{base_id}-{i}", each_delta=stream))
        except BaseException as e:
            self.abort(streams)
            if isinstance(e, RequestError) and e.param == "prompt" and param != "prompt":
                raise RequestError(str(e), param=param, code=e.code) from None
            raise
        return streams

    def abort(self, streams: list) -> None:
        for s in streams:
            self.engine.abort(s.request_id)

    async def wait_all(self, request: Request, streams: list) -> list[RequestOutput]:
        """Collects every stream; a client that disconnects first aborts them."""
        work = asyncio.ensure_future(asyncio.gather(*(collect(s) for s in streams)))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it now
                self.abort(streams)
        if not work.done() or work.cancelled():
            raise APIError(400, "the client disconnected", code="client_disconnected")
        if work.exception() is not None:  # one prompt failed: the others must not keep running
            self.abort(streams)
        return work.result()

    async def echo_text(self, prompt, ids: list[int], skip_special: bool) -> str:
        """The prompt as echoed: the string sent, or the decoded ids."""
        if isinstance(prompt, str) or self.engine.tokenizer is None:
            return prompt if isinstance(prompt, str) else ""
        return await self.prompts.decode(ids, skip_special)

    # -- /v1/completions -------------------------------------------------------------------------
    async def completions(self, request: Request, req: P.CompletionRequest) -> Response:
        self.check_model(req.model)
        self.check_capacity()
        prompts = self.prompts.completion_prompts(req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = self.sampling(req, max_tokens, req.logprobs)
        await compile_for(self.engine, params, constraints(req)[1])
        if params.n * len(prompts) > P.MAX_CHOICES:
            raise APIError(
                400,
                f"n x number of prompts = {params.n * len(prompts)} is over {P.MAX_CHOICES}",
                param="n",
                code="invalid_value",
            )
        encoded = await self.prompts.encode(prompts)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = self.add_all(encoded, params, rid, bool(req.stream))
        if req.stream:
            return self.sse(self.completion_events(rid, req, params, streams, prompts), streams)
        results = await self.wait_all(request, streams)
        self.admission.check_finished(results)
        choices, completion_tokens = [], 0
        skip = params.skip_special_tokens
        for i, r in enumerate(results):
            prefix = await self.echo_text(prompts[i], r.prompt_token_ids, skip) if req.echo else ""
            p_ids = r.prompt_token_ids if req.echo else None
            for c in r.outputs:
                completion_tokens += len(c.token_ids)
                lp = None
                if req.logprobs is not None:
                    lps, end = c.logprobs or [], len(prefix) + len(c.text)
                    offs = self.lp.offsets(r.prompt_token_ids, [x.token_id for x in lps], len(prefix), skip)
                    p_offs = self.lp.offsets([], p_ids, 0, skip) if p_ids else []
                    lp = self.lp.completion(lps, [min(o, end) for o in offs], p_ids, p_offs)
                choices.append(P.CompletionChoice(i * params.n + c.index, prefix + c.text, lp, c.finish_reason))
        usage = _usage(
            sum(len(r.prompt_token_ids) for r in results), completion_tokens, sum(r.num_cached_tokens for r in results)
        )
        return self.json(P.CompletionResponse(id=rid, model=self.model, choices=choices, usage=usage))

    async def completion_events(
        self, rid: str, req: P.CompletionRequest, params: SamplingParams, streams: list, prompts: list
    ) -> AsyncIterator[bytes]:
        chunk = functools.partial(P.CompletionChunk, id=rid, model=self.model, created=P.now())
        n = params.n
        offsets: dict[int, int] = {}
        prompt_tokens: dict[int, int] = {}
        cached: dict[int, int] = {}
        completion_tokens = 0
        echoed: set[int] = set()
        async for i, delta in _merge(streams):
            prompt_tokens[i], cached[i] = len(delta.prompt_token_ids), delta.num_cached_tokens
            if req.echo and i not in echoed:
                echoed.add(i)
                p_ids, skip = delta.prompt_token_ids, params.skip_special_tokens
                text = await self.echo_text(prompts[i], p_ids, skip)
                for j in range(n):
                    lp = None
                    if req.logprobs is not None:
                        lp = self.lp.completion([], [], p_ids, self.lp.offsets([], p_ids, 0, skip))
                    offsets[i * n + j] = len(text)
                    yield P.sse(chunk(choices=[P.CompletionChoice(i * n + j, text, lp)]))
            for o in delta.outputs:
                idx = i * n + o.index
                completion_tokens += len(o.token_ids)
                if not o.token_ids and not o.text and o.finish_reason is None:
                    continue  # no new token this step (its text may still be held back: one chunk a step)
                lp = None
                if req.logprobs is not None:
                    lps, off = o.logprobs or [], offsets.get(idx, 0)
                    if len(lps) == 1:  # the usual chunk: one token, whose text the chunk carries
                        offs = [off + self.lp.start_in(o.text, lps[0].token_id)]
                    else:  # text held back for a stop string came out with later tokens
                        offs = [off] * len(lps)
                    lp = self.lp.completion(lps, offs)
                offsets[idx] = offsets.get(idx, 0) + len(o.text)
                yield P.sse(chunk(choices=[P.CompletionChoice(idx, o.text, lp, o.finish_reason)]))
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = _usage(sum(prompt_tokens.values()), completion_tokens, sum(cached.values()))
            yield P.sse(chunk(choices=[], usage=usage))

    # -- /v1/chat/completions --------------------------------------------------------------------
    async def chat(self, request: Request, req: P.ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        self.check_capacity()
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        tools = ToolUse(req, getattr(self.cfg, "tool_parser", "hermes"))
        ids = await self.prompts.chat(req, tools.template_tools())
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        field = constraints(req)[1]
        params = tools.constrain(self.sampling(req, max_tokens, logprobs), field)
        await compile_for(self.engine, params, tools.field or field)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.add_all([ids], params, rid, bool(req.stream), param="messages")
        if req.stream:
            return self.sse(self.chat_events(rid, req, params, streams, tools), streams)
        (r,) = await self.wait_all(request, streams)
        self.admission.check_finished([r])
        choices = []
        for c in r.outputs:
            lp = self.lp.chat(c.logprobs or []) if req.logprobs else None
            content, calls, reason = tools.finish(c.text, c.finish_reason)
            message = P.ChatResponseMessage("assistant", content, calls)
            choices.append(P.ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=reason))
        usage = _usage(len(r.prompt_token_ids), sum(len(c.token_ids) for c in r.outputs), r.num_cached_tokens)
        return self.json(P.ChatCompletionResponse(id=rid, model=self.model, choices=choices, usage=usage))

    async def chat_events(
        self, rid: str, req: P.ChatCompletionRequest, params: SamplingParams, streams: list, tools: ToolUse
    ) -> AsyncIterator[bytes]:
        chunk = functools.partial(P.ChatCompletionChunk, id=rid, model=self.model, created=P.now())
        for j in range(params.n):  # every choice starts with the role
            yield P.sse(chunk(choices=[P.ChatChunkChoice(index=j, delta=P.DeltaMessage("assistant", ""))]))
        prompt_tokens = cached = completion_tokens = 0
        calls = [ToolStream(tools) for _ in range(params.n)]  # text becomes content or tool-call deltas
        async for _, delta in _merge(streams):
            prompt_tokens, cached = len(delta.prompt_token_ids), delta.num_cached_tokens
            for o in delta.outputs:
                completion_tokens += len(o.token_ids)
                if not o.token_ids and not o.text and o.finish_reason is None:
                    continue  # one chunk per step with new tokens, as vLLM sends
                lp = self.lp.chat(o.logprobs or []) if req.logprobs else None
                content, tool_calls = calls[o.index].feed(o.text)
                reason = o.finish_reason
                if reason is not None:
                    rest, ends, reason = calls[o.index].end(reason)
                    content, tool_calls = (
                        (content or "") + (rest or "") or None,
                        (tool_calls or []) + (ends or []) or None,
                    )
                d = P.DeltaMessage(content=content, tool_calls=tool_calls)
                yield P.sse(
                    chunk(choices=[P.ChatChunkChoice(index=o.index, delta=d, logprobs=lp, finish_reason=reason)])
                )
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = _usage(prompt_tokens, completion_tokens, cached)
            yield P.sse(chunk(choices=[], usage=usage))

    # -- responses -------------------------------------------------------------------------------
    @staticmethod
    def json(obj: Any, status: int = 200) -> Response:
        return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")

    def sse(self, events: AsyncIterator[bytes], streams: list) -> Stream:
        async def framed() -> AsyncIterator[bytes]:
            try:
                async for chunk in events:
                    yield chunk
            except EngineDeadError as e:  # headers are gone: report in-band, then end properly
                yield P.sse(error_body(503, str(e), code="engine_unavailable"))
            except Exception:
                log.exception("stream %s failed", streams[0].request_id if streams else "?")
                yield P.sse(error_body(500, "internal error", code="internal_error"))
            finally:
                # Runs on normal end, on error and when the client disconnects (cancellation or
                # generator close): aborting a finished request is a no-op.
                self.abort(streams)
            yield P.SSE_DONE

        return Stream(
            framed(),
            status_code=200,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
