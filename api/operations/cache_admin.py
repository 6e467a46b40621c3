"""Cache administration, behind the API key: both caches' statistics, and emptying them.

With per-key caches (MLXQ_CACHE_SCOPE=key, keys on) a key sees and clears its own namespace only: its statistics
are its own response cache's, and the prefix KV cache's (the workers', of every key together) are left out."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.auth import AUTHENTICATED, Owner
from api.errors import APIError
from api.services import ServicesDep
from mlxq.contract import PREFIX_CACHE_CLEARS
from mlxq.repos import cache_entries, counters

router = APIRouter(prefix="/v1/cache", tags=["cache"], dependencies=AUTHENTICATED)


@router.get("/stats")
async def cache_stats(services: ServicesDep, owner: Owner) -> dict[str, Any]:
    """The caches' statistics: the whole service's with keys off or MLXQ_CACHE_SCOPE=global; else the key's own."""
    namespace = services.admission.namespace(owner)
    if namespace:
        own = await asyncio.to_thread(services.health.namespace_cache, namespace)
        return {"scope": "key", "response_cache": own}
    snapshot = await asyncio.to_thread(services.health.snapshot)
    return {"scope": "global", "response_cache": snapshot["cache"], "prefix_cache": snapshot["prefix_cache"]}


@router.delete("")
async def clear_response_cache(
    services: ServicesDep, owner: Owner, older_than_s: Annotated[float | None, Query(ge=0)] = None
) -> dict[str, Any]:
    """Delete response-cache entries (all, or those stored more than `older_than_s` ago)."""
    namespace = services.admission.namespace(owner) if owner is not None else None

    def clear() -> int:
        with services.sessions.begin() as session:
            return cache_entries.clear_cache(session=session, namespace=namespace, older_than_s=older_than_s)

    return {"deleted": await asyncio.to_thread(clear)}


@router.delete("/prefix")
async def clear_prefix_cache(services: ServicesDep, owner: Owner) -> dict[str, Any]:
    """Make every worker drop its prefix KV cache (within a heartbeat; saved empty). With per-key caches the workers'
    caches hold every key's partitions, and one key must not empty another's: refused (an operator clears it with
    keys off or MLXQ_CACHE_SCOPE=global)."""
    if services.admission.namespace(owner):
        raise APIError(
            403,
            "With per-key caches (MLXQ_CACHE_SCOPE=key) the prefix KV cache holds every key's partitions, and one key "
            "may not empty the others'; a key's prompts are never served to another key. Clear it as an operator "
            "(keys off or MLXQ_CACHE_SCOPE=global).",
            type="permission_error",
            code="prefix_cache_shared",
        )

    def bump() -> None:
        with services.sessions.begin() as session:
            counters.bump(session=session, name=PREFIX_CACHE_CLEARS)

    await asyncio.to_thread(bump)
    return {"prefix_cache": "clearing"}
