"""kombu's SQLAlchemy transport, woken by a bell instead of polling.

The stock transport sleeps `polling_interval` (1 s) between empty polls, so a task waits up to that long
in the queue, and a short interval burns CPU while idle. This subclass rings a local bell (`mlxq.bell`)
after each message is committed and waits on it between polls: a task is picked up within milliseconds,
and `polling_interval` is only the safety net for a lost ring (or a producer on another machine). An
idle consumer polls once per `polling_interval`, and on a SQLite file a publish, a poll and a pick-up
skip kombu's ORM (see `Channel._sqlite`).

It also strips its own options (`polling_interval`, `bell`) before the rest reach `create_engine`: the
stock transport forwards every option there, which breaks on `polling_interval`. `bell: False` turns
the ring off for this connection (tests use it to lose every ring on purpose).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from functools import cache
from json import dumps, loads
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as _SQLChannel
from kombu.transport.sqlalchemy import Transport as _SQLTransport
from kombu.utils import cached_property
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError

from mlxq.bell import Bell, Listener, get_bell, sql_bell_name

ALIAS = "mlxqsql"
_NOT_ENGINE_OPTIONS = ("polling_interval", "bell")

log = logging.getLogger(__name__)


def _sqlite_normal_sync(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Channel(_SQLChannel):
    def __init__(self, connection: Any, **kwargs: Any) -> None:
        self._db: sqlite3.Connection | None = None
        self._db_checked = False
        self._db_lock = threading.Lock()
        self._queue_ids: dict[str, int] = {}
        super().__init__(connection, **kwargs)

    def _engine_from_config(self):
        options = self.connection.client.transport_options
        saved = {k: options.pop(k) for k in _NOT_ENGINE_OPTIONS if k in options}
        try:
            engine = super()._engine_from_config()
        finally:
            options.update(saved)
        if engine.dialect.name == "sqlite":
            # Every publish and every pick-up is a commit; with SQLite's default FULL sync each one waits
            # for an fsync (several ms). In WAL mode NORMAL is still safe against a crashed process.
            event.listen(engine, "connect", _sqlite_normal_sync)
        return engine

    # -- the hot path on a SQLite file: plain sqlite3, no ORM ----------------------------------------
    # kombu's ORM path costs milliseconds of Python per publish and per poll (about 3 ms for an idle
    # poll on a small VM, once a second), and it keeps every delivered message as an invisible row
    # that no code reads again, so its table and each poll's scan grow without bound. Here a publish
    # is one INSERT, an empty poll one read without a write lock, and a delivered message is deleted.
    # Other databases keep kombu's own path.

    def _sqlite(self) -> sqlite3.Connection | None:
        if not self._db_checked:
            self._db_checked = True
            engine, _ = self._open()  # kombu creates the tables here
            url = engine.url
            if engine.dialect.name == "sqlite" and url.database not in (None, "", ":memory:") and not url.query:
                options = self.connection.client.transport_options
                timeout = (options.get("connect_args") or {}).get("timeout", 30)
                db = sqlite3.connect(url.database, timeout=timeout, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA synchronous=NORMAL")
                # Left behind by kombu's own path (or an older mlxq): nothing reads them.
                db.execute(f"DELETE FROM {self.message_tablename} WHERE visible = 0")
                self._db = db
        return self._db

    def _get_or_create(self, queue: str) -> Any:
        """kombu's, safe across processes: its lock is per process, so two processes declaring a new queue at
        once (a new worker's own queue: the worker consumes it while the api or the worker itself sends to it)
        race to insert it, and the loser finds the winner's row instead of failing."""
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()

    def _queue_id(self, queue: str) -> int:
        queue_id = self._queue_ids.get(queue)
        if queue_id is None:
            queue_id = self._queue_ids[queue] = self._get_or_create(queue).id
            self.session.commit()
        return queue_id

    def _put(self, queue, payload, **kwargs):
        db = self._sqlite()
        if db is None:
            super()._put(queue, payload, **kwargs)
        else:
            queue_id = self._queue_id(queue)
            with self._db_lock:
                db.execute(
                    f"INSERT INTO {self.message_tablename} (visible, payload, version, queue_id) VALUES (1, ?, 1, ?)",
                    (dumps(payload), queue_id),
                )
        # Committed by now (or raised): ring.
        if (ringer := self.connection.bell) is not None:
            ringer.ring()

    def _get(self, queue):
        db = self._sqlite()
        if db is None:
            return super()._get(queue)
        queue_id = self._queue_id(queue)
        table = self.message_tablename
        pending = f"FROM {table} WHERE queue_id = ? AND visible != 0"
        with self._db_lock:
            # The common case, an empty poll, is one read: no write lock, nothing to commit.
            if db.execute(f"SELECT 1 {pending} LIMIT 1", (queue_id,)).fetchone() is None:
                raise Empty()
            db.execute("BEGIN IMMEDIATE")  # two consumers never take the same message
            try:
                row = db.execute(f"SELECT id, payload {pending} ORDER BY timestamp, id LIMIT 1", (queue_id,)).fetchone()
                if row is not None:
                    db.execute(f"DELETE FROM {table} WHERE id = ?", (row[0],))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if row is None:
            raise Empty()
        return loads(bytes_to_str(row[1]))

    def close(self):
        try:
            super().close()
        finally:
            with self._db_lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

    # With every prefetch slot taken the consumer does not poll at all; when an ack or reject frees one,
    # wake it so the next queued message does not wait for the safety poll.
    def basic_ack(self, delivery_tag, multiple=False):
        was_full = not self.qos.can_consume()
        super().basic_ack(delivery_tag, multiple=multiple)
        if was_full:
            self.connection.nudge()

    def basic_reject(self, delivery_tag, requeue=False):
        was_full = not self.qos.can_consume()
        super().basic_reject(delivery_tag, requeue=requeue)
        if was_full:
            self.connection.nudge()

    # A new consumer or a larger prefetch may find messages the last (empty) poll could not take.
    def basic_consume(self, *args, **kwargs):
        self.connection.poll_soon()
        return super().basic_consume(*args, **kwargs)

    def basic_qos(self, *args, **kwargs):
        self.connection.poll_soon()
        return super().basic_qos(*args, **kwargs)


class Transport(_SQLTransport):
    Channel = Channel
    # The plain-sqlite3 path raises sqlite3's own errors; both mean "retry" to kombu and Celery. (mypy types
    # the attribute by kombu's own one-element tuple; kombu takes any tuple of exception types.)
    connection_errors = (OperationalError, sqlite3.OperationalError)  # type: ignore[assignment]

    _listener: Listener | None = None
    _listener_failed = False
    # Whether the next drain must poll at once, and when the last poll found nothing.
    _poll_now = True
    _polled_at = float("-inf")

    @cached_property
    def bell(self) -> Bell | None:
        """The bell of this broker database, shared by every producer and consumer on this machine."""
        # kombu's Connection, set in __init__; kombu's hints see only its class attributes' None defaults.
        client: Any = self.client
        if not client.transport_options.get("bell", True):
            return None
        return get_bell(sql_bell_name("broker", client.hostname))

    def _listen(self) -> None:
        # Made by the first drain (so only consumers listen) and before its first poll, so a message
        # committed after that poll finds the listener already there.
        if self._listener is not None or self._listener_failed or self.bell is None:
            return
        try:
            self._listener = self.bell.listen()
        except OSError as exc:
            self._listener_failed = True
            log.warning("no broker bell (%s); polling every %ss", exc, self.polling_interval)

    def nudge(self) -> None:
        """Make this transport's wait, if any, poll now (from any thread)."""
        if (listener := self._listener) is not None:
            listener.wake()

    def poll_soon(self) -> None:
        """Make the next drain poll at once (from the consuming thread)."""
        self._poll_now = True

    def drain_events(self, connection, timeout=None):
        # kombu's loop (virtual.Transport.drain_events) polls, sleeps `polling_interval`, polls again. Here
        # a poll runs only when it may find something: a ring was heard, a message was just delivered (more
        # may wait), the consumers changed, or the safety interval has passed since the last empty poll.
        # Between polls it waits on the bell, until the next safety poll or the end of `timeout`.
        self._listen()
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        interval = self.polling_interval or 0.0
        while True:
            if self._poll_now or now - self._polled_at >= interval:
                try:
                    self.cycle.get(self._deliver, timeout=timeout)
                except Empty:
                    self._poll_now, self._polled_at = False, time.monotonic()
                else:
                    self._poll_now = True
                    return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError()  # socket.timeout, as kombu raises
            until = self._polled_at + interval if deadline is None else min(self._polled_at + interval, deadline)
            if self._listener is not None:
                self._poll_now = bool(self._listener.wait(max(0.0, until - now)))
            else:
                time.sleep(max(0.0, until - now))
            now = time.monotonic()

    def close_connection(self, connection):
        try:
            super().close_connection(connection)
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None


def register() -> None:
    TRANSPORT_ALIASES.setdefault(ALIAS, "mlxq.broker:Transport")


def kombu_url(broker_url: str) -> str:
    """Route `sqla+…` URLs through this transport; others pass unchanged."""
    if broker_url.startswith("sqla+"):
        register()
        return f"{ALIAS}+" + broker_url.removeprefix("sqla+")
    return broker_url


def prune_delivered(broker_url: str, *, older_than_s: float) -> int:
    """Delete delivered messages that kombu's own SQL path keeps as invisible rows (on a database other than
    a SQLite file; there, `Channel._get` deletes on delivery). Returns how many; 0 for other brokers."""
    if not broker_url.startswith("sqla+") or broker_url.startswith("sqla+sqlite"):
        return 0
    engine = _prune_engine(broker_url.removeprefix("sqla+"))
    cutoff = datetime.now() - timedelta(seconds=older_than_s)  # kombu stamps local naive time
    with engine.begin() as conn:
        if not inspect(conn).has_table("kombu_message"):
            return 0
        return (
            conn.execute(
                text("DELETE FROM kombu_message WHERE visible = false AND timestamp < :cutoff"), {"cutoff": cutoff}
            ).rowcount
            or 0
        )


@cache
def _prune_engine(url: str):
    return create_engine(url, pool_size=1, max_overflow=0)


def survive_redis_restarts() -> None:
    """Keep a worker alive across a Redis restart (kombu 5.x, up to at least 5.7).

    When the connection to Redis is lost, Celery closes it, and the channel then restores its unacknowledged
    messages, and later acknowledges the tasks that finish meanwhile, through a connection that closing
    has already dropped: `'NoneType' object has no attribute 'hostname'` (or `'client'`). That
    AttributeError escapes Celery's connection-error handling, and the worker logs "Unrecoverable error"
    and exits. Caught here, the consumer reconnects as it does for any lost connection. The messages stay
    in Redis's unacked set: a finished job's comes back as a duplicate that is skipped (only a queued job
    can be claimed), and mlxq.delivery re-sends an unfinished job's (its row, not its message, is the
    record), so nothing is lost.
    """
    from kombu.transport import redis as kombu_redis

    for name in ("restore_unacked", "ack", "reject"):
        original = getattr(kombu_redis.QoS, name)
        if getattr(original, "_mlxq", False):
            continue

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            try:
                return _original(self, *args, **kwargs)
            except AttributeError as exc:
                log.warning(
                    "Redis connection lost: could not %s (%s); the jobs are re-sent from the database",
                    _name.replace("_", " "),
                    exc,
                )

        guarded._mlxq = True  # type: ignore[attr-defined]
        setattr(kombu_redis.QoS, name, guarded)
