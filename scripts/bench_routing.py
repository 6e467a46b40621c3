"""Routing benchmark: several workers behind one api, cache-aware routing against delivery by load alone (what a
shared queue does: whichever worker is free takes the job), one worker alone, and mlx_lm.server, side by side in
one run.

The load: eight agent sessions (bench_agent.py's ~1,200-token system prompt with its tool schemas, made distinct
per session at its top) of five turns each, streamed at temperature 0 with max_tokens 24, the eight sessions
running at once (each waits for its own answer before its next turn), so their turns interleave. Measured per
configuration: the later turns' share of prompt tokens served from the prefix cache, their median time to first
token, and the requests each worker took. Then, with cache-aware routing, a third worker joins and every session
sends a sixth turn: the share of sessions that moved. A plot (bench_routing.png) and one JSON line.

    .venv/bin/python scripts/bench_routing.py [--sessions 8] [--turns 5] [--out bench_routing.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import ms, start_mlx_lm  # noqa: E402
from bench_agent import USERS, builtin_f32, system_prompt  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

PROJECTS = ["billing", "search", "auth", "reports", "mobile", "infra", "docs", "ml", "chat", "sync", "cli", "web"]


def streamed_turn(http: httpx.Client, model: str, messages: list[dict]) -> dict[str, Any]:
    """One streamed turn: time to the first content, the answer, prompt and cached tokens, and its job id."""
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t = time.perf_counter()
    first, text, usage, job = None, [], {}, None
    with http.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        job = r.headers.get("x-job-id")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                first = first or time.perf_counter() - t
                text.append(delta["content"])
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft": first if first is not None else time.perf_counter() - t,
        "text": "".join(text),
        "prompt": usage.get("prompt_tokens", 0),
        "cached": details.get("cached_tokens") or 0,
        "job": job,
    }


def worker_of(http: httpx.Client, job: str | None) -> str | None:
    return http.get(f"/v1/jobs/{job}").json()["worker"] if job else None


def run_sessions(base: str, model: str, sessions: int, turns: int, jobs: bool) -> list[list[dict[str, Any]]]:
    """Every session's turns, the sessions at once; each turn with the worker that ran it (mlxq only)."""
    out: list[list[dict[str, Any]]] = [[] for _ in range(sessions)]
    histories = [
        [{"role": "system", "content": f"Project {PROJECTS[i % len(PROJECTS)]} #{i}.\n{system_prompt()}"}]
        for i in range(sessions)
    ]

    def one(i: int) -> None:
        with httpx.Client(base_url=base) as http:
            for turn in range(turns):
                histories[i].append({"role": "user", "content": USERS[turn % len(USERS)]})
                result = streamed_turn(http, model, histories[i])
                result["worker"] = worker_of(http, result["job"]) if jobs else None
                out[i].append(result)
                histories[i].append({"role": "assistant", "content": result["text"]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run_sessions.histories = histories  # type: ignore[attr-defined]
    return out


def summary(results: list[list[dict[str, Any]]]) -> dict[str, Any]:
    later = [t for turns in results for t in turns[1:]]
    per_worker: dict[str, int] = {}
    for turns in results:
        for t in turns:
            if t["worker"]:
                per_worker[t["worker"]] = per_worker.get(t["worker"], 0) + 1
    total = sum(per_worker.values())
    return {
        "later_turns_cached_share": round(sum(t["cached"] for t in later) / max(1, sum(t["prompt"] for t in later)), 3),
        "later_turns_median_ttft_ms": ms(statistics.median(t["ttft"] for t in later)),
        "first_turns_median_ttft_ms": ms(statistics.median(turns[0]["ttft"] for turns in results)),
        "requests_per_worker": per_worker,
        "largest_worker_share": round(max(per_worker.values()) / total, 3) if total else None,
        "sessions_on_one_worker": sum(len({t["worker"] for t in turns}) == 1 for turns in results),
    }


def mlxq_cluster(tmp: Path, name: str, model_dir: Path, workers: list[str], **env: str) -> Service:
    (tmp / name).mkdir()
    svc = Service(
        {
            "MLXQ_DATA_DIR": str(tmp / name / "data"),
            "MLXQ_MODEL": str(model_dir),
            "MLXQ_MODEL_NAME": BUILTIN_MODEL,
            "MLXQ_CACHE_SAMPLED": "false",
            **env,
        },
        tmp / name,
    ).start(worker=False)
    for worker in workers:
        svc.add_worker(worker)
    svc.wait_workers(set(workers), timeout=300)
    return svc


def plot(rows: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (share, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    share.bar(names, [rows[n]["later_turns_cached_share"] for n in names], color="tab:blue")
    share.set_title("later turns: prompt tokens from the prefix cache")
    share.set_ylim(0, 1.05)
    ttft.bar(names, [rows[n]["later_turns_median_ttft_ms"] for n in names], color="tab:orange")
    ttft.set_title("later turns: median time to first token (ms)")
    for axis in (share, ttft):
        axis.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench_routing.png"))
    parser.add_argument(
        "--configs", default="one,load,aware,mlx_lm", help="which of: one, load, aware, mlx_lm (comma-separated)"
    )
    args = parser.parse_args()
    chosen = set(args.configs.split(","))
    model_dir = builtin_f32()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        configs = [
            (name, workers, env)
            for key, name, workers, env in [
                ("one", "one worker", ["w1"], {}),
                ("load", "two, by load", ["w1", "w2"], {"MLXQ_ROUTING": "load"}),
                ("aware", "two, cache-aware", ["w1", "w2"], {}),
            ]
            if key in chosen
        ]
        joined: dict[str, Any] = {}
        for name, workers, env in configs:
            svc = mlxq_cluster(tmp, name.replace(" ", "_").replace(",", ""), model_dir, workers, **env)
            try:
                results = run_sessions(svc.base, BUILTIN_MODEL, args.sessions, args.turns, jobs=True)
                rows[name] = summary(results)
                if name == "two, cache-aware":
                    joined = join_third(svc, results, run_sessions.histories)  # type: ignore[attr-defined]
            finally:
                svc.stop()
        if "mlx_lm" in chosen:
            ref, ref_base = start_mlx_lm(model_dir, tmp / "mlx_lm.log", 24)
            try:
                sessions = run_sessions(ref_base, str(model_dir), args.sessions, args.turns, False)
                rows["mlx_lm.server"] = summary(sessions)
            finally:
                ref.terminate()
                ref.wait(timeout=20)
    one, aware = rows.get("one worker"), rows.get("two, cache-aware")
    plot(rows, Path(args.out))
    print(
        json.dumps(
            {
                "bench": "routing",
                "model": BUILTIN_MODEL,
                "sessions": args.sessions,
                "turns": args.turns,
                "rows": rows,
                "cache_aware_over_one_worker_later_ttft": round(
                    aware["later_turns_median_ttft_ms"] / one["later_turns_median_ttft_ms"], 3
                )
                if one and aware
                else None,
                "third_worker_joins": joined,
                "plot": args.out,
            }
        )
    )


def join_third(svc: Service, results: list[list[dict[str, Any]]], histories: list[list[dict]]) -> dict[str, Any]:
    """A third worker joins; every session sends one more turn: how many moved, and where new sessions go."""
    svc.add_worker("w3")
    svc.wait_workers({"w1", "w2", "w3"}, timeout=300)
    time.sleep(2 * 2.0 + 1)  # two heartbeats: every worker's index is current
    moved = 0
    with httpx.Client(base_url=svc.base) as http:
        for turns, history in zip(results, histories, strict=True):
            turn = streamed_turn(http, BUILTIN_MODEL, [*history, {"role": "user", "content": "Anything else?"}])
            moved += worker_of(http, turn["job"]) != turns[-1]["worker"]
        fresh = [
            worker_of(http, streamed_turn(http, BUILTIN_MODEL, [{"role": "user", "content": f"New task {i}."}])["job"])
            for i in range(len(results))
        ]
    return {
        "sessions_moved_share": round(moved / len(results), 3),
        "new_sessions_on_the_new_worker_share": round(fresh.count("w3") / len(fresh), 3),
    }


if __name__ == "__main__":
    main()
