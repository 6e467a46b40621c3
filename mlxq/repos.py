"""Data access for the response cache, jobs, counters and worker heartbeats (keyword-only functions)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from mlxq.contract import CANCELLED, Priority, job_error
from mlxq.sql import CacheEntry, Counter, Job, RequestLog, Worker

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


# -- response cache ---------------------------------------------------------------------------

def _upsert(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise NotImplementedError(dialect)
    return insert


def put_entry(*, session: Session, key: str, kind: str, model: str, result: dict[str, Any],
              ttl_s: float | None) -> None:
    """Insert or replace an entry in one statement (bounded afterwards by `evict_lru`)."""
    now = time.time()
    values = {"kind": kind, "model": model, "result": result, "size_bytes": len(json.dumps(result)),
              "last_access_at": now, "expires_at": now + ttl_s if ttl_s else None}
    stmt = _upsert(session)(CacheEntry).values(key=key, hits=0, created_at=now, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=[CacheEntry.key], set_=values))


def evict_lru(*, session: Session, max_entries: int) -> int:
    """Delete least-recently-used entries beyond `max_entries`; returns how many."""
    excess = (session.scalar(select(func.count()).select_from(CacheEntry)) or 0) - max_entries
    if excess <= 0:
        return 0
    oldest = select(CacheEntry.key).order_by(CacheEntry.last_access_at).limit(excess)
    return session.execute(delete(CacheEntry).where(CacheEntry.key.in_(oldest.scalar_subquery()))).rowcount or 0


def lookup_result(*, session: Session, key: str, now: float | None = None) -> dict[str, Any] | None:
    """The hot path of a hit: one indexed read of the stored result, no ORM object."""
    row = session.execute(
        select(CacheEntry.result, CacheEntry.expires_at).where(CacheEntry.key == key)
    ).first()
    if row is None or (row.expires_at is not None and row.expires_at <= (now or time.time())):
        return None
    return row.result


def touch_entry(*, session: Session, key: str, hits: int = 1, now: float | None = None) -> None:
    session.execute(
        update(CacheEntry)
        .where(CacheEntry.key == key)
        .values(last_access_at=now or time.time(), hits=CacheEntry.hits + hits)
    )


def purge_expired(*, session: Session) -> int:
    result = session.execute(delete(CacheEntry).where(CacheEntry.expires_at <= time.time()))
    return result.rowcount or 0


def clear_cache(*, session: Session) -> int:
    return session.execute(delete(CacheEntry)).rowcount or 0


def cache_items(*, session: Session) -> tuple[int, int]:
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(CacheEntry.size_bytes), 0))
    ).one()
    return int(count), int(size)


# -- counters ---------------------------------------------------------------------------------

def bump(*, session: Session, name: str, by: int = 1) -> None:
    done = session.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + by))
    if not done.rowcount:
        session.add(Counter(name=name, value=by))


def counters(*, session: Session) -> dict[str, int]:
    return {c.name: int(c.value) for c in session.scalars(select(Counter))}


# -- jobs -------------------------------------------------------------------------------------

def create_job(*, session: Session, key: str, kind: str, model: str, request: dict[str, Any],
               store: bool, ttl_s: float | None, priority: Priority = "interactive", stream: bool = True) -> Job:
    job = Job(id=str(uuid.uuid4()), key=key, kind=kind, model=model, status="queued", request=request,
              store=store, ttl_s=ttl_s, priority=priority, stream=stream, created_at=time.time())
    session.add(job)
    return job


def get_job(*, session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def find_inflight(*, session: Session, key: str) -> Job | None:
    """An active job for the same request (single flight: identical requests run once)."""
    return session.scalars(
        select(Job).where(Job.key == key, Job.status.in_(ACTIVE), Job.store.is_(True))
        .order_by(Job.created_at).limit(1)
    ).first()


def start_job(*, session: Session, job_id: str, worker: str) -> Job | None:
    """Mark a job running and return it; None when it is already finished (a redelivered task)."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(("succeeded", "cancelled")))
        .values(status="running", started_at=time.time(), error=None, worker=worker)
        .returning(Job.kind, Job.request, Job.key, Job.store, Job.ttl_s, Job.model, Job.priority, Job.stream)
    ).first()
    if row is None:
        return None
    return Job(id=job_id, status="running", worker=worker, kind=row.kind, request=row.request, key=row.key,
               store=row.store, ttl_s=row.ttl_s, model=row.model, priority=row.priority, stream=row.stream)


def cancelled_among(*, session: Session, job_ids: list[str]) -> list[str]:
    """Which of these jobs were cancelled (one query for every job the worker is running)."""
    return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status == "cancelled")))


def cancel_job(*, session: Session, job_id: str) -> bool:
    """Ask a queued or running job to stop; the worker notices within a poll interval."""
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(status="cancelled", error=dict(CANCELLED), finished_at=time.time())
    )
    return bool(done.rowcount)


def finish_job(*, session: Session, job_id: str, status: str, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> None:
    session.execute(
        update(Job).where(Job.id == job_id)
        .values(status=status, result=result, error=error, finished_at=time.time())
    )


def fail_running_jobs(*, session: Session, worker: str, message: str) -> int:
    """Jobs left running by a worker that died are failed, never left running forever."""
    err = job_error(503, message, code="worker_restarted")
    result = session.execute(
        update(Job).where(Job.status == "running", Job.worker == worker)
        .values(status="failed", error=dict(err), finished_at=time.time())
    )
    return result.rowcount or 0


def fail_orphaned_jobs(*, session: Session, live_workers: list[str], older_than_s: float) -> int:
    """Fail running jobs whose worker is no longer alive (started long enough ago to rule out a race)."""
    err = job_error(503, "the worker running this job stopped", code="worker_lost")
    query = update(Job).where(Job.status == "running", Job.started_at < time.time() - older_than_s)
    if live_workers:
        query = query.where(Job.worker.not_in(live_workers))
    return session.execute(query.values(status="failed", error=dict(err), finished_at=time.time())).rowcount or 0


def queue_depth(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0)


# -- workers ----------------------------------------------------------------------------------

def heartbeat(*, session: Session, name: str, model: str, model_loaded: bool, error: str | None,
              started_at: float, stats: dict[str, Any] | None = None) -> None:
    worker = session.get(Worker, name)
    if worker is None:
        worker = Worker(name=name, started_at=started_at)
        session.add(worker)
    worker.model, worker.model_loaded, worker.error, worker.stats = model, model_loaded, error, stats
    worker.started_at, worker.last_seen = started_at, time.time()


def live_workers(*, session: Session, within_s: float) -> list[Worker]:
    return list(session.scalars(select(Worker).where(Worker.last_seen >= time.time() - within_s)))


def remove_worker(*, session: Session, name: str) -> None:
    session.execute(delete(Worker).where(Worker.name == name))


# -- request log ------------------------------------------------------------------------------

def log_requests(*, session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(RequestLog), rows)


def request_log(*, session: Session, since: float = 0.0) -> list[RequestLog]:
    return list(session.scalars(select(RequestLog).where(RequestLog.at >= since).order_by(RequestLog.id)))
