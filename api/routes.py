"""HTTP routes: thin handlers that validate, call the pipeline, and render in the client's dialect."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from api.errors import APIError
from api.pipeline import CachePolicy, Pipeline
from api.protocol import ChatCompletionRequest, chat_completion, model_list
from api.services import Services, ServicesDep
from mlxq import repos
from mlxq.keys import canonical_chat

router = APIRouter()


def check_model(services: Services, model: str) -> None:
    if model != services.settings.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves "
                            f"`{services.settings.model_name}`.", code="model_not_found", param="model")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, services: ServicesDep,
                           cache_control: str | None = Header(None)) -> JSONResponse:
    check_model(services, body.model)
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n")
    if body.stream:
        raise APIError(400, "Streaming is not supported yet; send stream=false.", param="stream")
    settings = services.settings
    canonical = canonical_chat(body.model_dump(exclude_none=True), default_temperature=settings.default_temperature,
                               default_max_tokens=settings.default_max_tokens)
    outcome = await Pipeline(services).run(kind="chat", canonical=canonical,
                                           policy=CachePolicy.parse(cache_control, body.cache))
    return JSONResponse(chat_completion(outcome.result, model=settings.model_name),
                        headers={"X-Cache": outcome.cache, "X-Request-Key": outcome.key})


@router.get("/v1/models")
async def models(services: ServicesDep) -> dict[str, Any]:
    return model_list(services.settings.model_name)


def health_snapshot(services: Services) -> dict[str, Any]:
    settings = services.settings
    services.stats.flush()
    with services.sessions() as session:
        workers = repos.live_workers(session=session, within_s=max(10.0, 3 * settings.heartbeat_s))
        depth = repos.queue_depth(session=session)
        counts = repos.counters(session=session)
        items, size = repos.cache_items(session=session)
    hits, misses = counts.get("cache_hits", 0), counts.get("cache_misses", 0)
    loaded = any(w.model_loaded for w in workers)
    errors = [w.error for w in workers if w.error]
    return {
        "status": "ok" if loaded else "degraded",
        "model": settings.model_name,
        "model_loaded": loaded,
        "worker": {"alive": bool(workers), "count": len(workers), "error": errors[0] if errors else None},
        "queue_depth": depth,
        "cache": {
            "hits": hits,
            "misses": misses,
            "bypass": counts.get("cache_bypass", 0),
            "total_requests": hits + misses + counts.get("cache_bypass", 0),
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "cached_items": items,
            "bytes": size,
        },
        "time": time.time(),
    }


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:
    return await asyncio.to_thread(health_snapshot, services)
