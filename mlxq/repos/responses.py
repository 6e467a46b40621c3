"""Stored responses of the Responses API (keyword-only functions). The job a response names holds its result
and its state, so a stored response is never a second copy of either."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mlxq.repos import jobs
from mlxq.sql import Job, StoredResponse, rowcount
from mlxq.states import JOB_ACTIVE


def store_response(
    *,
    session: Session,
    response_id: str,
    job_id: str,
    model: str,
    request: dict[str, Any],
    input_items: list[dict[str, Any]],
    previous_items: list[dict[str, Any]],
    background: bool,
    owner: str | None,
    created_at: float | None = None,
) -> StoredResponse:
    row = StoredResponse(
        id=response_id,
        job_id=job_id,
        model=model,
        request=request,
        input_items=input_items,
        previous_items=previous_items,
        background=background,
        created_at=created_at or time.time(),
        owner=owner,
    )
    session.add(row)
    return row


def get_response(*, session: Session, response_id: str) -> tuple[StoredResponse, Job | None] | None:
    """The stored response and its job (None once retention removed the job)."""
    row = session.get(StoredResponse, response_id)
    if row is None:
        return None
    return row, session.get(Job, row.job_id)


def recent_responses(*, session: Session, owner: str | None, limit: int) -> list[tuple[StoredResponse, Job | None]]:
    """`owner`'s stored responses, newest first, with their jobs (None once retention removed one)."""
    query = select(StoredResponse).order_by(StoredResponse.created_at.desc()).limit(limit)
    if owner is not None:
        query = query.where(StoredResponse.owner == owner)
    return [(row, session.get(Job, row.job_id)) for row in session.scalars(query)]


def cancel_response(*, session: Session, response_id: str) -> bool:
    """The client cancels its background response: it leaves the job (cancelled if nobody else waits for it, as
    mlxq.repos.jobs.leave_job does for any client that goes away) and the response is cancelled. A response whose
    job has ended is unchanged; returns whether it was cancelled."""
    row = session.get(StoredResponse, response_id)
    job = session.get(Job, row.job_id) if row is not None else None
    if row is None or job is None or row.cancelled_at is not None or job.status not in JOB_ACTIVE:
        return False
    jobs.leave_job(session=session, job_id=job.id, abandon=True)
    row.cancelled_at = time.time()
    return True


def delete_response(*, session: Session, response_id: str) -> bool:
    return bool(rowcount(session.execute(delete(StoredResponse).where(StoredResponse.id == response_id))))


def prune(*, session: Session, before: float) -> int:
    """Retention: responses created before `before` (as old as the jobs that answered them)."""
    return rowcount(session.execute(delete(StoredResponse).where(StoredResponse.created_at < before)))
