"""A bound on request bodies: a larger one is a 413 before anything parses it.

Pure ASGI, in front of the whole app: a declared Content-Length over the bound is refused before the
body is read; a chunked body (no Content-Length) is read here up to the bound and then handed on
whole, so one that grows past it is refused without the app ever holding it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ErrorShape, error_body

TOO_LARGE = "request_too_large"


class BodyLimit:
    """`max_bytes` for every path but those under `uploads`, a prefix with its own bound (file uploads)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        uploads: tuple[str, int, str] | None = None,
        shapes: Sequence[tuple[str, ErrorShape]] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads
        self.shapes = shapes  # the dialects' error bodies by path prefix (api.errors.error_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.max_bytes, "MLXQ_MAX_BODY_MB"
        if self.uploads is not None and scope.get("path", "").startswith(self.uploads[0]):
            limit, setting = self.uploads[1], self.uploads[2]
        declared = _content_length(scope)
        if declared is not None:
            if declared > limit:
                await self._refuse(scope, send, f"The request body ({declared} bytes) is larger", limit, setting)
                return
            # The server frames the body by its Content-Length: no more than that can arrive.
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(scope, send, "The request body is larger", limit, setting)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, what: str, limit: int, setting: str) -> None:
        limit_mb = limit / 2**20
        message = f"{what} than the limit of {limit_mb:g} MB ({setting})."
        error = error_body(
            scope.get("path", ""), self.shapes, 413, message, type="invalid_request_error", code=TOO_LARGE
        )
        body = json.dumps(error).encode()
        # The unread rest of the body is not wanted: close the connection after the answer.
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
