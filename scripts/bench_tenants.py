"""Tenant partitioning of the prefix cache (issue 26): what it costs a single tenant, and that several keys each keep
their own sessions warm. mlxq alone, one configuration at a time, on the float32 SmolLM2 (what it runs on a CPU).

Configurations, each a fresh service with MLXQ_API_KEYS set:

* `global`: one key, MLXQ_CACHE_SCOPE=global: every request in the one shared partition, exactly as before
  partitioning existed (mlxq.keys.cache_partition is "" there);
* `one-key`: one key, per-key scope (the default): the key's requests in its own partition;
* `four-keys`: four keys, per-key scope, each running its own agent session, their turns interleaved.

Each session is scripts/bench_agent.py's: a ~1,200-token system prompt with 10 tool schemas, 5 user turns carrying
the growing history, streamed at temperature 0, max_tokens 24, the answer sent back as the assistant message. Per
turn: TTFT (client side, to the first content chunk) and the cached share (usage.prompt_tokens_details.cached_tokens
over prompt_tokens from the usage chunk). Every request carries `Cache-Control: no-cache` so the response cache
answers none of them. Then, where there are several keys, key B sends key A's first turn exactly: its cached tokens
(what a tenant could learn) and its TTFT beside a cold prompt of the same length.

Targets: one-key later-turn cached share and TTFT within noise of global's (partitioning costs one tenant nothing);
four-keys: every key's later turns at least 0.95 cached; key B's copy of A's prompt 0 cached tokens, its TTFT no
shorter than cold.

    .venv/bin/python scripts/bench_tenants.py [--configs global,one-key,four-keys] [--turns 5]

Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_agent import USERS, builtin_f32, system_prompt  # noqa: E402

from mlxq.procs import Service  # noqa: E402
from mlxq.settings import BUILTIN_MODEL  # noqa: E402

CONFIGS = {
    "global": {"keys": 1, "scope": "global"},
    "one-key": {"keys": 1, "scope": "key"},
    "four-keys": {"keys": 4, "scope": "key"},
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def turn(http: httpx.Client, key: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One streamed turn: TTFT, the answer, prompt and cached tokens."""
    payload = {
        "model": BUILTIN_MODEL,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with http.stream("POST", "/v1/chat/completions", json=payload, headers=headers, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first if first is not None else time.perf_counter() - t0
                    text.append(content)
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    return {"ttft": first, "text": "".join(text), "prompt": usage.get("prompt_tokens", 0), "cached": cached}


def run_config(name: str, model_dir: Path, tmp: Path, turns: int) -> dict[str, Any]:
    spec = CONFIGS[name]
    keys = [f"bench-{name}-{i}-{uuid.uuid4().hex[:8]}" for i in range(spec["keys"])]
    env = {
        "MLXQ_DATA_DIR": str(tmp / name),
        "MLXQ_MODEL": str(model_dir),
        "MLXQ_MODEL_NAME": BUILTIN_MODEL,
        "MLXQ_API_KEYS": ",".join(keys),
        "MLXQ_CACHE_SCOPE": spec["scope"],
    }
    (tmp / f"logs-{name}").mkdir(parents=True, exist_ok=True)
    svc = Service(env, tmp / f"logs-{name}").start()
    try:
        http = httpx.Client(base_url=svc.base)
        turn(http, keys[0], [{"role": "user", "content": f"warm up {uuid.uuid4().hex}"}])
        # Each key's session opens with its own tag, so no two sessions share more than the template's opening.
        history = {
            k: [{"role": "system", "content": f"Session {i} ({uuid.uuid4().hex[:6]}).\n{system_prompt()}"}]
            for i, k in enumerate(keys)
        }
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        for t in range(turns):
            for key in keys:  # interleaved: every key's turn t, then turn t + 1
                messages = history[key] + [{"role": "user", "content": USERS[t % len(USERS)]}]
                got = turn(http, key, messages)
                results[key].append(got)
                history[key] = messages + [{"role": "assistant", "content": got["text"]}]
        out: dict[str, Any] = {"per_key": {}}
        for i, key in enumerate(keys):
            later = results[key][1:]
            out["per_key"][f"key{i}"] = {
                "later_share": round(sum(r["cached"] for r in later) / max(sum(r["prompt"] for r in later), 1), 4),
                "later_ttft_ms": round(1000 * statistics.median(r["ttft"] for r in later), 1),
                "first_ttft_ms": round(1000 * results[key][0]["ttft"], 1),
            }
        pooled = [r for key in keys for r in results[key][1:]]
        out["later_share"] = round(sum(r["cached"] for r in pooled) / max(sum(r["prompt"] for r in pooled), 1), 4)
        out["later_share_min"] = min(v["later_share"] for v in out["per_key"].values())
        out["later_ttft_ms"] = round(1000 * statistics.median(r["ttft"] for r in pooled), 1)
        if len(keys) > 1:
            # Key B sends key A's first turn exactly, once (a repeat would hit B's own entry), beside two cold prompts of
            # that length from a third key.
            a_first = history[keys[0]][:2]
            copy = turn(http, keys[1], a_first)
            colds = []
            for _ in range(2):
                cold = [{"role": "system", "content": f"Cold {uuid.uuid4().hex[:6]}.\n{system_prompt()}"}, a_first[1]]
                colds.append(turn(http, keys[2], cold))
            out["copy_cached"] = copy["cached"]
            out["copy_prompt"] = copy["prompt"]
            out["copy_ttft_ms"] = round(1000 * copy["ttft"], 1)
            out["cold_ttft_ms"] = round(1000 * statistics.median(c["ttft"] for c in colds), 1)
        return out
    finally:
        svc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="global,one-key,four-keys")
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()
    model_dir = builtin_f32()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            say(f"{name}: running")
            results[name] = run_config(name, model_dir, Path(tmp), args.turns)
            say(f"{name}: {json.dumps(results[name])}")
    say(
        "| config | later-turn cached share (min over keys) | later-turn TTFT | B's copy of A's prompt: cached, TTFT | cold |"
    )
    say("|---|---|---|---|---|")
    for name, r in results.items():
        copy = f"{r['copy_cached']} of {r['copy_prompt']}, {r['copy_ttft_ms']} ms" if "copy_cached" in r else "-"
        cold = f"{r['cold_ttft_ms']} ms" if "cold_ttft_ms" in r else "-"
        say(f"| {name} | {r['later_share']} ({r['later_share_min']}) | {r['later_ttft_ms']} ms | {copy} | {cold} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
