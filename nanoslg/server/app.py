"""The OpenAI-compatible Litestar app: routes, the API-key guard, health, metrics and version.

The OpenAI endpoints' work is in completions.py; every error is answered by errors.py's handler.
Only the engine API is used (add_request / abort / metrics / tokenizer): no torch here.
"""

from __future__ import annotations

import dataclasses
import hmac

from litestar import Litestar, Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import SwaggerRenderPlugin

from nanoslg import __version__
from nanoslg.core.config import ServerConfig
from nanoslg.server import protocol as P
from nanoslg.server.admission import shutting_down
from nanoslg.server.body import StrictRequest, require_body
from nanoslg.server.completions import OpenAIServer
from nanoslg.server.errors import ERROR_RESPONSES, APIError, ErrorResponse, error_response, handle_exception
from nanoslg.server.metrics import ServerMetrics
from nanoslg.server.openapi import ExactSchemaPlugin, request_schemas


def create_app(engine, server_cfg) -> Litestar:
    """Builds the Litestar app; the engine must be started on the loop that serves it."""
    srv = OpenAIServer(engine, server_cfg)
    prom = ServerMetrics(engine, srv.model)
    schemas = request_schemas(srv.model, engine.vocab_size, engine.max_model_len, srv.prompts.max_chars)
    api_key: str | None = getattr(server_cfg, "api_key", None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check_key(connection, _handler) -> None:
        got = connection.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        # Constant time: the comparison takes as long whatever prefix of the key is right.
        if expected is None or not hmac.compare_digest(got, expected):
            raise APIError(
                401, "missing or wrong API key: send `Authorization: Bearer <server.api_key>`", code="invalid_api_key"
            )

    @get("/models", sync_to_thread=False, responses={401: ERROR_RESPONSES[401]})
    def models() -> P.ModelList:
        return P.ModelList([P.ModelCard(srv.model, engine.max_model_len, root=srv.model)])

    @post("/completions", status_code=200, responses=ERROR_RESPONSES)
    async def completions(request: Request, data: P.CompletionRequest) -> Response[P.CompletionResponse]:
        """OpenAI completions. With `stream: true` the answer is `text/event-stream`: `data: {chunk}`
        events, then `data: [DONE]`."""
        return await srv.completions(request, data)

    @post("/chat/completions", status_code=200, responses=ERROR_RESPONSES)
    async def chat_completions(request: Request, data: P.ChatCompletionRequest) -> Response[P.ChatCompletionResponse]:
        """OpenAI chat completions, rendered with the checkpoint's chat template. With `stream: true`:
        `data: {chunk}` events (the first carries the role), then `data: [DONE]`."""
        return await srv.chat(request, data)

    v1 = Router(
        "/v1",
        route_handlers=[models, completions, chat_completions],
        guards=[check_key] if expected is not None else [],
    )

    @get(
        "/health",
        sync_to_thread=False,
        responses={503: ResponseSpec(ErrorResponse, description="The engine loop has died, or the server is draining")},
    )
    def health() -> Response[P.HealthResponse]:
        if not engine.is_alive:
            return error_response(503, "the engine loop has stopped", code="engine_unavailable")
        if not engine.accepting:  # draining: load balancers stop sending here
            e = shutting_down(server_cfg.shutdown_timeout)
            return error_response(e.status, e.message, code=e.code, headers=e.headers)
        return OpenAIServer.json(P.HealthResponse("ok"))

    @get("/metrics", sync_to_thread=False, media_type="text/plain")
    def metrics() -> Response[bytes]:
        body, content_type = prom.render()
        return Response(body, media_type=content_type)

    @get("/version", sync_to_thread=False)
    def version() -> P.VersionResponse:
        return P.VersionResponse(__version__)

    return Litestar(
        route_handlers=[v1, health, metrics, version],
        exception_handlers={Exception: handle_exception},
        request_class=StrictRequest,
        before_request=require_body,
        request_max_body_size=getattr(server_cfg, "max_body_bytes", 16 * 1024 * 1024),
        openapi_config=OpenAPIConfig(
            title="NanoSLG",
            version=__version__,
            description="OpenAI-compatible LLM inference server",
            render_plugins=[ExactSchemaPlugin(schemas), SwaggerRenderPlugin(path="/swagger")],
        ),
        logging_config=None,
        debug=False,
        state=State({"metrics": prom}),
    )


def server_config(**overrides) -> ServerConfig:
    """A ServerConfig with overrides (tests and embedding)."""
    return dataclasses.replace(ServerConfig(), **overrides)
