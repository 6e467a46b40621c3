"""OpenAI's routes: check, canonicalize and make the job specs (api.pipeline.prepare), answer (api.pipeline.respond)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from api.auth import AUTHENTICATED, Owner
from api.dialects.openai import adapter
from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest
from api.dialects.openai.render import ChunkWriter, chat_completion, forces_a_call, model_list, text_completion
from api.errors import APIError
from api.pipeline.model_info import resolve_model
from api.pipeline.prepare import prepare_specs
from api.pipeline.relay import relay
from api.pipeline.respond import answer
from api.services import ServicesDep

router = APIRouter(dependencies=AUTHENTICATED)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    services: ServicesDep,
    owner: Owner,
    client: Request,
    cache_control: str | None = Header(None),
) -> Response:
    _, specs = await prepare_specs(
        services, adapter.chat(body), endpoint=client.url.path, owner=owner, cache_control=cache_control
    )
    model = specs[0].model
    tier = body.served_tier
    writer = ChunkWriter(
        kind="chat",
        model=model,
        stream_options=body.stream_options,
        forced_call=forces_a_call(specs[0].request),
        service_tier=tier,
    )
    return await answer(
        services,
        specs,
        endpoint="chat",
        render=lambda results: chat_completion(results[0], model=model, service_tier=tier),
        stream=(lambda source: relay(source, writer)) if body.stream else None,
        client=client,
    )


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    services: ServicesDep,
    owner: Owner,
    client: Request,
    cache_control: str | None = Header(None),
) -> Response:
    prepared, specs = await prepare_specs(
        services, adapter.completion(body), endpoint=client.url.path, owner=owner, cache_control=cache_control
    )
    model, echo = specs[0].model, prepared.echo
    writer = ChunkWriter(kind="completion", model=model, stream_options=body.stream_options, prefix=echo[0])
    return await answer(
        services,
        specs,
        endpoint="completion",
        render=lambda results: text_completion(results, model=model, prefixes=echo),
        stream=(lambda source: relay(source, writer)) if body.stream else None,
        client=client,
    )


@router.get("/v1/models")
async def models(services: ServicesDep) -> dict[str, Any]:
    """Every model served: the configured ones (the main one first) and any other a live worker serves."""
    configured = list(services.settings.served_models)
    live = await services.model_info.live_models()
    return model_list([*configured, *sorted(live - set(configured))])


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, services: ServicesDep) -> dict[str, Any]:
    """One model (OpenAI's and Anthropic's retrieve): a served model by its name, or the one an alias names (answers
    name the served model too); a 404 for any other name. A hub id has slashes: the path takes them."""
    try:
        served = await resolve_model(services.settings, services.model_info, model_id)
    except APIError as exc:
        if exc.status != 503:  # a configured model without a worker now is still a model of this server
            raise
        served = model_id
    return model_list([served])["data"][0]
