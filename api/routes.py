"""HTTP routes: thin handlers that validate, call the pipeline, and render in the client's dialect."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response

from api.errors import APIError
from api.health import health_snapshot
from api.pipeline import CachePolicy, Pipeline
from api.protocol import ChatCompletionRequest, chat_completion, model_list
from api.services import Services, ServicesDep
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
    started = time.perf_counter()
    settings = services.settings
    canonical = canonical_chat(body.model_dump(exclude_none=True), default_temperature=settings.default_temperature,
                               default_max_tokens=settings.default_max_tokens)
    outcome = await Pipeline(services).run(kind="chat", canonical=canonical,
                                           policy=CachePolicy.parse(cache_control, body.cache))
    services.metrics.observe("chat", outcome.cache, time.perf_counter() - started)
    return JSONResponse(chat_completion(outcome.result, model=settings.model_name),
                        headers={"X-Cache": outcome.cache, "X-Request-Key": outcome.key})


@router.get("/v1/models")
async def models(services: ServicesDep) -> dict[str, Any]:
    return model_list(services.settings.model_name)


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:
    return await asyncio.to_thread(health_snapshot, services)


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    body = await asyncio.to_thread(services.metrics.render)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
