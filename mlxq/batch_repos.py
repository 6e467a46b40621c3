"""Data access for files and batches (keyword-only functions, like mlxq.repos).

A batch's lines point at jobs; the jobs hold the results. A line's job may be shared: identical lines,
a cached answer, an identical job already in flight. So progress, resumption after a worker dies, and
the output (each line once, in order) all read from the jobs, never from a second copy of their state.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.orm import Session, defer

from mlxq.contract import CANCELLED
from mlxq.repos import ACTIVE
from mlxq.sql import Batch, BatchLine, File, Job, rowcount

# Statuses a batch leaves only to a final one.
OPEN = ("validating", "in_progress", "finalizing", "cancelling")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- files ------------------------------------------------------------------------------------


def create_file(*, session: Session, purpose: str, filename: str, content: bytes, owner: str | None) -> File:
    file = File(
        id=new_id("file"),
        purpose=purpose,
        filename=filename,
        bytes=len(content),
        content=content,
        created_at=time.time(),
        owner=owner,
    )
    session.add(file)
    return file


def get_file(*, session: Session, file_id: str) -> File | None:
    return session.get(File, file_id)


def list_files(
    *, session: Session, owner: str | None, purpose: str | None = None, limit: int = 100, after: str | None = None
) -> list[File]:
    query = select(File).order_by(File.created_at.desc(), File.id.desc()).limit(limit)
    if owner is not None:
        query = query.where(File.owner == owner)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None and (cursor := session.get(File, after)) is not None:
        query = query.where(
            (File.created_at < cursor.created_at) | ((File.created_at == cursor.created_at) & (File.id < cursor.id))
        )
    return list(session.scalars(query.options(defer(File.content))))


def delete_file(*, session: Session, file_id: str) -> bool:
    return bool(rowcount(session.execute(delete(File).where(File.id == file_id))))


# -- batches ----------------------------------------------------------------------------------


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
        status="validating",
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
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)
    if owner is not None:
        query = query.where(Batch.owner == owner)
    if after is not None and (cursor := session.get(Batch, after)) is not None:
        query = query.where(
            (Batch.created_at < cursor.created_at) | ((Batch.created_at == cursor.created_at) & (Batch.id < cursor.id))
        )
    return list(session.scalars(query))


def add_lines(*, session: Session, batch_id: str, lines: list[dict[str, Any]]) -> None:
    """Rows of {line, custom_id, job_id, error}."""
    if lines:
        session.execute(insert(BatchLine), [{"batch_id": batch_id, **line} for line in lines])


def move(*, session: Session, batch_id: str, to: str, frm: tuple[str, ...], **values: Any) -> bool:
    """Move a batch from one of `frm` to `to`, stamping `<to>_at`; False when another process was first."""
    stamp = {f"{to}_at": time.time()} if hasattr(Batch, f"{to}_at") else {}
    done = session.execute(
        update(Batch).where(Batch.id == batch_id, Batch.status.in_(frm)).values(status=to, **stamp, **values)
    )
    return bool(rowcount(done))


def line_counts(*, session: Session, batch_id: str) -> dict[str, int]:
    """OpenAI's request_counts: total lines, completed (succeeded), failed (refused, failed, cancelled)."""
    row = session.execute(
        select(
            func.count(),
            func.sum(case((Job.status == "succeeded", 1), else_=0)),
            func.sum(case((BatchLine.job_id.is_(None) | Job.status.in_(("failed", "cancelled")), 1), else_=0)),
            func.sum(case((Job.status.in_(ACTIVE), 1), else_=0)),
            func.sum(Job.completion_tokens),
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
    }


def cancel_jobs(*, session: Session, batch_id: str) -> int:
    """Cancel the batch's own jobs still queued or running (not jobs it shares with other clients)."""
    return rowcount(
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status.in_(ACTIVE))
            .values(status="cancelled", error=dict(CANCELLED), finished_at=time.time())
        )
    )


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
    return list(session.scalars(select(Batch).where(Batch.status.in_(("in_progress", "cancelling")))))


def prune(*, session: Session, before: float) -> dict[str, int]:
    """Retention: finished batches (and their lines) and files older than `before`."""
    old = select(Batch.id).where(Batch.status.not_in(OPEN), Batch.created_at < before)
    lines = rowcount(session.execute(delete(BatchLine).where(BatchLine.batch_id.in_(old))))
    return {
        "batch_lines": lines,
        "batches": rowcount(session.execute(delete(Batch).where(Batch.status.not_in(OPEN), Batch.created_at < before))),
        "files": rowcount(session.execute(delete(File).where(File.created_at < before))),
    }
