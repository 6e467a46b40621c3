"""OpenAI's Batch API (`/v1/batches`), close enough that the official `openai` client works unchanged.

The routes only read and ask: the lines are checked in api.offline.batch_lines, the batch's life (create, move on,
finalize) is api.offline.batch_lifecycle's. A GET reads the batch as it is; the house-keeping moves it.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.auth import AUTHENTICATED, Owner, owns
from api.errors import APIError
from api.offline import batch_lifecycle
from api.offline.batch_lines import read_lines
from api.offline.files import owned_file
from api.offline.pages import list_page
from api.pipeline.prepare import ENDPOINTS
from api.services import Services, ServicesDep
from mlxq.repos import batches
from mlxq.sql import Batch
from mlxq.states import BatchStatus, FilePurpose

router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=AUTHENTICATED)


class BatchRequest(BaseModel):
    input_file_id: str
    endpoint: str
    # The one window OpenAI offers (its API refuses any other); the batch expires 24 h after it is created.
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


def batch_object(session: Session, batch: Batch) -> dict[str, Any]:
    counts = batches.line_counts(session=session, batch_id=batch.id)
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
        # What the lines have used so far, each as its output line reports it, in OpenAI's batch object's shape.
        "usage": {
            "input_tokens": counts["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": counts["cached_tokens"]},
            "output_tokens": counts["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"],
        },
        "metadata": batch.meta,
    }


def _owned(session: Session, batch_id: str, owner: str | None) -> Batch:
    """The batch, if it is the caller's: another key's batch is as absent as an unknown one (404)."""
    batch = batches.get_batch(session=session, batch_id=batch_id)
    if batch is None or not owns(owner, batch.owner):
        raise APIError(404, f"No batch with id {batch_id!r}.", code="batch_not_found", param="batch_id")
    return batch


def read_batch(services: Services, batch_id: str, owner: str | None) -> dict[str, Any]:
    with services.sessions() as session:
        return batch_object(session, _owned(session, batch_id, owner))


@router.post("")
async def create_batch(services: ServicesDep, owner: Owner, request: Annotated[BatchRequest, Body()]) -> dict[str, Any]:
    if request.endpoint not in ENDPOINTS:
        raise APIError(
            400, f"Unsupported endpoint {request.endpoint!r}; use one of {', '.join(ENDPOINTS)}.", param="endpoint"
        )

    def read_input() -> bytes:
        with services.sessions() as session:
            file = owned_file(session, request.input_file_id, owner, param="input_file_id")
            if file.purpose != FilePurpose.BATCH:
                raise APIError(400, f"File {file.id} has purpose {file.purpose!r}, not 'batch'.", param="input_file_id")
            return file.content

    content = await asyncio.to_thread(read_input)
    lines = await read_lines(services, request.endpoint, content, owner)
    if not lines:
        raise APIError(400, "The input file has no lines.", param="input_file_id")
    if len(lines) > (most := services.settings.max_batch_lines):
        raise APIError(
            400,
            f"The input file has {len(lines)} lines; at most {most} are allowed in one batch.",
            param="input_file_id",
        )
    new = batch_lifecycle.NewBatch(
        request.endpoint, request.input_file_id, request.completion_window, request.metadata, owner
    )
    # All or nothing, and retried whole as a single request's admission is: a line that met an identical job
    # created at the same moment joins it on the next try (api.pipeline.admission.retry_on_conflict).
    batch_id = await asyncio.to_thread(
        services.admission.retry_on_conflict, lambda: batch_lifecycle.create(services, new, lines)
    )
    return await asyncio.to_thread(read_batch, services, batch_id, owner)


@router.get("/{batch_id}")
async def get_batch(batch_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    return await asyncio.to_thread(read_batch, services, batch_id, owner)


@router.get("")
async def list_batches(
    services: ServicesDep, owner: Owner, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> dict[str, Any]:
    def read() -> list[dict[str, Any]]:
        with services.sessions() as session:
            rows = batches.list_batches(session=session, owner=owner, limit=limit + 1, after=after)
            return [batch_object(session, b) for b in rows]

    return list_page(await asyncio.to_thread(read), limit)


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, services: ServicesDep, owner: Owner) -> dict[str, Any]:
    """Stop the batch's jobs (the worker drops them within a second); the output keeps what finished. Answered
    as `cancelling`, as OpenAI does; the house-keeping finalizes it."""

    def cancel() -> dict[str, Any]:
        with services.sessions.begin() as session:
            _owned(session, batch_id, owner)
            cancellable = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
            if batches.move(session=session, batch_id=batch_id, to=BatchStatus.CANCELLING, frm=cancellable):
                batches.cancel_jobs(session=session, batch_id=batch_id)
        services.batches_open.set()
        return read_batch(services, batch_id, owner)

    return await asyncio.to_thread(cancel)
