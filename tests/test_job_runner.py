"""worker.job_runner's relay of a sequence's events: what each wake-up publishes."""

from __future__ import annotations

import queue
import threading
import time

from mlxq import events
from worker.job_runner import FIRST_LINGER_S, drain


def later(source: queue.SimpleQueue, after_s: float, *items: events.Event | None) -> threading.Thread:
    def put() -> None:
        time.sleep(after_s)
        for item in items:
            source.put(item)

    thread = threading.Thread(target=put)
    thread.start()
    return thread


def test_a_first_token_that_follows_at_once_goes_out_with_started():
    """One publication, one read by the api, for a short prompt's `started` and its first token."""
    source: queue.SimpleQueue[events.Event | None] = queue.SimpleQueue()
    source.put(events.started(12, 0))
    thread = later(source, FIRST_LINGER_S / 4, events.delta("Hi"))
    batches = drain(source, linger_s=FIRST_LINGER_S)
    assert [e["type"] for e in next(batches)] == ["started", "delta"]
    thread.join()
    later(source, 0.0, events.delta(" there"), events.done({}), None).join()
    assert [[e["type"] for e in b] for b in batches] == [["delta", "done"]]


def test_a_long_prompt_s_started_goes_out_alone_after_the_wait():
    source: queue.SimpleQueue[events.Event | None] = queue.SimpleQueue()
    source.put(events.started(3000, 0))
    batches = drain(source, linger_s=FIRST_LINGER_S)
    tic = time.monotonic()
    assert [e["type"] for e in next(batches)] == ["started"]
    assert FIRST_LINGER_S * 0.9 <= time.monotonic() - tic < 1.0
    later(source, 0.0, events.progress(512, 3000), None).join()
    assert [[e["type"] for e in b] for b in batches] == [["progress"]]


def test_an_end_within_the_wait_ends_the_relay():
    source: queue.SimpleQueue[events.Event | None] = queue.SimpleQueue()
    source.put(events.error({"status": 400, "message": "no"}))
    source.put(None)
    assert [[e["type"] for e in b] for b in drain(source, linger_s=FIRST_LINGER_S)] == [["error"]]
