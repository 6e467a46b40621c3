"""Streams for every dialect: a job's events (live, or replayed from a cached result) carried to the
client as SSE, and the path a streamed request takes (submit, wait for the start, stream, record, leave).
A dialect brings only its renderer: events in, its SSE events out."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.errors import APIError
from api.metrics import GENERATED_TOKENS, request_counter
from api.pipeline import CachePolicy, Outcome, Pipeline
from api.services import Services
from mlxq import events
from mlxq.contract import Priority, job_error
from mlxq.events import Event
from mlxq.keys import is_deterministic, tool_names

# A streamed request waits this long for its job to start before committing to a 200 SSE response,
# so that errors known up front (a prompt over the context, no model) still get a proper 4xx.
FIRST_EVENT_WAIT_S = 2.0

Renderer = Callable[[AsyncIterator[Event]], AsyncIterator[ServerSentEvent]]


def replay(result: dict[str, Any]) -> list[Event]:
    """The events a finished result would have produced: how a cache hit streams."""
    usage = result.get("usage") or {}
    replayed: list[Event] = [events.started(usage.get("prompt_tokens", 0), usage.get("cached_tokens", 0))]
    if result.get("text") or result.get("logprobs"):
        replayed.append(events.delta(result.get("text", ""), result.get("logprobs")))
    if result.get("tool_calls"):
        replayed.append(events.tool_calls(result["tool_calls"]))
    replayed.append(events.done(result))
    return replayed


async def from_list(items: Iterable[Event]) -> AsyncIterator[Event]:
    for event in items:
        yield event


async def guard(source: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """An APIError raised once the stream has begun (shutdown, timeout, a lost worker) as an error event:
    the status line is sent by then, so the error can only travel in the stream."""
    try:
        async for event in source:
            yield event
    except APIError as exc:
        yield events.error(job_error(exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param))
    except DBAPIError:
        yield events.error(
            job_error(503, "The database is unavailable; retry the request.", code="database_unavailable")
        )


def event_source(stream: AsyncIterator[ServerSentEvent], headers: dict[str, str], ping_s: float) -> EventSourceResponse:
    return EventSourceResponse(stream, headers=headers, ping=ping_s, sep="\n")


def cache_headers(outcome: Outcome) -> dict[str, str]:
    headers = {"X-Cache": outcome.cache, "X-Request-Key": outcome.key}
    if outcome.job_id:
        headers["X-Job-Id"] = outcome.job_id
    return headers


async def job_events(pipeline: Pipeline, outcome: Outcome, *, replayable: bool) -> AsyncIterator[Event]:
    """The outcome's events: replayed from the cache, or live from its job (errors up front raise)."""
    if outcome.job_id is None:
        return from_list(replay(outcome.result))
    live = pipeline.events(outcome.job_id, replayable=replayable)
    prelude: list[Event] = []
    deadline = time.monotonic() + FIRST_EVENT_WAIT_S
    while True:
        event = await anext(live)
        if event["type"] == "error":
            await live.aclose()
            raise APIError.from_job(event.get("error") or {})
        prelude.append(event)
        if event["type"] != "waiting" or time.monotonic() > deadline:
            break

    async def chained() -> AsyncIterator[Event]:
        for event in prelude:
            yield event
        async for event in live:
            yield event

    return chained()


def record(
    services: Services, *, endpoint: str, outcome: Outcome, canonical: dict[str, Any], started: float, stream: bool
) -> None:
    """Metrics and the request log (what scripts/analyze_traces.py reads) for one answered request."""
    elapsed = time.perf_counter() - started
    services.metrics.observe(endpoint, outcome.cache, elapsed)
    usage = outcome.result.get("usage") or {}
    # Shared counters (the database's), so every api process and replica reports the same totals.
    services.stats.count(request_counter(endpoint, 200, outcome.cache))
    if outcome.cache != "HIT" and usage.get("completion_tokens"):
        services.stats.count(GENERATED_TOKENS, by=int(usage["completion_tokens"]))
    tools = tool_names(canonical.get("tools"))
    services.stats.log(
        key=outcome.key,
        endpoint=endpoint,
        cache=outcome.cache,
        stream=stream,
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=usage.get("cached_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        tools=tools or None,
        latency_ms=round(elapsed * 1000, 2),
    )


async def tap(source: AsyncIterator[Event], outcome: Outcome) -> AsyncIterator[Event]:
    """Pass events through, keeping the final result on the outcome for the request log."""
    async for event in source:
        if event["type"] == "done":
            outcome.result = event.get("result") or {}
        yield event


async def stream_response(
    services: Services,
    pipeline: Pipeline,
    outcome: Outcome,
    canonical: dict[str, Any],
    sse: AsyncIterator[ServerSentEvent],
    endpoint: str,
    started: float,
) -> Response:
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


async def stream_outcome(
    services: Services,
    pipeline: Pipeline,
    *,
    kind: str,
    canonical: dict[str, Any],
    policy: CachePolicy,
    priority: Priority,
    started: float,
    render: Renderer,
    owner: str | None,
) -> Response:
    """Submit one request and answer it as the dialect's stream (live, or replayed from the cache)."""
    outcome = await pipeline.submit(kind=kind, canonical=canonical, policy=policy, priority=priority, owner=owner)
    try:
        source = tap(await job_events(pipeline, outcome, replayable=is_deterministic(canonical)), outcome)
    except BaseException:
        if outcome.job_id:
            pipeline.leave_soon(outcome.job_id, abandon=True)
        raise
    return await stream_response(services, pipeline, outcome, canonical, render(source), kind, started)
