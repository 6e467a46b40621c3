"""Redis and PostgreSQL restarted under a running service, on servers the test owns.

What a user expects while the broker or the database restarts: `/health` keeps answering (a 503, or a
200 that says degraded), a request sent during the outage gets a clean, retryable 503 at once (never a hang
or a 500), a cached answer is still served when only the broker is down, and once the server is back every
request that was accepted gets its answer (or a 503 that a retry turns into the answer) and no job is
left queued or running.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, func, select

from mlxq.procs import Service
from mlxq.sql import Job
from mlxq.states import JOB_FINAL as TERMINAL
from tests.conftest import MODEL_NAME, service_env, unavailable
from tests.servers import PostgresServer, RedisServer, ServerMissing

pytestmark = pytest.mark.e2e

IN_FLIGHT = 6  # requests running when the server goes down; every third one streamed
# Six at once make ~80 tokens/s each with the tiny model on two cores: the short ones (about 6 s) finish while
# the server is down (their results are written then), the long ones decode on across the restart. At 200 tokens
# the short ones sometimes finished before the outage began, which then tested nothing.
SHORT_TOKENS, LONG_TOKENS = 500, 1200
OUTAGE_S = 10.0  # the server stays down at least this long
DOWN_HEALTH_S = 15.0  # /health must say "degraded" within this long of the outage
RECOVER_S = 60.0  # ...and "ok" within this long of the server's return
QUICK_S = 30.0  # the bound on any answer during the outage: a 503 must not take longer


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path).start()
    except ServerMissing as exc:
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except ServerMissing as exc:
        unavailable(str(exc))
    try:
        yield server.start()
    finally:
        server.close()


# -- the clients --------------------------------------------------------------------------------


def client(svc: Service, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=timeout)


def prompt(tag: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"[{tag}] Write a long story about a lighthouse keeper and the sea."}]


@dataclass
class Call:
    """One client request: its answer, or how it failed."""

    tag: str
    stream: bool
    max_tokens: int = 8
    text: str | None = None
    error: Exception | None = None
    elapsed: float = 0.0
    first: str | None = None  # how the first attempt ended, when it was retried

    @property
    def retryable(self) -> bool:
        """A clean 503; or, for a stream that had already answered 200, an error object in the stream with a
        machine-readable `code` (worker_lost, broker_unavailable, ...). A bare "generation failed" (no code,
        an internal error) is not one: the client cannot tell it from a bug."""
        if isinstance(self.error, openai.APIStatusError):
            return self.error.status_code == 503
        # openai raises a plain APIError for an `error` object inside a stream; its body is that object.
        body = getattr(self.error, "body", None)
        return (
            self.stream
            and type(self.error) is openai.APIError
            and isinstance(body, dict)
            and body.get("type") == "server_error"
            and body.get("code") is not None
        )

    def describe(self) -> str:
        if self.error is None and self.text is None:
            now = "no answer yet (hung)"
        elif self.error is None:
            now = f"ok in {self.elapsed:.1f}s"
        else:
            status = getattr(self.error, "status_code", None)
            now = f"{type(self.error).__name__} status={status} after {self.elapsed:.1f}s: {self.error}"
        return f"{self.tag}: {f'first {self.first}; retry: ' if self.first else ''}{now}"


def ask(svc: Service, call: Call, *, timeout: float = 120) -> Call:
    """Send `call`'s request with the official client; record its text or its error."""
    oa = client(svc, timeout)
    started = time.monotonic()
    call.text, call.error = None, None
    try:
        kw = dict(model=MODEL_NAME, messages=prompt(call.tag), temperature=0, max_tokens=call.max_tokens)
        if call.stream:
            parts = []
            for chunk in oa.chat.completions.create(**kw, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            call.text = "".join(parts)
        else:
            call.text = oa.chat.completions.create(**kw).choices[0].message.content
    except Exception as exc:  # what the client sees is the result under test
        call.error = exc
    call.elapsed = time.monotonic() - started
    return call


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def launch(svc: Service, calls: list[Call]) -> list[threading.Thread]:
    threads = [threading.Thread(target=ask, args=(svc, c), daemon=True) for c in calls]
    for t in threads:
        t.start()
    return threads


# -- the database -------------------------------------------------------------------------------


def job_counts(db_url: str) -> dict[str, int]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    finally:
        engine.dispose()


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:  # the server under test may be the one that is down
            pass
        time.sleep(step)
    return False


def wait_quiet(db_url: str, timeout: float = 90) -> dict[str, int]:
    """Job counts once none is queued or running (or the last counts at the deadline)."""
    counts: dict[str, int] = {}

    def quiet() -> bool:
        counts.clear()
        counts.update(job_counts(db_url))
        return not set(counts) - set(TERMINAL)

    wait_for(quiet, timeout, step=0.5)
    return counts


# -- /health ------------------------------------------------------------------------------------


@dataclass
class HealthLog:
    """Every /health answer seen during an outage: (seconds since it began, status code or error, body)."""

    since: float = field(default_factory=time.monotonic)
    seen: list[tuple[float, object, object]] = field(default_factory=list)

    def probe(self, svc: Service) -> tuple[object, object]:
        """(status code or the transport error, body) of one GET /health, also kept in the log."""
        at = round(time.monotonic() - self.since, 2)
        try:
            r = httpx.get(f"{svc.base}/health", timeout=10)
        except httpx.HTTPError as exc:
            self.seen.append((at, f"{type(exc).__name__}: {exc}", None))
            return self.seen[-1][1:]
        try:
            body = r.json()
        except ValueError:
            body = r.text[:300]
        self.seen.append((at, r.status_code, body))
        return r.status_code, body

    def wait_for(self, svc: Service, state: Callable[[object, object], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if state(*self.probe(svc)):
                return True
            time.sleep(0.5)
        return False

    def answered_every_time(self) -> bool:
        """No probe hung or failed: each got a 200 or 503 with a JSON body."""
        return all(code in (200, 503) and isinstance(body, dict) for _, code, body in self.seen)

    def summary(self) -> str:
        """One line per change of answer (the counters left out), with the times it was seen."""
        lines: list[str] = []
        last, first_at, prev_at = None, 0.0, 0.0
        for at, code, body in [*self.seen, (None, None, None)]:
            shown = {k: v for k, v in body.items() if k not in QUIET} if isinstance(body, dict) else body
            now = f"{code} {json.dumps(shown)[:400] if shown else ''}"
            if now != last:
                if last is not None:
                    lines.append(f"  t+{first_at}..{prev_at}s: {last}")
                last, first_at = now, at
            prev_at = at
        return "\n".join(lines)


def degraded(code: object, body: object) -> bool:
    """What a load balancer or a person reads as "not healthy": a 503, or a 200 whose status is not ok."""
    return code == 503 or (code == 200 and isinstance(body, dict) and body.get("status") not in (None, "ok"))


def healthy(code: object, body: object) -> bool:
    return code == 200 and isinstance(body, dict) and body.get("status") == "ok"


# /health fields that change with every request; left out of the outage's health log.
QUIET = {"cache", "prefix_cache", "batch", "time", "model"}


def report(
    svc: Service,
    server: RedisServer | PostgresServer,
    calls: list[Call],
    health: HealthLog,
    counts: dict[str, int] | None = None,
) -> str:
    """Everything the lead needs to see when an assertion fails."""
    return (
        "\ncalls:\n"
        + "\n".join(f"  {c.describe()}" for c in calls)
        + f"\n/health during the outage:\n{health.summary()}"
        + f"\njobs: {counts}"
        + f"\n{type(server).__name__} log:\n{server.logs()}"
        + f"\nservice logs:\n{svc.logs()}"
    )


# -- the scenario, shared by both servers --------------------------------------------------------


def outage_scenario(svc: Service, db_url: str, server: RedisServer | PostgresServer, *, hit_while_down: bool) -> None:
    """Requests in flight; `server` stops; /health and new requests during the outage; `server` returns;
    then every accepted request is answered (or a clean 503 that a retry answers) and every job ends."""
    run = uuid.uuid4().hex[:6]
    warm = ask(svc, Call(f"{run}-warm", stream=False))
    assert warm.error is None, report(svc, server, [warm], HealthLog())

    calls = [
        Call(f"{run}-{i}", stream=i % 3 == 2, max_tokens=LONG_TOKENS if i % 2 else SHORT_TOKENS)
        for i in range(IN_FLIGHT)
    ]
    threads = launch(svc, calls)
    # Stop the server once every request is a job and the worker is generating (tokens are flowing).
    assert wait_for(
        lambda: sum(job_counts(db_url).values()) >= IN_FLIGHT + 1 and job_counts(db_url).get("running", 0) >= 1, 30
    ), report(svc, server, calls, HealthLog())
    time.sleep(1.0)
    assert not any(c.error or c.text for c in calls), "the requests finished before the outage; raise SHORT_TOKENS"

    server.stop()
    health = HealthLog()
    said_degraded = health.wait_for(svc, degraded, DOWN_HEALTH_S)

    # New requests during the outage: a clean 503 fast (or, at worst, the answer), never a hang or a 500.
    during = [
        ask(svc, Call(f"{run}-down-{kind}", stream=kind == "stream"), timeout=QUICK_S) for kind in ("sync", "stream")
    ]
    hit = ask(svc, Call(f"{run}-warm", stream=False), timeout=QUICK_S) if hit_while_down else None
    health.wait_for(svc, lambda *_: False, OUTAGE_S - (time.monotonic() - health.since))  # /health all along
    server.start()
    back = health.wait_for(svc, healthy, RECOVER_S)

    join_all(threads, 150)
    everyone = [*calls, *during, *([hit] if hit else [])]
    hung = [c.tag for c, t in zip(calls, threads, strict=True) if t.is_alive()]
    dead = [f"{p.args[3]} exited {p.returncode}" for p in svc.procs if p.poll() is not None]
    assert not dead, f"a service process died in the outage: {dead}{report(svc, server, everyone, health)}"
    # Every in-flight request: its answer, or a clean 503 that one retry (now the server is back) answers.
    retries = [c for c in calls if c.error is not None and c.retryable]
    for c in retries:
        c.first = c.describe().split(": ", 1)[1]
    join_all(launch(svc, retries), 150)
    counts = wait_quiet(db_url, 60)
    details = report(svc, server, everyone, health, counts)

    assert not hung, f"requests never answered: {hung}{details}"
    assert health.answered_every_time(), f"/health failed or hung during the outage{details}"
    assert said_degraded, f"/health did not say degraded (or 503) within {DOWN_HEALTH_S:g}s of the outage{details}"
    assert back, f"/health did not say ok within {RECOVER_S:g}s of the server's return{details}"
    for c in during:
        assert c.error is None or (isinstance(c.error, openai.APIStatusError) and c.error.status_code == 503), (
            f"a request sent during the outage: {c.describe()}{details}"
        )
        assert c.elapsed < QUICK_S, f"a request sent during the outage took {c.elapsed:.1f}s{details}"
    if hit is not None:
        assert hit.error is None and hit.text == warm.text, f"a cached answer was not served: {hit.describe()}{details}"
    failed = [c.describe() for c in calls if c.error is not None or c.text is None]
    assert not failed, f"accepted requests lost (after one retry): {failed}{details}"
    assert not set(counts) - set(TERMINAL), f"jobs left unfinished: {counts}{details}"
    # A stream's text is the answer: the stored result, which the same request now reads from the cache.
    for c in calls:
        if c.stream:
            again = ask(svc, Call(c.tag, stream=False, max_tokens=c.max_tokens))
            assert again.error is None and again.text == c.text, (
                f"stream {c.tag} got {len(c.text or '')} chars, the stored answer has {len(again.text or '')}{details}"
            )
    fresh = ask(svc, Call(f"{run}-after", stream=False))
    assert fresh.error is None, f"no answer after recovery: {fresh.describe()}{details}"


def test_redis_restart_mid_run(tmp_path: Path, tiny_model: Path, private_redis: RedisServer, service_factory):
    """The Redis broker (and stream channel) restarts while requests run; SQLite holds the jobs."""
    env = service_env(tmp_path, tiny_model, MLXQ_BROKER_URL=private_redis.url(1))
    svc = service_factory(env).start()
    outage_scenario(svc, f"sqlite:///{tmp_path / 'data' / 'mlxq.sqlite'}", private_redis, hit_while_down=True)


def test_postgres_restart_mid_run(
    tmp_path: Path, tiny_model: Path, private_postgres: PostgresServer, redis_url: tuple[str, str], service_factory
):
    """PostgreSQL (jobs, response cache, heartbeats) restarts while requests run; the shared Redis brokers."""
    db_url = private_postgres.create_database("mlxq")
    broker, prefix = redis_url
    env = service_env(
        tmp_path,
        tiny_model,
        MLXQ_DATABASE_URL=db_url,
        MLXQ_BROKER_URL=broker,
        MLXQ_QUEUE=prefix,
        MLXQ_REDIS_PREFIX=prefix,
    )
    svc = service_factory(env).start()
    outage_scenario(svc, db_url, private_postgres, hit_while_down=False)
