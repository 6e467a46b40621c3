"""Running the api under uvicorn so that a stop is prompt and clean.

On SIGTERM or SIGINT, uvicorn stops accepting connections and waits for the open ones; requests still
waiting for a job would hold that wait for as long as the job runs. Here the signal also sets
`Services.closing`, so those requests answer 503 within a second, and uvicorn's wait is bounded.
"""

from __future__ import annotations

from types import FrameType
from typing import cast

import uvicorn
from fastapi import FastAPI

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
    Server(config).run()
