"""Cancellation of running jobs: one poll of the job rows for every job the worker runs.

A job is cancelled in its row (the last client left, DELETE, a batch cancelled); the worker sees it within
CANCEL_POLL_S and sets the sequence's flag, so the batch drops it at the next step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from sqlalchemy.orm import Session, sessionmaker

from mlxq.repos import jobs

log = logging.getLogger(__name__)

# A cancelled job (client gone, DELETE) stops within this long, well under a second.
CANCEL_POLL_S = 0.25


class CancelWatch:
    """Polls (every CANCEL_POLL_S, only while jobs run) in a thread of its own."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Condition()
        threading.Thread(target=self._loop, name="mlxq-cancel-watch", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, job_id: str, flag: threading.Event) -> Iterator[None]:
        """Set `flag` if the job is cancelled while the block runs."""
        with self._lock:
            self._flags[job_id] = flag
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._flags.pop(job_id, None)

    def cancel_all(self) -> None:
        """Interrupt every watched job (the worker is stopping)."""
        with self._lock:
            for flag in self._flags.values():
                flag.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._flags:
                    self._lock.wait()
                ids = list(self._flags)
            try:
                with self._sessions() as session:
                    cancelled = jobs.cancelled_among(session=session, job_ids=ids)
            except Exception:
                log.exception("cancel poll failed")
                cancelled = []
            with self._lock:
                for job_id in cancelled:
                    if (flag := self._flags.get(job_id)) is not None:
                        flag.set()
            time.sleep(CANCEL_POLL_S)
