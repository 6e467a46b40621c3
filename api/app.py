"""The FastAPI application: lifespan builds the services once; routers stay thin."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.dialects import registry
from api.dialects.registry import Dialect
from api.limits import BodyLimit
from api.offline import batches, files, jobs
from api.operations import cache_admin, ops
from api.operations.housekeeping import HouseKeeping
from api.request_ids import RequestIds
from api.services import Services
from mlxq import __version__
from mlxq.db import upgrade
from mlxq.repos.jobs import cancel_orphans
from mlxq.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, *, migrate: bool = True, dialects: Sequence[Dialect] | None = None
) -> FastAPI:
    """The app serving `dialects` (api.dialects.registry.DIALECTS unless given): their routes, their errors'
    shapes and their labels in /metrics all come from their records."""
    settings = settings or get_settings()
    dialects = registry.DIALECTS if dialects is None else dialects

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(settings)
        services = app.state.services = Services.build(settings)
        if settings.database_url.startswith("sqlite"):  # embedded: this is the only api, its clients are all new
            with services.sessions.begin() as session:
                if orphans := cancel_orphans(session=session):
                    log.info("cancelled %d jobs whose clients left with the last api process (killed)", orphans)
        try:
            services.warm_up()
        except Exception:  # the broker may come up later; requests will say so if it does not
            log.warning("could not warm up the database or broker connection", exc_info=True)
        services.stats.start()
        housekeeping = HouseKeeping(services)
        housekeeping.start()
        yield
        housekeeping.stop()
        await services.aclose()

    app = FastAPI(title="mlxq", version=__version__, lifespan=lifespan)
    errors.install(app, registry.error_shapes(dialects), registry.endpoint_labels(dialects))
    # An oversized body is refused before anything reads it.
    app.add_middleware(
        BodyLimit,
        max_bytes=int(settings.max_body_mb * 2**20),
        uploads=("/v1/files", int(settings.max_file_mb * 2**20) + 2**16, "MLXQ_MAX_FILE_MB"),
        shapes=registry.error_shapes(dialects),
    )
    # Added last, so outermost: a refusal of the body limit carries the id too.
    app.add_middleware(RequestIds)
    for router in (
        ops.router,
        *registry.routers(dialects),
        jobs.router,
        files.router,
        batches.router,
        cache_admin.router,
    ):
        app.include_router(router)
    return app
