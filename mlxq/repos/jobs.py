"""Jobs: the record of every request that needs the worker (keyword-only functions).

A job's life: queued -> running -> succeeded | failed | cancelled. Only an active job changes state,
so a late writer (a worker presumed dead, a redelivered task) never overwrites a final one; only a
queued job can be claimed, so a duplicate task message is skipped; a running job whose worker died
goes back to queued (or fails after `max_attempts`), and `sent_at` NULL marks it for sending.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Text, case, cast, delete, func, or_, select, update
from sqlalchemy.orm import Session

from mlxq.contract import CANCELLED, Priority, job_error
from mlxq.jobspec import JobSpec, Route
from mlxq.repos.pages import newest_first
from mlxq.sql import Job, StreamEvent, rowcount
from mlxq.states import JOB_ACTIVE, JOB_FINAL, JobStatus


def create_job(*, session: Session, spec: JobSpec, sent: bool, result: dict[str, Any] | None = None) -> Job:
    """A new job for `spec`: queued (`sent`: its message goes out right after the commit, else mlxq.delivery
    sends it when there is room), or, given a cached `result`, succeeded at once (it stores nothing)."""
    now = time.time()
    job = Job(
        id=str(uuid.uuid4()),
        key=spec.key,
        kind=spec.kind,
        model=spec.model,
        status=JobStatus.QUEUED,
        request=spec.request.wire(),
        store=spec.cache.store and result is None,
        ttl_s=spec.cache.ttl_s,
        priority=spec.priority,
        stream=spec.stream,
        created_at=now,
        sent_at=now if sent else None,
        attempts=0,
        waiters=1,
        attached=spec.attached,
        batch_id=spec.batch_id,
        owner=spec.owner,
        namespace=spec.namespace,
        session=spec.session,
        endpoint=spec.endpoint,
    )
    if spec.route is not None:
        job.target, job.route_reason, job.route_matched = spec.route.worker, spec.route.reason, spec.route.matched
    if result is not None:
        job.status, job.result, job.finished_at, job.sent_at = JobStatus.SUCCEEDED, result, now, None
        job.completion_tokens, job.prompt_tokens, job.cached_tokens = _usage(result)
    session.add(job)
    return job


def get_job(*, session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def find_inflight(*, session: Session, key: str) -> Job | None:
    """An active job for the same request (single flight: identical requests run once)."""
    return session.scalars(
        select(Job)
        .where(Job.key == key, Job.status.in_(JOB_ACTIVE), Job.store.is_(True))
        .order_by(Job.created_at)
        .limit(1)
    ).first()


def join_job(*, session: Session, job_id: str, priority: Priority = "interactive", attached: bool = True) -> bool:
    """Another client waits for a job; an interactive one makes it interactive from now on, and one not `attached`
    (a submitted job, a batch line, a background response: JobSpec.attached) makes it outlive its api. Returns
    whether it still needs its message (a low-priority job waiting for room, mlxq.delivery)."""
    values: dict[str, Any] = {"waiters": Job.waiters + 1}
    if priority == "interactive":
        values["priority"] = "interactive"
    if not attached:
        values["attached"] = False
    row = session.execute(
        update(Job).where(Job.id == job_id).values(**values).returning(Job.sent_at, Job.status)
    ).first()
    return row is not None and row.sent_at is None and row.status == JobStatus.QUEUED


def cancel_orphans(*, session: Session) -> int:
    """Cancel the active jobs only clients of an api that is gone waited for (killed: it could tell no one), so they
    never run again after a restart for nobody. Only where this api is the only one (the embedded database): a
    shared database's other apis may still have clients waiting. Returns how many."""
    return cancel_active(session=session, where=[Job.attached.is_(True)])


def list_jobs(
    *,
    session: Session,
    owner: str | None,
    status: JobStatus | None = None,
    limit: int = 20,
    after: str | None = None,
    batch_id: str | None = None,
) -> list[Job]:
    """Newest first; `after` is the last id of the previous page. Only `owner`'s (None: keys are off)."""
    query = newest_first(session, Job, owner=owner, limit=limit, after=after)
    if status is not None:
        query = query.where(Job.status == status)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    return list(session.scalars(query))


def leave_job(*, session: Session, job_id: str, abandon: bool) -> bool:
    """A client stops waiting; when it `abandon`s the job (went away early) and was the last one waiting,
    the job is cancelled. Returns whether it was."""
    session.execute(update(Job).where(Job.id == job_id).values(waiters=Job.waiters - 1))
    if not abandon:
        return False
    return bool(cancel_active(session=session, where=[Job.id == job_id, Job.waiters <= 0]))


def cancel_active(*, session: Session, where: list[ColumnElement[bool]]) -> int:
    """Cancel the active (queued or running) jobs matching `where`: the one way a job is cancelled, whoever asks (a
    client, the last waiter leaving, a batch, an api's start). Returns how many; a final job is never touched."""
    done = session.execute(
        update(Job)
        .where(*where, Job.status.in_(JOB_ACTIVE))
        .values(status=JobStatus.CANCELLED, error=dict(CANCELLED), finished_at=time.time())
    )
    return rowcount(done)


def start_job(*, session: Session, job_id: str, worker: str, model: str) -> Job | None:
    """Claim a queued job of `model` for `worker` and return it; None when it is not queued (finished,
    cancelled, or claimed already through a duplicate message) or is another model's."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.model == model)
        .values(status=JobStatus.RUNNING, started_at=time.time(), error=None, worker=worker, attempts=Job.attempts + 1)
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
        status=JobStatus.RUNNING,
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
    return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status == JobStatus.CANCELLED)))


def cancel_job(*, session: Session, job_id: str) -> bool:
    """Ask a queued or running job to stop; the worker notices within a poll interval."""
    return bool(cancel_active(session=session, where=[Job.id == job_id]))


def finish_job(
    *,
    session: Session,
    job_id: str,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
) -> bool:
    """Record a job's end, unless it has ended already (a late or duplicate writer changes nothing)."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JOB_ACTIVE))
        .values(
            status=status,
            result=result,
            error=error,
            finished_at=time.time(),
            **dict(zip(("completion_tokens", "prompt_tokens", "cached_tokens"), _usage(result), strict=True)),
        )
    )
    return bool(rowcount(done))


def _usage(result: dict[str, Any] | None) -> tuple[int | None, int | None, int | None]:
    """(completion, prompt, cached) tokens of a result's usage."""
    usage = (result or {}).get("usage") or {}
    counts = [usage.get(k) for k in ("completion_tokens", "prompt_tokens", "cached_tokens")]
    completion, prompt, cached = (int(n) if isinstance(n, int) else None for n in counts)
    return completion, prompt, cached


def requeue_job(*, session: Session, job_id: str) -> bool:
    """Put a running job back in the queue without counting the attempt (its worker is shutting down)."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, worker=None, sent_at=None, attempts=Job.attempts - 1)
    )
    return bool(rowcount(done))


def release_job(*, session: Session, job_id: str) -> None:
    """A worker that is stopping hands back a job it has not started: it needs its message sent again."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(sent_at=None))


def requeue_running(
    *, session: Session, max_attempts: int, worker: str | None = None, live_workers: list[str] | None = None
) -> tuple[int, int]:
    """Running jobs of a worker that died (`worker`, or any worker not in `live_workers`) go back to the
    queue; those that have had `max_attempts` fail instead, so a request that kills the worker cannot
    crash-loop it. Returns (requeued, failed)."""
    running = select(Job.id).where(Job.status == JobStatus.RUNNING)
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
            .where(Job.id.in_(ids), Job.status == JobStatus.RUNNING, Job.attempts >= max_attempts)
            .values(status=JobStatus.FAILED, error=dict(err), finished_at=time.time())
        )
    )
    requeued = rowcount(
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, worker=None, sent_at=None)
        )
    )
    return requeued, failed


def jobs_to_send(*, session: Session, low_window: int = 1 << 30, limit: int = 500) -> list[str]:
    """Queued jobs that need their task message (again): never sent (requeued, unrouted, lost, or low-priority
    work held back). Low-priority jobs are sent only while fewer than `low_window` of them are in flight: the
    broker and the workers' consumer threads never fill with them, so an interactive request is always taken
    at once and goes first in the engine."""
    queued = (
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED, Job.sent_at.is_(None))
        .order_by(Job.created_at)
        .limit(limit)
    )
    ids = list(session.scalars(queued.where(Job.priority != "low")))
    in_flight = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.priority == "low",
            or_(Job.status == JobStatus.RUNNING, (Job.status == JobStatus.QUEUED) & Job.sent_at.is_not(None)),
        )
    )
    room = low_window - int(in_flight or 0)
    if room > 0:
        ids += list(session.scalars(queued.where(Job.priority == "low").limit(room)))
    return ids


@dataclass(frozen=True)
class Sending:
    """What routing and the task label need of a job to send."""

    id: str
    kind: str
    model: str
    request: dict[str, Any]
    session: str | None
    chars: int  # the size of its stored request (characters of its JSON)
    batch_id: str | None
    namespace: str = ""  # its cache namespace: with its cache_salt, the prefix-cache partition routing matches in


def jobs_for_sending(*, session: Session, job_ids: list[str]) -> list[Sending]:
    if not job_ids:
        return []
    size = func.length(cast(Job.request, Text))
    rows = session.execute(
        select(Job.id, Job.kind, Job.model, Job.request, Job.session, size, Job.batch_id, Job.namespace)
        .where(Job.id.in_(job_ids))
        .order_by(Job.created_at)
    )
    return [
        Sending(i, kind, model, request, sess, int(n or 0), batch, ns or "")
        for i, kind, model, request, sess, n, batch, ns in rows
    ]


def mark_sent(*, session: Session, routes: Mapping[str, Route]) -> None:
    """The jobs' messages went out now, each to its route's worker."""
    now = time.time()
    for job_id, route in routes.items():
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(sent_at=now, target=route.worker, route_reason=route.reason, route_matched=route.matched)
        )


def sent_before(*, session: Session, before: float, limit: int = 500) -> list[tuple[str, str | None]]:
    """Queued jobs whose message went out before `before`, and the worker it went to."""
    rows = session.execute(
        select(Job.id, Job.target)
        .where(Job.status == JobStatus.QUEUED, Job.sent_at < before)
        .order_by(Job.created_at)
        .limit(limit)
    )
    return [(job_id, target) for job_id, target in rows]


def sent_to_gone_workers(*, session: Session, live: list[str]) -> list[str]:
    """Queued jobs whose message went to a worker not in `live`: it will never take them."""
    query = select(Job.id).where(Job.status == JobStatus.QUEUED, Job.sent_at.is_not(None), Job.target.is_not(None))
    if live:
        query = query.where(Job.target.not_in(live))
    return list(session.scalars(query))


def unsend(*, session: Session, job_ids: list[str]) -> None:
    """Their messages are lost: mark them for sending (and routing) again."""
    if job_ids:
        session.execute(
            update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED).values(sent_at=None, target=None)
        )


def fail_stale_queued(*, session: Session, older_than_s: float) -> int:
    """Queued jobs no worker started in `older_than_s` fail: nothing stays queued forever."""
    err = job_error(503, f"no worker started this job within {older_than_s:.0f} s", code="queue_timeout")
    return rowcount(
        session.execute(
            update(Job)
            .where(Job.status == JobStatus.QUEUED, Job.created_at < time.time() - older_than_s)
            .values(status=JobStatus.FAILED, error=dict(err), finished_at=time.time())
        )
    )


def route_counts(*, session: Session) -> dict[str, tuple[int, int]]:
    """Per worker, the jobs routed to it (of those kept) and how many of them to a prefix it held."""
    held = func.sum(case((Job.route_matched > 0, 1), else_=0))
    rows = session.execute(select(Job.target, func.count(), held).where(Job.target.is_not(None)).group_by(Job.target))
    return {target: (int(n), int(hits or 0)) for target, n, hits in rows}


def job_counts(*, session: Session) -> dict[str, int]:
    return {status: int(n) for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status))}


def queue_depth(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)) or 0)


def prune(*, session: Session, before: float) -> int:
    """Retention: finished jobs older than `before`."""
    return rowcount(session.execute(delete(Job).where(Job.status.in_(JOB_FINAL), Job.finished_at < before)))


def prune_events(*, session: Session, before: float) -> int:
    """Retention: stream events older than `before`, of jobs no longer active (a live stream keeps its own)."""
    active = select(Job.id).where(Job.status.in_(JOB_ACTIVE))
    return rowcount(
        session.execute(delete(StreamEvent).where(StreamEvent.created_at < before, StreamEvent.job_id.not_in(active)))
    )
