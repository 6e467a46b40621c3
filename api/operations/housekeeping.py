"""The api's house-keeping: nothing stays queued or running forever, and nothing is kept forever.

- A running job whose worker stopped sending heartbeats goes back to the queue (a worker that restarts
  under the same name does this itself at once; this covers one that never comes back), or fails after
  `max_attempts`.
- A queued job without a task message (requeued, or its message lost with a dead worker or a restarted
  broker) is sent again (mlxq.delivery); one no worker starts within `job_queue_timeout_s` fails.
- An open batch is finalized once none of its jobs is active (api.offline.batch_lifecycle), within a second.
- Finished jobs, the request log, stream events and delivered broker messages are deleted after their
  retention.
"""

from __future__ import annotations

import asyncio
import logging
import time

from api.offline import batch_lifecycle
from api.operations.background import run_every
from api.services import Services
from mlxq import retention
from mlxq.broker import prune_delivered
from mlxq.repos import jobs, workers

log = logging.getLogger(__name__)

# Open batches are moved on this often (their jobs' ends are seen within it).
BATCH_ROUND_S = 1.0


class HouseKeeping:
    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings
        # A worker is gone after missing several heartbeats (and at least 10 s).
        self.grace_s = max(10.0, 5 * settings.heartbeat_s)
        self._tasks: list[asyncio.Task] = []
        self._batches_read_at = float("-inf")

    def reap(self) -> None:
        settings, sessions = self.services.settings, self.services.sessions
        with sessions.begin() as session:
            live = [w.name for w in workers.live_workers(session=session, within_s=self.grace_s)]
            requeued, failed = jobs.requeue_running(
                session=session, live_workers=live, max_attempts=settings.max_attempts
            )
            stale = jobs.fail_stale_queued(session=session, older_than_s=settings.job_queue_timeout_s)
        if requeued or failed or stale:
            log.warning(
                "jobs of stopped workers: %d requeued, %d failed after %d attempts; %d never started",
                requeued,
                failed,
                settings.max_attempts,
                stale,
            )
        try:
            self.services.delivery.send_waiting(lost_after_s=settings.resend_after_s)
        except Exception as exc:  # the broker is down: the next round tries again
            log.warning("could not re-send queued jobs: %s", exc)

    def move_batches(self) -> None:
        self._batches_read_at = time.monotonic()
        if not batch_lifecycle.advance_open(self.services):
            self.services.batches_open.clear()

    def _batches_due(self) -> bool:
        """Every round while this process knows of open batches; otherwise as often as the reaper, for
        batches another api process created and left (an idle service must not poll every second)."""
        return self.services.batches_open.is_set() or time.monotonic() - self._batches_read_at > self.grace_s / 2

    def prune(self) -> None:
        settings, sessions, now = self.services.settings, self.services.sessions, time.time()
        with sessions.begin() as session:
            removed = retention.prune_requests(
                session=session,
                jobs_before=now - settings.job_retention_s,
                log_before=now - settings.request_log_retention_s,
                events_before=now - settings.stream_retention_s,
            )
        with sessions.begin() as session:
            removed |= retention.prune_batches(session=session, before=now - settings.file_retention_s)
        removed["broker_messages"] = prune_delivered(settings.broker_url, older_than_s=settings.stream_retention_s)
        if any(removed.values()):
            log.info("retention: removed %s", removed)

    def start(self) -> None:
        self._tasks = [
            run_every(self.grace_s / 2, self.reap),
            run_every(BATCH_ROUND_S, self.move_batches, when=self._batches_due),
            run_every(self.services.settings.housekeeping_s, self.prune),
        ]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
