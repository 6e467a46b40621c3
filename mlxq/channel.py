"""The stream channel: the worker publishes a job's events, the api relays them as they come.

Redis Streams when the broker is Redis (readers block in XREAD). In the embedded mode a SQL table, the
durable record, with a local bell (`mlxq.bell`) rung after each commit: a waiting reader wakes on the
ring, and polls only every `poll_interval_s` as the safety net for a lost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mlxq.bell import Listener, get_bell, sql_bell_name
from mlxq.events import Event
from mlxq.sql import StreamEvent

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# Redis: a job's events stay readable this long after its last publication (late joiners, slow readers);
# the SQL channel's are kept MLXQ_STREAM_RETENTION_S by the api's house-keeping.
RETENTION_S = 3600.0


class Channel(Protocol):
    def publish(self, job_id: str, event: Event) -> None: ...

    def publish_many(self, job_id: str, events: list[Event]) -> None:
        """Several events of one job, in order, at the cost of one."""
        ...

    def listen(self, job_id: str) -> AsyncIterator[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class _Wakeups:
    """The api process's one bell listener, on the event loop, waking the listens of the job ids it hears."""

    def __init__(self, listener: Listener, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._listener = listener
        self._waiting: dict[str, set[asyncio.Event]] = {}
        loop.add_reader(listener.fileno(), self._on_ring)

    def _on_ring(self) -> None:
        payloads = set(self._listener.drain())
        if b"" in payloads:  # a ring for everyone, or some rings may have been dropped
            targets = [e for events in self._waiting.values() for e in events]
        else:
            targets = [e for p in payloads for e in self._waiting.get(p.decode(errors="replace"), ())]
        for event in targets:
            event.set()

    @contextlib.contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiting.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiting.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[job_id]

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self._listener.fileno())
        self._listener.close()


class SQLChannel:
    """Events as rows of one SQL table, with a bell (`mlxq.bell`) rung after each commit.

    A listener reads the rows after the last it saw, and when there are none waits for a ring naming its
    job (or any ring for everyone), at most `poll_interval_s`, the safety net for a lost ring.
    """

    def __init__(self, sessions: sessionmaker[Session], poll_interval_s: float) -> None:
        self._sessions = sessions
        self._poll = poll_interval_s
        url = sessions.kw["bind"].url.render_as_string(hide_password=False)
        self._bell = get_bell(sql_bell_name("stream", url))
        self._wakeups: _Wakeups | None = None
        self._no_wakeups = False

    def publish(self, job_id: str, event: Event) -> None:
        self.publish_many(job_id, [event])

    def publish_many(self, job_id: str, events: list[Event]) -> None:
        if not events:
            return
        # Old events are pruned by the api's house-keeping (mlxq.retention), not here on every job's end.
        now = time.time()
        with self._sessions.begin() as session:
            session.add_all([StreamEvent(job_id=job_id, data=json.dumps(e), created_at=now) for e in events])
        self._bell.ring(job_id.encode())

    def _read(self, job_id: str, after: int) -> list[tuple[int, str]]:
        with self._sessions() as session:
            rows = session.execute(
                select(StreamEvent.id, StreamEvent.data)
                .where(StreamEvent.job_id == job_id, StreamEvent.id > after)
                .order_by(StreamEvent.id)
            ).all()
        return [(int(r[0]), r[1]) for r in rows]

    def _wakeups_here(self) -> _Wakeups | None:
        loop = asyncio.get_running_loop()
        if self._wakeups is not None and self._wakeups.loop is not loop:
            self._wakeups.close()  # a new event loop (tests): listen again on this one
            self._wakeups = None
        if self._wakeups is None and not self._no_wakeups:
            try:
                self._wakeups = _Wakeups(self._bell.listen(), loop)
            except (OSError, NotImplementedError) as exc:  # no Unix sockets, or a loop without add_reader
                self._no_wakeups = True
                log.warning("no stream bell (%s); polling every %ss", exc, self._poll)
        return self._wakeups

    def _subscribe(self, job_id: str) -> contextlib.AbstractContextManager[asyncio.Event]:
        wakeups = self._wakeups_here()
        if wakeups is None:
            return contextlib.nullcontext(asyncio.Event())  # never set: the poll alone
        return wakeups.subscribe(job_id)

    async def listen(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        # Subscribed before the first read, and the flag cleared before each read: a row committed after
        # a read began rings after that, so the wait below ends at once; one read per ring, not per poll.
        with self._subscribe(job_id) as rung:
            after = 0
            while True:
                rung.clear()
                rows = await asyncio.to_thread(self._read, job_id, after)
                for row_id, data in rows:
                    after = row_id
                    yield json.loads(data)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rung.wait(), self._poll)

    async def aclose(self) -> None:
        if self._wakeups is not None:
            self._wakeups.close()
            self._wakeups = None


class RedisChannel:
    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = prefix
        self._sync: redis.Redis | None = None
        self._async: aioredis.Redis | None = None

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:stream:{job_id}"

    def publish(self, job_id: str, event: Event) -> None:
        self.publish_many(job_id, [event])

    def publish_many(self, job_id: str, events: list[Event]) -> None:
        import redis

        if not events:
            return
        if self._sync is None:
            self._sync = redis.Redis.from_url(self._url)
        pipe = self._sync.pipeline()
        for event in events:
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
            # RESP2's shape (redis-py's default protocol): [[stream, [(id, fields), ...]], ...]; redis-py's hints
            # give the union of every protocol's shapes.
            reply = cast(
                "list[list[Any]] | None", await self._async.xread({self._key(job_id): last}, block=1000, count=256)
            )
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    yield json.loads(fields[b"d"])

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()


def make_channel(
    *, broker_url: str, redis_prefix: str, sessions: sessionmaker[Session], poll_interval_s: float
) -> Channel:
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisChannel(broker_url, redis_prefix)
    return SQLChannel(sessions, poll_interval_s)
