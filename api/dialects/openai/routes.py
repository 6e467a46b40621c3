"""OpenAI's routes: check and canonicalize (api.prepare), make the job specs, answer (api.respond)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import Response

from api.auth import AUTHENTICATED, Owner
from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest
from api.dialects.openai.render import ChunkWriter, chat_completion, model_list, openai_stream, text_completion
from api.prepare import prepare
from api.respond import answer
from api.services import ServicesDep
from mlxq.jobspec import CachePolicy

router = APIRouter(dependencies=AUTHENTICATED)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, services: ServicesDep, owner: Owner, cache_control: str | None = Header(None)
) -> Response:
    prepared = await prepare(services, body)
    model = services.settings.model_name
    spec = await services.admission.spec_for(
        "chat",
        prepared.canonicals[0],
        owner=owner,
        policy=CachePolicy.parse(cache_control, body.cache),
        priority=prepared.priority,
        stream=bool(body.stream),
    )
    writer = ChunkWriter(kind="chat", model=model, stream_options=body.stream_options)
    return await answer(
        services,
        [spec],
        endpoint="chat",
        render=lambda results: chat_completion(results[0], model=model),
        stream=(lambda source: openai_stream(source, writer)) if body.stream else None,
    )


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, services: ServicesDep, owner: Owner, cache_control: str | None = Header(None)
) -> Response:
    prepared = await prepare(services, body)
    model, echo = services.settings.model_name, prepared.echo
    policy = CachePolicy.parse(cache_control, body.cache)
    specs = [
        await services.admission.spec_for(
            "completion", canonical, owner=owner, policy=policy, priority=prepared.priority, stream=bool(body.stream)
        )
        for canonical in prepared.canonicals
    ]
    writer = ChunkWriter(kind="completion", model=model, stream_options=body.stream_options)
    return await answer(
        services,
        specs,
        endpoint="completion",
        render=lambda results: text_completion(results, model=model, prefixes=echo),
        stream=(lambda source: openai_stream(source, writer, prefix=echo[0])) if body.stream else None,
    )


@router.get("/v1/models")
async def models(services: ServicesDep) -> dict[str, Any]:
    return model_list(services.settings.model_name)
