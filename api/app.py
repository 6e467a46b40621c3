"""The FastAPI application: lifespan builds the services once; routers stay thin."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.limits import BodyLimit
from api.routes import router
from api.services import Services
from mlxq import __version__
from mlxq.db import upgrade
from mlxq.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(settings)
        services = app.state.services = Services.build(settings)
        try:
            services.warm_up()
        except Exception:  # the broker may come up later; requests will say so if it does not
            log.warning("could not warm up the database or broker connection", exc_info=True)
        services.stats.start()
        services.reaper.start()
        yield
        await services.aclose()

    app = FastAPI(title="mlxq", version=__version__, lifespan=lifespan)
    errors.install(app)
    # An oversized body is refused before anything reads it.
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * 2**20))
    app.include_router(router)
    return app
