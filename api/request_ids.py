"""One id per request, in the headers both dialects' clients read: OpenAI's `x-request-id` and Anthropic's
`request-id` (the SDKs' `_request_id`, and the `request_id` of the errors they raise), so a user's report of a
failed call can be matched to this server's log.

Pure ASGI, around the whole app: the headers go on the response's start message, so a stream carries them as
well as a JSON answer or an error, and nothing of the body is buffered.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADERS = ("x-request-id", "request-id")
# Where the id is kept in the scope, for what answers outside this middleware (an unhandled error's 500, which
# Starlette renders outside every added middleware).
SCOPE_KEY = "mlxq.request_id"


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_headers(scope: Scope) -> dict[str, str]:
    """The id headers of the request in `scope` (none outside this middleware)."""
    request_id = scope.get(SCOPE_KEY)
    return {name: request_id for name in HEADERS} if isinstance(request_id, str) else {}


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[SCOPE_KEY] = request_id = new_request_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name in HEADERS:
                    headers[name] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
