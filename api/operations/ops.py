"""The service's own routes: the root, health and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.auth import AUTHENTICATED
from api.errors import APIError
from api.operations.health import public
from api.services import ServicesDep

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> dict[str, str]:
    """What is served here, for a person or a client's reachability check (Claude Code sends `HEAD /`)."""
    return {"service": "mlxq", "health": "/health", "models": "/v1/models", "docs": "/docs"}


@router.get("/health", responses={503: {"description": "Requests are refused: no broker, or no worker of the model"}})
async def health(request: Request, services: ServicesDep) -> JSONResponse:
    """Open, for load balancers. 200 while requests are taken (`status` says `degraded` while no worker has its model
    loaded: they wait for one, as during a restart); 503, same body, while they are refused: the broker is unreachable,
    the model failed to load, or no worker has been seen for MLXQ_WORKER_WAIT_S (a `worker_unavailable`). With keys on,
    the details (counts, caches, workers' load) only behind a valid key, or for everyone with MLXQ_HEALTH_DETAILS=true
    (api.operations.health.public)."""
    snapshot = await asyncio.to_thread(services.health.snapshot)
    body = snapshot
    if not services.settings.health_details:
        try:
            await services.auth.owner(request)  # None with keys off: the details, as for a local single user
        except APIError:
            body = public(snapshot)
    refused = snapshot["broker"]["error"] is not None or (
        not snapshot["model_loaded"]
        and (snapshot["worker"]["error"] is not None or await services.model_info.lost(services.settings.model_name))
    )
    return JSONResponse(body, status_code=503 if refused else 200)


@router.get("/metrics", dependencies=AUTHENTICATED)
async def metrics(services: ServicesDep) -> Response:
    body = await asyncio.to_thread(services.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
