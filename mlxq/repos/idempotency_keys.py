"""Idempotency keys of submitted jobs: a retried submit gets the job the first one got."""

from __future__ import annotations

import time

from sqlalchemy import delete
from sqlalchemy.orm import Session

from mlxq.sql import IdempotencyKey, Job, rowcount


def job_for_idempotency_key(*, session: Session, key: str) -> Job | None:
    row = session.get(IdempotencyKey, key)
    return session.get(Job, row.job_id) if row is not None else None


def remember_idempotency_key(*, session: Session, key: str, job_id: str) -> None:
    """Raises IntegrityError when another submit with the same key was first (the caller then reads it)."""
    session.add(IdempotencyKey(key=key, job_id=job_id, created_at=time.time()))


def prune(*, session: Session, before: float) -> int:
    """Retention: keys older than `before` (they live as long as the jobs they name)."""
    return rowcount(session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < before)))
