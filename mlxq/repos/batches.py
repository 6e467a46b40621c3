"""Batches and their lines (keyword-only functions).

A batch's lines point at jobs; the jobs hold the results. A line's job may be shared: identical lines,
a cached answer, an identical job already in flight. So progress, resumption after a worker dies, and
the output (each line once, in order) all read from the jobs, never from a second copy of their state.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.orm import Session

from mlxq.repos import jobs
from mlxq.repos.files import new_id
from mlxq.repos.pages import newest_first
from mlxq.sql import Batch, BatchLine, Job, rowcount
from mlxq.states import BATCH_OPEN, JOB_ACTIVE, BatchStatus, JobStatus


def create_batch(
    *,
    session: Session,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    window_s: float,
    metadata: dict[str, Any] | None,
    owner: str | None,
) -> Batch:
    now = time.time()
    batch = Batch(
        id=new_id("batch"),
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status=BatchStatus.VALIDATING,
        meta=metadata,
        created_at=now,
        expires_at=now + window_s,
        owner=owner,
    )
    session.add(batch)
    return batch


def get_batch(*, session: Session, batch_id: str) -> Batch | None:
    return session.get(Batch, batch_id)


def list_batches(*, session: Session, owner: str | None, limit: int = 20, after: str | None = None) -> list[Batch]:
    return list(session.scalars(newest_first(session, Batch, owner=owner, limit=limit, after=after)))


def add_lines(*, session: Session, batch_id: str, lines: list[dict[str, Any]]) -> None:
    """Rows of {line, custom_id, job_id, error}."""
    if lines:
        session.execute(insert(BatchLine), [{"batch_id": batch_id, **line} for line in lines])


def move(*, session: Session, batch_id: str, to: BatchStatus, frm: tuple[BatchStatus, ...], **values: Any) -> bool:
    """Move a batch from one of `frm` to `to`, stamping `<to>_at`; False when another process was first."""
    stamp = {f"{to}_at": time.time()} if hasattr(Batch, f"{to}_at") else {}
    done = session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status.in_(frm)).values(status=to, **stamp, **values)
    )
    return bool(rowcount(done))


def line_counts(*, session: Session, batch_id: str) -> dict[str, int]:
    """OpenAI's request_counts: total lines, completed (succeeded), failed (refused, failed, cancelled); and the
    lines' token usage."""
    row = session.execute(
        select(
            func.count(),
            func.sum(case((Job.status == JobStatus.SUCCEEDED, 1), else_=0)),
            func.sum(
                case((BatchLine.job_id.is_(None) | Job.status.in_((JobStatus.FAILED, JobStatus.CANCELLED)), 1), else_=0)
            ),
            func.sum(case((Job.status.in_(JOB_ACTIVE), 1), else_=0)),
            func.sum(Job.completion_tokens),
            func.sum(Job.prompt_tokens),
            func.sum(Job.cached_tokens),
        )
        .select_from(BatchLine)
        .outerjoin(Job, Job.id == BatchLine.job_id)
        .where(BatchLine.batch_id == batch_id)
    ).one()
    return {
        "total": int(row[0] or 0),
        "completed": int(row[1] or 0),
        "failed": int(row[2] or 0),
        "active": int(row[3] or 0),
        "completion_tokens": int(row[4] or 0),
        "prompt_tokens": int(row[5] or 0),
        "cached_tokens": int(row[6] or 0),
    }


def cancel_jobs(*, session: Session, batch_id: str) -> int:
    """Cancel the batch's own jobs still queued or running (not jobs it shares with other clients)."""
    return jobs.cancel_active(session=session, where=[Job.batch_id == batch_id])


def results(*, session: Session, batch_id: str) -> list[tuple[BatchLine, Job | None]]:
    """Every line in order, with its job."""
    rows = session.execute(
        select(BatchLine, Job)
        .outerjoin(Job, Job.id == BatchLine.job_id)
        .where(BatchLine.batch_id == batch_id)
        .order_by(BatchLine.line)
    ).all()
    return [(line, job) for line, job in rows]


def open_batches(*, session: Session) -> list[Batch]:
    return list(
        session.scalars(select(Batch).where(Batch.status.in_((BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING))))
    )


def prune(*, session: Session, before: float) -> dict[str, int]:
    """Retention: finished batches (and their lines) older than `before`."""
    old = select(Batch.id).where(Batch.status.not_in(BATCH_OPEN), Batch.created_at < before)
    lines = rowcount(session.execute(delete(BatchLine).where(BatchLine.batch_id.in_(old))))
    finished = delete(Batch).where(Batch.status.not_in(BATCH_OPEN), Batch.created_at < before)
    return {"batch_lines": lines, "batches": rowcount(session.execute(finished))}
