"""Preemption within the memory budget (issue 25): interactive requests arriving while low-priority work (batch lines)
fills the batch, in the engine (no api, no queue), on the built-in SmolLM2 as float32 (what mlxq runs on a CPU).

Two configurations, each a fresh engine with the prefix cache on:

* `size`: the batch full by its sequence count (4), its KV share to spare: a parked line keeps its cache;
* `kv`: the batch full by its KV share (MLXQ_BATCH_TOKENS sized so that the 4 lines fill it): a parked line's cache is
  the room the interactive request needs, so it goes into the prefix cache (its own share) and the line resumes from
  there (worker.batcher).

Each: 4 low-priority lines (`--prompt-tokens` distinct words each, `--max-tokens` answers, greedy); once all decode,
`--interactive` short interactive requests, one after another. A thread reads the engine's memory parts every 5 ms:
the largest (kv_in_flight + kv_parked + kv_ahead) / kv_limit seen is what the KV share held at its fullest (at most
1: a parked cache once counted nowhere). Also reported: the interactive requests' median time to first token, the
lines' wall time, preemptions, those whose cache left the KV share (for the prefix cache), and whether every line's answer equals its answer alone.

    .venv/bin/python scripts/bench_preempt.py [--prompt-tokens 600] [--max-tokens 96] [--interactive 4]

Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from worker.blas import preload_openblas  # noqa: E402

preload_openblas()  # before anything imports MLX (bench_agent does)

from bench_agent import builtin_f32  # noqa: E402

from worker.engine import BatchLimits, Engine, wait  # noqa: E402
from worker.memory import KV_STEP  # noqa: E402

LINES = 4


def chat(text: str, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0.0, "max_tokens": max_tokens}


class Drops(logging.Handler):
    """Counts the parked sequences whose cache left the KV share (parked without it, or let go later)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.count += "(0 tokens kept)" in message or "dropped a parked sequence's cache" in message


def run(model: Path, config: str, lines: list[dict[str, Any]], alone: list[str], args: argparse.Namespace) -> dict:
    tokens = 0
    if config == "kv":  # the lines fill the KV share: their reservations, padded as the batch pads them, and no more
        probe = Engine.load(str(model), BatchLimits(size=LINES))
        longest = max(len(probe.chat_tokens(r)) + args.max_tokens for r in lines)
        probe.close()
        tokens = LINES * (longest + KV_STEP - 1) + 64  # worker.memory.KvShape.reservation's rows
    engine = Engine.load(str(model), BatchLimits(size=LINES, tokens=tokens))
    engine.enable_prefix_cache(max_entries=16)
    drops = Drops()
    logging.getLogger("worker.batcher").addHandler(drops)
    logging.getLogger("worker.batcher").setLevel(logging.INFO)
    fullest, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            m = engine.memory()
            fullest[0] = max(fullest[0], (m["kv_in_flight"] + m["kv_parked"] + m["kv_ahead"]) / m["kv_limit"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tic = time.perf_counter()
    low = [engine.submit("chat", r, priority="low") for r in lines]
    while not all(s.generated for s in low):
        time.sleep(0.005)
    ttfts = []
    for i in range(args.interactive):
        asked = time.perf_counter()
        first: list[float] = []
        seq = engine.submit("chat", chat(f"Question {i}: name a colour.", 8))
        wait(seq, lambda e, f=first: f or (e["type"] == "delta" and f.append(time.perf_counter())))
        ttfts.append((first[0] if first else time.perf_counter()) - asked)
    answers = [wait(s, lambda _e: None)["text"] for s in low]
    wall = time.perf_counter() - tic
    stop.set()
    sampler.join()
    stats = engine.batcher.stats()
    logging.getLogger("worker.batcher").removeHandler(drops)
    engine.close()
    return {
        "config": config,
        "kv_limit_mb": round(engine.kv_limit / 2**20, 1),
        "fullest_kv_share": round(fullest[0], 3),
        "interactive_ttft_s": round(statistics.median(ttfts), 3),
        "lines_wall_s": round(wall, 2),
        "preempted": stats["preempted"],
        "let_go": drops.count,
        "answers_equal_alone": answers == alone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--interactive", type=int, default=4)
    args = parser.parse_args()
    model = builtin_f32()
    rng = random.Random(7)
    words = "river stone cloud paper engine garden signal window market winter copper forest".split()
    lines = [
        chat(f"Line {i}. Summarize: " + " ".join(rng.choice(words) for _ in range(args.prompt_tokens)), args.max_tokens)
        for i in range(LINES)
    ]
    reference = Engine.load(str(model), BatchLimits(size=LINES))
    alone = [reference.generate("chat", r)["text"] for r in lines]
    reference.close()
    rows = [run(model, config, lines, alone, args) for config in ("size", "kv")]
    print(
        "| config | KV share | fullest (batch + parked + ahead) | interactive TTFT | lines' wall | preempted | "
        "cache let go | answers = alone |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(
            f"| {r['config']} | {r['kv_limit_mb']} MB | {r['fullest_kv_share']} | {r['interactive_ttft_s']} s | "
            f"{r['lines_wall_s']} s | {r['preempted']} | {r['let_go']} | {r['answers_equal_alone']} |",
            file=sys.stderr,
        )
    print(json.dumps({"args": vars(args), "configs": rows}))


if __name__ == "__main__":
    main()
