"""OpenAI's Files and Batch APIs, close enough that the official `openai` client works unchanged.

A batch becomes one low-priority job per valid line, decided in one transaction with the batch row:
a cached answer succeeds at once, identical lines share one job, a line identical to a job in flight
joins it. mlxq.delivery sends the jobs a window at a time, so interactive requests go first and the
lines decode together. The jobs are the progress record: a worker that dies mid-batch leaves its jobs
to run again, and the output is composed once, from the jobs, when none is active.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.auth import AUTHENTICATED, Owner
from api.errors import APIError
from api.jobs import list_page, render_result
from api.pipeline import Pipeline
from api.prepare import ENDPOINTS, parse, prepare
from api.services import Services, ServicesDep
from mlxq import batch_repos, delivery, repos
from mlxq.keys import is_deterministic, request_key
from mlxq.sql import Batch, BatchLine, Job
from mlxq.sql import File as FileRow

log = logging.getLogger(__name__)

files_router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=AUTHENTICATED)
batches_router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=AUTHENTICATED)

PURPOSES = ("batch", "batch_output")
# Line problems listed in the batch's `errors` (all of them are in the error file).
ERRORS_SHOWN = 100


# -- files ------------------------------------------------------------------------------------


def file_object(file: FileRow) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def _file(session: Session, file_id: str, owner: str | None) -> FileRow:
    """The file, if it is the caller's: another key's file is as absent as an unknown one (404)."""
    file = batch_repos.get_file(session=session, file_id=file_id)
    if file is None or (owner is not None and file.owner != owner):
        raise APIError(404, f"No file with id {file_id!r}.", code="file_not_found", param="file_id")
    return file


@files_router.post("")
async def upload_file(
    services: ServicesDep, owner: Owner, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    if purpose != "batch":
        raise APIError(400, "Only purpose 'batch' is supported.", param="purpose")
    limit = int(services.settings.max_file_mb * 2**20)
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise APIError(
            413, f"The file is larger than {services.settings.max_file_mb:g} MB.", code="file_too_large", param="file"
        )

    def store() -> dict[str, Any]:
        with services.sessions.begin() as session:
            row = batch_repos.create_file(
                session=session, purpose=purpose, filename=file.filename or "upload.jsonl", content=content, owner=owner
            )
            return file_object(row)

    return await asyncio.to_thread(store)


@files_router.get("")
async def list_files(
    services: ServicesDep,
    owner: Owner,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with services.sessions() as session:
            return [
                file_object(f)
                for f in batch_repos.list_files(
                    session=session, owner=owner, purpose=purpose, limit=limit + 1, after=after
                )
            ]

    return list_page(await asyncio.to_thread(read), limit)


@files_router.get("/{file_id}")
async def get_file(file_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with services.sessions() as session:
            return file_object(_file(session, file_id, owner))

    return await asyncio.to_thread(read)


@files_router.get("/{file_id}/content")
async def file_content(file_id: str, services: ServicesDep, owner: Owner) -> Response:
    def read() -> bytes:
        with services.sessions() as session:
            return _file(session, file_id, owner).content

    return Response(await asyncio.to_thread(read), media_type="application/jsonl")


@files_router.delete("/{file_id}")
async def delete_file(file_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    def delete() -> None:
        with services.sessions.begin() as session:
            _file(session, file_id, owner)
            if not batch_repos.delete_file(session=session, file_id=file_id):
                raise APIError(404, f"No file with id {file_id!r}.", code="file_not_found", param="file_id")

    await asyncio.to_thread(delete)
    return {"id": file_id, "object": "file", "deleted": True}


# -- batches ----------------------------------------------------------------------------------


class BatchRequest(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = Field("24h", pattern=r"^[1-9][0-9]*h$")
    metadata: dict[str, str] | None = None


def batch_object(session: Session, batch: Batch) -> dict[str, Any]:
    counts = batch_repos.line_counts(session=session, batch_id=batch.id)
    errors = {"object": "list", "data": batch.errors} if batch.errors else None
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        **{
            name: int(value) if value is not None else None
            for name, value in (
                ("created_at", batch.created_at),
                ("in_progress_at", batch.in_progress_at),
                ("expires_at", batch.expires_at),
                ("finalizing_at", batch.finalizing_at),
                ("completed_at", batch.completed_at),
                ("failed_at", batch.failed_at),
                ("expired_at", batch.expired_at),
                ("cancelling_at", batch.cancelling_at),
                ("cancelled_at", batch.cancelled_at),
            )
        },
        "request_counts": {k: counts[k] for k in ("total", "completed", "failed")},
        # Not in OpenAI's object (its clients ignore it): what the lines have generated so far.
        "usage": {"completion_tokens": counts["completion_tokens"]},
        "metadata": batch.meta,
    }


def _line_error(line: int, code: str, message: str, custom_id: Any = None) -> dict[str, Any]:
    return {
        "line": line,
        "custom_id": custom_id if isinstance(custom_id, str) else None,
        "job": None,
        "error": {"code": code, "message": f"line {line}: {message}", "line": line},
    }


async def _read_lines(services: Services, endpoint: str, content: bytes, owner: str | None) -> list[dict[str, Any]]:
    """Each non-blank line checked as its endpoint would check it: {line, custom_id, job | None, error | None},
    `job` being (kind, canonical, key). Runs on the event loop (the checks may read the model's facts) in
    slices, so a large file never holds the loop for long."""
    pipeline = Pipeline(services)
    weights, namespace = await pipeline.weights(), pipeline.namespace(owner)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, raw_line in enumerate(content.split(b"\n"), start=1):
        if n % 64 == 0:
            await asyncio.sleep(0)
        if not raw_line.strip():
            continue
        try:
            item = json.loads(raw_line)
        except ValueError as exc:
            out.append(_line_error(n, "invalid_json", f"not valid JSON ({exc})."))
            continue
        if not isinstance(item, dict):
            out.append(_line_error(n, "invalid_request", "each line must be a JSON object."))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            out.append(_line_error(n, "missing_custom_id", "custom_id must be a non-empty string.", custom_id))
            continue
        if custom_id in seen:
            out.append(
                _line_error(n, "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line.", custom_id)
            )
            continue
        seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            out.append(_line_error(n, "invalid_method", "method must be POST.", custom_id))
            continue
        if item.get("url") != endpoint:
            out.append(_line_error(n, "mismatched_url", f"url must be the batch's endpoint {endpoint!r}.", custom_id))
            continue
        if not isinstance(item.get("body"), dict):
            out.append(_line_error(n, "invalid_request", "body must be a JSON object.", custom_id))
            continue
        try:
            body = parse(endpoint, item["body"])
            if body.stream:
                raise APIError(400, "A batch line is not streamed.", param="stream")
            prepared = await prepare(services, body)
            if len(prepared.canonicals) != 1:
                raise APIError(400, "A batch line takes one prompt.", param="prompt")
        except APIError as exc:
            out.append(_line_error(n, exc.code or "invalid_request", exc.message, custom_id))
            continue
        canonical = prepared.canonicals[0]
        key = request_key(prepared.kind, canonical, weights=weights, namespace=namespace)
        out.append({"line": n, "custom_id": custom_id, "job": (prepared.kind, canonical, key), "error": None})
    return out


def _create(
    services: Services, request: BatchRequest, lines: list[dict[str, Any]], window_s: float, owner: str | None
) -> str:
    """The batch row, its lines and their jobs, in one transaction: all or nothing."""
    ttl, namespace = services.settings.cache_ttl_s, Pipeline(services).namespace(owner)
    with services.sessions.begin() as session:
        batch = batch_repos.create_batch(
            session=session,
            endpoint=request.endpoint,
            input_file_id=request.input_file_id,
            completion_window=request.completion_window,
            window_s=window_s,
            metadata=request.metadata,
            owner=owner,
        )
        by_key: dict[str, str] = {}
        rows = []
        for line in lines:
            job_id = None
            if line["job"] is not None:
                kind, canonical, key = line["job"]
                job_id = by_key.get(key)
                if job_id is None:
                    job_id = by_key[key] = _job_for(session, batch.id, kind, canonical, key, ttl, owner, namespace)
            rows.append(
                {"line": line["line"], "custom_id": line["custom_id"], "job_id": job_id, "error": line["error"]}
            )
        batch_repos.add_lines(session=session, batch_id=batch.id, lines=rows)
        problems = [r["error"] for r in rows if r["error"]]
        batch.errors = problems[:ERRORS_SHOWN] or None
        batch.status, batch.in_progress_at = "in_progress", time.time()
        return batch.id


def _job_for(
    session: Session,
    batch_id: str,
    kind: str,
    canonical: dict[str, Any],
    key: str,
    ttl_s: float | None,
    owner: str | None,
    namespace: str,
) -> str:
    """A line's job: the cached answer, an identical job in flight, or a new low-priority job."""
    cacheable = is_deterministic(canonical)
    common = {
        "key": key,
        "kind": kind,
        "model": canonical["model"],
        "request": canonical,
        "ttl_s": ttl_s,
        "priority": "low",
        "stream": False,
        "batch_id": batch_id,
        "owner": owner,
        "namespace": namespace,
    }
    if cacheable and (cached := repos.lookup_result(session=session, key=key)) is not None:
        return repos.create_job(session=session, store=False, result=cached, **common).id
    if cacheable and (running := repos.find_inflight(session=session, key=key)) is not None:
        repos.join_job(session=session, job_id=running.id, priority="low")
        return running.id
    return repos.create_job(session=session, store=cacheable, sent=False, **common).id


@batches_router.post("")
async def create_batch(services: ServicesDep, owner: Owner, request: Annotated[BatchRequest, Body()]) -> dict[str, Any]:
    if request.endpoint not in ENDPOINTS:
        raise APIError(
            400, f"Unsupported endpoint {request.endpoint!r}; use one of {', '.join(ENDPOINTS)}.", param="endpoint"
        )
    settings = services.settings

    def read_input() -> bytes:
        with services.sessions() as session:
            file = _file(session, request.input_file_id, owner)
            if file.purpose != "batch":
                raise APIError(400, f"File {file.id} has purpose {file.purpose!r}, not 'batch'.", param="input_file_id")
            return file.content

    content = await asyncio.to_thread(read_input)
    lines = await _read_lines(services, request.endpoint, content, owner)
    if not lines:
        raise APIError(400, "The input file has no lines.", param="input_file_id")
    if len(lines) > settings.max_batch_lines:
        raise APIError(
            400,
            f"The input file has {len(lines)} lines; at most {settings.max_batch_lines} are allowed in one batch.",
            param="input_file_id",
        )
    window_s = int(request.completion_window[:-1]) * 3600.0
    batch_id = await asyncio.to_thread(_create, services, request, lines, window_s, owner)
    await asyncio.to_thread(delivery.resend, services.sessions, services.celery, settings, lost_after_s=None)
    return await asyncio.to_thread(read_batch, services, batch_id, owner)


def _batch(session: Session, batch_id: str, owner: str | None) -> Batch:
    """The batch, if it is the caller's: another key's batch is as absent as an unknown one (404)."""
    batch = batch_repos.get_batch(session=session, batch_id=batch_id)
    if batch is None or (owner is not None and batch.owner != owner):
        raise APIError(404, f"No batch with id {batch_id!r}.", code="batch_not_found", param="batch_id")
    return batch


def read_batch(services: Services, batch_id: str, owner: str | None) -> dict[str, Any]:
    with services.sessions() as session:
        _batch(session, batch_id, owner)
    advance(services, batch_id)
    with services.sessions() as session:
        batch = batch_repos.get_batch(session=session, batch_id=batch_id)
        if batch is None:
            raise APIError(404, f"No batch with id {batch_id!r}.", code="batch_not_found", param="batch_id")
        return batch_object(session, batch)


@batches_router.get("/{batch_id}")
async def get_batch(batch_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    return await asyncio.to_thread(read_batch, services, batch_id, owner)


@batches_router.get("")
async def list_batches(
    services: ServicesDep, owner: Owner, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with services.sessions() as session:
            return [
                batch_object(session, b)
                for b in batch_repos.list_batches(session=session, owner=owner, limit=limit + 1, after=after)
            ]

    return list_page(await asyncio.to_thread(read), limit)


@batches_router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    """Stop the batch's jobs (the worker drops them within a second); the output keeps what finished."""

    def cancel() -> dict[str, Any]:
        with services.sessions.begin() as session:
            _batch(session, batch_id, owner)
            if batch_repos.move(session=session, batch_id=batch_id, to="cancelling", frm=("validating", "in_progress")):
                batch_repos.cancel_jobs(session=session, batch_id=batch_id)
        with services.sessions() as session:  # answered as `cancelling`, as OpenAI does
            batch = batch_repos.get_batch(session=session, batch_id=batch_id)
            assert batch is not None  # found just above, in this request
            return batch_object(session, batch)

    return await asyncio.to_thread(cancel)


# -- progress and output ----------------------------------------------------------------------


def advance(services: Services, batch_id: str) -> None:
    """Move an open batch on: expire it past its window; finish it when none of its jobs is active (or
    at once when cancelling). Safe from any process at any time: each move is one conditional update."""
    with services.sessions.begin() as session:
        batch = batch_repos.get_batch(session=session, batch_id=batch_id)
        if batch is None or batch.status not in ("in_progress", "cancelling"):
            return
        final = "cancelled" if batch.status == "cancelling" else "completed"
        if batch.status == "in_progress" and time.time() > batch.expires_at:
            final = "expired"
            batch_repos.cancel_jobs(session=session, batch_id=batch_id)
        elif final == "completed" and batch_repos.line_counts(session=session, batch_id=batch_id)["active"]:
            return
        # One transaction from the claim to the final state: a failure leaves the batch as it was, for the
        # next round, never stuck half-way; a second process finds the claim taken.
        if not batch_repos.move(session=session, batch_id=batch_id, to="finalizing", frm=(batch.status,)):
            return
        output, errors = _compose(services, session, batch_id, final)
        ids = {}
        for name, lines in (("output_file_id", output), ("error_file_id", errors)):
            if lines:
                content = ("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n").encode()
                ids[name] = batch_repos.create_file(
                    session=session,
                    purpose="batch_output",
                    filename=f"{batch_id}_{name.split('_')[0]}.jsonl",
                    content=content,
                    owner=batch.owner,
                ).id
        batch_repos.move(session=session, batch_id=batch_id, to=final, frm=("finalizing",), **ids)
    log.info("batch %s %s: %d answered, %d errors", batch_id, final, len(output), len(errors))


def _compose(
    services: Services, session: Session, batch_id: str, final: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output lines, error lines), each line of the input once, in order."""
    output: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for line, job in batch_repos.results(session=session, batch_id=batch_id):
        entry = _entry(services, line, job, final)
        (output if entry["error"] is None and entry["response"]["status_code"] == 200 else errors).append(entry)
    return output, errors


def _entry(services: Services, line: BatchLine, job: Job | None, final: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": None,
        "error": None,
    }
    if job is None:
        entry["error"] = line.error or {"code": "invalid_request", "message": "refused"}
    elif job.status == "succeeded":
        entry["response"] = {
            "status_code": 200,
            "request_id": job.id,
            "body": render_result(services, job.kind, job.result),
        }
    elif job.status in ("failed", "cancelled"):
        error = job.error or {}
        entry["response"] = {
            "status_code": int(error.get("status", 500)),
            "request_id": job.id,
            "body": {"error": {k: error.get(k) for k in ("message", "type", "param", "code")}},
        }
    else:  # still queued or running: the batch was cancelled or expired first
        entry["error"] = {"code": f"batch_{final}", "message": f"The batch was {final} before this request ran."}
    return entry


def advance_open(services: Services) -> None:
    """The reaper's round: move every open batch on."""
    with services.sessions() as session:
        ids = [b.id for b in batch_repos.open_batches(session=session)]
    for batch_id in ids:
        try:
            advance(services, batch_id)
        except Exception:
            log.exception("could not advance batch %s", batch_id)
