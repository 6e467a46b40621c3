"""kombu's SQLAlchemy transport with a configurable poll interval.

The stock transport sleeps `polling_interval` (1 s) between empty polls, and
passing that option through `broker_transport_options` breaks it: every option
is forwarded to `create_engine`. This subclass strips it first, so the embedded
broker can poll every few milliseconds.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as _SQLChannel
from kombu.transport.sqlalchemy import Transport as _SQLTransport

ALIAS = "mlxqsql"
_NOT_ENGINE_OPTIONS = ("polling_interval",)


class Channel(_SQLChannel):
    def _engine_from_config(self):
        options = self.connection.client.transport_options
        saved = {k: options.pop(k) for k in _NOT_ENGINE_OPTIONS if k in options}
        try:
            return super()._engine_from_config()
        finally:
            options.update(saved)


class Transport(_SQLTransport):
    Channel = Channel


def register() -> None:
    TRANSPORT_ALIASES.setdefault(ALIAS, "mlxq.broker:Transport")


def kombu_url(broker_url: str) -> str:
    """Route `sqla+…` URLs through this transport; others pass unchanged."""
    if broker_url.startswith("sqla+"):
        register()
        return f"{ALIAS}+" + broker_url.removeprefix("sqla+")
    return broker_url
