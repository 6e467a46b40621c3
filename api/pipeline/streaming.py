"""Streams for every dialect: a job's events, live or replayed from a cached result, ready for the one relay
(api.pipeline.relay: events in, a dialect's SSE events out, by its writer), and the SSE response that carries them
(api.pipeline.respond)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sqlalchemy.exc import DBAPIError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.errors import APIError
from api.pipeline.admission import Outcome
from api.pipeline.follow import JobFollower, told_to_retry
from mlxq import events
from mlxq.contract import job_error
from mlxq.events import Event
from mlxq.states import CacheOutcome

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


async def job_events(
    follower: JobFollower, outcome: Outcome, *, replayable: bool, timeout: bool = True
) -> AsyncIterator[Event]:
    """The outcome's events: replayed from the cache, or live from its job (errors up front raise)."""
    if outcome.job_id is None or outcome.cache == CacheOutcome.HIT:  # a cached answer (its job row, if any, is done)
        return from_list(replay(outcome.result))
    live = follower.events(outcome.job_id, replayable=replayable, timeout=timeout)
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


async def tap(source: AsyncIterator[Event], outcome: Outcome) -> AsyncIterator[Event]:
    """Pass events through, keeping the final result on the outcome for the request log (and whether its client was
    told to send the request again, so that the job is given up)."""
    try:
        async for event in source:
            if event["type"] == "done":
                outcome.result = event.get("result") or {}
            yield event
    except APIError as exc:
        outcome.unanswered = told_to_retry(exc)
        raise
