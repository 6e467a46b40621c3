"""The embedded broker: kombu's SQL transport with a poll interval it can actually use."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection, Queue

from mlxq.broker import kombu_url


def test_polling_interval_is_honoured_and_not_passed_to_sqlalchemy(tmp_path: Path):
    url = kombu_url(f"sqla+sqlite:///{tmp_path / 'b.sqlite'}")
    with Connection(url, transport_options={"polling_interval": 0.01}) as conn:
        assert conn.transport.polling_interval == 0.01
        queue = Queue("q", routing_key="q")
        with conn.Producer() as producer:
            producer.publish({"n": 1}, routing_key="q", declare=[queue])
        got: list[dict] = []
        with conn.Consumer(queue, callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            conn.drain_events(timeout=2)
        assert got == [{"n": 1}]


def test_stock_transport_would_reject_the_option(tmp_path: Path):
    # Why mlxq.broker exists: the stock transport forwards the option to create_engine.
    import pytest

    with Connection(f"sqla+sqlite:///{tmp_path / 'c.sqlite'}", transport_options={"polling_interval": 0.01}) as conn:
        with pytest.raises(TypeError, match="polling_interval"):
            _ = conn.default_channel.session


def test_other_urls_pass_unchanged():
    assert kombu_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert kombu_url("sqla+postgresql://x/y").startswith("mlxqsql+postgresql://")
