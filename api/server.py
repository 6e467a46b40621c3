"""Running the api under uvicorn so that a stop is prompt and clean.

On SIGTERM or SIGINT, uvicorn stops accepting connections and waits for the open ones; requests still
waiting for a job would hold that wait for as long as the job runs. Here the signal also sets
`Services.closing`, so those requests answer 503 within a second, and uvicorn's wait is bounded. A stream answers
with an error event in its dialect: sse-starlette's own drain, which cuts every stream on the signal, is off, or it
raced the 503 and a stream could end on an ordinary delta, the client unable to tell its answer was cut short.
"""

from __future__ import annotations

from types import FrameType
from typing import cast

import uvicorn
from fastapi import FastAPI
from sse_starlette.sse import AppStatus

from api.app import create_app
from mlxq.settings import Settings

# After the waiting requests have answered 503, what uvicorn still gives open connections before it
# cancels them (whole seconds: uvicorn's `timeout_graceful_shutdown` is an int).
GRACEFUL_S = 3


class Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = cast(FastAPI, self.config.app)  # run() below hands uvicorn the FastAPI app itself
        if (services := getattr(app.state, "services", None)) is not None:
            services.closing.set()
        super().handle_exit(sig, frame)


def run(settings: Settings, *, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_S,
    )
    AppStatus.disable_automatic_graceful_drain()  # streams end by `closing`, with an error event (module doc)
    Server(config).run()
