"""The response cache, jobs and counters on the SQLite default and on PostgreSQL, schema from Alembic."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlxq import retention
from mlxq.db import make_engine, make_sessionmaker, upgrade
from mlxq.jobspec import Route
from mlxq.repos import cache_entries, counters, files, jobs, request_log, workers
from mlxq.settings import Settings
from mlxq.states import RouteReason
from tests.factories import job_spec


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'cache.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(Settings(data_dir=tmp_path, database_url=url))
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def put(sessions, key: str, *, max_entries: int = 100, ttl_s: float | None = None) -> None:
    with sessions.begin() as s:
        cache_entries.put_entry(session=s, key=key, kind="chat", model="m", result={"text": key}, ttl_s=ttl_s)
    with sessions.begin() as s:
        cache_entries.evict_lru(session=s, max_entries=max_entries)


def get(sessions, key: str):
    with sessions() as s:
        return cache_entries.lookup_result(session=s, key=key)


def test_put_get_roundtrip_and_replace(sessions):
    put(sessions, "a")
    assert get(sessions, "a") == {"text": "a"}
    assert get(sessions, "b") is None
    put(sessions, "a")
    with sessions() as s:
        assert cache_entries.cache_items(session=s)[0] == 1


def test_lru_bound_by_entries_evicts_least_recently_used(sessions):
    for k in ("a", "b", "c"):
        put(sessions, k, max_entries=3)
        time.sleep(0.01)
    with sessions.begin() as s:
        cache_entries.touch_entry(session=s, key="a")  # a is now the most recently used
    put(sessions, "d", max_entries=3)
    assert get(sessions, "b") is None
    assert all(get(sessions, k) for k in ("a", "c", "d"))


def test_ttl_expires_entries(sessions):
    put(sessions, "t", ttl_s=0.05)
    assert get(sessions, "t") is not None
    time.sleep(0.1)
    assert get(sessions, "t") is None
    with sessions.begin() as s:
        assert cache_entries.purge_expired(session=s) == 1


def test_counters_start_seeded_and_count(sessions):
    with sessions.begin() as s:
        assert counters.counters(session=s) == {"cache_hits": 0, "cache_misses": 0, "cache_bypass": 0}
        counters.bump(session=s, name="cache_hits")
        counters.bump(session=s, name="cache_hits")
    with sessions() as s:
        assert counters.counters(session=s)["cache_hits"] == 2


def new_job(sessions, key: str = "k") -> str:
    with sessions.begin() as s:
        return jobs.create_job(session=s, spec=job_spec(key), sent=True).id


def status(sessions, job_id: str):
    with sessions() as s:
        return jobs.get_job(session=s, job_id=job_id)


def test_a_job_is_claimed_once_and_a_dead_workers_job_runs_again_until_max_attempts(sessions):
    job_id = new_job(sessions)
    with sessions() as s:
        assert jobs.find_inflight(session=s, key="k").id == job_id
        assert jobs.queue_depth(session=s) == 1
    with sessions.begin() as s:  # another model's worker never claims it
        assert jobs.start_job(session=s, job_id=job_id, worker="w9", model="other") is None
    for attempt in (1, 2):
        with sessions.begin() as s:
            assert jobs.start_job(session=s, job_id=job_id, worker="w1", model="m").attempts == attempt
        with sessions.begin() as s:  # a duplicate message for a claimed job is skipped
            assert jobs.start_job(session=s, job_id=job_id, worker="w1", model="m") is None
        with sessions.begin() as s:  # the worker restarted: its job goes back to the queue, unsent
            assert jobs.requeue_running(session=s, worker="w2", max_attempts=2) == (0, 0)
            expected = (1, 0) if attempt == 1 else (0, 1)
            assert jobs.requeue_running(session=s, worker="w1", max_attempts=2) == expected
        if attempt == 1:
            assert status(sessions, job_id).status == "queued"
            with sessions() as s:
                assert jobs.jobs_to_send(session=s) == [job_id]
            with sessions.begin() as s:
                jobs.mark_sent(session=s, routes={job_id: Route("w1", RouteReason.SESSION)})
            with sessions() as s:
                assert jobs.jobs_to_send(session=s) == []
                assert jobs.sent_before(session=s, before=time.time() + 1) == [(job_id, "w1")]
                assert jobs.sent_to_gone_workers(session=s, live=["w1"]) == []
                assert jobs.sent_to_gone_workers(session=s, live=["w2"]) == [job_id]  # its worker is gone
            with sessions.begin() as s:
                jobs.unsend(session=s, job_ids=[job_id])
            with sessions() as s:
                assert jobs.jobs_to_send(session=s) == [job_id]
    job = status(sessions, job_id)
    assert job.status == "failed" and job.error["code"] == "worker_crashed" and job.attempts == 2
    with sessions.begin() as s:  # a late answer never overwrites the final state
        assert not jobs.finish_job(session=s, job_id=job_id, status="succeeded", result={"text": "x"})
    assert status(sessions, job_id).status == "failed"


def test_a_job_interrupted_by_a_stopping_worker_does_not_use_up_an_attempt(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as s:
        jobs.start_job(session=s, job_id=job_id, worker="w1", model="m")
    with sessions.begin() as s:
        assert jobs.requeue_job(session=s, job_id=job_id)
    job = status(sessions, job_id)
    assert (job.status, job.attempts, job.sent_at) == ("queued", 0, None)


def test_a_job_is_cancelled_only_when_its_last_waiter_leaves(sessions):
    job_id = new_job(sessions)  # its creator waits
    with sessions.begin() as s:
        jobs.join_job(session=s, job_id=job_id)
    with sessions.begin() as s:
        assert not jobs.leave_job(session=s, job_id=job_id, abandon=True)  # the joiner still waits
    assert status(sessions, job_id).status == "queued"
    with sessions.begin() as s:
        assert jobs.leave_job(session=s, job_id=job_id, abandon=True)
    assert status(sessions, job_id).status == "cancelled"


def test_retention_removes_old_finished_jobs_logs_and_events(sessions):
    from mlxq.sql import StreamEvent

    done, running = new_job(sessions, "a"), new_job(sessions, "b")
    with sessions.begin() as s:
        jobs.finish_job(session=s, job_id=done, status="succeeded", result={})
        request_log.log_requests(session=s, rows=[{"at": 1.0, "key": "a", "endpoint": "chat", "cache": "MISS"}])
        s.add_all([StreamEvent(job_id=j, data="{}", created_at=1.0) for j in (done, running)])
    now = time.time() + 1
    with sessions.begin() as s:
        assert retention.prune_requests(session=s, jobs_before=now, log_before=now, events_before=now) == {
            "jobs": 1,
            "idempotency_keys": 0,
            "responses": 0,
            "request_log": 1,
            "stream_events": 1,
        }
    assert status(sessions, done) is None and status(sessions, running) is not None


def test_one_storing_job_per_key_in_flight(sessions):
    from sqlalchemy.exc import IntegrityError

    def create(store: bool = True) -> str:
        with sessions.begin() as s:
            return jobs.create_job(session=s, spec=job_spec("same", store=store), sent=True).id

    first = create()
    with pytest.raises(IntegrityError):
        create()
    create(store=False)  # requests that do not store (sampled) never join or block
    with sessions.begin() as s:
        jobs.finish_job(session=s, job_id=first, status="succeeded", result={})
    create()  # once the first is done, the key is free again


def test_jobs_of_a_worker_that_stopped_beating_go_back_to_the_queue(sessions):
    gone, alive = new_job(sessions, "g"), new_job(sessions, "a")
    with sessions.begin() as s:
        jobs.start_job(session=s, job_id=gone, worker="dead-host", model="m")
        jobs.start_job(session=s, job_id=alive, worker="live-host", model="m")
    with sessions.begin() as s:
        assert jobs.requeue_running(session=s, live_workers=["live-host"], max_attempts=2) == (1, 0)
    assert status(sessions, gone).status == "queued"
    assert status(sessions, alive).status == "running"


def test_liveness_reads_the_databases_clock(sessions):
    with sessions.begin() as s:
        workers.heartbeat(session=s, name="w", model="m", model_loaded=True, error=None, started_at=0.0)
    with sessions() as s:
        assert [w.name for w in workers.live_workers(session=s, within_s=5)] == ["w"]
    with sessions() as s:  # what mlxq serve's watchdog reads: seconds since the beat, by the same clock
        quiet = workers.silence(session=s, name="w")
        assert quiet is not None and 0 <= quiet < 5 and workers.silence(session=s, name="nobody") is None


def test_files_are_listed_newest_or_oldest_first_in_pages(sessions):
    with sessions.begin() as s:
        ids = [
            files.create_file(session=s, purpose="batch", filename=f"{i}.jsonl", content=b"x", owner=None).id
            for i in range(3)
        ]
    with sessions() as s:

        def listed(**kw: object) -> list[str]:
            return [f.id for f in files.list_files(session=s, owner=None, **kw)]

        assert listed() == ids[::-1] and listed(oldest=True) == ids
        assert listed(after=ids[2], limit=1) == [ids[1]] and listed(after=ids[0], limit=1, oldest=True) == [ids[1]]
