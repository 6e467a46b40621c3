"""Data access for the response cache, jobs, counters and worker heartbeats (keyword-only functions)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Text, cast, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from mlxq.contract import CANCELLED, Priority, job_error
from mlxq.sql import CacheEntry, Counter, IdempotencyKey, Job, RequestLog, StreamEvent, Worker, db_now, rowcount

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


# -- response cache ---------------------------------------------------------------------------


def _upsert(session: Session) -> Callable[..., postgresql.Insert | sqlite.Insert]:
    """The dialect's INSERT, which has `on_conflict_do_update`."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(dialect)  # pragma: no cover - only SQLite and PostgreSQL are supported


def put_entry(
    *,
    session: Session,
    key: str,
    kind: str,
    model: str,
    result: dict[str, Any],
    ttl_s: float | None,
    namespace: str = "",
) -> None:
    """Insert or replace an entry in one statement (bounded afterwards by `evict_lru`)."""
    now = time.time()
    values = {
        "kind": kind,
        "model": model,
        "namespace": namespace,
        "result": result,
        "size_bytes": len(json.dumps(result)),
        "last_access_at": now,
        "expires_at": now + ttl_s if ttl_s else None,
    }
    stmt = _upsert(session)(CacheEntry).values(key=key, hits=0, created_at=now, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=[CacheEntry.key], set_=values))


def evict_lru(*, session: Session, max_entries: int) -> int:
    """Delete least-recently-used entries beyond `max_entries`; returns how many."""
    excess = (session.scalar(select(func.count()).select_from(CacheEntry)) or 0) - max_entries
    if excess <= 0:
        return 0
    oldest = select(CacheEntry.key).order_by(CacheEntry.last_access_at).limit(excess)
    return rowcount(session.execute(delete(CacheEntry).where(CacheEntry.key.in_(oldest.scalar_subquery()))))


def lookup_result(*, session: Session, key: str, now: float | None = None) -> dict[str, Any] | None:
    """The hot path of a hit: one indexed read of the stored result, no ORM object."""
    row = session.execute(select(CacheEntry.result, CacheEntry.expires_at).where(CacheEntry.key == key)).first()
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
    return rowcount(result)


def clear_cache(*, session: Session, namespace: str | None = None, older_than_s: float | None = None) -> int:
    """Delete response-cache entries: all, or one namespace's, or those stored longer ago than `older_than_s`."""
    query = delete(CacheEntry)
    if namespace is not None:
        query = query.where(CacheEntry.namespace == namespace)
    if older_than_s is not None:
        query = query.where(CacheEntry.created_at < time.time() - older_than_s)
    return rowcount(session.execute(query))


def cache_items(*, session: Session) -> tuple[int, int]:
    count, size = session.execute(select(func.count(), func.coalesce(func.sum(CacheEntry.size_bytes), 0))).one()
    return int(count), int(size)


# -- counters ---------------------------------------------------------------------------------


def bump(*, session: Session, name: str, by: int = 1) -> None:
    done = session.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + by))
    if not rowcount(done):
        session.add(Counter(name=name, value=by))


def counters(*, session: Session) -> dict[str, int]:
    return {c.name: int(c.value) for c in session.scalars(select(Counter))}


# -- jobs -------------------------------------------------------------------------------------
# A job's life: queued -> running -> succeeded | failed | cancelled. Only an active job changes state,
# so a late writer (a worker presumed dead, a redelivered task) never overwrites a final one; only a
# queued job can be claimed, so a duplicate task message is skipped; a running job whose worker died
# goes back to queued (or fails after `max_attempts`), and `sent_at` NULL marks it for sending.


def create_job(
    *,
    session: Session,
    key: str,
    kind: str,
    model: str,
    request: dict[str, Any],
    store: bool,
    ttl_s: float | None,
    priority: Priority = "interactive",
    stream: bool = True,
    waiters: int = 1,
    sent: bool = True,
    batch_id: str | None = None,
    result: dict[str, Any] | None = None,
    owner: str | None = None,
    namespace: str = "",
) -> Job:
    """A new job: queued (`sent`: its message goes out right after the commit; else mlxq.delivery sends it
    when there is room), or, given a cached `result`, succeeded at once."""
    now = time.time()
    job = Job(
        id=str(uuid.uuid4()),
        key=key,
        kind=kind,
        model=model,
        status="queued",
        request=request,
        store=store,
        ttl_s=ttl_s,
        priority=priority,
        stream=stream,
        created_at=now,
        sent_at=now if sent else None,
        attempts=0,
        waiters=waiters,
        batch_id=batch_id,
        owner=owner,
        namespace=namespace,
    )
    if result is not None:
        job.status, job.result, job.finished_at, job.sent_at = "succeeded", result, now, None
        job.completion_tokens = _completion_tokens(result)
    session.add(job)
    return job


def get_job(*, session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def find_inflight(*, session: Session, key: str) -> Job | None:
    """An active job for the same request (single flight: identical requests run once)."""
    return session.scalars(
        select(Job).where(Job.key == key, Job.status.in_(ACTIVE), Job.store.is_(True)).order_by(Job.created_at).limit(1)
    ).first()


def join_job(*, session: Session, job_id: str, priority: Priority = "interactive") -> bool:
    """Another client waits for a job; an interactive one makes it interactive from now on. Returns whether
    it still needs its message (a low-priority job waiting for room, mlxq.delivery)."""
    values: dict[str, Any] = {"waiters": Job.waiters + 1}
    if priority == "interactive":
        values["priority"] = "interactive"
    row = session.execute(
        update(Job).where(Job.id == job_id).values(**values).returning(Job.sent_at, Job.status)
    ).first()
    return row is not None and row.sent_at is None and row.status == "queued"


def job_for_idempotency_key(*, session: Session, key: str) -> Job | None:
    row = session.get(IdempotencyKey, key)
    return session.get(Job, row.job_id) if row is not None else None


def remember_idempotency_key(*, session: Session, key: str, job_id: str) -> None:
    """Raises IntegrityError when another submit with the same key was first (the caller then reads it)."""
    session.add(IdempotencyKey(key=key, job_id=job_id, created_at=time.time()))


def list_jobs(
    *,
    session: Session,
    owner: str | None,
    status: str | None = None,
    limit: int = 20,
    after: str | None = None,
    batch_id: str | None = None,
) -> list[Job]:
    """Newest first; `after` is the last id of the previous page. Only `owner`'s (None: keys are off)."""
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if owner is not None:
        query = query.where(Job.owner == owner)
    if status is not None:
        query = query.where(Job.status == status)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    if after is not None and (cursor := session.get(Job, after)) is not None:
        query = query.where(
            or_(Job.created_at < cursor.created_at, (Job.created_at == cursor.created_at) & (Job.id < cursor.id))
        )
    return list(session.scalars(query))


def leave_job(*, session: Session, job_id: str, abandon: bool) -> bool:
    """A client stops waiting; when it `abandon`s the job (went away early) and was the last one waiting,
    the job is cancelled. Returns whether it was."""
    session.execute(update(Job).where(Job.id == job_id).values(waiters=Job.waiters - 1))
    if not abandon:
        return False
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.waiters <= 0, Job.status.in_(ACTIVE))
        .values(status="cancelled", error=dict(CANCELLED), finished_at=time.time())
    )
    return bool(rowcount(done))


def start_job(*, session: Session, job_id: str, worker: str) -> Job | None:
    """Claim a queued job for `worker` and return it; None when it is not queued (finished, cancelled, or
    claimed already through a duplicate message)."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(status="running", started_at=time.time(), error=None, worker=worker, attempts=Job.attempts + 1)
        .returning(
            Job.kind,
            Job.request,
            Job.key,
            Job.store,
            Job.ttl_s,
            Job.model,
            Job.priority,
            Job.stream,
            Job.attempts,
            Job.namespace,
        )
    ).first()
    if row is None:
        return None
    return Job(
        id=job_id,
        status="running",
        worker=worker,
        kind=row.kind,
        request=row.request,
        key=row.key,
        store=row.store,
        ttl_s=row.ttl_s,
        model=row.model,
        priority=row.priority,
        stream=row.stream,
        attempts=row.attempts,
        namespace=row.namespace,
    )


def cancelled_among(*, session: Session, job_ids: list[str]) -> list[str]:
    """Which of these jobs were cancelled (one query for every job the worker is running)."""
    return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status == "cancelled")))


def cancel_job(*, session: Session, job_id: str) -> bool:
    """Ask a queued or running job to stop; the worker notices within a poll interval."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(status="cancelled", error=dict(CANCELLED), finished_at=time.time())
    )
    return bool(rowcount(done))


def finish_job(
    *,
    session: Session,
    job_id: str,
    status: str,
    result: dict[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
) -> bool:
    """Record a job's end, unless it has ended already (a late or duplicate writer changes nothing)."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE))
        .values(
            status=status,
            result=result,
            error=error,
            finished_at=time.time(),
            completion_tokens=_completion_tokens(result),
        )
    )
    return bool(rowcount(done))


def _completion_tokens(result: dict[str, Any] | None) -> int | None:
    tokens = ((result or {}).get("usage") or {}).get("completion_tokens")
    return int(tokens) if isinstance(tokens, int) else None


def requeue_job(*, session: Session, job_id: str) -> bool:
    """Put a running job back in the queue without counting the attempt (its worker is shutting down)."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(status="queued", worker=None, sent_at=None, attempts=Job.attempts - 1)
    )
    return bool(rowcount(done))


def release_job(*, session: Session, job_id: str) -> None:
    """A worker that is stopping hands back a job it has not started: it needs its message sent again."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(sent_at=None))


def requeue_running(
    *, session: Session, max_attempts: int, worker: str | None = None, live_workers: list[str] | None = None
) -> tuple[int, int]:
    """Running jobs of a worker that died (`worker`, or any worker not in `live_workers`) go back to the
    queue; those that have had `max_attempts` fail instead, so a request that kills the worker cannot
    crash-loop it. Returns (requeued, failed)."""
    running = select(Job.id).where(Job.status == "running")
    if worker is not None:
        running = running.where(Job.worker == worker)
    elif live_workers:
        running = running.where(or_(Job.worker.is_(None), Job.worker.not_in(live_workers)))
    ids = list(session.scalars(running))
    if not ids:
        return 0, 0
    err = job_error(
        500,
        f"the worker stopped while running this job, {max_attempts} times: giving up "
        "(the request may crash the worker)",
        code="worker_crashed",
    )
    failed = rowcount(
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == "running", Job.attempts >= max_attempts)
            .values(status="failed", error=dict(err), finished_at=time.time())
        )
    )
    requeued = rowcount(
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == "running")
            .values(status="queued", worker=None, sent_at=None)
        )
    )
    return requeued, failed


def jobs_to_send(
    *, session: Session, lost_before: float | None, low_window: int = 1 << 30, limit: int = 500
) -> list[str]:
    """Queued jobs that need their task message (again): never sent (requeued, or low-priority work held
    back), or, when `lost_before` is given, sent before it (the caller found the broker's queue empty, so
    that message was lost). Low-priority jobs are sent only while fewer than `low_window` of them are in
    flight: the broker and the worker's consumer threads never fill with them, so an interactive request
    is always taken at once and goes first in the engine."""
    unsent = Job.sent_at.is_(None)
    cond = unsent if lost_before is None else or_(unsent, Job.sent_at < lost_before)
    queued = select(Job.id).where(Job.status == "queued", cond).order_by(Job.created_at).limit(limit)
    ids = list(session.scalars(queued.where(Job.priority != "low")))
    in_flight = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.priority == "low", or_(Job.status == "running", (Job.status == "queued") & Job.sent_at.is_not(None)))
    )
    room = low_window - int(in_flight or 0)
    if lost_before is not None:  # a lost message is re-sent whatever the room: it was counted in flight
        ids += list(
            session.scalars(
                select(Job.id)
                .where(Job.status == "queued", Job.priority == "low", Job.sent_at < lost_before)
                .limit(limit)
            )
        )
    if room > 0:
        ids += list(session.scalars(queued.where(Job.priority == "low", unsent).limit(room)))
    return ids


def task_labels(*, session: Session, job_ids: list[str]) -> dict[str, tuple[str, int]]:
    """Each job's kind and the size of its stored request (characters of its JSON), for its task label."""
    if not job_ids:
        return {}
    size = func.length(cast(Job.request, Text))
    rows = session.execute(select(Job.id, Job.kind, size).where(Job.id.in_(job_ids)))
    return {job_id: (kind, int(chars or 0)) for job_id, kind, chars in rows}


def mark_sent(*, session: Session, job_ids: list[str]) -> None:
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(sent_at=time.time()))


def fail_stale_queued(*, session: Session, older_than_s: float) -> int:
    """Queued jobs no worker started in `older_than_s` fail: nothing stays queued forever."""
    err = job_error(503, f"no worker started this job within {older_than_s:.0f} s", code="queue_timeout")
    return rowcount(
        session.execute(
            update(Job)
            .where(Job.status == "queued", Job.created_at < time.time() - older_than_s)
            .values(status="failed", error=dict(err), finished_at=time.time())
        )
    )


def job_counts(*, session: Session) -> dict[str, int]:
    return {status: int(n) for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def queue_depth(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0)


def prune(*, session: Session, jobs_before: float, log_before: float, events_before: float) -> dict[str, int]:
    """Retention: finished jobs, request-log rows and stream events older than the given times."""
    active = select(Job.id).where(Job.status.in_(ACTIVE))
    return {
        "jobs": rowcount(session.execute(delete(Job).where(Job.status.in_(TERMINAL), Job.finished_at < jobs_before))),
        "idempotency_keys": rowcount(
            session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < jobs_before))
        ),
        "request_log": rowcount(session.execute(delete(RequestLog).where(RequestLog.at < log_before))),
        "stream_events": rowcount(
            session.execute(
                delete(StreamEvent).where(StreamEvent.created_at < events_before, StreamEvent.job_id.not_in(active))
            )
        ),
    }


# -- workers ----------------------------------------------------------------------------------


def heartbeat(
    *,
    session: Session,
    name: str,
    model: str,
    model_loaded: bool,
    error: str | None,
    started_at: float,
    stats: dict[str, Any] | None = None,
) -> None:
    worker = session.get(Worker, name)
    if worker is None:
        worker = Worker(name=name, started_at=started_at)
        session.add(worker)
    worker.model, worker.model_loaded, worker.error, worker.stats = model, model_loaded, error, stats
    # The database's clock, which live_workers reads too: a worker's and an api's clocks never meet.
    worker.started_at, worker.last_seen = started_at, db_now()


def live_workers(*, session: Session, within_s: float) -> list[Worker]:
    return list(session.scalars(select(Worker).where(Worker.last_seen >= db_now() - within_s)))


def remove_worker(*, session: Session, name: str) -> None:
    session.execute(delete(Worker).where(Worker.name == name))


# -- request log ------------------------------------------------------------------------------


def log_requests(*, session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(RequestLog), rows)


def request_log(*, session: Session, since: float = 0.0) -> list[RequestLog]:
    return list(session.scalars(select(RequestLog).where(RequestLog.at >= since).order_by(RequestLog.id)))
