"""What the live workers say about the model they serve (vocabulary size, context length, weights fingerprint).

Each worker's heartbeat row carries `stats["model"]`; the api reads the newest block, at most once
every `ttl_s`, so checking a request against it costs no query on the hot path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from mlxq.repos import workers


class ModelInfo:
    """The newest `stats["model"]` block of the live workers (None until one has published), cached briefly."""

    def __init__(self, sessions: sessionmaker[Session], *, within_s: float, ttl_s: float = 2.0) -> None:
        self._sessions = sessions
        self._within_s = within_s
        self._ttl_s = ttl_s
        self._value: dict[str, Any] | None = None
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, Any] | None:
        """`{"vocab_size": int, "context_length": int | None, "fingerprint": str}`, or None.

        Read in a thread (never on the event loop); concurrent callers share one read.
        """
        if time.monotonic() - self._read_at < self._ttl_s:
            return self._value
        async with self._lock:
            if time.monotonic() - self._read_at >= self._ttl_s:
                self._value = await asyncio.to_thread(self.read)
                self._read_at = time.monotonic()
        return self._value

    def read(self) -> dict[str, Any] | None:
        """The block itself, from the database now (blocking)."""
        with self._sessions() as session:
            live = workers.live_workers(session=session, within_s=self._within_s)
            blocks = [(w.last_seen, (w.stats or {}).get("model")) for w in live]
        published = [(seen, block) for seen, block in blocks if isinstance(block, dict)]
        return max(published, key=lambda item: item[0])[1] if published else None
