"""OpenAI's routes: validate, run through the pipeline, render."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response

from api.auth import AUTHENTICATED, Owner
from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest
from api.dialects.openai.render import ChunkWriter, chat_completion, model_list, openai_stream, text_completion
from api.pipeline import CachePolicy, Pipeline
from api.prepare import prepare
from api.services import ServicesDep
from api.streaming import cache_headers, record, stream_outcome

router = APIRouter(dependencies=AUTHENTICATED)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, services: ServicesDep, owner: Owner, cache_control: str | None = Header(None)
) -> Response:
    started = time.perf_counter()
    prepared = await prepare(services, body)
    canonical, pipeline = prepared.canonicals[0], Pipeline(services)
    policy = CachePolicy.parse(cache_control, body.cache)
    if body.stream:
        writer = ChunkWriter(kind="chat", model=services.settings.model_name, stream_options=body.stream_options)
        return await stream_outcome(
            services,
            pipeline,
            kind="chat",
            canonical=canonical,
            policy=policy,
            priority=body.priority,
            started=started,
            owner=owner,
            render=lambda source: openai_stream(source, writer),
        )
    outcome = await pipeline.run(kind="chat", canonical=canonical, policy=policy, priority=body.priority, owner=owner)
    record(services, endpoint="chat", outcome=outcome, canonical=canonical, started=started, stream=False)
    return JSONResponse(
        chat_completion(outcome.result, model=services.settings.model_name), headers=cache_headers(outcome)
    )


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, services: ServicesDep, owner: Owner, cache_control: str | None = Header(None)
) -> Response:
    started = time.perf_counter()
    prepared = await prepare(services, body)
    canonicals, echo, pipeline = prepared.canonicals, prepared.echo, Pipeline(services)
    policy = CachePolicy.parse(cache_control, body.cache)
    if body.stream:
        writer = ChunkWriter(kind="completion", model=services.settings.model_name, stream_options=body.stream_options)
        return await stream_outcome(
            services,
            pipeline,
            kind="completion",
            canonical=canonicals[0],
            policy=policy,
            priority=body.priority,
            started=started,
            owner=owner,
            render=lambda source: openai_stream(source, writer, prefix=echo[0]),
        )
    outcomes = await asyncio.gather(
        *(
            pipeline.run(kind="completion", canonical=c, policy=policy, priority=body.priority, owner=owner)
            for c in canonicals
        )
    )
    cache = outcomes[0].cache if len({o.cache for o in outcomes}) == 1 else "MIXED"
    for outcome, canonical in zip(outcomes, canonicals, strict=True):
        record(services, endpoint="completion", outcome=outcome, canonical=canonical, started=started, stream=False)
    headers = {"X-Cache": cache, "X-Request-Key": ",".join(o.key for o in outcomes)}
    return JSONResponse(
        text_completion([o.result for o in outcomes], model=services.settings.model_name, prefixes=echo),
        headers=headers,
    )


@router.get("/v1/models")
async def models(services: ServicesDep) -> dict[str, Any]:
    return model_list(services.settings.model_name)
