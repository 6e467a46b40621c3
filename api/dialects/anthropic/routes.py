"""Anthropic's routes: the request in its own models, then the one path every dialect takes (its neutral request,
api.dialects.anthropic.adapter, through api.pipeline.prepare, so every dialect shares validation, keys and caches), answered
in its own shapes.
`x-api-key`, `anthropic-version`, `anthropic-beta` and `?beta=true` (Claude Code) are accepted as sent."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from api.auth import AUTHENTICATED, Owner
from api.dialects.anthropic import adapter
from api.dialects.anthropic.protocol import CountTokensRequest, MessagesRequest, check_system_turns, thread_refusal
from api.dialects.anthropic.render import MessageStreamWriter, message
from api.pipeline.prepare import prepare, prepare_specs
from api.pipeline.relay import relay
from api.pipeline.respond import answer, run
from api.services import ServicesDep

router = APIRouter(tags=["anthropic"], dependencies=AUTHENTICATED)


@router.post("/v1/messages")
async def messages(
    body: MessagesRequest,
    services: ServicesDep,
    owner: Owner,
    client: Request,
    cache_control: str | None = Header(None),
    anthropic_beta: str | None = Header(None),
) -> Response:
    check_system_turns(body, anthropic_beta)
    if (refusal := thread_refusal(body)) is not None:
        return JSONResponse(refusal, status_code=400)
    _, specs = await prepare_specs(
        services, adapter.incoming(body), endpoint=client.url.path, owner=owner, cache_control=cache_control
    )
    model = specs[0].model
    writer = MessageStreamWriter(model=model)
    return await answer(
        services,
        specs,
        endpoint="messages",
        render=lambda results: message(results[0], model=model),
        stream=(lambda source: relay(source, writer)) if body.stream else None,
        client=client,
    )


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest,
    services: ServicesDep,
    owner: Owner,
    client: Request,
    anthropic_beta: str | None = Header(None),
) -> dict[str, Any]:
    """The prompt's tokens through the model's tokenizer and chat template, counted by the worker (the one
    process that holds them); counted once per distinct request, then from the response cache."""
    check_system_turns(body, anthropic_beta)
    prepared = await prepare(services, adapter.counted(body), kind="count")
    spec = await services.admission.spec_for("count", prepared.requests[0], owner=owner, endpoint=client.url.path)
    outcome = await run(services, spec)
    return {"input_tokens": int(outcome.result.get("input_tokens", 0))}
