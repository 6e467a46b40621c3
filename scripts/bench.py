"""Benchmark the spine, side by side in one run; prints one JSON line.

Per deployment (embedded SQLite, and Redis + PostgreSQL when reachable): cold request latency,
cache-hit latency p50/p99 and hits/s with 8 and 32 concurrent clients, queue-hop overhead (a
request through mlxq minus the same generation on the engine called directly, alternated), and
/health latency while a generation runs.

    .venv/bin/python scripts/bench.py [--modes sqlite,redis] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxq.procs import Service, free_port  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402
from mlxq.states import CacheOutcome  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/9"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


def body(content: str, **kw) -> dict:
    return {"model": BUILTIN_MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


async def hit_load(base: str, payload: dict, clients: int, per_client: int) -> dict:
    lat: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as http:

        async def one_client() -> None:
            for _ in range(per_client):
                t = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=payload)
                lat.append(time.perf_counter() - t)
                assert r.headers["x-cache"] == CacheOutcome.HIT, r.text

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99)), "hits_per_s": round(len(lat) / wall, 1)}


def floor(base: str, clients: int) -> dict:
    """The framework's own floor at the same concurrency: GET /v1/models (no SQL, no cache)."""

    async def go() -> dict:
        lat: list[float] = []
        async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=clients)) as http:

            async def one() -> None:
                for _ in range(400 // clients * 2):
                    t = time.perf_counter()
                    await http.get("/v1/models")
                    lat.append(time.perf_counter() - t)

            await asyncio.gather(*(one() for _ in range(clients)))
        return {"p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99))}

    return asyncio.run(go())


def queue_hop(base: str, engine, db_url: str, rounds: int) -> dict:
    """The same short generation through mlxq (uncached) and on the engine directly, alternated.

    Besides the side-by-side ratio, each request is split by its job row: overhead = client
    latency - the worker's own run time (started_at -> finished_at), and pickup = created_at ->
    started_at (enqueue to the worker taking it).
    """
    from sqlalchemy import create_engine, text

    via, direct, keys = [], [], []
    http = httpx.Client(base_url=base, timeout=60)
    for i in range(rounds):
        req = body(f"Say the number {i}.", max_tokens=1)
        time.sleep(0.2)  # let the other side's BLAS threads go idle: they spin a while after work
        t = time.perf_counter()
        r = http.post("/v1/chat/completions", json=req, headers={"Cache-Control": "no-cache"})
        via.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
        keys.append(r.headers["x-request-key"])
        canonical = {"messages": req["messages"], "temperature": 0.0, "max_tokens": 1}
        time.sleep(0.2)
        t = time.perf_counter()
        engine.generate("chat", canonical)
        direct.append(time.perf_counter() - t)
    sql = create_engine(db_url)
    with sql.connect() as conn:
        rows = {
            k: conn.execute(text("SELECT created_at, started_at, finished_at FROM jobs WHERE key = :k"), {"k": k}).one()
            for k in keys
        }
    sql.dispose()
    overhead = [v - (rows[k][2] - rows[k][1]) for v, k in zip(via, keys, strict=True)]
    pickup = [rows[k][1] - rows[k][0] for k in keys]
    return {
        "via_mlxq_p50_ms": ms(statistics.median(via)),
        "engine_direct_p50_ms": ms(statistics.median(direct)),
        "ratio": round(statistics.median(via) / statistics.median(direct), 3),
        "overhead_p50_ms": ms(statistics.median(overhead)),
        "pickup_p50_ms": ms(statistics.median(pickup)),
        "pickup_max_ms": ms(max(pickup)),
    }


def http_ttft(http: httpx.Client, payload: dict, headers: dict | None = None) -> float:
    """Seconds to the first content chunk of a streamed chat request, on a kept-alive connection."""
    t = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=payload, headers=headers or {}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    return time.perf_counter() - t
    return time.perf_counter() - t


def ttft(base: str, engine, rounds: int) -> dict:
    """Time to first token: streamed through mlxq vs the engine's own first delta, alternated."""
    via, direct = [], []
    http = httpx.Client(base_url=base)
    for i in range(rounds):
        req = body(f"Tell me about the number {i}.", max_tokens=8, stream=True)
        time.sleep(0.2)
        via.append(http_ttft(http, req, {"Cache-Control": "no-cache"}))
        time.sleep(0.2)
        first: list[float] = []
        t = time.perf_counter()

        def on_event(event: dict, t0: float = t, first: list[float] = first) -> None:
            if event["type"] == "delta" and event["content"] and not first:
                first.append(time.perf_counter() - t0)

        engine.generate("chat", {"messages": req["messages"], "temperature": 0.0, "max_tokens": 8}, emit=on_event)
        direct.append(first[0])
    return {
        "mlxq_p50_ms": ms(statistics.median(via)),
        "engine_p50_ms": ms(statistics.median(direct)),
        "added_p50_ms": ms(statistics.median(via) - statistics.median(direct)),
        "ratio": round(statistics.median(via) / statistics.median(direct), 3),
    }


def health_during_generation(base: str, model: str = BUILTIN_MODEL) -> dict:
    """/health latency while the server generates 200 tokens."""
    lat: list[float] = []
    done = threading.Event()

    def generate() -> None:
        httpx.post(
            f"{base}/v1/chat/completions",
            timeout=300,
            headers={"Cache-Control": "no-store"},
            json={**body("Write a long story about a dragon.", max_tokens=200), "model": model},
        )
        done.set()

    threading.Thread(target=generate, daemon=True).start()
    time.sleep(0.3)
    with httpx.Client(base_url=base, timeout=10) as http:
        while not done.is_set():
            t = time.perf_counter()
            http.get("/health")
            lat.append(time.perf_counter() - t)
            time.sleep(0.02)
    return {"samples": len(lat), "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99))}


def start_mlx_lm(model_dir: Path, log_path: Path, max_tokens: int, port: int = 0) -> tuple[subprocess.Popen, str]:
    """`mlx_lm.server` on `port` (0: a free one), with the system OpenBLAS preloaded like mlxq's worker, once its
    /health answers or it has exited (callers check `poll()`); (process, base URL)."""
    port = port or free_port()
    env = {**os.environ, "LD_PRELOAD": "libopenblas.so.0"} if sys.platform.startswith("linux") else None
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--max-tokens",
            str(max_tokens),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return proc, base


@contextmanager
def running_mlx_lm(model_dir: Path, log: Path, max_tokens: int) -> Iterator[tuple[subprocess.Popen, str]]:
    """mlx_lm.server started (`start_mlx_lm`), checked alive, and stopped afterwards: (its process, its base URL)."""
    proc, base = start_mlx_lm(model_dir, log, max_tokens)
    try:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        yield proc, base
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_mode(mode: str, model: Path, engine, tmp: Path) -> dict:
    env = {"MLXQ_DATA_DIR": str(tmp / mode), "MLXQ_MODEL": str(model), "MLXQ_MODEL_NAME": BUILTIN_MODEL}
    db_url = f"sqlite:///{tmp / mode / 'mlxq.sqlite'}"
    cleanup = []
    if mode == "redis":
        import psycopg
        import redis

        name = f"mlxq_bench_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        prefix = f"mlxqbench{uuid.uuid4().hex[:6]}"
        db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        env.update(MLXQ_DATABASE_URL=db_url, MLXQ_BROKER_URL=REDIS, MLXQ_QUEUE=prefix, MLXQ_REDIS_PREFIX=prefix)

        def drop() -> None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            client = redis.Redis.from_url(REDIS)
            keys = list(client.scan_iter(match=f"*{prefix}*"))
            if keys:
                client.delete(*keys)

        cleanup.append(drop)
    log_dir = tmp / f"logs-{mode}"
    log_dir.mkdir()
    svc = Service(env, log_dir).start()
    try:
        payload = body("What is the capital of France?", max_tokens=16)
        t = time.perf_counter()
        r = httpx.post(f"{svc.base}/v1/chat/completions", json=payload, timeout=120)
        cold = time.perf_counter() - t
        assert r.headers["x-cache"] == CacheOutcome.MISS and "Paris" in r.text, r.text
        time.sleep(0.2)
        result: dict = {"cold_ms": ms(cold)}
        result["hit_c1"] = asyncio.run(hit_load(svc.base, payload, 1, 300))
        result["floor_c1"] = floor(svc.base, 1)
        for clients in (8, 32):
            asyncio.run(hit_load(svc.base, payload, clients, 10))  # warm-up
            result[f"hit_c{clients}"] = asyncio.run(hit_load(svc.base, payload, clients, 400 // clients * 4))
            result[f"floor_c{clients}"] = floor(svc.base, clients)
        result["queue_hop"] = queue_hop(svc.base, engine, db_url, 15)
        result["ttft"] = ttft(svc.base, engine, 12)
        result["health_during_generation"] = health_during_generation(svc.base)
        return result
    finally:
        svc.stop()
        for fn in cleanup:
            fn()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="sqlite,redis")
    parser.add_argument("--model", default=str(ROOT / ".data" / "models" / BUILTIN_MODEL))
    args = parser.parse_args()
    from worker.blas import preload_openblas

    preload_openblas()
    from worker.engine import Engine
    from worker.pull import pull_builtin

    model = Path(args.model)
    if model.name == BUILTIN_MODEL:
        pull_builtin(model)
    engine = Engine.load(str(model))
    # Same conditions as the worker, which reuses the template's shared opening through its prefix cache.
    engine.enable_prefix_cache(max_entries=16, max_bytes=1 << 30)
    engine.generate("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2})
    out: dict = {"bench": "spine", "model": BUILTIN_MODEL}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            out[mode] = run_mode(mode, model, engine, Path(tmp))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
