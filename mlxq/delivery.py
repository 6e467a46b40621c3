"""At-least-once delivery of jobs: a job's task message is sent, and sent again whenever it may be lost.

A message is lost when a worker dies holding it (the embedded broker deletes a message on delivery; Redis
keeps it unacknowledged for hours), when the broker restarts without persistence, or when a send fails
after the job's row was committed. The job row, not the broker, is the record: a job that is queued but
has no message is found here and sent again. A duplicate message is harmless, because only a queued job
can be claimed (`repos.start_job`).
"""

from __future__ import annotations

import logging
import time

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from mlxq import repos
from mlxq.contract import GENERATE_TASK
from mlxq.settings import Settings

log = logging.getLogger(__name__)


def task_label(job_id: str, kind: str, chars: int) -> str:
    """A task's `argsrepr`: what Flower and the worker's log show for it. Short, and never the prompt."""
    return f"job {job_id[:8]} {kind} {chars} chars"


def send(celery: Celery, queue: str, job_id: str, *, kind: str, chars: int) -> None:
    """Send a job's task message; `chars` is the size of its canonical request as stored (JSON)."""
    celery.send_task(
        GENERATE_TASK,
        args=[job_id],
        task_id=job_id,
        queue=queue,
        argsrepr=task_label(job_id, kind, chars),
        kwargsrepr="{}",
    )


def broker_depth(celery: Celery, queue: str) -> int:
    """Messages waiting in the broker's queue (not those a worker holds)."""
    with celery.connection_for_write() as conn:
        # A plain (not passive) declare: Redis has no key for an empty queue, and a passive one would fail.
        return conn.default_channel.queue_declare(queue=queue, durable=True, auto_delete=False).message_count


def resend(sessions: sessionmaker[Session], celery: Celery, settings: Settings, *, lost_after_s: float | None) -> int:
    """Send the jobs that need a message: requeued ones, and low-priority ones while there is room for
    them (`Settings.low_window`); with `lost_after_s`, also those sent that long ago and still queued while
    the broker's queue is empty (so their message is gone). Returns how many were sent."""
    queue = settings.queue
    lost_before = None
    if lost_after_s is not None:
        with sessions() as session:
            stale = repos.jobs_to_send(session=session, lost_before=time.time() - lost_after_s, limit=1)
        if stale and broker_depth(celery, queue) == 0:
            lost_before = time.time() - lost_after_s
    with sessions() as session:
        ids = repos.jobs_to_send(session=session, lost_before=lost_before, low_window=settings.low_window)
        labels = repos.task_labels(session=session, job_ids=ids)
    for job_id in ids:
        kind, chars = labels[job_id]
        send(celery, queue, job_id, kind=kind, chars=chars)
    if ids:
        with sessions.begin() as session:
            repos.mark_sent(session=session, job_ids=ids)
        log.info("sent %d queued jobs (requeued, lost, or low-priority work with room now)", len(ids))
    return len(ids)
