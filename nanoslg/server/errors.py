"""Every error the server answers, in OpenAI's shape: one exception handler maps what was raised
(an APIError, a RequestError from the engine, a validation failure, Litestar's HTTP errors) to a
status and an error body naming the field."""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from msgspec import Struct

from nanoslg.core.errors import EngineDeadError, RequestError

log = logging.getLogger("nanoslg.server")


class ErrorResponse(Struct):
    error: ErrorInfo


class ErrorInfo(Struct):
    """OpenAI's error object: `type` is the kind (ERROR_TYPES), `param` the request field at fault."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


# OpenAI's error `type` for each status the server returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
    500: "internal_server_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(ErrorInfo(message, ERROR_TYPES.get(status, "invalid_request_error"), param, code))


class APIError(Exception):
    """An error answered in the OpenAI shape with its HTTP status (and headers, e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        msgspec.json.encode(error_body(status, message, param, code)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
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


def handle_exception(request: Request, exc: Exception) -> Response:
    """One handler for everything, so no error escapes in a non-OpenAI shape; each is counted."""
    response = _response_for(request, exc)
    metrics = request.app.state.get("metrics")
    if metrics is not None:
        metrics.reject(response.status_code)
    return response


def _response_for(request: Request, exc: Exception) -> Response:
    if isinstance(exc, APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)
    if isinstance(exc, RequestError):
        return error_response(400, str(exc), exc.param, exc.code)
    if isinstance(exc, EngineDeadError):
        return error_response(503, str(exc), code="engine_unavailable")
    if isinstance(exc, ValidationException):
        msg, param = _validation_message(exc)
        return error_response(400, msg, param, "invalid_value")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        if status == 404:
            return error_response(
                404, f"{request.method} {request.url.path} is not a route of this server", code="not_found"
            )
        if status == 413:
            return error_response(
                413, "the request body is larger than server.max_body_bytes", code="request_too_large"
            )
        if status >= 500:  # e.g. the client went away while its body was being read
            log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
        # Litestar's headers carry meaning (405's Allow names the methods the route takes).
        return error_response(status, str(exc.detail), headers=dict(exc.headers or {}) or None)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error", code="internal_error")


ERROR_RESPONSES = {
    400: ResponseSpec(ErrorResponse, description="Invalid request (the `param` names the field)"),
    401: ResponseSpec(ErrorResponse, description="Missing or wrong API key (when server.api_key is set)"),
    404: ResponseSpec(ErrorResponse, description="Unknown model"),
    413: ResponseSpec(ErrorResponse, description="Request body larger than server.max_body_bytes"),
    503: ResponseSpec(ErrorResponse, description="Waiting queue full, or the engine is shutting down"),
}
