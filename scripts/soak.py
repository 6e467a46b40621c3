"""Soak test: many concurrent clients of every kind for a bounded time, then the invariants.

Starts its own api + worker (`mlxq.procs.Service`) on a temporary data dir and runs `--clients` (50)
client loops for `--duration` seconds (60) on loopback, each sending, back to back, a random mix of:

* hit         chat, temperature 0, one of a few hot prompts (answered from the response cache once warm)
* miss        chat, temperature 0, a distinct prompt (a job for the worker), 8-32 tokens
* stream      chat, streamed to `data: [DONE]` (half hot prompts, half distinct)
* disconnect  chat, streamed, the client closes the connection after the first chunk or two
* completion  /v1/completions, hot or distinct prompt
* bad         invalid input (malformed JSON, missing field, wrong type, unenforceable schema, n=2, empty prompt)

with the official `openai` AsyncOpenAI client (raw httpx for the malformed bodies). Afterwards it waits
for quiescence and checks the invariants:

* every request was answered with a 2xx, refused with a 4xx (bad input only) or a 503; anything else
  (a 500, a timeout, a dropped connection that was not our own disconnect, a stream that ended without
  `[DONE]` or with an error) is a failure
* every job row is terminal (succeeded, failed, cancelled) and the queue is empty

It prints a JSON summary (requests, requests/s, outcomes, errors by kind, latency p50/p95 per kind, api
and worker RSS at start and end, jobs by status, failures) and exits 1 if an invariant failed.

    .venv/bin/python scripts/soak.py [--duration 60] [--clients 50] [--model DIR] [--mode sqlite|redis] \
        [--seed 0] [--log-dir DIR]

`--mode redis` uses the Redis on 127.0.0.1:6379 (db 12, an own key prefix and queue, removed afterwards)
and a PostgreSQL database on 127.0.0.1:5432 that the script creates and drops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402
from mlxq.states import JOB_FINAL  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# A spare Redis db, away from bench.py's 9 and bench_concurrency.py's 14.
REDIS = "redis://127.0.0.1:6379/12"
TERMINAL = set(JOB_FINAL)

# Relative weights of the request kinds each client draws from.
MIX = {"hit": 30, "miss": 20, "stream": 15, "disconnect": 10, "completion": 15, "bad": 10}
HOT = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "What colour is the sky?",
]
TOPICS = [
    "volcanoes",
    "honeybees",
    "the Silk Road",
    "bridges",
    "chess",
    "ocean currents",
    "the printing press",
    "rain forests",
    "the telephone",
    "comets",
    "glaciers",
    "lighthouses",
]
# Invalid requests and what they must be refused with (any 4xx; the status is informational).
BAD: list[tuple[str, str, bytes | dict]] = [
    ("malformed json", "/v1/chat/completions", b'{"model": "x", "messages": ['),
    ("missing messages", "/v1/chat/completions", {"model": "{model}"}),
    (
        "temperature not a number",
        "/v1/chat/completions",
        {"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    ),
    ("unknown role", "/v1/chat/completions", {"model": "{model}", "messages": [{"role": "robot", "content": "x"}]}),
    (
        "unenforceable schema",  # a JSON Schema feature the grammar engine lacks is refused before the queue
        "/v1/chat/completions",
        {
            "model": "{model}",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        },
    ),
    ("n=2", "/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "n": 2}),
    ("empty prompt", "/v1/completions", {"model": "{model}", "prompt": ""}),
    ("empty messages", "/v1/chat/completions", {"model": "{model}", "messages": []}),
]


@dataclass
class Result:
    """One request: its kind, what came of it (`outcome`), whether that broke an invariant, its latency."""

    kind: str
    outcome: str
    latency: float
    failure: str | None = None  # why this request broke an invariant, if it did
    detail: str = ""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


# --- Memory --------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident memory of one process in MB: psutil when installed, else /proc/<pid>/status."""
    try:
        import psutil

        try:
            return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            return None
    except ImportError:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def memory(svc: Service) -> dict[str, float | None]:
    api, worker = svc.procs[0].pid, svc.procs[1].pid
    return {"api": rss_mb(api), "worker": rss_mb(worker)}


class MemoryTrace:
    """RSS of api and worker every `every_s` seconds in a thread: growth that levels off is a cache, growth
    that does not is a leak."""

    def __init__(self, svc: Service, every_s: float) -> None:
        self.svc, self.every_s = svc, every_s
        self.samples: list[dict[str, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append({"t": round(time.monotonic() - self._started, 1), **memory(self.svc)})

    def __enter__(self) -> MemoryTrace:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, name: str) -> float | None:
        values = [s[name] for s in self.samples if s[name] is not None]
        return max(values) if values else None


# --- The clients -----------------------------------------------------------------------------------


class Clients:
    """What every client loop shares: the service's address, the model id, a source of distinct prompts."""

    def __init__(self, base: str, model: str, timeout: float, rng: random.Random) -> None:
        self.base, self.model, self.timeout, self.rng = base, model, timeout, rng
        self.run = uuid.uuid4().hex[:6]
        self.counter = 0
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
        self.http = httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits)
        # max_retries=0: every refusal is counted as the service gave it, not hidden by the client's retries.
        self.oa = openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=timeout, http_client=self.http
        )

    def distinct(self) -> str:
        self.counter += 1
        topic = self.rng.choice(TOPICS)
        return f"[{self.run}-{self.counter}] Tell me one fact about {topic}."

    def messages(self, text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- one request of each kind ------------------------------------------------------------------

    async def one(self, kind: str) -> Result:
        started = time.perf_counter()
        try:
            outcome, failure, detail = await getattr(self, f"_{kind}")()
        except openai.APIStatusError as exc:
            outcome, failure, detail = self._status(kind, exc.status_code, exc.message)
        except (openai.APITimeoutError, httpx.TimeoutException) as exc:
            outcome, failure, detail = "timeout", "timeout", str(exc)
        except (openai.APIConnectionError, httpx.TransportError) as exc:
            outcome, failure, detail = "connection", "connection error", f"{type(exc).__name__}: {exc}"
        except openai.APIError as exc:  # an error object inside a stream that had answered 200
            outcome, failure, detail = "stream_error", "error in a stream", str(exc)
        except Exception as exc:  # anything else is a bug in the service or in this script: report it
            outcome, failure, detail = "exception", f"{type(exc).__name__}", str(exc)
        return Result(kind, outcome, time.perf_counter() - started, failure, detail[:300])

    @staticmethod
    def _status(kind: str, status: int, message: str) -> tuple[str, str | None, str]:
        if status == 503:
            return "503", None, message
        if 400 <= status < 500:
            # A valid request refused as invalid is wrong too (429 would be a legitimate refusal).
            ok = kind == "bad" or status == 429
            return "4xx", None if ok else f"{status} on a valid request", message
        return f"{status}", f"HTTP {status}", message

    async def _chat(self, text: str, max_tokens: int) -> tuple[str, str | None, str]:
        raw = await self.oa.chat.completions.with_raw_response.create(
            model=self.model, messages=self.messages(text), temperature=0, max_tokens=max_tokens
        )
        reply = raw.parse()
        if not reply.choices or reply.choices[0].message.content is None:
            return "empty", "an answer without content", raw.http_response.text[:200]
        return raw.headers.get("x-cache", "?").lower(), None, ""

    async def _hit(self) -> tuple[str, str | None, str]:
        return await self._chat(self.rng.choice(HOT), 16)

    async def _miss(self) -> tuple[str, str | None, str]:
        return await self._chat(self.distinct(), self.rng.randint(8, 32))

    async def _completion(self) -> tuple[str, str | None, str]:
        text = self.rng.choice(HOT) if self.rng.random() < 0.5 else self.distinct()
        raw = await self.oa.completions.with_raw_response.create(
            model=self.model, prompt=text, temperature=0, max_tokens=16
        )
        reply = raw.parse()
        if not reply.choices or reply.choices[0].text is None:
            return "empty", "an answer without text", raw.http_response.text[:200]
        return raw.headers.get("x-cache", "?").lower(), None, ""

    async def _stream(self) -> tuple[str, str | None, str]:
        text = self.rng.choice(HOT) if self.rng.random() < 0.5 else self.distinct()
        # Read the raw SSE lines, so that a stream cut short (no `data: [DONE]`) is seen as such.
        payload = {
            "model": self.model,
            "messages": self.messages(text),
            "temperature": 0,
            "max_tokens": self.rng.randint(8, 32),
            "stream": True,
        }
        async with self.http.stream("POST", "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                return self._status("stream", r.status_code, r.text[:200])
            done = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line[:20]:
                    return "stream_error", "error in a stream", line[:200]
        if not done:
            return "stream_truncated", "a stream ended without [DONE]", ""
        return "stream", None, ""

    async def _disconnect(self) -> tuple[str, str | None, str]:
        payload = {
            "model": self.model,
            "messages": self.messages(self.distinct()),
            "temperature": 0,
            "max_tokens": 32,
            "stream": True,
        }
        keep = self.rng.randint(1, 2)
        async with self.http.stream("POST", "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                return self._status("disconnect", r.status_code, r.text[:200])
            chunks = 0
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "stream", None, "finished before we left"
                if line.startswith("data: "):
                    chunks += 1
                    if chunks >= keep:
                        break
        # Leaving the block before the body is read closes the connection: a real client disconnect.
        return "disconnect", None, ""

    async def _bad(self) -> tuple[str, str | None, str]:
        name, path, body = self.rng.choice(BAD)
        if isinstance(body, bytes):
            r = await self.http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            body = json.loads(json.dumps(body).replace("{model}", self.model))
            r = await self.http.post(path, json=body)
        if 400 <= r.status_code < 500:
            try:
                error = r.json()["error"]
                if not {"message", "type", "param", "code"} <= set(error):
                    return "4xx", f"{name}: not an OpenAI error object", r.text[:200]
            except (ValueError, KeyError, TypeError):
                return "4xx", f"{name}: not an OpenAI error object", r.text[:200]
            return "4xx", None, ""
        if r.status_code == 503:
            return "503", None, r.text[:200]
        return str(r.status_code), f"bad input ({name}) answered {r.status_code}", r.text[:200]


async def client_loop(clients: Clients, deadline: float, results: list[Result]) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    while time.monotonic() < deadline:
        results.append(await clients.one(clients.rng.choices(kinds, weights)[0]))


async def load(
    base: str, model: str, n_clients: int, duration: float, timeout: float, seed: int
) -> tuple[list[Result], float]:
    clients = Clients(base, model, timeout, random.Random(seed))
    results: list[Result] = []
    start = time.monotonic()
    try:
        await asyncio.gather(*(client_loop(clients, start + duration, results) for _ in range(n_clients)))
    finally:
        await clients.aclose()
    return results, time.monotonic() - start


# --- The service -------------------------------------------------------------------------------------


@contextmanager
def backing(mode: str, env: dict[str, str], data: Path) -> Iterator[str]:
    """Point env at the mode's database and broker; yield the database URL for the invariant checks."""
    if mode == "sqlite":
        yield f"sqlite:///{data / 'mlxq.sqlite'}"
        return
    import psycopg
    import redis

    prefix = f"mlxqsoak{uuid.uuid4().hex[:8]}"
    name = f"mlxq_soak_{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=3)
    client.ping()
    admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    admin.execute(f'CREATE DATABASE "{name}"')
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    env.update(MLXQ_BROKER_URL=REDIS, MLXQ_QUEUE=prefix, MLXQ_REDIS_PREFIX=prefix, MLXQ_DATABASE_URL=db_url)
    try:
        yield db_url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        # kombu also leaves an unprefixed bookkeeping key; drop it when nobody else uses the db.
        if client.dbsize() == 1:
            client.delete("_kombu.binding_deadlines")
        client.close()


def jobs_by_status(db_url: str) -> dict[str, int]:
    from sqlalchemy import create_engine, func, select

    from mlxq.sql import Job

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    finally:
        engine.dispose()


def quiesce(svc: Service, db_url: str, timeout: float) -> tuple[dict[str, int], int | None, float]:
    """Wait until no job is queued or running and the queue is empty; (jobs by status, queue depth, seconds)."""
    started = time.monotonic()
    jobs: dict[str, int] = {}
    depth: int | None = None
    while time.monotonic() - started < timeout:
        jobs = jobs_by_status(db_url)
        try:
            depth = svc.health().get("queue_depth")
        except httpx.HTTPError:
            depth = None
        if not set(jobs) - TERMINAL and depth == 0:
            break
        time.sleep(0.5)
    return jobs, depth, round(time.monotonic() - started, 1)


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_kind[r.kind].append(r.latency)
    failures = Counter(r.failure for r in results if r.failure)
    examples: dict[str, str] = {}
    for r in results:
        if r.failure and r.failure not in examples:
            examples[r.failure] = f"{r.kind}: {r.detail}"
    return {
        "requests": len(results),
        "requests_per_s": round(len(results) / wall, 1),
        "by_kind": dict(Counter(r.kind for r in results)),
        "by_outcome": dict(Counter(r.outcome for r in results)),
        "errors_by_kind": dict(failures),
        "error_examples": examples,
        "latency_ms": {
            kind: {"n": len(v), "p50": round(pct(v, 50) * 1000, 1), "p95": round(pct(v, 95) * 1000, 1)}
            for kind, v in sorted(by_kind.items())
        },
    }


def warm_up(base: str, model: str) -> None:
    """One request before the clock starts: the worker's first forward pass compiles and allocates."""
    with httpx.Client(base_url=base, timeout=120) as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "temperature": 0,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Warm up."}],
            },
        )
        r.raise_for_status()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--model", type=Path, default=ROOT / ".data" / "models" / BUILTIN_MODEL)
    parser.add_argument("--mode", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout, seconds")
    parser.add_argument("--quiesce-s", type=float, default=120.0, help="how long jobs may take to settle after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-every-s", type=float, default=5.0, help="RSS sampling period during the load")
    parser.add_argument("--log-dir", type=Path, help="keep the data dir and logs here, not in a temporary dir")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    model = args.model
    if model == ROOT / ".data" / "models" / BUILTIN_MODEL and not (model / "config.json").exists():
        from worker.pull import pull_builtin

        model = pull_builtin(model)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.log_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data, logs = root / "data", root / "logs"
        logs.mkdir(exist_ok=True)
        env = {"MLXQ_DATA_DIR": str(data), "MLXQ_MODEL": str(model), "MLXQ_MODEL_NAME": BUILTIN_MODEL}
        with backing(args.mode, env, data) as db_url:
            svc = Service(env, logs).start()
            try:
                warm_up(svc.base, BUILTIN_MODEL)
                mem_start = memory(svc)
                print(
                    f"soak: {args.clients} clients for {args.duration:g}s on {svc.base} ({args.mode})",
                    file=sys.stderr,
                    flush=True,
                )
                with MemoryTrace(svc, args.rss_every_s) as trace:
                    results, wall = asyncio.run(
                        load(svc.base, BUILTIN_MODEL, args.clients, args.duration, args.timeout, args.seed)
                    )
                mem_end_load = memory(svc)
                jobs, depth, settle_s = quiesce(svc, db_url, args.quiesce_s)
                mem_end = memory(svc)
                alive = {name: p.poll() is None for name, p in zip(("api", "worker"), svc.procs, strict=True)}
                health = svc.health() if alive["api"] else {}
            except BaseException:
                print(svc.logs(), file=sys.stderr)
                raise
            finally:
                svc.stop()

    summary = {
        "mode": args.mode,
        "clients": args.clients,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        **summarize(results, wall),
    }
    summary["rss_mb"] = {
        "start": mem_start,
        "end_of_load": mem_end_load,
        "end": mem_end,
        "peak": {"api": trace.peak("api"), "worker": trace.peak("worker")},
        "samples": trace.samples,
    }
    summary["jobs_by_status"] = jobs
    summary["queue_depth_after"] = depth
    summary["settle_s"] = settle_s
    summary["processes_alive"] = alive
    summary["cache"] = health.get("cache")
    # The worker's prefix KV cache holds most of what its RSS gains under load: compare the two.
    summary["prefix_cache"] = health.get("prefix_cache")
    failures = [f"{n} requests: {why}" for why, n in summary["errors_by_kind"].items()]
    if set(jobs) - TERMINAL:
        failures.append(
            f"jobs not terminal after {args.quiesce_s:g}s: { {k: v for k, v in jobs.items() if k not in TERMINAL} }"
        )
    if depth != 0:
        failures.append(f"queue depth {depth} after the run")
    if not all(alive.values()):
        failures.append(f"a process died: {alive}")
    summary["failures"] = failures
    print(json.dumps(summary, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
