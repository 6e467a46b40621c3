"""Memory benchmark: the resident memory of the process holding the model under a long-prompt load, mlxq with its
default memory budget and with a small one (MLXQ_MEMORY_GB), beside mlx_lm.server, one server at a time.

Every configuration gets the same float32 copy of the built-in SmolLM2 (what mlxq runs on a CPU; mlx_lm.server with
the system OpenBLAS preloaded, as scripts/bench_routing.py starts it), a fresh data dir, and the same load, all
through the official `openai` client at temperature 0 to /v1/chat/completions:

* Concurrent rounds: `--rounds` rounds of `--concurrency` requests sent at the same moment, each a distinct prompt
  of about `--prompt-tokens` tokens (random words from a seeded RNG, behind a unique tag at the very start, so no
  two share a prefix beyond the chat template's opening), `--max-tokens` each; new prompts every round. Generated
  tokens/s = sum of usage.completion_tokens / the rounds' wall time.
* An agent session: `--agent-turns` turns of one conversation (a ~1,000-token system prompt; each turn appends the
  previous answer and a short user message). For the turns after the first: latency, and prompt tokens served
  from the prefix cache (usage.prompt_tokens_details.cached_tokens; where mlxq's usage lacks it, the delta of
  /health's prefix_cache.tokens_saved, read after a heartbeat; mlx_lm.server: its usage, or null).
* Then 3 s idle, and the final RSS.

Memory: a sampler thread reads, every 0.2 s from when the server is ready (mlxq: its model loaded; mlx_lm.server:
its /health answering, while it may still be loading the model) to the end of the idle, the RSS of the process
holding the model: mlx_lm.server's own process, and for mlxq the largest-RSS member of the `mlxq worker` process
tree (the worker runs the model in its own process, Celery's pool being threads, so that is the worker itself; the
largest member stays right should the model ever move to a child). Linux: VmRSS from /proc/<pid>/status, and VmHWM
(the kernel's peak over the process's life, the model load included) of that process; elsewhere psutil, no VmHWM.
Peak RSS = max(samples, VmHWM). For mlxq, GET /health every 1 s keeps the last `workers[0].memory` block (the
budget as "total" or "budget", allowance, weights, kv_in_flight, prefix_cache, mlx_* and rss byte counts, each
optional) and each key's maximum.

Reported per configuration: peak and final RSS, tokens/s, wall time, agent later-turn median latency and cached
tokens, and for mlxq the budget; then, beside mlx_lm.server in the same run, peak RSS mlxq-default / mlx_lm (target
<= 0.8) and tokens/s mlxq-default / mlx_lm (target >= 0.95), and whether each mlxq configuration's peak stayed
within budget + allowance. MB here are 2**20 bytes. Progress and a markdown table on stderr, one JSON summary on
stdout, and a PNG of RSS over time per configuration, a dashed line at each mlxq budget (+ allowance) when known.

    .venv/bin/python scripts/bench_memory.py [--configs default,small,mlx_lm] [--small-gb 2.0] [--concurrency 8] \
        [--prompt-tokens 1200] [--max-tokens 32] [--rounds 2] [--agent-turns 4] [--plot bench_memory.png] \
        [--log-dir DIR] [--port 0]

The defaults take about 4 minutes per configuration on a 2-core CPU; a smoke run:

    .venv/bin/python scripts/bench_memory.py --configs mlx_lm,default --concurrency 2 --prompt-tokens 300 \
        --rounds 1 --agent-turns 2 --max-tokens 8
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import ms, start_mlx_lm, stop_process  # noqa: E402
from bench_agent import USERS, builtin_f32  # noqa: E402
from bench_concurrency import process_tree  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

MB = 2**20
SAMPLE_S = 0.2
HEALTH_S = 1.0
IDLE_S = 3.0
HEARTBEAT_WAIT_S = 2.5  # the worker publishes its stats every 2 s (MLXQ_HEARTBEAT_S)
TARGET_RSS_RATIO = 0.8  # peak RSS mlxq-default / mlx_lm.server, at most
TARGET_TOKS_RATIO = 0.95  # tokens/s mlxq-default / mlx_lm.server, at least
# Sent to mlxq so its response cache neither answers nor stores; mlx_lm.server ignores it.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
CONFIGS = ("default", "small", "mlx_lm")
# Common words that the SmolLM2 tokenizer encodes as one token each (with their leading space).
WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education river garden window bridge market "
    "winter summer forest island village letter paper music color light stone field road table"
).split()


def say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def mb(value: float | None) -> float | None:
    return round(value / MB, 1) if value is not None else None


# --- Prompts -----------------------------------------------------------------------------------


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def load_prompts(seed: int, rounds: int, concurrency: int, tokens: int) -> list[list[str]]:
    """Per round, `concurrency` distinct prompts of about `tokens` tokens, each opening with its own tag."""
    rng = random.Random(seed)
    return [
        [
            f"[load r{r} #{i:02d} s{seed}] Summarise these notes in one short paragraph:\n{words(rng, tokens)}"
            for i in range(concurrency)
        ]
        for r in range(rounds)
    ]


def agent_system_prompt(seed: int, tokens: int = 1000) -> str:
    rng = random.Random(seed + 1)
    return f"[agent s{seed}] You are a concise assistant. Background notes for the whole session:\n{words(rng, tokens)}"


# --- Memory sampling ---------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of one process in bytes (Linux), empty when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def tree_memory(root: int) -> tuple[int, int | None] | None:
    """(RSS, VmHWM or None) of the largest-RSS process among `root` and its descendants; None when all are gone."""
    if sys.platform.startswith("linux"):
        members = [proc_status(pid) for pid in process_tree([root])]
        best = max((m for m in members if "VmRSS" in m), key=lambda m: m["VmRSS"], default=None)
        return (best["VmRSS"], best.get("VmHWM")) if best else None
    import psutil

    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return None
    sizes = []
    for proc in procs:
        try:
            sizes.append(proc.memory_info().rss)
        except psutil.Error:
            continue
    return (max(sizes), None) if sizes else None


@dataclass
class Sampler:
    """RSS of the model's process every SAMPLE_S seconds: (s since start, bytes), and the largest VmHWM seen."""

    root: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    hwm: int | None = None
    phases: dict[str, float] = field(default_factory=dict)  # when each part of the load began (s since start)
    began: float = field(default_factory=time.perf_counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.read()
            self._stop.wait(SAMPLE_S)

    def read(self) -> int | None:
        reading = tree_memory(self.root)
        if reading is None:
            return None
        rss, hwm = reading
        self.samples.append((time.perf_counter() - self.began, rss))
        if hwm is not None:
            self.hwm = max(self.hwm or 0, hwm)
        return rss

    def mark(self, phase: str) -> None:
        self.phases[phase] = round(time.perf_counter() - self.began, 2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak_sampled(self) -> int | None:
        return max((rss for _, rss in self.samples), default=None)

    @property
    def peak(self) -> int | None:
        values = [v for v in (self.peak_sampled, self.hwm) if v is not None]
        return max(values, default=None)


@dataclass
class HealthPoller:
    """GET /health every HEALTH_S seconds: the last `workers[0].memory` block and each numeric key's maximum."""

    base: str
    last: dict[str, Any] | None = None
    maxima: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> HealthPoller:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        with httpx.Client(base_url=self.base, timeout=5) as http:
            while not self._stop.is_set():
                try:
                    self.record(http.get("/health").json())
                except (httpx.HTTPError, ValueError):
                    pass
                self._stop.wait(HEALTH_S)

    def record(self, health: dict[str, Any]) -> None:
        self.polls += 1
        workers = health.get("workers") or []
        memory = workers[0].get("memory") if workers else None
        if not isinstance(memory, dict):
            return
        self.last = memory
        for key, value in memory.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.maxima[key] = max(self.maxima.get(key, value), value)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# --- Servers -----------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: its base URL, the model id it expects, the pid holding the model, and mlxq or not."""

    name: str
    base: str
    model: str
    pid: int
    mlxq: bool


@contextmanager
def mlxq_server(name: str, env: dict[str, str], run_dir: Path, port: int) -> Iterator[Target]:
    """The api and one worker (embedded SQLite) on a fresh data dir under `run_dir`; MLXQ_MEMORY_GB only if in `env`."""
    data = run_dir / "data"
    shutil.rmtree(data, ignore_errors=True)  # fresh: nothing cached from an earlier run in the same --log-dir
    svc = Service({"MLXQ_DATA_DIR": str(data), "MLXQ_CACHE_SAMPLED": "false", **env}, run_dir)
    if "MLXQ_MEMORY_GB" not in env:
        svc.env.pop("MLXQ_MEMORY_GB", None)  # the default budget, whatever this shell exports
    if port:
        svc.port, svc.base = port, f"http://127.0.0.1:{port}"
    svc.start()
    try:
        worker = next(p for p in svc.procs if "worker" in list(p.args))  # type: ignore[arg-type]
        yield Target(name, svc.base, BUILTIN_MODEL, worker.pid, mlxq=True)
    except BaseException:
        say(f"service logs:\n{svc.logs()}")
        raise
    finally:
        svc.stop()


@contextmanager
def mlx_lm_server(model_dir: Path, run_dir: Path, port: int, max_tokens: int) -> Iterator[Target]:
    """`python -m mlx_lm.server` as scripts/bench.py starts it (system OpenBLAS preloaded on Linux), on `port` (or a
    free one)."""
    log_path = run_dir / "mlx_lm.log"
    proc, base = start_mlx_lm(model_dir, log_path, max_tokens, port=port)
    try:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        yield Target("mlx_lm", base, str(model_dir), proc.pid, mlxq=False)
    finally:
        stop_process(proc)


# --- Load --------------------------------------------------------------------------------------


@dataclass
class Round:
    wall_s: float
    completion_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def chat(client: openai.OpenAI, target: Target, messages: list[dict[str, str]], max_tokens: int) -> Any:
    return client.chat.completions.create(
        model=target.model,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=max_tokens,
        extra_headers=NO_CACHE,
    )


def concurrent_round(client: openai.OpenAI, target: Target, prompts: list[str], max_tokens: int) -> Round:
    """All prompts sent at the same moment, one thread each; wall time until the last answer."""
    result = Round(0.0)
    lock = threading.Lock()
    gate = threading.Barrier(len(prompts) + 1)

    def one(content: str) -> None:
        gate.wait()
        try:
            reply = chat(client, target, [{"role": "user", "content": content}], max_tokens)
        except openai.APIError as exc:
            with lock:
                result.errors.append(f"{type(exc).__name__}: {exc}")
            return
        with lock:
            if reply.usage:
                result.completion_tokens.append(reply.usage.completion_tokens)
                result.prompt_tokens.append(reply.usage.prompt_tokens)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - start
    return result


def tokens_saved(base: str) -> int | None:
    try:
        return int(httpx.get(f"{base}/health", timeout=5).json()["prefix_cache"]["tokens_saved"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def agent_session(client: openai.OpenAI, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """One conversation, turn by turn: each turn's latency (s), prompt tokens, and cached prompt tokens."""
    history = [{"role": "system", "content": agent_system_prompt(args.seed)}]
    turns: list[dict[str, Any]] = []
    saved = None
    if target.mlxq:
        time.sleep(HEARTBEAT_WAIT_S)  # the rounds' prefix stats published before the session's baseline
        saved = tokens_saved(target.base)
    for turn in range(args.agent_turns):
        history.append({"role": "user", "content": USERS[turn % len(USERS)]})
        start = time.perf_counter()
        reply = chat(client, target, history, args.max_tokens)
        latency = time.perf_counter() - start
        details = reply.usage.prompt_tokens_details if reply.usage else None
        cached = details.cached_tokens if details else None
        source = "usage" if cached is not None else None
        if target.mlxq and cached is None and saved is not None:
            time.sleep(HEARTBEAT_WAIT_S)  # /health's prefix_cache is the worker's last heartbeat
            now = tokens_saved(target.base)
            cached, source, saved = (now - saved, "health", now) if now is not None else (None, None, saved)
        elif target.mlxq and saved is not None:
            saved += cached or 0
        turns.append(
            {
                "latency_s": latency,
                "prompt_tokens": reply.usage.prompt_tokens if reply.usage else None,
                "cached_tokens": cached,
                "cached_source": source,
            }
        )
        history.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    return summarise_agent(turns)


def summarise_agent(turns: list[dict[str, Any]]) -> dict[str, Any]:
    later = turns[1:]
    latencies = [t["latency_s"] for t in later]
    cached = [t["cached_tokens"] for t in later]
    prompt = [t["prompt_tokens"] for t in later]
    known = [(c, p) for c, p in zip(cached, prompt, strict=True) if c is not None and p]
    return {
        "turn_latency_ms": [ms(t["latency_s"]) for t in turns],
        "turn_prompt_tokens": [t["prompt_tokens"] for t in turns],
        "later_median_latency_ms": ms(statistics.median(latencies)) if latencies else None,
        "later_cached_tokens": cached,
        "later_cached_share": round(sum(c for c, _ in known) / sum(p for _, p in known), 3) if known else None,
        "cached_source": sorted({t["cached_source"] for t in later if t["cached_source"]}) or None,
    }


# --- One configuration -------------------------------------------------------------------------


@contextmanager
def server_for(name: str, model_dir: Path, run_dir: Path, args: argparse.Namespace) -> Iterator[Target]:
    if name == "mlx_lm":
        with mlx_lm_server(model_dir, run_dir, args.port, args.max_tokens) as target:
            yield target
        return
    env = {"MLXQ_MODEL": str(model_dir), "MLXQ_MODEL_NAME": BUILTIN_MODEL}
    if name == "small":
        env["MLXQ_MEMORY_GB"] = f"{args.small_gb:g}"
    with mlxq_server(name, env, run_dir, args.port) as target:
        yield target


def run_config(name: str, model_dir: Path, run_dir: Path, prompts: list[list[str]], args: argparse.Namespace) -> dict:
    """Start the server, sample its memory through the load and an idle, stop it; the configuration's numbers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"[{name}] starting the server")
    began = time.perf_counter()
    with server_for(name, model_dir, run_dir, args) as target:
        sampler = Sampler(target.pid).start()
        poller = HealthPoller(target.base).start() if target.mlxq else None
        try:
            client = openai.OpenAI(base_url=f"{target.base}/v1", api_key="unused", timeout=args.timeout, max_retries=0)
            chat(client, target, [{"role": "user", "content": "[warm-up] Say hello."}], 4)
            rounds = []
            sampler.mark("rounds")
            for r, round_prompts in enumerate(prompts):
                result = concurrent_round(client, target, round_prompts, args.max_tokens)
                rss = mb(sampler.samples[-1][1]) if sampler.samples else None
                say(
                    f"[{name}] round {r}: {result.wall_s:.1f} s, {sum(result.completion_tokens)} tokens, "
                    f"{len(result.errors)} errors, RSS {rss} MB"
                )
                rounds.append(result)
            sampler.mark("agent")
            agent = agent_session(client, target, args)
            say(f"[{name}] agent: latency {agent['turn_latency_ms']} ms, cached {agent['later_cached_tokens']}")
            sampler.mark("idle")
            time.sleep(IDLE_S)
            final = sampler.read()
        finally:
            sampler.stop()
            if poller:
                poller.stop()
    row = summarise_config(target, rounds, agent, sampler, poller, final)
    row["wall_s"] = round(time.perf_counter() - began, 1)
    say(f"[{name}] peak RSS {row['peak_rss_mb']} MB, final {row['final_rss_mb']} MB, {row['tok_s']} tok/s")
    return row


def summarise_config(
    target: Target,
    rounds: list[Round],
    agent: dict[str, Any],
    sampler: Sampler,
    poller: HealthPoller | None,
    final: int | None,
) -> dict[str, Any]:
    wall = sum(r.wall_s for r in rounds)
    tokens = sum(sum(r.completion_tokens) for r in rounds)
    prompt = [t for r in rounds for t in r.prompt_tokens]
    memory = poller.last if poller else None
    budget = (memory or {}).get("budget", (memory or {}).get("total"))  # the worker names its budget "total"
    limit = budget + ((memory or {}).get("allowance") or 0) if isinstance(budget, int | float) else None
    return {
        "server": "mlxq" if target.mlxq else "mlx_lm.server",
        "rss_of": "largest-RSS process of the mlxq worker's tree" if target.mlxq else "the mlx_lm.server process",
        "peak_rss_mb": mb(sampler.peak),
        "peak_rss_sampled_mb": mb(sampler.peak_sampled),
        "vm_hwm_mb": mb(sampler.hwm),
        "final_rss_mb": mb(final),
        "rss_samples": len(sampler.samples),
        "phases_s": sampler.phases,
        "rss_series": [(round(t, 2), mb(v)) for t, v in sampler.samples],
        "tok_s": round(tokens / wall, 1) if wall else None,
        "rounds_wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "prompt_tokens_mean": round(statistics.mean(prompt)) if prompt else None,
        "errors": sum(len(r.errors) for r in rounds),
        "error_samples": [e for r in rounds for e in r.errors][:3],
        "agent": agent,
        "health_memory": memory,
        "health_memory_max": poller.maxima if poller else None,
        "health_polls": poller.polls if poller else None,
        "budget_mb": mb(budget) if isinstance(budget, int | float) else None,
        "limit_mb": mb(limit),
        "within_budget": (sampler.peak <= limit) if limit is not None and sampler.peak is not None else None,
        "within_budget_during_load": (sampler.peak_sampled <= limit)
        if limit is not None and sampler.peak_sampled is not None
        else None,
    }


# --- Report ------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def comparisons(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mine, ref = rows.get("default"), rows.get("mlx_lm")
    rss = ratio(mine["peak_rss_mb"], ref["peak_rss_mb"]) if mine and ref else None
    toks = ratio(mine["tok_s"], ref["tok_s"]) if mine and ref else None
    return {
        "peak_rss_default_over_mlx_lm": {
            "target": f"<= {TARGET_RSS_RATIO:g}",
            "value": rss,
            "met": rss is not None and rss <= TARGET_RSS_RATIO,
        },
        "tok_s_default_over_mlx_lm": {
            "target": f">= {TARGET_TOKS_RATIO:g}",
            "value": toks,
            "met": toks is not None and toks >= TARGET_TOKS_RATIO,
        },
        "within_budget": {name: row["within_budget"] for name, row in rows.items() if row["server"] == "mlxq"},
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = [
        "config",
        "peak RSS MB",
        "VmHWM MB",
        "final RSS MB",
        "tok/s",
        "rounds s",
        "agent later ms",
        "agent cached",
        "budget (+allow.) MB",
        "within",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [
            name,
            row["peak_rss_mb"],
            row["vm_hwm_mb"],
            row["final_rss_mb"],
            row["tok_s"],
            row["rounds_wall_s"],
            row["agent"]["later_median_latency_ms"],
            row["agent"]["later_cached_tokens"],
            f"{row['budget_mb']} ({row['limit_mb']})" if row["budget_mb"] is not None else None,
            row["within_budget"],
        ]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    """RSS over time per configuration (s since its server was ready: the model load itself shows only in VmHWM
    for mlxq), a dashed line at each known mlxq limit, dotted ones where each part of the load began."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (name, row) in enumerate(rows.items()):
        color = f"C{i}"
        series = row["rss_series"]
        ax.plot([t for t, _ in series], [v for _, v in series], color=color, lw=1.5, label=f"{name} RSS")
        if row["limit_mb"] is not None:
            ax.axhline(row["limit_mb"], color=color, ls="--", lw=1, label=f"{name} budget + allowance")
        for phase, t in row["phases_s"].items():
            ax.axvline(t, color=color, ls=":", lw=0.8, alpha=0.6)
            ax.annotate(phase, (t, 0), xytext=(2, 4 + 10 * i), textcoords="offset points", fontsize=7, color=color)
    ax.set_xlabel("seconds since the server was ready (dotted: where the rounds, the agent session, the idle begin)")
    ax.set_ylabel("RSS of the model's process (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"{BUILTIN_MODEL}: {args.rounds} x {args.concurrency} concurrent ~{args.prompt_tokens}-token prompts, "
        f"then {args.agent_turns} agent turns",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    say(f"plot saved to {out}")


# --- Main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of: default, small, mlx_lm (in order)")
    parser.add_argument("--small-gb", type=float, default=2.0, help="MLXQ_MEMORY_GB of the `small` configuration")
    parser.add_argument("--concurrency", type=int, default=8, help="requests sent at once per round")
    parser.add_argument("--prompt-tokens", type=int, default=1200, help="about this many tokens per prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="concurrent rounds, new prompts each")
    parser.add_argument("--agent-turns", type=int, default=4, help="turns of the agent session after the rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts' random words")
    parser.add_argument("--plot", default="bench_memory.png", help="PNG of RSS over time")
    parser.add_argument("--port", type=int, default=0, help="port of the server under test (0: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    parser.add_argument("--log-dir", help="keep the servers' logs and data here instead of a temporary directory")
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    return args


def main() -> None:
    args = parse_args()
    model_dir = builtin_f32()
    prompts = load_prompts(args.seed, args.rounds, args.concurrency, args.prompt_tokens)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(args.log_dir or tmp)
        for name in args.configs.split(","):
            rows[name] = run_config(name, model_dir, base_dir / name, prompts, args)
    plot(rows, Path(args.plot), args)
    say("\n" + table(rows))
    compared = comparisons(rows)
    say(
        f"peak RSS default / mlx_lm {compared['peak_rss_default_over_mlx_lm']['value']} (target <= "
        f"{TARGET_RSS_RATIO:g}); tok/s default / mlx_lm {compared['tok_s_default_over_mlx_lm']['value']} "
        f"(target >= {TARGET_TOKS_RATIO:g}); within budget {compared['within_budget']}"
    )
    for row in rows.values():
        row.pop("rss_series")  # in the plot; too long for the summary line
    print(
        json.dumps(
            {
                "bench": "memory",
                "model": BUILTIN_MODEL,
                "concurrency": args.concurrency,
                "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens,
                "rounds": args.rounds,
                "agent_turns": args.agent_turns,
                "small_gb": args.small_gb,
                "configs": rows,
                "targets": compared,
                "plot": str(args.plot),
            }
        )
    )


if __name__ == "__main__":
    main()
