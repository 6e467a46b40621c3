"""The response cache, jobs and counters on the SQLite default and on PostgreSQL, schema from Alembic."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlxq import repos
from mlxq.db import make_engine, make_sessionmaker, upgrade
from mlxq.settings import Settings


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
        repos.put_entry(session=s, key=key, kind="chat", model="m", result={"text": key}, ttl_s=ttl_s)
    with sessions.begin() as s:
        repos.evict_lru(session=s, max_entries=max_entries)


def get(sessions, key: str):
    with sessions() as s:
        return repos.lookup_result(session=s, key=key)


def test_put_get_roundtrip_and_replace(sessions):
    put(sessions, "a")
    assert get(sessions, "a") == {"text": "a"}
    assert get(sessions, "b") is None
    put(sessions, "a")
    with sessions() as s:
        assert repos.cache_items(session=s)[0] == 1


def test_lru_bound_by_entries_evicts_least_recently_used(sessions):
    for k in ("a", "b", "c"):
        put(sessions, k, max_entries=3)
        time.sleep(0.01)
    with sessions.begin() as s:
        repos.touch_entry(session=s, key="a")  # a is now the most recently used
    put(sessions, "d", max_entries=3)
    assert get(sessions, "b") is None
    assert all(get(sessions, k) for k in ("a", "c", "d"))


def test_ttl_expires_entries(sessions):
    put(sessions, "t", ttl_s=0.05)
    assert get(sessions, "t") is not None
    time.sleep(0.1)
    assert get(sessions, "t") is None
    with sessions.begin() as s:
        assert repos.purge_expired(session=s) == 1


def test_counters_start_seeded_and_count(sessions):
    with sessions.begin() as s:
        assert repos.counters(session=s) == {"cache_hits": 0, "cache_misses": 0, "cache_bypass": 0}
        repos.bump(session=s, name="cache_hits")
        repos.bump(session=s, name="cache_hits")
    with sessions() as s:
        assert repos.counters(session=s)["cache_hits"] == 2


def test_single_flight_finds_the_active_job_and_restart_fails_running_ones(sessions):
    with sessions.begin() as s:
        job = repos.create_job(session=s, key="k", kind="chat", model="m", request={}, store=True, ttl_s=None)
        job_id = job.id
    with sessions() as s:
        assert repos.find_inflight(session=s, key="k").id == job_id
        assert repos.queue_depth(session=s) == 1
    with sessions.begin() as s:
        assert repos.start_job(session=s, job_id=job_id, worker="w1") is not None
    with sessions.begin() as s:
        assert repos.fail_running_jobs(session=s, worker="w2", message="x") == 0
        assert repos.fail_running_jobs(session=s, worker="w1", message="restarted") == 1
    with sessions() as s:
        job = repos.get_job(session=s, job_id=job_id)
        assert job.status == "failed" and job.error["code"] == "worker_restarted"
        assert repos.find_inflight(session=s, key="k") is None
    with sessions.begin() as s:
        repos.finish_job(session=s, job_id=job_id, status="succeeded", result={"text": "x"})
    with sessions.begin() as s:  # a redelivered task for a finished job is skipped
        assert repos.start_job(session=s, job_id=job_id, worker="w1") is None


def test_one_storing_job_per_key_in_flight(sessions):
    from sqlalchemy.exc import IntegrityError

    def create(store: bool = True) -> str:
        with sessions.begin() as s:
            return repos.create_job(session=s, key="same", kind="chat", model="m", request={}, store=store,
                                    ttl_s=None).id

    first = create()
    with pytest.raises(IntegrityError):
        create()
    create(store=False)  # requests that do not store (sampled) never join or block
    with sessions.begin() as s:
        repos.finish_job(session=s, job_id=first, status="succeeded", result={})
    create()  # once the first is done, the key is free again


def test_jobs_of_a_worker_that_stopped_beating_are_failed(sessions):
    with sessions.begin() as s:
        gone = repos.create_job(session=s, key="g", kind="chat", model="m", request={}, store=True, ttl_s=None).id
        alive = repos.create_job(session=s, key="a", kind="chat", model="m", request={}, store=True, ttl_s=None).id
    with sessions.begin() as s:
        repos.start_job(session=s, job_id=gone, worker="dead-host")
        repos.start_job(session=s, job_id=alive, worker="live-host")
    with sessions.begin() as s:
        assert repos.fail_orphaned_jobs(session=s, live_workers=["live-host"], older_than_s=60) == 0  # too recent
        assert repos.fail_orphaned_jobs(session=s, live_workers=["live-host"], older_than_s=0) == 1
    with sessions() as s:
        assert repos.get_job(session=s, job_id=gone).error["code"] == "worker_lost"
        assert repos.get_job(session=s, job_id=alive).status == "running"
