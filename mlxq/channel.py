"""The stream channel: the worker publishes a job's events, the api relays them as they come.

Redis Streams when the broker is Redis; in the embedded mode a SQL table polled
every few milliseconds (a once-a-second poll would add a second to every request).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from mlxq.sql import StreamEvent

# Events stay readable this long after publication (late single-flight joiners, slow readers).
RETENTION_S = 3600.0


class Channel(Protocol):
    def publish(self, job_id: str, event: dict[str, Any]) -> None: ...

    def listen(self, job_id: str) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class SQLChannel:
    def __init__(self, sessions: sessionmaker[Session], poll_interval_s: float) -> None:
        self._sessions = sessions
        self._poll = poll_interval_s

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        now = time.time()
        with self._sessions.begin() as session:
            session.add(StreamEvent(job_id=job_id, data=json.dumps(event), created_at=now))
            if event.get("type") in ("done", "error"):
                session.execute(delete(StreamEvent).where(StreamEvent.created_at < now - RETENTION_S))

    def _read(self, job_id: str, after: int) -> list[tuple[int, str]]:
        with self._sessions() as session:
            rows = session.execute(
                select(StreamEvent.id, StreamEvent.data)
                .where(StreamEvent.job_id == job_id, StreamEvent.id > after)
                .order_by(StreamEvent.id)
            ).all()
        return [(int(r[0]), r[1]) for r in rows]

    async def listen(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        after = 0
        while True:
            rows = await asyncio.to_thread(self._read, job_id, after)
            for row_id, data in rows:
                after = row_id
                yield json.loads(data)
            if not rows:
                await asyncio.sleep(self._poll)

    async def aclose(self) -> None:
        return None


class RedisChannel:
    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = prefix
        self._sync = None
        self._async = None

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:stream:{job_id}"

    def publish(self, job_id: str, event: dict[str, Any]) -> None:
        import redis

        if self._sync is None:
            self._sync = redis.Redis.from_url(self._url)
        pipe = self._sync.pipeline()
        pipe.xadd(self._key(job_id), {"d": json.dumps(event)})
        pipe.expire(self._key(job_id), int(RETENTION_S))
        pipe.execute()

    async def listen(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        import redis.asyncio as aioredis

        if self._async is None:
            self._async = aioredis.Redis.from_url(self._url)
        last = "0-0"
        while True:
            # Block in Redis, not in a poll loop: an event reaches the reader at once.
            reply = await self._async.xread({self._key(job_id): last}, block=1000, count=256)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield json.loads(fields[b"d"])

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()


def make_channel(*, broker_url: str, redis_prefix: str, sessions: sessionmaker[Session],
                 poll_interval_s: float) -> Channel:
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisChannel(broker_url, redis_prefix)
    return SQLChannel(sessions, poll_interval_s)
