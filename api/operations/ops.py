"""The service's own routes: health and metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.auth import AUTHENTICATED
from api.errors import APIError
from api.operations.health import public
from api.services import ServicesDep

router = APIRouter()


@router.get("/health")
async def health(request: Request, services: ServicesDep) -> dict[str, Any]:
    """Open, for load balancers. With keys on, the details (counts, caches, workers' load) only behind a valid
    key, or for everyone with MLXQ_HEALTH_DETAILS=true (api.operations.health.public)."""
    snapshot = await asyncio.to_thread(services.health.snapshot)
    if services.settings.health_details:
        return snapshot
    try:
        await services.auth.owner(request)  # None with keys off: the details, as for a local single user
    except APIError:
        return public(snapshot)
    return snapshot


@router.get("/metrics", dependencies=AUTHENTICATED)
async def metrics(services: ServicesDep) -> Response:
    body = await asyncio.to_thread(services.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
