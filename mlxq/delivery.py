"""At-least-once delivery of jobs: which job's task message is sent, when, and to which queue.

Every caller asks this module; none sends a task on its own. The admission path tells it about a job it
admitted, the worker tells it when it starts and when a low-priority job ends, the api's house-keeping asks
it to find lost messages. It decides:
- when: an interactive job's message goes right after its row is committed; windowed work (batch lines) goes
  only while fewer than `Settings.low_window` low-priority jobs are in flight, so the broker and the worker's
  consumer threads never fill with it and an interactive request is always taken at once;
- which: besides new jobs, those whose message may be lost. A message is lost when a worker dies holding it
  (the embedded broker deletes a message on delivery; Redis keeps it unacknowledged for hours), when the broker
  restarts without persistence, or when a send fails after the job's row was committed. The job row, not the
  broker, is the record: a queued job with `sent_at` NULL needs its message, and one sent long ago while the
  broker's queue is empty lost it. A duplicate message is harmless: only a queued job can be claimed
  (`repos.jobs.start_job`);
- where: the queue of the job's routing target, by default the shared queue (`Settings.queue`).
"""

from __future__ import annotations

import json
import logging
import time

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from mlxq.contract import GENERATE_TASK, job_error
from mlxq.jobspec import JobSpec
from mlxq.repos import jobs
from mlxq.settings import Settings
from mlxq.states import JobStatus

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """A new job's message could not be sent; the job has been failed (`broker_unavailable`)."""


def task_label(job_id: str, kind: str, chars: int) -> str:
    """A task's `argsrepr`: what Flower and the worker's log show for it. Short, and never the prompt."""
    return f"job {job_id[:8]} {kind} {chars} chars"


class Delivery:
    """Made once per process (api or worker) and injected."""

    def __init__(self, sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> None:
        self._sessions = sessions
        self._celery = celery
        self._settings = settings

    # -- the decisions ---------------------------------------------------------------------

    def sends_at_once(self, spec: JobSpec) -> bool:
        """Whether a new job's message goes right after its commit (`sent_at` stamped at creation), or waits
        for room among low-priority work."""
        return not spec.windowed

    def queue_for(self, target: str | None) -> str:
        return target or self._settings.queue

    # -- what callers tell it --------------------------------------------------------------

    def admitted(self, job_id: str, spec: JobSpec, *, new: bool, waiting_for_room: bool) -> None:
        """After an admission's commit: a new job's message now, or windowed work when there is room (also when
        the request joined a low-priority job still waiting for room, which its client cannot wait for)."""
        if new and self.sends_at_once(spec):
            self._send_new(job_id, spec)
        elif new or waiting_for_room:
            self.send_waiting()

    def send_waiting(self, *, lost_after_s: float | None = None) -> int:
        """Send the queued jobs that need a message: requeued ones, windowed ones while there is room, and with
        `lost_after_s`, those sent that long ago and still queued while the broker's queue is empty (so their
        message is gone). Returns how many were sent."""
        lost_before = None
        if lost_after_s is not None:
            with self._sessions() as session:
                stale = jobs.jobs_to_send(session=session, lost_before=time.time() - lost_after_s, limit=1)
            if stale and self.broker_depth() == 0:
                lost_before = time.time() - lost_after_s
        with self._sessions() as session:
            ids = jobs.jobs_to_send(session=session, lost_before=lost_before, low_window=self._settings.low_window)
            labels = jobs.task_labels(session=session, job_ids=ids)
        for job_id in ids:
            kind, chars = labels[job_id]
            self._send(job_id, kind=kind, chars=chars, queue=self.queue_for(None))
        if ids:
            with self._sessions.begin() as session:
                jobs.mark_sent(session=session, job_ids=ids)
            log.info("sent %d queued jobs (requeued, lost, or low-priority work with room now)", len(ids))
        return len(ids)

    def broker_depth(self) -> int:
        """Messages waiting in the shared queue (not those a worker holds)."""
        with self._celery.connection_for_write() as conn:
            # A plain (not passive) declare: Redis has no key for an empty queue, and a passive one would fail.
            declared = conn.default_channel.queue_declare(queue=self.queue_for(None), durable=True, auto_delete=False)
            return declared.message_count

    # -- sending ---------------------------------------------------------------------------

    def _send_new(self, job_id: str, spec: JobSpec) -> None:
        try:
            self._send(job_id, kind=spec.kind, chars=len(json.dumps(spec.canonical)), queue=self.queue_for(spec.target))
        except Exception as exc:
            error = job_error(503, f"could not enqueue the job: {exc}", code="broker_unavailable")
            with self._sessions.begin() as session:
                jobs.finish_job(session=session, job_id=job_id, status=JobStatus.FAILED, error=dict(error))
            raise BrokerUnavailable(str(exc)) from exc

    def _send(self, job_id: str, *, kind: str, chars: int, queue: str) -> None:
        """The task carries only the job id; `chars` is the size of its canonical request as stored (JSON)."""
        self._celery.send_task(
            GENERATE_TASK,
            args=[job_id],
            task_id=job_id,
            queue=queue,
            argsrepr=task_label(job_id, kind, chars),
            kwargsrepr="{}",
        )
