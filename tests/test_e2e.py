"""The whole path through real processes: official openai client -> api -> broker -> worker -> SmolLM2."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, inspect, text

from mlxq.traces import from_request_log
from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def count(db_url: str, table: str) -> int:
    engine = create_engine(db_url)
    try:
        if not inspect(engine).has_table(table):
            return 0
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar())
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "redis+postgresql"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, smollm2: Path) -> tuple[dict, str]:
    """Service environment and its SQL URL: the embedded default, or Redis + PostgreSQL."""
    env = service_env(tmp_path, smollm2)
    if request.param == "sqlite":
        return env, f"sqlite:///{tmp_path / 'data' / 'mlxq.sqlite'}"
    pg = request.getfixturevalue("pg_url")
    redis_url, prefix = request.getfixturevalue("redis_url")
    env.update(MLXQ_DATABASE_URL=pg, MLXQ_BROKER_URL=redis_url, MLXQ_QUEUE=prefix, MLXQ_REDIS_PREFIX=prefix)
    return env, pg


def client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(svc) -> tuple[str, str]:
    raw = client(svc).chat.completions.with_raw_response.create(model=MODEL_NAME, messages=QUESTION, temperature=0)
    return raw.parse().choices[0].message.content, raw.headers["x-cache"]


def test_answer_cache_hit_without_enqueue_and_survives_restart(deployment, service_factory):
    env, db_url = deployment
    svc = service_factory(env).start()
    answer, cache = ask(svc)
    assert "Paris" in answer and cache == "MISS"
    jobs = count(db_url, "jobs")
    assert jobs == 1

    again, cache = ask(svc)
    assert (again, cache) == (answer, "HIT")
    assert count(db_url, "jobs") == jobs  # a hit never touches the queue

    svc.health()  # the api writes its counters within a second (and on a clean stop): here, now
    svc.restart()
    after, cache = ask(svc)
    assert (after, cache) == (answer, "HIT")
    assert count(db_url, "jobs") == jobs
    stats = svc.health()["cache"]
    assert (stats["hits"], stats["misses"], stats["cached_items"]) == (2, 1, 1)
    assert stats["hit_rate"] == pytest.approx(2 / 3, abs=1e-3)


def test_cache_controls_and_nondeterministic_requests(tmp_path: Path, smollm2: Path, service_factory):
    svc = service_factory(service_env(tmp_path, smollm2)).start()
    oa = client(svc)
    kw = dict(model=MODEL_NAME, messages=QUESTION, max_tokens=8)

    def cache_of(**extra) -> str:
        return oa.chat.completions.with_raw_response.create(**kw, **extra).headers["x-cache"]

    assert cache_of(temperature=0, extra_headers={"Cache-Control": "no-store"}) == "MISS"
    assert cache_of(temperature=0) == "MISS"  # no-store kept it out of the cache
    assert cache_of(temperature=0) == "HIT"
    assert cache_of(temperature=0, extra_headers={"Cache-Control": "no-cache"}) == "BYPASS"
    assert cache_of(temperature=0, extra_body={"cache": {"no-cache": True}}) == "BYPASS"
    assert cache_of(temperature=0.9) == "BYPASS"  # sampled output is never served from the cache
    assert cache_of(temperature=0.9, seed=5) == "MISS"
    assert cache_of(temperature=0.9, seed=5) == "HIT"

    stats = svc.health()["cache"]
    assert (stats["hits"], stats["misses"], stats["bypass"]) == (2, 3, 3)
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{svc.base}/metrics", timeout=5).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("mlxq_cache_hits", ())] == 2 and samples[("mlxq_cache_misses", ())] == 3
    assert samples[("mlxq_requests_total", (("cache", "BYPASS"), ("endpoint", "chat"), ("status", "200")))] == 3


def test_bad_input_is_an_openai_4xx_and_nothing_is_enqueued(tmp_path: Path, smollm2: Path, service_factory):
    env = service_env(tmp_path, smollm2, MLXQ_MODEL_ALIASES="{}")  # strict names: another is a 404
    svc = service_factory(env).start(worker=False)
    url = f"{svc.base}/v1/chat/completions"
    bad = [
        ("malformed JSON", b'{"model": "x", "messages": [', 400, None),
        ("missing messages", b'{"model": "SmolLM2-135M-Instruct"}', 400, "messages"),
        ("messages not a list", b'{"model": "SmolLM2-135M-Instruct", "messages": "hi"}', 400, "messages"),
        (
            "temperature not a number",
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", '
            b'"content": "hi"}], "temperature": "hot"}',
            400,
            "temperature",
        ),
        (
            "unknown role",
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages.0.role",
        ),
        ("unknown model", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    ]
    for name, body, status, param in bad:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == status, name
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert err["type"] == "invalid_request_error" and err["message"], name
        assert err["param"] == param, (name, err)
        assert "Traceback" not in r.text

    with pytest.raises(openai.NotFoundError) as exc:
        client(svc).chat.completions.create(model="gpt-9", messages=QUESTION)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # retrieved by name: the same names, the same 404
        client(svc).models.retrieve("gpt-9")
    assert client(svc).models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.BadRequestError):
        client(svc).chat.completions.create(model=MODEL_NAME, messages=[])

    db = f"sqlite:///{tmp_path / 'data' / 'mlxq.sqlite'}"
    assert count(db, "jobs") == 0
    assert count(f"sqlite:///{tmp_path / 'data' / 'broker.sqlite'}", "kombu_message") == 0
    assert svc.health()["queue_depth"] == 0


def test_health_answers_while_the_worker_generates(tmp_path: Path, smollm2: Path, service_factory):
    svc = service_factory(service_env(tmp_path, smollm2)).start()
    db = f"sqlite:///{tmp_path / 'data' / 'mlxq.sqlite'}"
    done = threading.Event()

    def long_generation() -> None:
        client(svc).chat.completions.create(
            model=MODEL_NAME,
            temperature=0,
            max_tokens=400,
            extra_body={"min_p": 0.0},
            messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        )
        done.set()

    threading.Thread(target=long_generation, daemon=True).start()
    deadline = time.time() + 30
    while count_jobs(db, "running") == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert count_jobs(db, "running") == 1
    answered = 0
    while count_jobs(db, "running") == 1 and answered < 20:
        r = httpx.get(f"{svc.base}/health", timeout=2)  # blocks only if the front end froze
        assert r.status_code == 200 and r.json()["worker"]["alive"]
        answered += 1
    assert answered >= 5
    assert done.wait(120)


def count_jobs(db: str, status: str) -> int:
    engine = create_engine(db)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM jobs WHERE status = :s"), {"s": status}).scalar())
    finally:
        engine.dispose()


def test_model_that_cannot_load_gives_errors_never_fake_text(tmp_path: Path, service_factory):
    env = service_env(tmp_path, tmp_path / "no-such-model")
    svc = service_factory(env).start(wait_model=False)
    health = svc.wait_health(lambda h: h["worker"]["error"] is not None)
    assert health["model_loaded"] is False and health["status"] == "degraded"
    assert "no-such-model" in health["worker"]["error"]
    # A balancer reading only the code stops sending here; the body says why, to a person.
    r = httpx.get(f"{svc.base}/health", timeout=5)
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    root = httpx.head(f"{svc.base}/", timeout=5)  # Claude Code's reachability check
    assert root.status_code == 200
    with pytest.raises(openai.APIStatusError) as exc:
        client(svc).chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0)
    assert exc.value.status_code == 503 and "model not loaded" in exc.value.message
    assert svc.health()["cache"]["cached_items"] == 0


def test_agent_turns_reuse_the_prefix_and_stay_warm_across_a_restart(tmp_path: Path, smollm2: Path, service_factory):
    svc = service_factory(service_env(tmp_path, smollm2)).start()
    system = {"role": "system", "content": "You are a coding agent. Follow the repository conventions. " * 30}
    oa = client(svc)
    first = oa.chat.completions.create(
        model=MODEL_NAME,
        temperature=0,
        max_tokens=8,
        messages=[system, {"role": "user", "content": "List three colours."}],
    )
    history = [
        system,
        {"role": "user", "content": "List three colours."},
        {"role": "assistant", "content": first.choices[0].message.content},
    ]
    second = oa.chat.completions.create(
        model=MODEL_NAME,
        temperature=0,
        max_tokens=8,
        messages=[*history, {"role": "user", "content": "Now three animals."}],
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens
    # Stats come with the worker's heartbeat; one taken between the turn's lookup (which moves the entry
    # out of the trie) and its insert shows no entry yet.
    health = svc.wait_health(lambda h: h["prefix_cache"]["hits"] >= 1 and h["prefix_cache"]["entries"] >= 1)
    assert health["prefix_cache"]["tokens_saved"] >= cached
    assert health["cache"]["misses"] == 2  # the response cache keeps its own counts

    svc.restart()  # the worker saves its prefix cache on shutdown and loads it on start
    third = oa.chat.completions.create(
        model=MODEL_NAME,
        temperature=0,
        max_tokens=8,
        messages=[*history, {"role": "user", "content": "Now three fruits."}],
    )
    assert third.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens

    svc.health()  # flushes the api's batched request log
    report = from_request_log(f"sqlite:///{tmp_path / 'data' / 'mlxq.sqlite'}")
    assert (report["total_requests"], report["unique_requests"]) == (3, 3)
    assert report["prefix_tokens_saved"] >= cached + third.usage.prompt_tokens_details.cached_tokens


def test_a_killed_workers_job_goes_back_to_the_queue_and_the_next_worker_answers(
    tmp_path: Path, smollm2: Path, service_factory
):
    svc = service_factory(service_env(tmp_path, smollm2)).start()
    db = f"sqlite:///{tmp_path / 'data' / 'mlxq.sqlite'}"
    answers: list[object] = []
    request = {
        "model": MODEL_NAME,
        "temperature": 0,
        "max_tokens": 400,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    }

    # The client waits out the kill, the reaper's grace, a cold worker start and the whole answer again: on a
    # loaded 2-core machine that can pass two minutes, so it waits longer than the default client here.
    waiting = client(svc).with_options(timeout=300)
    waiter = threading.Thread(target=lambda: answers.append(waiting.chat.completions.create(**request)), daemon=True)
    waiter.start()
    deadline = time.time() + 30
    while count_jobs(db, "running") == 0 and time.time() < deadline:
        time.sleep(0.05)
    svc.procs[1].kill()  # the worker, without a chance to clean up, and nobody restarts it
    # The api sees its heartbeats stop and puts the job back in the queue: not running, not failed.
    deadline = time.time() + 30
    while count_jobs(db, "queued") == 0 and time.time() < deadline:
        time.sleep(0.2)
    assert (count_jobs(db, "queued"), count_jobs(db, "running"), count_jobs(db, "failed")) == (1, 0, 0)
    svc.procs[1] = svc._spawn("worker", "--log-level", "INFO")  # a new worker: the job runs again
    waiter.join(300)
    assert answers, f"no answer after the new worker started\n{svc.logs()}"
    assert answers[0].choices[0].finish_reason == "length"
    again = client(svc).chat.completions.with_raw_response.create(**request)
    assert again.headers["x-cache"] == "HIT"
    assert again.parse().choices[0].message.content == answers[0].choices[0].message.content
