"""The Responses API's routes (`/v1/responses`), as the `openai` SDK's `client.responses` and Codex call them.

A request is continued from its stored predecessor (`previous_response_id`), converted to the neutral request
(api.dialects.responses.adapter, so every dialect shares validation, keys and caches), admitted and answered
through the one path (api.pipeline.prepare, api.pipeline.respond), rendered as a `response` object or its event stream. With
`store` (OpenAI's default) it is kept (api.dialects.responses.stored); with `background` it is a job: answered
at once as `queued`, polled, streamed from any event (`starting_after`), cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from api.auth import AUTHENTICATED, Owner
from api.dialects.responses import adapter, stored
from api.dialects.responses.protocol import InputTokensRequest, ResponsesRequest
from api.dialects.responses.render import ResponseContext
from api.errors import APIError
from api.offline.pages import list_page
from api.pipeline.admission import Outcome
from api.pipeline.prepare import prepare, prepare_specs
from api.pipeline.relay import relay
from api.pipeline.respond import answer, record, run
from api.pipeline.streaming import event_source, from_list, replay
from api.services import Services, ServicesDep
from mlxq.jobspec import CachePolicy
from mlxq.keys import is_deterministic
from mlxq.sql import Job
from mlxq.states import JOB_FINAL, JobStatus, ResponseStatus

router = APIRouter(prefix="/v1/responses", tags=["responses"], dependencies=AUTHENTICATED)


@contextlib.contextmanager
def responses_params() -> Iterator[None]:
    """A 400 found on the neutral request names the Responses field the client sent (`text.format`, not
    `response_format`: the adapter's terms); a tool's fields are flat in Responses (`tools.0.name`, not
    `tools.0.function.name`)."""
    try:
        yield
    except APIError as exc:
        if param := exc.param:
            exc.param = adapter.TERMS.param(param)
            exc.message = exc.message.replace(f"'{param}'", f"'{exc.param}'")
        if exc.param and exc.param.startswith("tools.") and ".function." in exc.param:
            exc.param = exc.param.replace(".function.", ".", 1)
        raise


@router.post("")
async def create_response(
    body: ResponsesRequest,
    services: ServicesDep,
    owner: Owner,
    client: Request,
    cache_control: str | None = Header(None),
) -> Response:
    started = time.perf_counter()
    if body.background and body.store is False:
        raise APIError(400, "A background response is stored: it cannot have store: false.", param="store")
    body = await stored.resolve_references(services, body, owner)
    previous = await stored.previous_items(services, body.previous_response_id, owner)
    with responses_params():
        incoming = adapter.incoming(body, previous)
        _, specs = await prepare_specs(
            services, incoming, endpoint=client.url.path, owner=owner, cache_control=cache_control
        )
    context = ResponseContext(request=body, model=specs[0].model, previous=previous, canonical=specs[0].request.wire())
    keep, background = body.store is not False, bool(body.background)
    # A kept response needs a job row to name even for a cached answer; a background one runs to its end
    # whoever leaves, and publishes its text for the readers that stream it later.
    spec = dataclasses.replace(specs[0], keep_row=keep, detached=background, stream=specs[0].stream or background)

    async def keep_it(outcome: Outcome) -> None:
        if keep and outcome.job_id is not None:
            await asyncio.to_thread(stored.store, services, context, outcome.job_id, background=background, owner=owner)

    if background and not body.stream:
        outcome = await services.admission.submit(spec)
        await keep_it(outcome)
        record(services, endpoint="responses", spec=spec, outcome=outcome, started=started, stream=False)
        return JSONResponse(context.render(outcome.result, status=None if outcome.result else ResponseStatus.QUEUED))
    writer = context.stream_writer()
    with responses_params():  # the worker's refusals too (a prompt over the context names `input`)
        return await answer(
            services,
            [spec],
            endpoint="responses",
            render=lambda results: context.render(results[0]),
            stream=(lambda source: relay(source, writer)) if body.stream else None,
            on_admit=keep_it,
            client=client,
        )


@router.post("/input_tokens")
async def count_input_tokens(
    body: InputTokensRequest, services: ServicesDep, owner: Owner, client: Request
) -> dict[str, Any]:
    """The input's tokens through the model's tokenizer and chat template, counted by the worker."""
    previous = await stored.previous_items(services, body.previous_response_id, owner)
    raw = body.model_dump(by_alias=True, exclude_none=True)
    request = ResponsesRequest.model_validate({**raw, "model": body.model or services.settings.model_name})
    request = await stored.resolve_references(services, request, owner)
    with responses_params():
        prepared = await prepare(services, adapter.counted(request, previous), kind="count")
    spec = await services.admission.spec_for(
        "count", prepared.requests[0], owner=owner, policy=CachePolicy(), endpoint=client.url.path
    )
    outcome = await run(services, spec)
    return {"object": "response.input_tokens", "input_tokens": int(outcome.result.get("input_tokens", 0))}


def _late_stream(services: Services, context: ResponseContext, job: Job, after: int | None) -> Response:
    """A stored response's events from the start (those numbered after `after`): the job's own events, live while
    it runs and kept after it ends (MLXQ_STREAM_RETENTION_S), so they are numbered as its first stream numbered
    them; a job that never ran (a cached answer) is replayed from its result, as its first stream was."""
    writer = context.stream_writer(starting_after=after, completed_at=job.finished_at)
    if job.started_at is None and job.status in JOB_FINAL:
        source = from_list(replay(job.result or {}))
    else:
        # No deadline: a background job runs however long it takes; a restart of a sampled one is not replayable
        # while it runs, and once it has ended its last run's events are its answer's.
        deterministic = is_deterministic(job.request)
        source = services.follower.events(
            job.id, replayable=deterministic, timeout=False, last_run=job.status in JOB_FINAL and not deterministic
        )
    return event_source(relay(source, writer), {}, services.settings.sse_keepalive_s)


@router.get("/{response_id}")
async def get_response(
    response_id: str,
    services: ServicesDep,
    owner: Owner,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> Response:
    context, job = await stored.load(services, response_id, owner)
    if stream:
        if job.status != JobStatus.SUCCEEDED and job.status in JOB_FINAL:
            raise APIError(400, f"Response '{response_id}' has ended without an answer to stream.", param="stream")
        return _late_stream(services, context, job, starting_after)
    return JSONResponse(context.render_job(job))


@router.delete("/{response_id}")
async def delete_response(response_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    await stored.delete(services, response_id, owner)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.post("/{response_id}/cancel")
async def cancel_response(response_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    return await stored.cancel(services, response_id, owner)


@router.get("/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    services: ServicesDep,
    owner: Owner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    context, _ = await stored.load(services, response_id, owner)
    items = stored.input_items(context)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return list_page(items[: limit + 1], limit)
