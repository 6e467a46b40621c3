"""Concurrency benchmark: mlxq beside mlx_lm.server under N simultaneous clients, plus idle cost.

What it measures, one server running at a time:

* Throughput under concurrency. Both servers are up and take turns round by round (the order flipping
  each repeat), so drift in a shared machine's load hits both alike. For each client count N
  (default 1, 4, 8, 16), N threads each send
  one distinct, non-streamed chat request at the same moment (temperature 0, max_tokens 64, a
  prompt asking for a long essay so generation runs the full budget). Recorded: wall time for the
  N requests, generated tokens/s (sum of usage.completion_tokens / wall), and p50/p99 per-request
  latency. mlxq runs on its embedded default (SQLite database and broker), then mlx_lm.server.
  Both get the same float32 copy of the built-in SmolLM2 and the same system OpenBLAS.
* Idle CPU (% of one core) of the server processes and their children over `--idle-s` seconds,
  for mlxq embedded, mlxq on Redis (+ PostgreSQL when reachable) and mlx_lm.server.
* Queue pickup latency for each mlxq deployment: the job row's `started_at - created_at` over a
  few sequential 1-token requests.

Prints a table with the tok/s ratio mlxq / mlx_lm.server beside its targets and saves a PNG plot
of tokens/s against clients.

    .venv/bin/python scripts/bench_concurrency.py [--clients 1,4,8,16] [--max-tokens 64] \
        [--out bench_concurrency.png] [--idle-s 30] [--repeat 1] [--log-dir DIR] [--skip-baseline] [--quick]

`--quick` is a smoke run (clients 1,2, 16 tokens, 5 s idle, 5 pickup requests); `--repeat 3` keeps
the median of three rounds per client count, since one round at 1 client is noisy on a small CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import PG_ADMIN, ms, pct, running_mlx_lm  # noqa: E402
from bench_agent import builtin_f32  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

# A spare Redis db, away from bench.py's 9; keys get a unique prefix and are removed afterwards.
REDIS = "redis://127.0.0.1:6379/14"
# Sent to mlxq so its response cache neither answers nor stores; mlx_lm.server ignores it.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
TOPICS = [
    "the history of the printing press",
    "how volcanoes form",
    "the water cycle",
    "the Roman Empire",
    "how airplanes fly",
    "the life of honeybees",
    "the invention of the telephone",
    "how computers store data",
    "the French Revolution",
    "the solar system",
    "how vaccines work",
    "the history of chess",
    "ocean currents",
    "the Industrial Revolution",
    "how bridges are built",
    "the migration of birds",
    "the history of money",
    "how rain forests grow",
    "the Silk Road",
    "how the human heart works",
]
# Targets for tok/s ratio mlxq / mlx_lm.server, by client count.
TARGETS = {1: 0.95, 8: 1.0, 16: 1.0}


@dataclass
class Server:
    """One server under test: where to send requests, the model id it expects, its process ids."""

    name: str
    base: str
    model: str
    pids: Callable[[], list[int]]


@dataclass
class Round:
    """N concurrent requests: per-request latencies and completion tokens, and the wall time."""

    clients: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return sum(self.tokens) / self.wall_s

    def row(self) -> list[str]:
        if not self.latencies:
            return ["-"] * 4
        return [
            f"{self.wall_s:.2f}",
            f"{self.tok_s:.1f}",
            f"{ms(pct(self.latencies, 50)):.0f}",
            f"{ms(pct(self.latencies, 99)):.0f}",
        ]


def essay_prompt(tag: str, index: int) -> str:
    # The tag makes every request of every round distinct, so neither mlxq's response cache nor either
    # server's prefix cache can reuse another request's work beyond the shared chat-template opening.
    return (
        f"[{tag}] Write a long, detailed essay about {TOPICS[index % len(TOPICS)]}. Cover its history, "
        f"how it works today and why it matters, with many examples."
    )


def chat(http: httpx.Client, server: Server, content: str, max_tokens: int) -> httpx.Response:
    payload = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    return http.post(f"{server.base}/v1/chat/completions", json=payload, headers=NO_CACHE)


def load_round(server: Server, clients: int, max_tokens: int, tag: str, timeout: float) -> Round:
    """N threads, each with its own connection, released together by a barrier; one request each."""
    barrier = threading.Barrier(clients + 1)

    def one(index: int) -> tuple[float, int, str | None]:
        with httpx.Client(timeout=timeout) as http:
            barrier.wait()
            t = time.perf_counter()
            try:
                r = chat(http, server, essay_prompt(tag, index), max_tokens)
            except httpx.HTTPError as exc:
                return time.perf_counter() - t, 0, f"{type(exc).__name__}: {exc}"
            latency = time.perf_counter() - t
            if r.status_code != 200:
                return latency, 0, f"HTTP {r.status_code}: {r.text[:300]}"
            return latency, r.json()["usage"]["completion_tokens"], None

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        barrier.wait()
        start = time.perf_counter()
        outcomes = [f.result() for f in futures]
        wall = time.perf_counter() - start
    result = Round(clients, wall)
    for latency, tokens, error in outcomes:
        if error:
            result.errors.append(error)
        else:
            result.latencies.append(latency)
            result.tokens.append(tokens)
    return result


def warm_up(server: Server, max_tokens: int, clients: int, timeout: float) -> None:
    """One request, then one small concurrent round: loads weights, compiles kernels, fills thread pools."""
    with httpx.Client(timeout=timeout) as http:
        r = chat(http, server, essay_prompt("warm-up", 0), max_tokens)
        r.raise_for_status()
    warm = load_round(server, clients, max_tokens, "warm-up-concurrent", timeout)
    if warm.errors:
        raise RuntimeError(f"{server.name} warm-up failed: {warm.errors[0]}")


def run_rounds(servers: list[Server], args: argparse.Namespace) -> dict[str, dict[int, Round]]:
    """Each client count `--repeat` times on every server, the servers taking turns round by round (the
    order flipping each time), so drift in the machine's load hits both alike; the round with the median
    tokens/s stands for each (one round is noisy)."""
    tries: dict[str, dict[int, list[Round]]] = {s.name: {} for s in servers}
    for n in args.client_counts:
        for attempt in range(args.repeat):
            for server in servers if attempt % 2 == 0 else servers[::-1]:
                time.sleep(1)  # let the previous round's BLAS threads stop spinning
                r = load_round(server, n, args.max_tokens, f"{uuid.uuid4().hex[:6]}-c{n}-{attempt}", args.timeout)
                tries[server.name].setdefault(n, []).append(r)
                short = sum(t < args.max_tokens for t in r.tokens)
                print(
                    f"  {server.name} c={n}: wall {r.wall_s:.2f}s, {r.tok_s:.1f} tok/s, {sum(r.tokens)} tokens"
                    f"{f', {short} stopped early' if short else ''}{f', {len(r.errors)} errors' if r.errors else ''}",
                    flush=True,
                )
                for error in r.errors[:3]:
                    print(f"    error: {error}", flush=True)
    return {
        name: {n: sorted(rs, key=lambda r: r.tok_s)[len(rs) // 2] for n, rs in by_n.items()}
        for name, by_n in tries.items()
    }


# --- CPU accounting from /proc -----------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(roots: list[int]) -> list[int]:
    """The roots and all their live descendants (celery pool processes, uvicorn workers, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(roots: list[int]) -> dict[int, int]:
    """utime + stime per process of the tree, in clock ticks."""
    ticks = {}
    for pid in process_tree(roots):
        if fields := stat_fields(pid):
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def idle_cpu(server: Server, seconds: float) -> float:
    """% of one core the server's processes burn while nobody sends anything."""
    time.sleep(3)  # BLAS threads spin for a while after the last work; that is not idle cost
    before = cpu_ticks(server.pids())
    time.sleep(seconds)
    after = cpu_ticks(server.pids())
    # A process born during the window counts from zero; one that died is lost (rare at idle).
    used = sum(t - before.get(pid, 0) for pid, t in after.items())
    return round(100 * used / CLK_TCK / seconds, 2)


# --- Queue pickup latency ----------------------------------------------------------------------


def pickup_latency(server: Server, db_url: str, requests: int) -> tuple[float, float]:
    """Median and p90 (ms) of enqueue -> worker start over sequential 1-token requests, from the jobs table."""
    import random

    from sqlalchemy import bindparam, create_engine, text

    job_ids = []
    with httpx.Client(timeout=120) as http:
        for i in range(requests):
            # A jittered gap so the worker is idle and requests do not line up with any poll period.
            time.sleep(random.uniform(0.1, 0.5))
            r = chat(http, server, f"[pickup-{uuid.uuid4().hex[:8]}-{i}] Say hello.", 1)
            r.raise_for_status()
            job_ids.append(r.headers["x-job-id"])
    sql = create_engine(db_url)
    query = text("SELECT created_at, started_at FROM jobs WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    with sql.connect() as conn:
        rows = conn.execute(query, {"ids": job_ids}).all()
    sql.dispose()
    waits = [started - created for created, started in rows if started is not None]
    return ms(statistics.median(waits)), ms(pct(waits, 90))


# --- Servers -----------------------------------------------------------------------------------


def service_pids(svc: Service) -> Callable[[], list[int]]:
    return lambda: [p.pid for p in svc.procs]


@contextmanager
def redis_postgres(env: dict[str, str]) -> Iterator[str | None]:
    """Point env at Redis (db 14, unique queue/prefix) and a fresh PostgreSQL db; yield the db URL.

    Yields None when Redis is unreachable. Without PostgreSQL the deployment keeps SQLite.
    """
    import redis

    client = redis.Redis.from_url(REDIS, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"Redis at {REDIS} unreachable ({exc}); skipping the Redis deployment")
        yield None
        return
    prefix = f"mlxqbenchc{uuid.uuid4().hex[:8]}"
    env.update(MLXQ_BROKER_URL=REDIS, MLXQ_QUEUE=prefix, MLXQ_REDIS_PREFIX=prefix)
    admin, name = None, f"mlxq_benchc_{uuid.uuid4().hex[:8]}"
    try:
        import psycopg

        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
        admin.execute(f'CREATE DATABASE "{name}"')
        env["MLXQ_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    except Exception as exc:  # any failure means: keep SQLite
        print(f"PostgreSQL unreachable ({exc}); the Redis deployment keeps SQLite")
        admin = None
    try:
        yield env.get("MLXQ_DATABASE_URL")
    finally:
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        # kombu also leaves an unprefixed pidbox bookkeeping key; drop it when nobody else uses the db.
        if client.dbsize() == 1:
            client.delete("_kombu.binding_deadlines")
        client.close()


@contextmanager
def mlxq_server(mode: str, model_dir: Path, tmp: Path) -> Iterator[tuple[Server, str] | None]:
    """mlxq's api + worker processes for `mode` (embedded | redis); yields (server, database URL), or None
    when the Redis deployment cannot run here."""
    data = tmp / f"mlxq-{mode}"
    env = {"MLXQ_DATA_DIR": str(data), "MLXQ_MODEL": str(model_dir), "MLXQ_MODEL_NAME": BUILTIN_MODEL}
    backing = redis_postgres(env) if mode == "redis" else nullcontext(None)
    with backing as db_url:
        if mode == "redis" and "MLXQ_BROKER_URL" not in env:
            yield None
            return
        log_dir = tmp / f"logs-{mode}"
        log_dir.mkdir()
        svc = Service(env, log_dir).start()
        server = Server(f"mlxq-{mode}", svc.base, BUILTIN_MODEL, service_pids(svc))
        try:
            yield server, db_url or f"sqlite:///{data / 'mlxq.sqlite'}"
        except BaseException:
            print(f"{server.name} logs:\n{svc.logs()}", file=sys.stderr)
            raise
        finally:
            svc.stop()


@contextmanager
def mlx_lm_server(model_dir: Path, tmp: Path, max_tokens: int) -> Iterator[Server]:
    with running_mlx_lm(model_dir, tmp / "mlx_lm.log", max_tokens) as (proc, base):
        yield Server("mlx_lm.server", base, str(model_dir), lambda: [proc.pid])


# --- Report ------------------------------------------------------------------------------------


def print_table(ours: dict[int, Round], theirs: dict[int, Round]) -> None:
    head = [
        "clients",
        "mlxq wall s",
        "tok/s",
        "p50 ms",
        "p99 ms",
        "mlx_lm wall s",
        "tok/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "target",
    ]
    rows = [head]
    for n, r in ours.items():
        other = theirs.get(n)
        ratio, target = "-", ""
        if other and other.tok_s and r.tokens:
            value = r.tok_s / other.tok_s
            ratio = f"{value:.2f}x"
            if n in TARGETS:
                target = f">= {TARGETS[n]:.2f}x {'ok' if value >= TARGETS[n] else 'MISS'}"
        rows.append([str(n), *r.row(), *(other.row() if other else ["-"] * 4), ratio, target])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        # Numbers right-aligned, the target note (last column) left-aligned.
        cells = [cell.rjust(w) for cell, w in zip(row[:-1], widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def plot(out: Path, results: dict[str, dict[int, Round]], max_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rounds in results.items():
        ax.plot(list(rounds), [r.tok_s for r in rounds.values()], marker="o", label=name)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{BUILTIN_MODEL} float32, max_tokens {max_tokens}, temperature 0")
    ax.set_xticks(list(next(iter(results.values()))))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot saved to {out}")


# --- Main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench_concurrency.png", help="PNG plot of tokens/s vs clients")
    parser.add_argument("--idle-s", type=float, default=30.0, help="seconds of idle CPU sampling per server")
    parser.add_argument("--pickup-requests", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="rounds per client count; the median one is kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    parser.add_argument("--log-dir", help="keep server logs and data here instead of a temporary directory")
    parser.add_argument("--skip-baseline", action="store_true", help="run mlxq only, not mlx_lm.server")
    parser.add_argument("--quick", action="store_true", help="smoke run: clients 1,2, 16 tokens, short idle")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.max_tokens, args.idle_s, args.pickup_requests = "1,2", 16, 5.0, 5
    args.client_counts = [int(c) for c in args.clients.split(",")]
    return args


def main() -> None:
    args = parse_args()
    model_dir = builtin_f32()
    warm_clients = min(4, max(args.client_counts))
    results: dict[str, dict[int, Round]] = {}
    idle: dict[str, float] = {}
    pickup: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(args.log_dir or tmp)
        tmp_path.mkdir(parents=True, exist_ok=True)
        with mlxq_server("redis", model_dir, tmp_path) as started:
            if started is not None:
                server, db_url = started
                print(f"{server.name}: warming up", flush=True)
                warm_up(server, args.max_tokens, warm_clients, args.timeout)
                idle[server.name] = idle_cpu(server, args.idle_s)
                pickup[server.name] = pickup_latency(server, db_url, args.pickup_requests)
        # The throughput rounds: mlxq embedded and mlx_lm.server both up, taking turns (the idle one costs
        # well under 1 % of a core), so both see the same machine.
        with (
            mlxq_server("embedded", model_dir, tmp_path) as started,
            (
                nullcontext(None) if args.skip_baseline else mlx_lm_server(model_dir, tmp_path, args.max_tokens)
            ) as baseline,
        ):
            assert started is not None
            server, db_url = started
            servers = [server] + ([baseline] if baseline is not None else [])
            for each in servers:
                print(f"{each.name}: warming up", flush=True)
                warm_up(each, args.max_tokens, warm_clients, args.timeout)
                idle[each.name] = idle_cpu(each, args.idle_s)
            pickup[server.name] = pickup_latency(server, db_url, args.pickup_requests)
            rounds = run_rounds(servers, args)
            results["mlxq"] = rounds[server.name]
            if baseline is not None:
                results["mlx_lm.server"] = rounds[baseline.name]

    print(f"\n{BUILTIN_MODEL} float32, max_tokens {args.max_tokens}, temperature 0, one request per client")
    print_table(results["mlxq"], results.get("mlx_lm.server", {}))
    print(f"\nidle CPU over {args.idle_s:g} s (% of one core, processes and children):")
    for name, value in idle.items():
        print(f"  {name:<16} {value:6.2f}%")
    print(f"\nqueue pickup (started_at - created_at), {args.pickup_requests} sequential 1-token requests:")
    for name, (p50, p90) in pickup.items():
        print(f"  {name:<16} median {p50:7.2f} ms   p90 {p90:7.2f} ms")
    plot(Path(args.out), results, args.max_tokens)


if __name__ == "__main__":
    main()
