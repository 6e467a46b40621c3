"""The embedded stream channel: SQL rows, read when the bell rings, with a slow poll as the safety net."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlxq.bell import bell_dir, sql_bell_name
from mlxq.channel import SQLChannel
from mlxq.db import make_engine, make_sessionmaker, upgrade
from mlxq.settings import Settings
from mlxq.sql import StreamEvent
from tests.conftest import ROOT

# A worker stand-in in its own process: publishes a delta, then a delta and `done` in one call, each
# stamped with the (system-wide) monotonic time it was sent.
PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from mlxq.channel import SQLChannel
    from mlxq.db import make_engine, make_sessionmaker
    channel = SQLChannel(make_sessionmaker(make_engine(sys.argv[1])), poll_interval_s=10)
    job = sys.argv[2]
    time.sleep(0.3)
    channel.publish(job, {"type": "delta", "content": "Par", "sent": time.monotonic()})
    time.sleep(0.3)
    sent = time.monotonic()
    channel.publish_many(job, [{"type": "delta", "content": "is", "sent": sent}, {"type": "done", "sent": sent}])
    """
)


@pytest.fixture
def db_url(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'mlxq.sqlite'}"
    upgrade(Settings(data_dir=tmp_path, database_url=url))
    yield url
    directory = bell_dir(sql_bell_name("stream", url))
    assert not directory.exists() or os.listdir(directory) == []  # aclose removed the listener's socket
    if directory.exists():
        directory.rmdir()


def channel_for(url: str, poll_s: float) -> SQLChannel:
    return SQLChannel(make_sessionmaker(make_engine(url)), poll_interval_s=poll_s)


async def collect(channel: SQLChannel, job_id: str, timeout: float) -> list[tuple[float, dict]]:
    got: list[tuple[float, dict]] = []

    async def run() -> None:
        async for event in channel.listen(job_id):
            got.append((time.monotonic(), event))
            if event["type"] == "done":
                return

    await asyncio.wait_for(run(), timeout)
    return got


def test_listen_wakes_on_events_from_another_process_long_before_the_poll(db_url: str):
    async def main() -> list[tuple[float, dict]]:
        channel = channel_for(db_url, poll_s=10)
        try:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", PUBLISHER, db_url, "job-1", cwd=ROOT)
            got = await collect(channel, "job-1", timeout=30)
            assert await proc.wait() == 0
            return got
        finally:
            await channel.aclose()

    got = asyncio.run(main())
    assert [e.get("content") or e["type"] for _, e in got] == ["Par", "is", "done"]
    # With a 10 s poll only the bell can deliver these in time; a ring takes well under a millisecond.
    assert max(at - e["sent"] for at, e in got) < 1.0


def test_one_listener_per_process_serves_every_job(db_url: str):
    async def main() -> dict[str, list[str]]:
        listener = channel_for(db_url, poll_s=10)
        publisher = channel_for(db_url, poll_s=10)
        try:
            tasks = {job: asyncio.create_task(collect(listener, job, timeout=10)) for job in ("a", "b", "c")}
            await asyncio.sleep(0.2)  # all three wait
            assert len(os.listdir(bell_dir(sql_bell_name("stream", db_url)))) == 1
            for job in ("c", "a", "b"):
                await asyncio.to_thread(
                    publisher.publish_many, job, [{"type": "delta", "content": job}, {"type": "done"}]
                )
            return {job: [e["type"] for _, e in await task] for job, task in tasks.items()}
        finally:
            await listener.aclose()

    assert asyncio.run(main()) == {job: ["delta", "done"] for job in ("a", "b", "c")}


def test_a_row_written_without_a_ring_arrives_with_the_safety_poll(db_url: str):
    async def main() -> list[tuple[float, dict]]:
        channel = channel_for(db_url, poll_s=0.3)
        sessions = make_sessionmaker(make_engine(db_url))

        def write_silently() -> None:
            time.sleep(0.3)
            with sessions.begin() as session:
                session.add(StreamEvent(job_id="quiet", data=json.dumps({"type": "done"}), created_at=time.time()))

        try:
            writer = asyncio.create_task(asyncio.to_thread(write_silently))
            got = await collect(channel, "quiet", timeout=10)
            await writer
            return got
        finally:
            await channel.aclose()

    assert [e for _, e in asyncio.run(main())] == [{"type": "done"}]


def test_events_already_published_are_replayed_in_order(db_url: str):
    channel = channel_for(db_url, poll_s=10)
    channel.publish("late", {"type": "started"})
    channel.publish_many("late", [{"type": "delta", "content": str(i)} for i in range(3)])
    channel.publish_many("late", [])
    channel.publish("late", {"type": "done"})

    async def main() -> list[tuple[float, dict]]:
        try:
            return await collect(channel, "late", timeout=10)
        finally:
            await channel.aclose()

    events = [e for _, e in asyncio.run(main())]
    assert events == [{"type": "started"}, *({"type": "delta", "content": str(i)} for i in range(3)), {"type": "done"}]


@pytest.mark.parametrize("replayable,last_run", [(True, False), (False, False), (False, True)])
def test_a_job_restarted_twice_is_relayed_once_or_its_client_told_to_retry(
    db_url: str, replayable: bool, last_run: bool
):
    """api.pipeline.follow on this channel: a stopped worker's `restarted` (kill -TERM), then a killed one's
    (kill -9) before the second run got as far: a deterministic job's text reaches the client once, whole; any other
    job's client, having had part of an answer, is told to retry; a reader of the ended job's kept events (a stored
    response streamed again) gets its last run's."""
    import threading

    from celery import Celery

    from api.errors import APIError
    from api.pipeline.follow import JobFollower
    from api.pipeline.model_info import ModelInfo
    from mlxq.delivery import Delivery

    sessions = make_sessionmaker(make_engine(db_url))
    channel = SQLChannel(sessions, poll_interval_s=0.05)
    settings = Settings(database_url=db_url)
    model_info = ModelInfo(sessions, within_s=10.0)
    follower = JobFollower(
        settings, sessions, channel, Delivery(sessions, Celery(), settings), threading.Event(), model_info
    )
    deltas = lambda *texts: [{"type": "delta", "content": t} for t in texts]  # noqa: E731
    channel.publish_many(
        "j",
        [
            *deltas("Hello", " wor"),
            {"type": "restarted", "attempt": 1},  # the stop: nothing counted
            *deltas("Hel"),
            {"type": "restarted", "attempt": 2},  # the kill, before the second run reached the first's end
            *deltas("Hello", " world", "!"),
            {"type": "done", "result": {"text": "Hello world!"}},
        ],
    )

    async def relayed() -> str:
        text = ""
        try:
            async for event in follower.events("j", replayable=replayable, last_run=last_run):
                text += event.get("content") or "" if event["type"] == "delta" else ""
        finally:
            await channel.aclose()
        return text

    if replayable or last_run:
        assert asyncio.run(relayed()) == "Hello world!"
    else:
        with pytest.raises(APIError, match="retry"):
            asyncio.run(relayed())


def test_a_worker_back_within_the_read_cache_is_not_refused(db_url: str):
    """api.pipeline.model_info: a read taken while no worker was alive (a request refused, /health polled while the
    successor loaded) must not refuse the requests that follow for its cache's life once a worker beats again. CI
    caught a request refused 503 right after /health said the worker was back."""
    from api.pipeline.model_info import ModelInfo
    from mlxq.repos import workers

    sessions = make_sessionmaker(make_engine(db_url))
    model_info = ModelInfo(sessions, within_s=10.0, wait_s=10.0, ttl_s=60.0)
    model_info._patience_until = 0.0  # past the start's patience: as long after a fresh start

    async def lost() -> bool:
        return await model_info.lost("m")

    assert asyncio.run(lost()), "no worker: lost"
    with sessions.begin() as session:
        workers.heartbeat(session=session, name="w", model="m", model_loaded=True, error=None, started_at=time.time())
    assert not asyncio.run(lost()), "a worker beats again: served at once, not after the read's 60 s"
