"""The api's house-keeping: nothing stays queued or running forever, and nothing is kept forever.

- A running job whose worker stopped sending heartbeats goes back to the queue (a worker that restarts
  under the same name does this itself at once; this covers one that never comes back), or fails after
  `max_attempts`.
- A queued job without a task message (requeued, or its message lost with a dead worker or a restarted
  broker) is sent again (mlxq.delivery); one no worker starts within `job_queue_timeout_s` fails.
- Finished jobs, the request log, stream events and delivered broker messages are deleted after their
  retention.
"""

from __future__ import annotations

import asyncio
import logging
import time

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from api.background import run_every
from mlxq import batch_repos, delivery, repos
from mlxq.broker import prune_delivered
from mlxq.settings import Settings

log = logging.getLogger(__name__)


class JobReaper:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self.settings = settings
        self._sessions = sessions
        self._celery = celery
        # A worker is gone after missing several heartbeats (and at least 10 s).
        self.grace_s = max(10.0, 5 * settings.heartbeat_s)
        self._tasks: list[asyncio.Task] = []

    def reap(self) -> None:
        settings = self.settings
        with self._sessions.begin() as session:
            live = [w.name for w in repos.live_workers(session=session, within_s=self.grace_s)]
            requeued, failed = repos.requeue_running(
                session=session, live_workers=live, max_attempts=settings.max_attempts
            )
            stale = repos.fail_stale_queued(session=session, older_than_s=settings.job_queue_timeout_s)
        if requeued or failed or stale:
            log.warning(
                "jobs of stopped workers: %d requeued, %d failed after %d attempts; %d never started",
                requeued,
                failed,
                settings.max_attempts,
                stale,
            )
        try:
            delivery.resend(self._sessions, self._celery, settings, lost_after_s=settings.resend_after_s)
        except Exception as exc:  # the broker is down: the next round tries again
            log.warning("could not re-send queued jobs: %s", exc)

    def prune(self) -> None:
        settings, now = self.settings, time.time()
        with self._sessions.begin() as session:
            removed = repos.prune(
                session=session,
                jobs_before=now - settings.job_retention_s,
                log_before=now - settings.request_log_retention_s,
                events_before=now - settings.stream_retention_s,
            )
        with self._sessions.begin() as session:
            removed |= batch_repos.prune(session=session, before=now - settings.file_retention_s)
        removed["broker_messages"] = prune_delivered(settings.broker_url, older_than_s=settings.stream_retention_s)
        if any(removed.values()):
            log.info("retention: removed %s", removed)

    def start(self) -> None:
        self._tasks = [run_every(self.grace_s / 2, self.reap), run_every(self.settings.housekeeping_s, self.prune)]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
