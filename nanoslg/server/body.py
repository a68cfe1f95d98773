"""Request bodies, decoded strictly into the endpoint's msgspec Struct.

Litestar decodes a JSON body loosely (`"16"` becomes 16) and lets decoding errors other than
msgspec's own escape as 500s (invalid UTF-8, nesting deeper than the interpreter's recursion
limit). Here every body is decoded typed and strict, as OpenAI does (a number written 16.0 is still
the integer 16), and each failure is a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request

from nanoslg.server.errors import APIError

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"missing required field `(?P<name>[^`]+)`")


def _invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(err: msgspec.ValidationError) -> APIError:
    """msgspec's "Expected `int | null`, got `str` - at `$.max_tokens`" -> a 400 naming max_tokens."""
    m = _AT.match(str(err))
    msg, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    if not path and (missing := _MISSING.search(msg)):
        path = missing.group("name")
    return _invalid(f"{path}: {msg}" if path else msg, path or None)


def _integral(obj: Any) -> Any:
    """Integral floats as ints, through lists and objects."""
    if isinstance(obj, float):
        return int(obj) if obj.is_integer() else obj
    if isinstance(obj, list):
        return [_integral(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _integral(v) for k, v in obj.items()}
    return obj


def decode_body(body: bytes, target: type) -> Any:
    """The JSON body as `target`, strictly typed; a 400 naming the field for anything else."""
    try:
        try:
            return msgspec.json.decode(body, type=target, strict=True)
        except msgspec.ValidationError as e:
            if "got `float`" not in str(e):
                raise
            # JSON has one number type: 16.0 is the integer 16 (JSON Schema and OpenAI agree).
            return msgspec.convert(_integral(msgspec.json.decode(body)), target, strict=True)
    except msgspec.ValidationError as e:
        raise validation_error(e) from None
    except msgspec.DecodeError as e:
        raise _invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except UnicodeDecodeError:
        raise _invalid("the request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise _invalid("the request body is nested too deeply", code="invalid_json") from None


async def require_body(request: Request) -> None:
    """A before-request hook: Litestar passes an empty body on as a missing `data` argument (its
    message is "'data'"), so routes that take a body say what is wrong first."""
    if request.route_handler.parsed_data_field is not None and not (await request.body()).strip():
        raise _invalid("the request body is empty; send a JSON object", code="invalid_json")


class StrictRequest(Request):
    """The app's request class: `data` is decoded by `decode_body` into the handler's data type."""

    async def json(self) -> Any:
        field = self.route_handler.parsed_data_field
        body = await self.body()
        return decode_body(body, Any if field is None else field.annotation)
