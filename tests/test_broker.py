"""The embedded broker: kombu's SQL transport, woken by the bell, with a slow poll as the safety net."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
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
    with Connection(f"sqla+sqlite:///{tmp_path / 'c.sqlite'}", transport_options={"polling_interval": 0.01}) as conn:
        with pytest.raises(TypeError, match="polling_interval"):
            _ = conn.default_channel.session


def test_other_urls_pass_unchanged():
    assert kombu_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert kombu_url("sqla+postgresql://x/y").startswith("mlxqsql+postgresql://")


def consume_one(url: str, queue: Queue, *, poll_s: float, timeout: float, got: list, ready: threading.Event) -> None:
    """Wait for one message on `queue` (in a thread) and note when it arrived."""
    with Connection(url, transport_options={"polling_interval": poll_s}) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, msg: (got.append((time.monotonic(), body)), msg.ack())]):
            ready.set()
            conn.drain_events(timeout=timeout)


def publish(url: str, queue: Queue, body: dict, **transport_options) -> float:
    with Connection(url, transport_options={"polling_interval": 10, **transport_options}) as conn:
        with conn.Producer() as producer:
            producer.publish(body, routing_key=queue.name, declare=[queue])
    return time.monotonic()


@pytest.fixture
def broker(tmp_path: Path) -> tuple[str, Queue]:
    url = kombu_url(f"sqla+sqlite:///{tmp_path / 'bell.sqlite'}")
    queue = Queue("q", routing_key="q")
    publish(url, queue, {"warm": True}, bell=False)  # tables and queue exist before anyone waits
    with Connection(url) as conn, conn.SimpleQueue(queue) as q:
        q.get(timeout=2).ack()
    return url, queue


def delivery_delay(url: str, queue: Queue, body: dict, *, poll_s: float, bell: bool) -> float:
    """Seconds from a publish to its delivery to a consumer already waiting (polling every `poll_s`)."""
    got: list = []
    ready = threading.Event()
    consumer = threading.Thread(
        target=consume_one, args=(url, queue), kwargs=dict(poll_s=poll_s, timeout=20, got=got, ready=ready)
    )
    consumer.start()
    ready.wait(5)
    time.sleep(0.3)  # let it finish its first, empty poll and wait on the bell
    sent = publish(url, queue, body, bell=bell)
    consumer.join(20)
    assert [b for _, b in got] == [body]
    return got[0][0] - sent


def test_the_bell_wakes_a_consumer_long_before_its_poll(broker: tuple[str, Queue]):
    # A ring arrives in well under a millisecond; without it this would take the 10 s poll.
    assert delivery_delay(*broker, {"n": 1}, poll_s=10, bell=True) < 1.0


def test_a_lost_ring_is_caught_by_the_safety_poll(broker: tuple[str, Queue]):
    assert delivery_delay(*broker, {"n": 2}, poll_s=0.5, bell=False) < 5.0  # every ring lost


def test_an_ack_that_frees_the_only_prefetch_slot_wakes_the_consumer(broker: tuple[str, Queue]):
    url, queue = broker
    publish(url, queue, {"n": 1})
    publish(url, queue, {"n": 2})
    held: list = []
    with Connection(url, transport_options={"polling_interval": 10}) as conn:
        with conn.Consumer(queue, prefetch_count=1, callbacks=[lambda body, msg: held.append((body, msg))]):
            conn.drain_events(timeout=5)
            assert [b for b, _ in held] == [{"n": 1}]
            # The slot is taken, so the consumer cannot take {"n": 2}; acking from another thread (as a
            # Celery pool thread does) must wake it rather than leave it for the 10 s poll.
            threading.Timer(0.3, held[0][1].ack).start()
            started = time.monotonic()
            conn.drain_events(timeout=20)
            assert [b for b, _ in held] == [{"n": 1}, {"n": 2}]
            assert time.monotonic() - started < 5.0
            held[1][1].ack()


def test_competing_consumers_get_each_message_once_and_delivered_rows_are_deleted(broker: tuple[str, Queue]):
    url, queue = broker
    with Connection(url, transport_options={"polling_interval": 10}) as conn, conn.Producer() as producer:
        for n in range(100):
            producer.publish({"n": n}, routing_key=queue.name, declare=[queue])
    got: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        def on(body: dict, msg) -> None:
            with lock:
                got.append(body["n"])
            msg.ack()

        with Connection(url, transport_options={"polling_interval": 10}) as conn:
            with conn.Consumer(queue, callbacks=[on], prefetch_count=1):
                deadline = time.monotonic() + 30
                while len(got) < 100 and time.monotonic() < deadline:
                    try:
                        conn.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass

    consumers = [threading.Thread(target=consume) for _ in range(2)]
    for t in consumers:
        t.start()
    for t in consumers:
        t.join(60)
    assert sorted(got) == list(range(100))
    # kombu's own path keeps every delivered message as an invisible row; this one deletes it.
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (0,)
