"""Jobs whose worker died stop being "running": the api fails them once the worker's heartbeat is gone.

A worker that restarts fails its own leftovers; this covers the one that never comes back (killed,
machine lost), so no waiting client and no job row is left hanging. With the Redis broker the task
is redelivered to the next worker (acks_late), which runs a failed job again.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.orm import Session, sessionmaker

from api.background import run_every
from mlxq import repos

log = logging.getLogger(__name__)


class JobReaper:
    def __init__(self, sessions: sessionmaker[Session], *, heartbeat_s: float) -> None:
        self._sessions = sessions
        # A worker is gone after missing several heartbeats (and at least 10 s).
        self.grace_s = max(10.0, 5 * heartbeat_s)
        self._task: asyncio.Task | None = None

    def reap(self) -> int:
        with self._sessions.begin() as session:
            live = [w.name for w in repos.live_workers(session=session, within_s=self.grace_s)]
            failed = repos.fail_orphaned_jobs(session=session, live_workers=live, older_than_s=self.grace_s)
        if failed:
            log.warning("failed %d jobs whose worker stopped sending heartbeats", failed)
        return failed

    def start(self) -> None:
        self._task = run_every(self.grace_s / 2, self.reap)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
