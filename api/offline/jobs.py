"""Submit-and-poll jobs: `/v1/jobs`. A job is any chat or completion body, run like a request whose
client never waits: it succeeds at once from the response cache, joins an identical job in flight, or
is queued; nobody leaving cancels it, only `DELETE`."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session
from sse_starlette import ServerSentEvent

from api.auth import AUTHENTICATED, Owner, owns
from api.dialects import registry
from api.errors import APIError
from api.offline.pages import list_page
from api.pipeline.prepare import KIND_ENDPOINTS, parse, prepare
from api.pipeline.streaming import event_source, guard
from api.services import Services, ServicesDep
from mlxq.contract import PRIORITIES
from mlxq.jobspec import CachePolicy
from mlxq.keys import is_deterministic
from mlxq.repos import jobs
from mlxq.sql import Job
from mlxq.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=AUTHENTICATED)


def render_result(job: Job) -> dict[str, Any] | None:
    """A job's result as the endpoint its client called would have answered (an Anthropic `message` for
    /v1/messages, a `response` for /v1/responses), rendered as a batch line's is (api.dialects.registry): one id
    (the job's) and one time (its end) however often it is read."""
    if job.result is None:
        return None
    endpoints = registry.routes()
    # By its kind where the row names no generation endpoint: a row from before it was kept, or a count.
    by_kind = endpoints["/v1/chat/completions" if job.kind == "chat" else "/v1/completions"]
    return endpoints.get(job.endpoint or "", by_kind).render_job(job)


def job_object(services: Services, job: Job) -> dict[str, Any]:
    endpoint = job.endpoint or KIND_ENDPOINTS.get(job.kind, job.kind)  # by its kind: a row from before it was kept
    return {
        "id": job.id,
        "object": "job",
        "endpoint": endpoint,
        "status": job.status,
        "priority": job.priority,
        "created_at": int(job.created_at),
        "started_at": job.started_at and int(job.started_at),
        "finished_at": job.finished_at and int(job.finished_at),
        "attempts": job.attempts,
        "batch_id": job.batch_id,
        "model": job.model,
        # Where mlxq.delivery sent it and why; `worker`: who ran it.
        "route": {
            "worker": job.target,
            "reason": job.route_reason,
            "cached_messages": job.route_matched,
        },
        "worker": job.worker,
        "result": render_result(job) if job.status == JobStatus.SUCCEEDED else None,
        "error": job.error if job.status in (JobStatus.FAILED, JobStatus.CANCELLED) else None,
    }


def _owned(session: Session, job_id: str, owner: str | None) -> Job:
    """The job, if it is the caller's: another key's job is as absent as an unknown one (404)."""
    job = jobs.get_job(session=session, job_id=job_id)
    if job is None or not owns(owner, job.owner):
        raise APIError(404, f"No job with id {job_id!r}.", code="job_not_found", param="job_id")
    return job


def _get(services: Services, job_id: str, owner: str | None) -> dict[str, Any]:
    with services.sessions() as session:
        return job_object(services, _owned(session, job_id, owner))


def _deterministic(services: Services, job_id: str, owner: str | None) -> bool:
    """Whether a run of the caller's job again gives the same text (then a restart's repeat is skipped, not sent
    again); 404 as `_get`."""
    with services.sessions() as session:
        return is_deterministic(_owned(session, job_id, owner).request)


@router.post("", status_code=202)
async def submit_job(
    services: ServicesDep,
    owner: Owner,
    raw: Annotated[dict[str, Any], Body()],
    idempotency_key: str | None = Header(None),
    cache_control: str | None = Header(None),
) -> Response:
    """Take a chat or completion body (`{"endpoint": …, "body": {…}, "priority": "low"}`, or the body itself,
    its endpoint told by `messages` or `prompt`); 202 with the job."""
    if isinstance(raw.get("body"), dict):
        endpoint, body_raw = raw.get("endpoint", "/v1/chat/completions"), raw["body"]
    else:
        endpoint = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
        body_raw = {k: v for k, v in raw.items() if k != "priority"}
    priority = raw.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise APIError(400, f"priority must be one of {', '.join(PRIORITIES)}.", param="priority")
    incoming = parse(endpoint, body_raw)  # the endpoints a job may name are the registry's, as a batch line's
    if incoming.stream:
        raise APIError(400, "A job is not streamed in its response; read GET /v1/jobs/{id}/events.", param="stream")
    prepared = await prepare(services, incoming)
    if len(prepared.requests) != 1:
        raise APIError(400, "A job takes one prompt; send several as a batch.", param="prompt")
    request = prepared.requests[0]
    if priority is not None:
        request = request.model_copy(update={"priority": priority})
    spec = await services.admission.spec_for(
        prepared.kind,
        request,
        owner=owner,
        policy=CachePolicy.parse(cache_control, incoming.cache),
        stream=True,  # its deltas are published: GET /v1/jobs/{id}/events relays them
        endpoint=endpoint,
    )
    outcome = await services.admission.submit(services.admission.with_idempotency_key(spec, idempotency_key))
    assert outcome.job_id is not None
    job = await asyncio.to_thread(_get, services, outcome.job_id, None)
    return JSONResponse(job, status_code=202, headers={"X-Cache": outcome.cache})


@router.get("")
async def list_jobs(
    services: ServicesDep,
    owner: Owner,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with services.sessions() as session:
            rows = jobs.list_jobs(session=session, owner=owner, status=status, limit=limit + 1, after=after)
            return [job_object(services, job) for job in rows]

    return list_page(await asyncio.to_thread(read), limit)


@router.get("/{job_id}")
async def get_job(job_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    return await asyncio.to_thread(_get, services, job_id, owner)


@router.get("/{job_id}/events")
async def job_events(job_id: str, services: ServicesDep, owner: Owner) -> Response:
    """The job's events as SSE (`event:` its type, `data:` the JSON of mlxq.events), from the first: a client
    that connects late gets what was produced so far, then the rest; the stream ends after `done` or
    `error`. Leaving does not cancel the job."""
    deterministic = await asyncio.to_thread(_deterministic, services, job_id, owner)  # 404 before the stream starts

    async def stream():
        # No deadline: a submitted job waits for a worker however long it takes (request_timeout_s and the wait for a
        # worker bound a client waiting for its answer), so its stream ends with its outcome, never a 504 or 503 while
        # it is still queued, as a background response's does (api.dialects.responses.routes).
        # A sampled job's new run (its worker died) does not continue the old text: the reader gets `restarted` and
        # the new text whole, where skipping as much as it had would splice two different answers.
        source = services.follower.events(job_id, timeout=False, replayable=deterministic, restarts=True)
        async for event in guard(source):
            yield ServerSentEvent(data=json.dumps(event, ensure_ascii=False), event=event["type"], sep="\n")

    return event_source(stream(), {"X-Job-Id": job_id}, services.settings.sse_keepalive_s)


@router.delete("/{job_id}")
async def cancel_job(job_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    """Cancel a queued or running job (the worker stops it within a second); a finished job is unchanged."""

    def cancel() -> dict[str, Any]:
        _get(services, job_id, owner)
        with services.sessions.begin() as session:
            jobs.cancel_job(session=session, job_id=job_id)
        return _get(services, job_id, owner)

    return await asyncio.to_thread(cancel)
