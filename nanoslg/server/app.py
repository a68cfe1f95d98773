"""The OpenAI-compatible Litestar app over an AsyncEngine on the same event loop.

Every client mistake is answered in OpenAI's error shape with a 4xx status; a client that goes away
(mid-stream or while waiting for a whole answer) aborts its engine request so its KV is freed.
Only the engine API is used here (add_request / abort / metrics / tokenizer): no torch.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import uuid
from typing import Any, AsyncIterator, Optional

import msgspec
from litestar import Litestar, Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.response import Stream

from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.errors import EngineDeadError, RequestError
from nanoslg.server import protocol as P
from nanoslg.server.protocol import APIError

log = logging.getLogger("nanoslg.server")


def _version() -> str:
    from nanoslg import __version__

    return __version__


# --- errors -------------------------------------------------------------------------------------


def _error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Response:
    return Response(msgspec.json.encode(P.error_body(status, message, param, code)), status_code=status,
                    media_type="application/json")


def _validation_message(exc: ValidationException) -> tuple[str, Optional[str]]:
    """Litestar's validation detail -> (message, param) naming the offending field."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict) and item.get("message"):
            key = item.get("key")
            param = key.split(".", 1)[1] if isinstance(key, str) and key.startswith("data.") else key
            if param == "data":
                param = None
            msg = str(item["message"])
            return (f"{param}: {msg}" if param else msg), param
    return str(exc.detail or "invalid request"), None


def _handle_exception(request: Request, exc: Exception) -> Response:
    """One handler for everything, so no error escapes in a non-OpenAI shape."""
    if isinstance(exc, APIError):
        return _error_response(exc.status, exc.message, exc.param, exc.code)
    if isinstance(exc, RequestError):
        return _error_response(400, str(exc), exc.param, exc.code)
    if isinstance(exc, EngineDeadError):
        return _error_response(503, str(exc), code="engine_unavailable")
    if isinstance(exc, ValidationException):
        msg, param = _validation_message(exc)
        return _error_response(400, msg, param, "invalid_value")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 404:
            return _error_response(404, f"{request.method} {request.url.path} is not a route of this server",
                                   code="not_found")
        if status == 413:
            return _error_response(413, "the request body is larger than server.max_body_bytes",
                                   code="request_too_large")
        if status >= 500:  # e.g. the client went away while its body was being read
            log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
        return _error_response(status, str(exc.detail))
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error_response(500, "internal error", code="internal_error")


ERROR_RESPONSES = {
    400: ResponseSpec(P.ErrorResponse, description="Invalid request (the `param` names the field)"),
    401: ResponseSpec(P.ErrorResponse, description="Missing or wrong API key (when server.api_key is set)"),
    404: ResponseSpec(P.ErrorResponse, description="Unknown model"),
    413: ResponseSpec(P.ErrorResponse, description="Request body larger than server.max_body_bytes"),
    503: ResponseSpec(P.ErrorResponse, description="Waiting queue full, or the engine is shutting down"),
}


# --- small helpers ------------------------------------------------------------------------------


class _Choice:
    """One choice's accumulated output."""

    __slots__ = ("text", "token_ids", "logprobs", "finish_reason")

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.finish_reason: Optional[str] = None


class _Result:
    """One engine request accumulated from its deltas."""

    def __init__(self) -> None:
        self.prompt_ids: list[int] = []
        self.prompt: Optional[str] = None
        self.cached = 0
        self.choices: dict[int, _Choice] = {}

    def add(self, delta) -> None:
        self.prompt_ids, self.cached = delta.prompt_token_ids, delta.num_cached_tokens
        self.prompt = delta.prompt if delta.prompt is not None else self.prompt
        for o in delta.outputs:
            c = self.choices.setdefault(o.index, _Choice())
            c.text += o.text
            c.token_ids += o.token_ids
            c.logprobs += o.logprobs or []
            if o.finish_reason is not None:
                c.finish_reason = o.finish_reason


async def _collect(stream) -> _Result:
    r = _Result()
    async for delta in stream:
        r.add(delta)
    return r


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
    return P.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
                   P.PromptTokensDetails(cached))


# --- the app ------------------------------------------------------------------------------------


class OpenAIServer:
    def __init__(self, engine, server_cfg):
        self.engine = engine
        self.cfg = server_cfg
        self.model = engine.model_name
        self._tok_cache: dict[int, str] = {}

    # -- request checks --------------------------------------------------------------------------
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model}`",
                           param="model", code="model_not_found")

    def check_capacity(self) -> None:
        if self.engine.num_waiting >= self.cfg.max_waiting:
            raise APIError(503, f"the waiting queue is full ({self.cfg.max_waiting} requests); retry later",
                           code="server_overloaded")

    def sampling(self, req, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        kw: dict[str, Any] = {"n": req.n or 1, "max_tokens": max_tokens, "logprobs": logprobs}
        for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens", "stop_token_ids"):
            value = getattr(req, name)
            if value is not None:
                kw[name] = value
        if req.top_k is not None:
            # A top_k at or over the vocabulary keeps every token: the same as off, and it keeps
            # huge values away from tensor code.
            kw["top_k"] = -1 if req.top_k >= self.engine.vocab_size else req.top_k
        if req.stop is not None:
            kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options",
                           code="invalid_value")
        return SamplingParams(**kw)

    def add_all(self, prompts: list, params: SamplingParams, base_id: str, param: str = "prompt") -> list:
        """Adds one engine request per prompt; all or none."""
        self.check_capacity()
        streams = []
        try:
            for i, p in enumerate(prompts):
                streams.append(self.engine.add_request(p, params, f"{base_id}-{i}"))
        except BaseException as e:
            self.abort(streams)
            if isinstance(e, RequestError) and e.param == "prompt" and param != "prompt":
                raise RequestError(str(e), param=param, code=e.code) from None
            raise
        return streams

    def abort(self, streams: list) -> None:
        for s in streams:
            self.engine.abort(s.request_id)

    async def wait_all(self, request: Request, streams: list) -> list[_Result]:
        """Collects every stream; a client that disconnects first aborts them."""
        work = asyncio.ensure_future(asyncio.gather(*(_collect(s) for s in streams)))
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

    # -- token text for logprobs -----------------------------------------------------------------
    def tok_str(self, tid: int) -> str:
        s = self._tok_cache.get(tid)
        if s is None:
            tok = self.engine.tokenizer
            try:
                s = tok.decode([tid]) if tok is not None else f"token_id:{tid}"
            except Exception:  # an id the tokenizer lacks (a padded embedding row)
                s = f"token_id:{tid}"
            if len(self._tok_cache) < 1_000_000:
                self._tok_cache[tid] = s
        return s

    def completion_logprobs(self, lps: list, offset: int, prompt_ids: Optional[list[int]] = None
                            ) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for tid in prompt_ids or []:  # echoed prompt tokens: the engine scores no prompt logprobs
            s = self.tok_str(tid)
            out.tokens.append(s)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(offset)
            offset += len(s)
        for lp in lps:
            s = self.tok_str(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.tok_str(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, lps: list) -> P.ChatLogprobs:
        content = []
        for lp in lps:
            s = self.tok_str(lp.token_id)
            top = [P.TopLogprob(self.tok_str(t), v, list(self.tok_str(t).encode())) for t, v in lp.top]
            content.append(P.ChatTokenLogprob(s, lp.logprob, list(s.encode()), top))
        return P.ChatLogprobs(content)

    # -- prompts ---------------------------------------------------------------------------------
    def completion_prompts(self, prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        kinds = {type(x) for x in prompt}
        if kinds == {int}:
            return [list(prompt)]
        if kinds in ({str}, {list}):
            return list(prompt)
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of "
                            "token-id lists (not a mix)", param="prompt", code="invalid_type")

    def prompt_text(self, r: _Result) -> str:
        if r.prompt is not None:
            return r.prompt
        tok = self.engine.tokenizer
        return tok.decode(r.prompt_ids) if tok is not None else ""

    def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        msgs = []
        for m in req.messages:
            if m.content is None or isinstance(m.content, str):
                content = m.content or ""
            else:
                content = "".join(part.text for part in m.content)
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so chat is not available; use /v1/completions "
                                "with token ids", param="messages", code="invalid_value")
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # no template, or the template refused the messages
            raise APIError(400, f"the chat template could not render the messages: {e}", param="messages",
                           code="invalid_value") from None
        # The template already holds the special tokens it wants (BOS...): add none again.
        return list(tok.encode(text, add_special_tokens=False))

    # -- /v1/completions -------------------------------------------------------------------------
    async def completions(self, request: Request, req: P.CompletionRequest) -> Response:
        self.check_model(req.model)
        prompts = self.completion_prompts(req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = self.sampling(req, max_tokens, req.logprobs)
        if params.n * len(prompts) > P.MAX_CHOICES:
            raise APIError(400, f"n x number of prompts = {params.n * len(prompts)} is over {P.MAX_CHOICES}",
                           param="n", code="invalid_value")
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = self.add_all(prompts, params, rid)
        if req.stream:
            return self.sse(self.completion_events(rid, req, params, streams), streams)
        results = await self.wait_all(request, streams)
        choices, completion_tokens = [], 0
        for i, r in enumerate(results):
            prefix = self.prompt_text(r) if req.echo else ""
            for j in sorted(r.choices):
                c = r.choices[j]
                completion_tokens += len(c.token_ids)
                lp = None
                if req.logprobs is not None:
                    lp = self.completion_logprobs(c.logprobs, 0, r.prompt_ids if req.echo else None)
                choices.append(P.CompletionChoice(i * params.n + j, prefix + c.text, lp, c.finish_reason))
        usage = _usage(sum(len(r.prompt_ids) for r in results), completion_tokens, sum(r.cached for r in results))
        return self.json(P.CompletionResponse(rid, self.model, choices, usage))

    async def completion_events(self, rid: str, req: P.CompletionRequest, params: SamplingParams,
                                streams: list) -> AsyncIterator[bytes]:
        created = P.now()
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
                r = _Result()
                r.prompt, r.prompt_ids = delta.prompt, delta.prompt_token_ids
                text = self.prompt_text(r)
                for j in range(n):
                    lp = self.completion_logprobs([], 0, r.prompt_ids) if req.logprobs is not None else None
                    offsets[i * n + j] = len(text)
                    yield P.sse(P.CompletionChunk(rid, self.model, [P.CompletionChoice(i * n + j, text, lp)],
                                                  created))
            for o in delta.outputs:
                idx = i * n + o.index
                completion_tokens += len(o.token_ids)
                if not o.token_ids and not o.text and o.finish_reason is None:
                    continue  # no new token this step (its text may still be held back: one chunk a step)
                lp = None
                if req.logprobs is not None:
                    lp = self.completion_logprobs(o.logprobs or [], offsets.get(idx, 0))
                offsets[idx] = offsets.get(idx, 0) + len(o.text)
                yield P.sse(P.CompletionChunk(rid, self.model, [P.CompletionChoice(idx, o.text, lp, o.finish_reason)],
                                              created))
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = _usage(sum(prompt_tokens.values()), completion_tokens, sum(cached.values()))
            yield P.sse(P.CompletionChunk(rid, self.model, [], created, usage=usage))

    # -- /v1/chat/completions --------------------------------------------------------------------
    async def chat(self, request: Request, req: P.ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        ids = self.chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling(req, max_tokens, logprobs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.add_all([ids], params, rid, param="messages")
        if req.stream:
            return self.sse(self.chat_events(rid, req, params, streams), streams)
        (r,) = await self.wait_all(request, streams)
        choices = []
        for j in sorted(r.choices):
            c = r.choices[j]
            lp = self.chat_logprobs(c.logprobs) if req.logprobs else None
            choices.append(P.ChatChoice(j, P.ChatResponseMessage("assistant", c.text), lp, c.finish_reason))
        usage = _usage(len(r.prompt_ids), sum(len(c.token_ids) for c in r.choices.values()), r.cached)
        return self.json(P.ChatCompletionResponse(rid, self.model, choices, usage))

    async def chat_events(self, rid: str, req: P.ChatCompletionRequest, params: SamplingParams,
                          streams: list) -> AsyncIterator[bytes]:
        created = P.now()
        for j in range(params.n):  # every choice starts with the role
            yield P.sse(P.ChatCompletionChunk(rid, self.model, [P.ChatChunkChoice(j, P.DeltaMessage("assistant", ""))],
                                              created))
        prompt_tokens = cached = completion_tokens = 0
        async for _, delta in _merge(streams):
            prompt_tokens, cached = len(delta.prompt_token_ids), delta.num_cached_tokens
            for o in delta.outputs:
                completion_tokens += len(o.token_ids)
                if not o.token_ids and not o.text and o.finish_reason is None:
                    continue  # one chunk per step with new tokens, as vLLM sends
                lp = self.chat_logprobs(o.logprobs or []) if req.logprobs else None
                d = P.DeltaMessage(content=o.text) if o.text else P.DeltaMessage()
                yield P.sse(P.ChatCompletionChunk(rid, self.model, [P.ChatChunkChoice(o.index, d, lp, o.finish_reason)],
                                                  created))
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = _usage(prompt_tokens, completion_tokens, cached)
            yield P.sse(P.ChatCompletionChunk(rid, self.model, [], created, usage=usage))

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
                yield P.sse(P.error_body(503, str(e), code="engine_unavailable"))
            except Exception:
                log.exception("stream %s failed", streams[0].request_id if streams else "?")
                yield P.sse(P.error_body(500, "internal error", code="internal_error"))
            finally:
                # Runs on normal end, on error and when the client disconnects (cancellation or
                # generator close): aborting a finished request is a no-op.
                self.abort(streams)
            yield P.SSE_DONE

        return Stream(framed(), status_code=200, media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- Prometheus /metrics ------------------------------------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(m, model: str) -> str:
    """EngineMetrics -> Prometheus text format, with the names vLLM users already graph."""
    lab = f'model_name="{_label(model)}"'
    lines: list[str] = []

    def head(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    def hist(name: str, h, help_: str) -> None:
        head(name, "histogram", help_)
        cum = 0
        for bound, count in zip(h.buckets, h.counts):
            cum += count
            lines.append(f'{name}_bucket{{{lab},le="{bound}"}} {cum}')
        cum += h.counts[-1]
        lines.append(f'{name}_bucket{{{lab},le="+Inf"}} {cum}')
        lines.append(f"{name}_sum{{{lab}}} {float(h.total)}")
        lines.append(f"{name}_count{{{lab}}} {h.n}")

    def scalar(name: str, kind: str, value, help_: str) -> None:
        head(name, kind, help_)
        lines.append(f"{name}{{{lab}}} {value}")

    hist("vllm:time_to_first_token_seconds", m.time_to_first_token, "Time to first token in seconds.")
    hist("vllm:inter_token_latency_seconds", m.inter_token_latency, "Time between output tokens in seconds.")
    hist("vllm:e2e_request_latency_seconds", m.e2e_request_latency, "End-to-end request latency in seconds.")
    hist("vllm:request_queue_time_seconds", m.request_queue_time, "Time from arrival to first schedule in seconds.")
    scalar("vllm:num_requests_running", "gauge", m.num_running, "Sequences running on the model.")
    scalar("vllm:num_requests_waiting", "gauge", m.num_waiting, "Sequences waiting to be scheduled.")
    scalar("vllm:kv_cache_usage_perc", "gauge", float(m.kv_cache_usage), "KV cache usage (1 = full).")
    scalar("vllm:prompt_tokens_total", "counter", m.prompt_tokens, "Prompt tokens received.")
    scalar("vllm:generation_tokens_total", "counter", m.generation_tokens, "Tokens generated.")
    scalar("vllm:num_preemptions_total", "counter", m.preemptions, "Sequences preempted.")
    scalar("vllm:prefix_cache_queries_total", "counter", m.prefix_cache_queries,
           "Prompt tokens looked up in the prefix cache.")
    scalar("vllm:prefix_cache_hits_total", "counter", m.prefix_cache_hits, "Prompt tokens found in the prefix cache.")
    head("vllm:request_success_total", "counter", "Finished sequences by finish reason.")
    for reason in sorted({"stop", "length", "abort"} | set(m.requests_finished)):
        count = m.requests_finished.get(reason, 0)
        lines.append(f'vllm:request_success_total{{{lab},finished_reason="{_label(str(reason))}"}} {count}')
    return "\n".join(lines) + "\n"


# --- wiring -------------------------------------------------------------------------------------


def create_app(engine, server_cfg) -> Litestar:
    """Builds the Litestar app; the engine must be started on the loop that serves it."""
    srv = OpenAIServer(engine, server_cfg)
    api_key: Optional[str] = getattr(server_cfg, "api_key", None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check_key(connection, _handler) -> None:
        got = connection.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        # Constant time: the comparison takes as long whatever prefix of the key is right.
        if expected is None or not hmac.compare_digest(got, expected):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <server.api_key>`",
                           code="invalid_api_key")

    @get("/models", sync_to_thread=False, responses={401: ERROR_RESPONSES[401]})
    def models() -> P.ModelList:
        return P.ModelList([P.ModelCard(srv.model, engine.max_model_len, root=srv.model)])

    @post("/completions", status_code=200, responses=ERROR_RESPONSES,
          description="OpenAI completions. With `stream: true` the answer is `text/event-stream`: "
                      "`data: {chunk}` events, then `data: [DONE]`.")
    async def completions(request: Request, data: P.CompletionRequest) -> Response[P.CompletionResponse]:
        return await srv.completions(request, data)

    @post("/chat/completions", status_code=200, responses=ERROR_RESPONSES,
          description="OpenAI chat completions, rendered with the checkpoint's chat template. With "
                      "`stream: true`: `data: {chunk}` events (the first carries the role), then `data: [DONE]`.")
    async def chat_completions(request: Request, data: P.ChatCompletionRequest) -> Response[P.ChatCompletionResponse]:
        return await srv.chat(request, data)

    v1 = Router("/v1", route_handlers=[models, completions, chat_completions],
                guards=[check_key] if expected is not None else [])

    @get("/health", sync_to_thread=False,
         responses={503: ResponseSpec(P.ErrorResponse, description="The engine loop has died")})
    def health() -> Response[P.HealthResponse]:
        if not engine.is_alive:
            return _error_response(503, "the engine loop has stopped", code="engine_unavailable")
        return OpenAIServer.json(P.HealthResponse("ok"))

    @get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
    def metrics() -> str:
        return render_metrics(engine.metrics, srv.model)

    @get("/version", sync_to_thread=False)
    def version() -> P.VersionResponse:
        return P.VersionResponse(_version())

    return Litestar(
        route_handlers=[v1, health, metrics, version],
        exception_handlers={Exception: _handle_exception},
        request_max_body_size=getattr(server_cfg, "max_body_bytes", 16 * 1024 * 1024),
        openapi_config=OpenAPIConfig(title="NanoSLG", version=_version(),
                                     description="OpenAI-compatible LLM inference server"),
        logging_config=None,
        debug=False,
    )


def server_config(**overrides) -> Any:
    """A ServerConfig with overrides (tests and embedding)."""
    from nanoslg.core.config import ServerConfig

    return dataclasses.replace(ServerConfig(), **overrides)
