"""HTTP routes: thin handlers that validate, call the pipeline, and render in the client's dialect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from api.errors import APIError
from api.health import health_snapshot
from api.pipeline import CachePolicy, Outcome, Pipeline
from api.prepare import prepare
from api.protocol import ChatCompletionRequest, CompletionRequest, chat_completion, model_list, text_completion
from api.services import Services, ServicesDep
from api.streaming import ChunkWriter, event_source, from_list, openai_stream, replay
from mlxq.contract import Priority
from mlxq.keys import is_deterministic, tool_names

router = APIRouter()

# A streamed request waits this long for its job to start before committing to a 200 SSE response,
# so that errors known up front (a prompt over the context, no model) still get a proper 4xx.
FIRST_EVENT_WAIT_S = 2.0


def cache_headers(outcome: Outcome) -> dict[str, str]:
    headers = {"X-Cache": outcome.cache, "X-Request-Key": outcome.key}
    if outcome.job_id:
        headers["X-Job-Id"] = outcome.job_id
    return headers


async def job_events(pipeline: Pipeline, outcome: Outcome, *, replayable: bool) -> AsyncIterator[dict[str, Any]]:
    """The outcome's events: replayed from the cache, or live from its job (errors up front raise)."""
    if outcome.job_id is None:
        return from_list(replay(outcome.result))
    events = pipeline.events(outcome.job_id, replayable=replayable)
    prelude: list[dict[str, Any]] = []
    deadline = time.monotonic() + FIRST_EVENT_WAIT_S
    while True:
        event = await anext(events)
        if event["type"] == "error":
            await events.aclose()
            raise APIError.from_job(event.get("error") or {})
        prelude.append(event)
        if event["type"] != "waiting" or time.monotonic() > deadline:
            break

    async def chained() -> AsyncIterator[dict[str, Any]]:
        for event in prelude:
            yield event
        async for event in events:
            yield event

    return chained()


def record(services: Services, *, endpoint: str, outcome: Outcome, canonical: dict[str, Any], started: float,
           stream: bool) -> None:
    """Metrics and the request log (what scripts/analyze_traces.py reads) for one answered request."""
    elapsed = time.perf_counter() - started
    services.metrics.observe(endpoint, outcome.cache, elapsed)
    usage = outcome.result.get("usage") or {}
    tools = tool_names(canonical.get("tools"))
    services.stats.log(key=outcome.key, endpoint=endpoint, cache=outcome.cache, stream=stream,
                       prompt_tokens=usage.get("prompt_tokens"), cached_tokens=usage.get("cached_tokens"),
                       completion_tokens=usage.get("completion_tokens"), tools=tools or None,
                       latency_ms=round(elapsed * 1000, 2))


async def tap(events: AsyncIterator[dict[str, Any]], outcome: Outcome) -> AsyncIterator[dict[str, Any]]:
    """Pass events through, keeping the final result on the outcome for the request log."""
    async for event in events:
        if event["type"] == "done":
            outcome.result = event.get("result") or {}
        yield event


async def stream_response(services: Services, pipeline: Pipeline, outcome: Outcome, canonical: dict[str, Any],
                          sse: AsyncIterator[ServerSentEvent], endpoint: str, started: float) -> Response:
    if outcome.cache == "HIT":
        # Every event of a cached answer is known: send the whole stream in one body, no SSE machinery.
        body = b"".join([item.encode() async for item in sse])
        record(services, endpoint=endpoint, outcome=outcome, canonical=canonical, started=started, stream=True)
        return Response(body, media_type="text/event-stream", headers=cache_headers(outcome))

    async def guarded() -> AsyncIterator[ServerSentEvent]:
        finished = False
        try:
            async for item in sse:
                yield item
            finished = True
        finally:
            record(services, endpoint=endpoint, outcome=outcome, canonical=canonical, started=started, stream=True)
            # A client that went away stops the job, unless another client still waits for it.
            if outcome.job_id:
                pipeline.leave_soon(outcome.job_id, abandon=not finished)

    return event_source(guarded(), cache_headers(outcome), services.settings.sse_keepalive_s)


async def openai_streamed(services: Services, pipeline: Pipeline, *, kind: str, canonical: dict[str, Any],
                          policy: CachePolicy, stream_options: dict[str, Any] | None, started: float,
                          priority: Priority, prefix: str = "") -> Response:
    """Submit one request and answer it as an OpenAI chunk stream (live, or replayed from the cache)."""
    outcome = await pipeline.submit(kind=kind, canonical=canonical, policy=policy, priority=priority)
    writer = ChunkWriter(kind=kind, model=services.settings.model_name,
                         include_usage=bool((stream_options or {}).get("include_usage")))
    try:
        events = tap(await job_events(pipeline, outcome, replayable=is_deterministic(canonical)), outcome)
    except BaseException:
        if outcome.job_id:
            pipeline.leave_soon(outcome.job_id, abandon=True)
        raise
    sse = openai_stream(events, writer, prefix=prefix)
    return await stream_response(services, pipeline, outcome, canonical, sse, kind, started)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, services: ServicesDep,
                           cache_control: str | None = Header(None)) -> Response:
    started = time.perf_counter()
    prepared = await prepare(services, body)
    canonical, pipeline = prepared.canonicals[0], Pipeline(services)
    policy = CachePolicy.parse(cache_control, body.cache)
    if body.stream:
        return await openai_streamed(services, pipeline, kind="chat", canonical=canonical, policy=policy,
                                     stream_options=body.stream_options, started=started, priority=body.priority)
    outcome = await pipeline.run(kind="chat", canonical=canonical, policy=policy, priority=body.priority)
    record(services, endpoint="chat", outcome=outcome, canonical=canonical, started=started, stream=False)
    return JSONResponse(chat_completion(outcome.result, model=services.settings.model_name),
                        headers=cache_headers(outcome))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, services: ServicesDep,
                      cache_control: str | None = Header(None)) -> Response:
    started = time.perf_counter()
    prepared = await prepare(services, body)
    canonicals, echo, pipeline = prepared.canonicals, prepared.echo, Pipeline(services)
    policy = CachePolicy.parse(cache_control, body.cache)
    if body.stream:
        return await openai_streamed(services, pipeline, kind="completion", canonical=canonicals[0], policy=policy,
                                     stream_options=body.stream_options, started=started, priority=body.priority,
                                     prefix=echo[0])
    outcomes = await asyncio.gather(*(pipeline.run(kind="completion", canonical=c, policy=policy,
                                                   priority=body.priority) for c in canonicals))
    cache = outcomes[0].cache if len({o.cache for o in outcomes}) == 1 else "MIXED"
    for outcome, canonical in zip(outcomes, canonicals, strict=True):
        record(services, endpoint="completion", outcome=outcome, canonical=canonical, started=started, stream=False)
    headers = {"X-Cache": cache, "X-Request-Key": ",".join(o.key for o in outcomes)}
    return JSONResponse(text_completion([o.result for o in outcomes], model=services.settings.model_name,
                                        prefixes=echo), headers=headers)


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
routers = [router]
