"""Cache bookkeeping, batched: no request pays for a write transaction of its own for it.

Hits (with their keys, for LRU access times) and the hit/miss/bypass counters are kept in
memory and flushed in one transaction every `interval_s`, before /health reads them, and at
shutdown. The counters live in SQL, so every api replica adds to the same totals. The response cache's
counters are kept per cache namespace too (`namespaced`), so a key's `GET /v1/cache/stats` counts its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter

from sqlalchemy.orm import Session, sessionmaker

from api.operations.background import run_every
from mlxq.repos import cache_entries, counters, request_log

log = logging.getLogger(__name__)


def namespaced(name: str, namespace: str) -> str:
    """The counter `name` of one cache namespace (an API key's, mlxq.keys): kept beside the service-wide one."""
    return f"{name}@{namespace}"


def is_namespaced(name: str) -> bool:
    return "@" in name


class StatsRecorder:
    def __init__(self, sessions: sessionmaker[Session], interval_s: float = 1.0) -> None:
        self._sessions = sessions
        self._interval = interval_s
        self._pending: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._log: list[dict] = []
        self._lock = threading.Lock()
        # Held for a whole flush: a reader's flush (before /health) waits for one in progress to commit, so it
        # never reads the counters while the periodic flush still holds them.
        self._flushing = threading.Lock()
        self._task: asyncio.Task | None = None

    def hit(self, key: str, namespace: str = "") -> None:
        with self._lock:
            self._pending[key] += 1
            self._counts["cache_hits"] += 1
            if namespace:
                self._counts[namespaced("cache_hits", namespace)] += 1

    def count(self, name: str, by: int = 1, namespace: str = "") -> None:
        """Add to the service-wide counter `name`, and to `namespace`'s own when given."""
        with self._lock:
            self._counts[name] += by
            if namespace:
                self._counts[namespaced(name, namespace)] += by

    def log(self, **row: object) -> None:
        """One request-log row (key, endpoint, cache outcome, token counts, tools, latency)."""
        with self._lock:
            self._log.append({"at": time.time(), **row})

    def flush(self) -> None:
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
            counts, self._counts = self._counts, Counter()
            rows, self._log = self._log, []
        if not pending and not counts and not rows:
            return
        now = time.time()
        try:
            with self._sessions.begin() as session:
                for key, n in sorted(pending.items()):
                    cache_entries.touch_entry(session=session, key=key, hits=n, now=now)
                for name, n in sorted(counts.items()):
                    counters.bump(session=session, name=name, by=n)
                request_log.log_requests(session=session, rows=rows)
        except Exception:
            log.exception("could not record cache statistics; retrying later")
            with self._lock:
                self._pending.update(pending)
                self._counts.update(counts)
                self._log[:0] = rows

    def pending(self) -> bool:
        """Whether a flush has anything to write."""
        with self._lock:
            return bool(self._pending or self._counts or self._log)

    def start(self) -> None:
        self._task = run_every(self._interval, self.flush, when=self.pending)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self.flush)
