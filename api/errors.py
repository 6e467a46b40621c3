"""Errors in the client's dialect: OpenAI error objects, never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.operations.metrics import request_counter
from api.pipeline.json_values import json_value_problem
from api.request_ids import request_id_headers

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    @classmethod
    def from_job(cls, error: dict[str, Any]) -> APIError:
        return cls(
            int(error.get("status", 500)),
            error.get("message", "job failed"),
            type=error.get("type"),
            code=error.get("code"),
            param=error.get("param"),
        )


def _utf8(text: str) -> str:
    """Text that can be encoded: a lone surrogate the client sent (echoed in a message) must not make a 500."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def openai_error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (`{"error": {message, type, param, code}}`): the one builder of it, for answers,
    stream errors, the body limit and batch output lines."""
    return {"error": {"message": _utf8(message), "type": type, "param": _utf8(param) if param else param, "code": code}}


def error_path(loc: Sequence[Any], body: Any, *, missing: bool = False) -> list[str | int]:
    """The path of a validation error in the body as the client sent it.

    Pydantic's locations also name the branch of a union they were checked against (the message
    role, `string`, `array`, ...), which is no part of the body: a segment is kept only where it
    indexes into the body, or is the field found missing at the end.
    """
    # FastAPI's first segment says where the value came from (the body, the query string, ...), not its name.
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else loc)
    if body is None:
        return parts
    path: list[str | int] = []
    node = body
    for i, part in enumerate(parts):
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and i == len(parts) - 1):
            continue  # a union branch
        path.append(part)
    return path


def _describe(error: dict[str, Any], body: Any) -> tuple[str, str]:
    """(dotted path, message) of one pydantic error."""
    kind = error.get("type")
    missing = kind in ("missing", "union_tag_not_found")
    path = error_path(error.get("loc", ()), body, missing=missing)
    if kind in ("union_tag_invalid", "union_tag_not_found"):  # a message's `role`: name that field
        path.append(str((error.get("ctx") or {}).get("discriminator", "")).strip("'\""))
    dotted = ".".join(str(p) for p in path)
    if not dotted:
        return "", (
            "The request body is missing (a JSON object is expected)."
            if missing
            else f"Invalid request body: {error.get('msg')}."
        )
    if missing:
        return dotted, f"Missing required parameter: '{dotted}'."
    return dotted, f"Invalid value for '{dotted}': {error.get('msg')}."


# Pydantic's error types for a value that is not an object where one is expected.
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def _not_an_object(first: dict[str, Any], body: Any, content_type: str | None) -> str | None:
    """What to say when the body as a whole is not a JSON object: sent as another media type (FastAPI then does
    not parse it), or JSON of another kind; None for any other error."""
    if tuple(first.get("loc", ())) != ("body",) or first.get("type") not in _NOT_AN_OBJECT:
        return None
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        return (
            f"The request body must be a JSON object sent with Content-Type: application/json; got Content-Type "
            f"'{media}'."
        )
    kind = "null" if body is None else _JSON_KINDS.get(type(body), type(body).__name__)
    return f"The request body must be a JSON object; got {kind}."


def _validation_message(exc: RequestValidationError, content_type: str | None = None) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if not_object := _not_an_object(first, getattr(exc, "body", None), content_type):
        return not_object, None
    if first.get("type") == "json_invalid":
        return f"Could not parse the request body as JSON: {(first.get('ctx') or {}).get('error', '')}", None
    # A lone surrogate (or NaN) is named as such even where it also made a field invalid.
    if problem := json_value_problem(getattr(exc, "body", None)):
        return problem
    described = list(dict.fromkeys(_describe(e, getattr(exc, "body", None)) for e in errors))
    (param, message), rest = described[0], described[1:]
    if rest:
        message += (
            f" ({len(rest)} more: " + "; ".join(m for _, m in rest[:3]) + ("; ..." if len(rest) > 3 else "") + ")"
        )
    return message, param or None


def invalid_body(exc: ValidationError, body: Any) -> APIError:
    """A body validated outside a route (a job's, a batch line's) refused as the route would refuse it."""
    message, param = _validation_message(RequestValidationError(exc.errors(), body=body))
    return APIError(400, message, param=param)


# A dialect's error body of (status, message), for the paths whose clients expect it rather than OpenAI's.
ErrorShape = Callable[[int, str], dict[str, Any]]


def error_body(
    path: str,
    shapes: Sequence[tuple[str, ErrorShape]],
    status: int,
    message: str,
    *,
    type: str,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """The error body a client of `path` reads: its dialect's shape (by prefix), else OpenAI's error object."""
    for prefix, shape in shapes:
        if path.startswith(prefix):
            return shape(status, _utf8(message))
    return openai_error_body(message, type=type, code=code, param=param)


def install(
    app: FastAPI, shapes: Sequence[tuple[str, ErrorShape]] = (), endpoints: Mapping[str, str] | None = None
) -> None:
    """Answer every error in its client's dialect: under a prefix of `shapes` in that shape, else as OpenAI's error
    object. A refused request to a generation path of `endpoints` (path -> /metrics label) is counted there. Both
    come from the dialect registry (api.dialects.registry, which api.app reads)."""
    endpoints = endpoints or {}

    def respond(
        request: Request,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        endpoint = endpoints.get(request.url.path)
        if endpoint is not None and (services := getattr(request.app.state, "services", None)) is not None:
            services.stats.count(request_counter(endpoint, status, "none"))
        body = error_body(request.url.path, shapes, status, message, type=type, code=code, param=param)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(
            request, exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request.headers.get("content-type"))
        return respond(request, 400, message, type="invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(
            request, exc.status_code, str(exc.detail), type=_TYPES.get(exc.status_code, "invalid_request_error")
        )

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database is down or restarting: a retryable 503, not a 500 (the pool reconnects once it is back).
        log.warning("database error: %s", exc.orig)
        return respond(
            request,
            503,
            "The database is unavailable; retry the request.",
            type="server_error",
            code="database_unavailable",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # Starlette answers this one outside every added middleware (api.request_ids): the id goes on here.
        return respond(
            request, 500, "Internal server error.", type="server_error", headers=request_id_headers(request.scope)
        )
