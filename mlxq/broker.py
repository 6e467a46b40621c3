"""kombu's SQLAlchemy transport, woken by a bell instead of polling.

The stock transport sleeps `polling_interval` (1 s) between empty polls, so a task waits up to that long
in the queue, and a short interval burns CPU while idle. This subclass rings a local bell (`mlxq.bell`)
after each message is committed and waits on it between polls: a task is picked up within milliseconds,
and `polling_interval` is only the safety net for a lost ring (or a producer on another machine).

It also strips its own options (`polling_interval`, `bell`) before the rest reach `create_engine`: the
stock transport forwards every option there, which breaks on `polling_interval`. `bell: False` turns
the ring off for this connection (tests use it to lose every ring on purpose).
"""

from __future__ import annotations

import logging
import time
from queue import Empty

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as _SQLChannel
from kombu.transport.sqlalchemy import Transport as _SQLTransport
from kombu.utils import cached_property
from sqlalchemy import event

from mlxq.bell import Bell, Listener, get_bell, sql_bell_name

ALIAS = "mlxqsql"
_NOT_ENGINE_OPTIONS = ("polling_interval", "bell")

log = logging.getLogger(__name__)


def _sqlite_normal_sync(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Channel(_SQLChannel):
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

    def _put(self, queue, payload, **kwargs):
        super()._put(queue, payload, **kwargs)  # committed (or raised) by now
        if (ringer := self.connection.bell) is not None:
            ringer.ring()

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


class Transport(_SQLTransport):
    Channel = Channel

    _listener: Listener | None = None
    _listener_failed = False

    @cached_property
    def bell(self) -> Bell | None:
        """The bell of this broker database, shared by every producer and consumer on this machine."""
        if not self.client.transport_options.get("bell", True):
            return None
        return get_bell(sql_bell_name("broker", self.client.hostname))

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
        """Wake this transport's own wait early (from any thread)."""
        if (listener := self._listener) is not None:
            listener.wake()

    def drain_events(self, connection, timeout=None):
        # kombu's loop (virtual.Transport.drain_events), with the sleep between empty polls replaced by a
        # wait on the bell for at most `polling_interval`, capped by what is left of `timeout`.
        self._listen()
        started = time.monotonic()
        while True:
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                elapsed = time.monotonic() - started
                if timeout is not None and elapsed >= timeout:
                    raise TimeoutError() from None  # socket.timeout, as kombu raises
                if self.polling_interval is None:
                    continue
                pause = self.polling_interval if timeout is None else min(self.polling_interval, timeout - elapsed)
                if self._listener is not None:
                    self._listener.wait(pause)
                else:
                    time.sleep(pause)

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
