"""Anthropic's routes: the request in its own models, then the one path every dialect takes (its OpenAI-form
twin through api.prepare, so both dialects share validation, keys and caches), answered in its own shapes.
`x-api-key`, `anthropic-version`, `anthropic-beta` and `?beta=true` (Claude Code) are accepted as sent."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response

from api.auth import AUTHENTICATED, Owner
from api.dialects.anthropic.protocol import CountTokensRequest, MessagesRequest, to_openai
from api.dialects.anthropic.render import MessageStreamWriter, anthropic_stream, error_body, message
from api.pipeline import CachePolicy, Pipeline
from api.prepare import parse, prepare
from api.services import ServicesDep
from api.streaming import cache_headers, record, stream_outcome

router = APIRouter(tags=["anthropic"], dependencies=AUTHENTICATED)
# Errors on these paths come in Anthropic's shape (api.errors.install).
ERROR_SHAPES = (("/v1/messages", error_body),)


@router.post("/v1/messages")
async def messages(
    body: MessagesRequest, services: ServicesDep, owner: Owner, cache_control: str | None = Header(None)
) -> Response:
    started = time.perf_counter()
    prepared = await prepare(services, parse("/v1/chat/completions", to_openai(body)))
    canonical, pipeline = prepared.canonicals[0], Pipeline(services)
    policy = CachePolicy.parse(cache_control, body.cache)
    model = services.settings.model_name
    if body.stream:
        writer = MessageStreamWriter(model=model)
        return await stream_outcome(
            services,
            pipeline,
            kind="chat",
            canonical=canonical,
            policy=policy,
            priority=prepared.priority,
            started=started,
            owner=owner,
            render=lambda source: anthropic_stream(source, writer),
        )
    outcome = await pipeline.run(
        kind="chat", canonical=canonical, policy=policy, priority=prepared.priority, owner=owner
    )
    record(services, endpoint="messages", outcome=outcome, canonical=canonical, started=started, stream=False)
    return JSONResponse(message(outcome.result, model=model), headers=cache_headers(outcome))


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    """The prompt's tokens through the model's tokenizer and chat template, counted by the worker (the one
    process that holds them); counted once per distinct request, then from the response cache."""
    openai_body = {**to_openai(body), "max_tokens": 1, "temperature": 0}
    prepared = await prepare(services, parse("/v1/chat/completions", openai_body))
    outcome = await Pipeline(services).run(
        kind="count", canonical=prepared.canonicals[0], policy=CachePolicy(), owner=owner
    )
    return {"input_tokens": int(outcome.result.get("input_tokens", 0))}
