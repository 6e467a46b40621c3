"""Answering admitted requests, for every dialect: the one place a route's request forks into the sync
answer (the client waits for the result) and the stream (SSE, live or replayed from the cache).

A route brings its job specs and two renderers: `render` (results -> its JSON body) and, when streamed,
`stream` (events -> its SSE events). Then submit, follow, record (metrics and the request log), leave: the
same for every dialect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from api.errors import APIError
from api.operations.metrics import GENERATED_TOKENS, Endpoint, request_counter
from api.pipeline.admission import Outcome
from api.pipeline.follow import told_to_retry
from api.pipeline.streaming import Renderer, event_source, job_events, tap
from api.services import Services
from mlxq.jobspec import JobSpec
from mlxq.states import CacheOutcome

JSONRenderer = Callable[[list[dict[str, Any]]], dict[str, Any]]
# Told each outcome as soon as it is admitted (before its answer), e.g. to store what names its job.
OnAdmit = Callable[[Outcome], Awaitable[None]]


def cache_headers(outcomes: list[Outcome]) -> dict[str, str]:
    """`X-Cache` (one outcome, or MIXED), `X-Request-Key` (comma-separated) and `X-Job-Id` for a single job."""
    kinds = {o.cache for o in outcomes}
    headers = {
        "X-Cache": outcomes[0].cache if len(kinds) == 1 else CacheOutcome.MIXED,
        "X-Request-Key": ",".join(o.key for o in outcomes),
    }
    if len(outcomes) == 1 and outcomes[0].job_id:
        headers["X-Job-Id"] = outcomes[0].job_id
    return headers


async def disconnected(client: Request) -> None:
    """Returns when the client closes its connection. The body has been read by now, so the next ASGI message
    is the disconnect (uvicorn does not cancel a handler whose client left: it must be told)."""
    while (await client.receive())["type"] != "http.disconnect":
        pass


async def run(
    services: Services, spec: JobSpec, on_admit: OnAdmit | None = None, gone: asyncio.Future[None] | None = None
) -> Outcome:
    """The synchronous path: admit, and wait for the answer (the outcome's `result`). When `gone` resolves first
    (the client left), stop waiting: the job is cancelled unless another client waits for it (single flight), it
    runs detached, or MLXQ_FINISH_ABANDONED says to finish and cache it."""
    outcome = await services.admission.submit(spec)
    if on_admit is not None:
        await on_admit(outcome)
    if outcome.job_id is not None and outcome.cache != CacheOutcome.HIT:
        waiting: asyncio.Future[Any] = asyncio.ensure_future(services.follower.wait(outcome.job_id))
        abandoned = False
        try:
            if gone is not None:
                await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    abandoned = True
                    raise APIError(499, "The client closed the request.", type="cancelled", code="client_closed")
            outcome.result = await waiting
        except APIError as exc:
            # Told to send it again (a stop, a lost worker, none alive): the job must not run on, or again after a
            # restart, for nobody.
            abandoned = abandoned or told_to_retry(exc)
            raise
        finally:
            waiting.cancel()
            keep = spec.detached or services.settings.finish_abandoned
            services.follower.leave_soon(outcome.job_id, abandon=abandoned and not keep)
    return outcome


async def answer(
    services: Services,
    specs: list[JobSpec],
    *,
    endpoint: Endpoint,
    render: JSONRenderer,
    stream: Renderer | None = None,
    on_admit: OnAdmit | None = None,
    client: Request | None = None,
) -> Response:
    """Admit `specs` (one per prompt; a streamed request has one) and answer them, synchronously with
    `render`, or as the dialect's SSE stream with `stream`. A sync `client` that goes away stops its jobs
    (`run`); a streaming one stops them when its stream closes."""
    started = time.perf_counter()
    if stream is not None:
        (spec,) = specs
        return await _stream(services, spec, endpoint=endpoint, render=stream, started=started, on_admit=on_admit)
    gone = asyncio.ensure_future(disconnected(client)) if client is not None else None
    try:
        outcomes = await asyncio.gather(*(run(services, spec, on_admit, gone) for spec in specs))
    finally:
        if gone is not None:
            gone.cancel()
    for spec, outcome in zip(specs, outcomes, strict=True):
        record(services, endpoint=endpoint, spec=spec, outcome=outcome, started=started, stream=False)
    return JSONResponse(render([o.result for o in outcomes]), headers=cache_headers(list(outcomes)))


async def _stream(
    services: Services, spec: JobSpec, *, endpoint: Endpoint, render: Renderer, started: float, on_admit: OnAdmit | None
) -> Response:
    outcome = await services.admission.submit(spec)
    follower = services.follower
    try:
        if on_admit is not None:
            await on_admit(outcome)
        replayable = spec.request.deterministic
        live = await job_events(follower, outcome, replayable=replayable, timeout=not spec.detached)
        source = tap(live, outcome)
    except BaseException:
        if outcome.job_id and not spec.detached:
            follower.leave_soon(outcome.job_id, abandon=True)
        raise
    sse = render(source)
    headers = cache_headers([outcome])
    if outcome.cache == CacheOutcome.HIT:
        # Every event of a cached answer is known: send the whole stream in one body, no SSE machinery.
        body = b"".join([item.encode() async for item in sse])
        record(services, endpoint=endpoint, spec=spec, outcome=outcome, started=started, stream=True)
        return Response(body, media_type="text/event-stream", headers=headers)

    async def guarded() -> AsyncIterator[ServerSentEvent]:
        finished = False
        try:
            async for item in sse:
                yield item
            finished = True
        finally:
            record(services, endpoint=endpoint, spec=spec, outcome=outcome, started=started, stream=True)
            # A client that went away stops the job, unless another client still waits for it. A detached job (a
            # background response) keeps its waiter, as a submitted job does: only its own cancel leaves it
            # (mlxq.repos.responses.cancel_response), so a joined client that leaves never cancels it.
            if outcome.job_id and not spec.detached:
                follower.leave_soon(outcome.job_id, abandon=not finished or outcome.unanswered)

    return event_source(guarded(), headers, services.settings.sse_keepalive_s)


def record(
    services: Services, *, endpoint: Endpoint, spec: JobSpec, outcome: Outcome, started: float, stream: bool
) -> None:
    """What one answered request leaves behind: its latency in /metrics, the shared request and token counters,
    and a request-log row (what scripts/analyze_traces.py reads). `started`: `time.perf_counter()` on arrival."""
    elapsed = time.perf_counter() - started
    services.metrics.observe(endpoint, outcome.cache, elapsed)
    usage: dict[str, Any] = outcome.result.get("usage") or {}
    # Shared counters (the database's), so every api process and replica reports the same totals.
    services.stats.count(request_counter(endpoint, 200, outcome.cache))
    if outcome.cache != CacheOutcome.HIT and usage.get("completion_tokens"):
        services.stats.count(GENERATED_TOKENS, by=int(usage["completion_tokens"]))
    services.stats.log(
        key=outcome.key,
        endpoint=endpoint,
        cache=outcome.cache,
        stream=stream,
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=usage.get("cached_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        tools=spec.request.tool_names or None,
        latency_ms=round(elapsed * 1000, 2),
    )
