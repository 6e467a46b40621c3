"""Prefix-cache tiers (issue 24): what a hit on each tier costs against prefilling the prefix again, and how many
sessions a byte bound keeps in each idle form. In process, on the engine (no HTTP), SmolLM2 as mlxq runs it here.

For each prefix size (`--sizes`, templated prompt tokens; a system prompt of seeded filler behind a unique tag), the
time of a one-token request (`max_tokens` 1: the prefill of what the cache does not hold, plus one decode step):

* cold: no prefix cache: the whole prompt prefilled (what mlx_lm.server pays on a miss too);
* memory exact: the entry held as it was stored (what mlx-lm's LRUPromptCache, mlx_lm.server's, always holds);
* memory 8-bit / 4-bit: the same entry after byte pressure quantized it (MLXQ_PREFIX_CACHE_BITS), dequantized on hit;
* disk exact / 8-bit / 4-bit: the entry evicted from memory to the disk tier (quantized first at 8 and 4 bits), read
  back on the hit (the page cache warm: just written);
* evict exact / 8-bit / 4-bit: what that eviction cost the engine thread (every stream in the batch waits for it):
  the insert that evicted the entry, its quantizing included; its file is written by a thread of its own.

Each a median of `--repeat` tries. Then sessions per budget: `--sessions` distinct ~`--session-tokens`-token prompts
into a prefix cache bounded at `--budget-mb`, at bits 0 (exact: the mlx-lm LRU's count), 8 and 4: how many the memory
holds at the end. Then exactness: `--turns` turns of two conversations served from entries quantized before every
turn (8 and 4 bits), their greedy answers (max_tokens 32) against the uncached engine's.

    .venv/bin/python scripts/bench_prefix_tiers.py [--sizes 64,512,2000] [--repeat 3] [--budget-mb 200] \
        [--sessions 40] [--session-tokens 1000] [--turns 4] [--quick]

Prints a markdown table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.blas import preload_openblas  # noqa: E402

preload_openblas()

from mlxq.settings import BUILTIN_MODEL, get_settings  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.prefix_cache import PrefixCache  # noqa: E402
from worker.pull import pull_builtin  # noqa: E402

WORDS = "the a repository file test build error function class module import return value change plan step".split()


def system_prompt(engine: Engine, tag: str, tokens: int) -> str:
    """Seeded filler behind `tag`, grown until the templated prompt is about `tokens` tokens."""
    rng = random.Random(tag)
    words = [tag]
    while len(engine.chat_tokens(request(" ".join(words), "Go on."))) < tokens:
        words += [rng.choice(WORDS) for _ in range(max(8, (tokens - len(words)) // 2))]
    return " ".join(words)


def request(system: str, user: str, *, max_tokens: int = 1, history: list[dict[str, str]] | None = None) -> dict:
    return {
        "messages": [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": user}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }


def timed(engine: Engine, body: dict) -> tuple[float, dict[str, Any]]:
    tic = time.perf_counter()
    result = engine.generate("chat", body)
    return time.perf_counter() - tic, dict(result)


def squeeze(engine: Engine, prefix: PrefixCache) -> None:
    """Byte pressure as the memory budget's shed makes it: every idle entry quantized (at `prefix.bits`)."""
    engine.batcher.call(lambda: prefix.lru.trim_to(n_bytes=max(int(prefix.lru.nbytes) - 1, 0)))


def hit_costs(engine: Engine, size: int, repeat: int, workdir: Path) -> dict[str, float]:
    costs: dict[str, list[float]] = {}

    def record(name: str, seconds: float, result: dict[str, Any], want_cached: bool) -> None:
        cached = result["usage"]["cached_tokens"]
        if want_cached and cached < result["usage"]["prompt_tokens"] - 2:
            raise SystemExit(f"{name} at {size}: expected a hit, got {cached}/{result['usage']['prompt_tokens']}")
        costs.setdefault(name, []).append(seconds)

    for attempt in range(repeat):
        body = request(system_prompt(engine, f"s{size}-{attempt}", size), "Go on.")
        engine.prefix = None
        record("cold", *timed(engine, body), False)
        for bits in (0, 8, 4):
            prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 34)
            prefix.bits = bits
            engine.generate("chat", body)
            if bits:
                squeeze(engine, prefix)
                assert prefix.snapshot()["quantized"] >= 1
            record(f"memory {bits or 'exact'}", *timed(engine, body), True)
        for bits in (0, 8, 4):
            prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 34)
            prefix.bits = bits
            prefix.attach_disk(workdir / f"disk-{size}-{attempt}-{bits}", 1 << 34)
            engine.generate("chat", body)
            inserts = insert_times(prefix)
            engine.generate("chat", request(f"evictor {attempt} {bits}", "Go on."))
            if prefix.snapshot()["spills"]:  # what the batch waited for: the evictor's insert, which spilled the entry
                costs.setdefault(f"evict {bits or 'exact'}", []).append(inserts[-1])
            prefix.flush()
            if not prefix.snapshot()["spills"]:
                costs.setdefault(f"disk {bits or 'exact'}", [])  # shorter than DISK_MIN_TOKENS: not kept
                continue
            record(f"disk {bits or 'exact'}", *timed(engine, body), True)
    return {name: statistics.median(times) for name, times in costs.items() if times}


def insert_times(prefix: PrefixCache) -> list[float]:
    """The seconds of each of `prefix`'s inserts from now on, on the engine thread: an insert that evicts an entry
    quantizes it and hands its file to the writer thread (worker.prefix_cache.SPILLS_IN_FLIGHT)."""
    times: list[float] = []
    insert = prefix.insert

    def timed_insert(*args: Any, **kwargs: Any) -> int | None:
        tic = time.perf_counter()
        try:
            return insert(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - tic)

    prefix.insert = timed_insert  # type: ignore[method-assign]
    return times


def sessions_per_budget(engine: Engine, budget_mb: int, sessions: int, tokens: int) -> dict[int, int]:
    """The sessions' entries, prefilled once, inserted in turn into a cache bounded at `budget_mb` at each width."""
    store = engine.enable_prefix_cache(max_entries=sessions, max_bytes=1 << 36)
    for i in range(sessions):
        engine.generate("chat", request(system_prompt(engine, f"session-{i}", tokens), "Go on."))
    entries = store.entries()
    held = {}
    for bits in (0, 8, 4):
        prefix = PrefixCache(engine.model, engine.key, sessions, budget_mb << 20, checkpoints=engine.checkpoints)
        prefix.bits = bits
        for tokens_, cache in entries:
            engine.batcher.call(lambda t=tokens_, c=cache, p=prefix: p.insert(list(t), copy.deepcopy(c)))
        held[bits] = prefix.snapshot()["entries"]
    return held


def exactness(engine: Engine, plain: Engine, turns: int) -> dict[int, tuple[int, int]]:
    """Greedy answers on turns served from quantized entries against the uncached engine's: (equal, hits)."""
    systems = [
        "You are a SQL expert. Schema: users(id, name, email), orders(id, user_id, total), items(id, order_id). " * 6,
        "You are a careful coding agent. Read the repository, make a plan, then act on it step by step. " * 8,
    ]
    users = ["Start.", "Now the next step.", "Explain the last answer.", "Shorten it.", "Add tests.", "Summarize."]
    out = {}
    for bits in (8, 4):
        prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 34)
        prefix.bits = bits
        equal = hits = 0
        for system in systems:
            history: list[dict[str, str]] = []
            for user in users[:turns]:
                body = request(system, user, max_tokens=32, history=history)
                squeeze(engine, prefix)
                got, want = engine.generate("chat", body), plain.generate("chat", body)
                if history:
                    hits += 1
                    equal += got["text"] == want["text"]
                history += [{"role": "user", "content": user}, {"role": "assistant", "content": want["text"]}]
        out[bits] = (equal, hits)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512,2000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget-mb", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--session-tokens", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few sessions")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeat, args.budget_mb, args.sessions, args.session_tokens, args.turns = (
            "200",
            1,
            20,
            8,
            300,
            2,
        )
    sizes = [int(s) for s in args.sizes.split(",")]
    model = pull_builtin(get_settings().data_dir / "models" / BUILTIN_MODEL)
    engine, plain = Engine.load(str(model)), Engine.load(str(model))
    engine.generate("chat", request("warm up", "Go on."))
    with tempfile.TemporaryDirectory() as tmp:
        costs = {size: hit_costs(engine, size, args.repeat, Path(tmp)) for size in sizes}
    held = sessions_per_budget(engine, args.budget_mb, args.sessions, args.session_tokens)
    exact = exactness(engine, plain, args.turns)

    names = ["cold", "memory exact", "memory 8", "memory 4", "disk exact", "disk 8", "disk 4"]
    print("A hit on each tier against the prefill (cold):", file=sys.stderr)
    print("| prefix tokens | " + " | ".join(names) + " |", file=sys.stderr)
    print("|---" * (len(names) + 1) + "|", file=sys.stderr)
    for size, row in costs.items():
        cells = []
        for name in names:
            if name not in row:
                cells.append("not kept")
            elif name == "cold":
                cells.append(f"{row[name]:.3f} s")
            else:
                cells.append(f"{row[name]:.3f} s ({row['cold'] / row[name]:.0f}x)")
        print(f"| {size} | " + " | ".join(cells) + " |", file=sys.stderr)
    evicts = ["evict exact", "evict 8", "evict 4"]
    print(
        "\nWhat the engine thread pays to evict the entry to disk (stored as it was, at 8 and at 4 bits):",
        file=sys.stderr,
    )
    print("| prefix tokens | " + " | ".join(evicts) + " |\n" + "|---" * (len(evicts) + 1) + "|", file=sys.stderr)
    for size, row in costs.items():
        cells = [f"{row[name] * 1000:.0f} ms" if name in row else "not kept" for name in evicts]
        print(f"| {size} | " + " | ".join(cells) + " |", file=sys.stderr)
    print(
        f"\n{args.budget_mb} MB bound, {args.sessions} sessions of ~{args.session_tokens} tokens held in memory: "
        + ", ".join(f"{'exact (mlx-lm LRU)' if b == 0 else f'{b}-bit'} {n}" for b, n in held.items()),
        file=sys.stderr,
    )
    print(
        "greedy answers from quantized entries equal to uncached: "
        + ", ".join(f"{b}-bit {e}/{h}" for b, (e, h) in exact.items()),
        file=sys.stderr,
    )
    print(json.dumps({"hit_seconds": costs, "sessions_held": held, "exact": exact}))


if __name__ == "__main__":
    main()
