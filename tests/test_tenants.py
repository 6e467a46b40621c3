"""Tenants cannot learn each other's prompts through the caches (issue 26): the prefix KV cache, its disk tier and the
routing index are partitioned by the cache namespace (per API key unless MLXQ_CACHE_SCOPE=global) and the request's
`cache_salt` (mlxq.keys.cache_partition); cache statistics are per key; /health without a key says only whether the
service is up.

First the parts alone (the partitioned trie, disk tier and hashes, on the tiny model), then the real service: two keys
on one worker (SQLite) and on two workers (Redis + PostgreSQL), a global scope, and a salt within one key.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from worker.blas import preload_openblas

preload_openblas()

from mlxq.delivery import WorkerView, choose, session_of  # noqa: E402
from mlxq.keys import cache_partition, prefix_hashes  # noqa: E402
from mlxq.procs import Service  # noqa: E402
from tests.conftest import MODEL_NAME, service_env  # noqa: E402
from worker.engine import Engine, wait  # noqa: E402
from worker.prefix_cache import DISK_MIN_TOKENS, ENTRY_SUFFIX, MANIFEST, DiskEntry, DiskTier  # noqa: E402

# Each try of the isolation check has its own pair of keys, so each B starts with nothing of its own cached: any
# cached token of B's copy would be A's. (One key's prompts share the chat template's head: "<|im_start|>system...".)
TRIES = 7
KEYS_A = [f"tenant-a{i}-0123456789" for i in range(TRIES)]
KEYS_B = [f"tenant-b{i}-0123456789" for i in range(TRIES)]
KEY_SALTED = "tenant-salted-0123456789"
KEYS = ",".join([*KEYS_A, *KEYS_B, KEY_SALTED])
SYSTEM = "You are a careful coding agent. Read the repository, make a plan, then act on it step by step. " * 24
PA, PB = cache_partition("owner-a", None), cache_partition("owner-b", None)


def chat(user: str, **kw: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "temperature": 0.0,
        "max_tokens": kw.pop("max_tokens", 6),
        **kw,
    }


def run(engine: Engine, request: dict[str, Any], partition: str) -> dict[str, Any]:
    return dict(wait(engine.submit("chat", request, partition=partition), lambda _event: None))


def cached(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["cached_tokens"])


# -- the parts alone -------------------------------------------------------------------------------------------------


def test_partitions_and_hashes():
    assert cache_partition("", None) == "" and cache_partition("", "") == ""  # one user: as without partitions
    assert len({cache_partition("a", None), cache_partition("b", None), cache_partition("a", "s")}) == 3
    assert cache_partition("a", "s") == cache_partition("a", "s") != cache_partition("", "s")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    plain = prefix_hashes("chat", body)
    assert prefix_hashes("chat", body, partition="") == plain
    mine, theirs = prefix_hashes("chat", body, partition=PA), prefix_hashes("chat", body, partition=PB)
    assert not set(mine) & set(theirs) and not set(mine) & set(plain)
    assert prefix_hashes("completion", {"model": "m", "prompt": "x"}, partition=PA) != prefix_hashes(
        "completion", {"model": "m", "prompt": "x"}
    )
    # Routing: a worker holding A's conversation holds nothing of B's copy of it; B goes by its own session.
    views = [WorkerView("w1", "m", 0, frozenset(mine)), WorkerView("w2", "m", 0, frozenset())]
    assert choose(views, mine, session_of("chat", body, None, PA), 4).reason == "prefix"
    route = choose(views, theirs, session_of("chat", body, None, PB), 4)
    assert route.reason == "session" and route.matched == 0


def test_the_disk_index_keeps_partitions_apart(tmp_path: Path):
    tier = DiskTier(tmp_path, 1 << 30)
    tier.add(DiskEntry(f"a{ENTRY_SUFFIX}", [1, 2, 3, 4], 10, "assistant", 0, PA))
    tier.add(DiskEntry(f"b{ENTRY_SUFFIX}", [1, 2, 3, 4], 10, "assistant", 0, PB))
    tier.add(DiskEntry(f"c{ENTRY_SUFFIX}", [1, 2], 10, "assistant", 0, PB))
    assert len(tier) == 3 and len(tier.ids()) == 3  # one prompt, two partitions: two entries, two ids
    assert tier.nearest([1, 2, 3, 4, 5], prefix_only=True, partition=PA) == (tier.entries()[0], 4)
    assert tier.nearest([1, 2, 3, 4, 5], prefix_only=True, partition=PB) == (tier.entries()[1], 4)
    assert tier.nearest([1, 2, 3, 4, 5], prefix_only=False, partition="") is None
    assert [e.file for e in tier.prefixes_of([1, 2, 3, 4], partition=PB)] == [f"c{ENTRY_SUFFIX}"]
    assert tier.prefixes_of([1, 2, 3, 4], partition=PA) == []
    tier.remove(tier.entries()[1], unlink=False)
    assert tier.nearest([1, 2, 3, 4, 5], prefix_only=True, partition=PB) == (tier.entries()[1], 2)
    assert tier.nearest([1, 2, 3, 4, 5], prefix_only=True, partition=PA) == (tier.entries()[0], 4)


def test_a_partition_is_served_only_from_its_own_entries(tiny_model: Path):
    engine, plain = Engine.load(str(tiny_model)), Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    ask = chat("alpha: what changed in the parser?")
    first = run(engine, ask, PA)
    assert cached(first) == 0
    # B's copy of A's exact prompt, and the shared partition's: nothing of A's (not even the system prompt).
    assert cached(run(engine, ask, PB)) == 0
    assert cached(run(engine, ask, "")) == 0
    # A's own repeat is an exact prefix hit, and every answer is the uncached one.
    again = run(engine, ask, PA)
    assert cached(again) == again["usage"]["prompt_tokens"] - 1
    assert again["text"] == first["text"] == plain.generate("chat", ask)["text"]
    # Each partition keeps its own entry; their ids differ (the routing index tells them apart).
    owners = sorted(p for p, *_ in prefix.partitioned_entries())
    assert owners == sorted(["", PA, PB]) and len(prefix.entry_ids()) == 3
    # A salted request through Engine.submit without a partition is its salt's own.
    salted = {**ask, "cache_salt": "client-1"}
    assert cached(dict(wait(engine.submit("chat", salted), lambda _e: None))) == 0
    assert cached(run(engine, salted, cache_partition("", "client-1"))) > 0
    # A salt per request leaves nothing behind once its entries are evicted (the trie keeps no empty partitions).
    for i in range(10):
        run(engine, chat(f"one-off {i}", max_tokens=1), cache_partition("", f"one-off-{i}"))
    assert len(prefix.lru) == 8 and len(prefix.lru._trie._trie) <= 8


def test_the_disk_tier_and_a_restart_keep_partitions_apart(tiny_model: Path, tmp_path: Path):
    engine = Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    prefix.attach_disk(tmp_path, 1 << 30)
    alpha, beta = chat("alpha: what changed?"), chat("beta: what broke?")
    first = run(engine, alpha, PA)
    assert first["usage"]["prompt_tokens"] >= DISK_MIN_TOKENS
    run(engine, beta, PB)  # the entry bound evicts A's alpha: to disk
    assert prefix.snapshot()["spills"] == 1 and prefix.snapshot()["disk_entries"] == 1
    # B asking A's alpha is served from B's own beta (the shared system prompt) at most, never from A's on disk.
    b_copy = run(engine, alpha, PB)
    a_tokens, b_tokens = engine.chat_tokens(alpha), engine.chat_tokens(beta)
    shared = next(i for i, (x, y) in enumerate(zip(a_tokens, b_tokens, strict=False)) if x != y)
    assert cached(b_copy) <= shared and prefix.snapshot()["disk_hits"] == 0
    # A's own comes back from disk.
    a_again = run(engine, alpha, PA)
    assert cached(a_again) == a_again["usage"]["prompt_tokens"] - 1 and prefix.snapshot()["disk_hits"] == 1
    assert a_again["text"] == first["text"]

    saved = engine.save_prefix_cache(tmp_path, 1 << 30)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["format"] == 4 and saved == len(manifest["entries"])
    assert {e["partition"] for e in manifest["entries"]} == {PA, PB}
    restarted = Engine.load(str(tiny_model))
    warm = restarted.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    warm.attach_disk(tmp_path, 1 << 30)
    assert warm.load(tmp_path) == saved
    assert cached(run(restarted, alpha, "")) == 0  # another partition after the restart too
    assert cached(run(restarted, alpha, PA)) == a_again["usage"]["prompt_tokens"] - 1


@pytest.mark.parametrize("family_model", ["qwen3_next"], indirect=True)
def test_checkpoints_of_a_model_that_cannot_trim_are_partitioned_too(family_model: Path):
    engine = Engine.load(str(family_model))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    assert prefix.checkpoints
    first = chat("Tell me a story about a cat on a boat.", max_tokens=8)
    answer = run(engine, first, PA)
    history = [{"role": "user", "content": "Tell me a story about a cat on a boat."}]
    history.append({"role": "assistant", "content": answer["text"]})
    later = {**first, "messages": [*first["messages"][:1], *history, {"role": "user", "content": "Shorter."}]}
    # A's checkpoints (its system prompt, its whole first prompt) serve A's next turn, never B's copy of it.
    assert cached(run(engine, later, PB)) == 0
    assert cached(run(engine, later, PA)) >= len(engine.chat_tokens(first)) - 1
    assert {p for p, *_ in prefix.partitioned_entries()} == {PA, PB}


# -- the real service ------------------------------------------------------------------------------------------------

# Unique prompts near the tiny model's 2,048-token context: prefill dominates a 1-token answer's latency (about
# 0.3 s cold against 0.02 s from the prefix cache on a 2-core CPU), so a prefix shared across keys would show.
WORDS = 440  # some 1,700 tokens


def long_prompt(tag: str) -> list[dict[str, str]]:
    text = " ".join(f"w{i}" for i in range(WORDS))
    return [{"role": "user", "content": f"{tag}: summarize these notes. {text}"}]


def http(svc: Service, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=svc.base, headers=headers, timeout=120)


def post_chat(
    client: httpx.Client, messages: list[dict[str, str]], *, fresh: bool = False, **extra: Any
) -> tuple[dict[str, Any], httpx.Response, float]:
    """A greedy 1-token chat answer, its response and its latency (its time to first token, with one token).
    `fresh`: not from the response cache (Cache-Control: no-cache), so a repeat runs and may hit the prefix cache."""
    body = {"model": MODEL_NAME, "messages": messages, "temperature": 0, "max_tokens": 1, **extra}
    headers = {"Cache-Control": "no-cache"} if fresh else {}
    start = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=body, headers=headers)
    took = time.perf_counter() - start
    assert reply.status_code == 200, reply.text
    return reply.json(), reply, took


def cached_of(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


def route_of(client: httpx.Client, reply: httpx.Response) -> dict[str, Any]:
    return client.get(f"/v1/jobs/{reply.headers['x-job-id']}").json()["route"]


def check_isolation(svc: Service, *, workers: int) -> None:
    """After A's request, B's copy of A's exact prompt is cold (no cached tokens, no shorter a time to first token
    than a cold prompt of its length, measured as a ratio of medians over several tries), while A's own repeat is a
    prefix hit on the worker that holds it."""
    cold, b_copy, warm = [], [], []
    reasons: list[str] = []
    post_chat(http(svc, KEY_SALTED), long_prompt("warm-up"), cache_salt="warm-up")  # first-request costs
    for i in range(TRIES):
        a, b = http(svc, KEYS_A[i]), http(svc, KEYS_B[i])
        messages = long_prompt(f"t{i}-{uuid.uuid4().hex[:8]}")
        first, first_reply, took = post_chat(a, messages)
        assert first_reply.headers["x-cache"] == "MISS" and cached_of(first) == 0
        cold.append(took)
        theirs, their_reply, took = post_chat(b, messages)
        assert their_reply.headers["x-cache"] == "MISS"  # per-key response caches (as before)
        assert cached_of(theirs) == 0, theirs["usage"]  # nothing of A's prompt shortened B's prefill
        assert theirs["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        b_copy.append(took)
        if workers > 1:
            time.sleep(1.5)  # three heartbeats (0.5 s in tests): the worker publishes A's prefix for routing
        mine, my_reply, took = post_chat(a, messages, fresh=True)
        assert cached_of(mine) == mine["usage"]["prompt_tokens"] - 1, mine["usage"]  # A's own: a prefix hit
        warm.append(took)
        # Another cold prompt of the same length, after B's copy: cold samples on both sides of it, so the load
        # of a shared machine drifting during the try weighs on both alike.
        other, _, took = post_chat(a, long_prompt(f"c{i}-{uuid.uuid4().hex[:8]}"))
        assert cached_of(other) < 64  # the chat template's head, which A's own prompts share
        cold.append(took)
        if workers > 1:  # A's repeat went to the worker holding A's prefix; B's copy found none anywhere
            mine_route, first_route = route_of(a, my_reply), route_of(a, first_reply)
            assert mine_route["worker"] == first_route["worker"]
            reasons.append(mine_route["reason"])
            assert route_of(b, their_reply)["reason"] != "prefix" and route_of(b, their_reply)["cached_messages"] == 0
    # By prefix, unless the worker's heartbeat had not yet published A's first request on a loaded machine (then by
    # A's session, to the same worker, as asserted above): prefix routing must work in A's partition at least once.
    assert workers == 1 or reasons.count("prefix") >= 1, reasons
    ratio = statistics.median(b_copy) / statistics.median(cold)
    shown = f"cold {cold}, B's copy {b_copy}, A's repeat {warm}"
    assert ratio >= 0.7, f"B's copy of A's prompt answered faster than a cold prompt: {shown}"
    # The measurement can tell: a prefix hit is much faster than a cold prefill here.
    assert statistics.median(warm) < 0.7 * statistics.median(cold), shown


def test_two_keys_on_one_worker_share_nothing(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_API_KEYS=KEYS)).start()
    check_isolation(svc, workers=1)
    a, b = http(svc, KEY_SALTED), http(svc, KEYS_B[0])

    # A salt separates two clients of one key: neither's prompt serves the other, nor its answer (this key has
    # nothing cached without a salt, and only the warm-up with another).
    messages = long_prompt(f"salted-{uuid.uuid4().hex[:8]}")
    first, _, _ = post_chat(a, messages, cache_salt="client-1")
    other, other_reply, _ = post_chat(a, messages, cache_salt="client-2")
    assert other_reply.headers["x-cache"] == "MISS" and cached_of(other) == 0
    unsalted, _, _ = post_chat(a, messages)
    assert cached_of(unsalted) == 0
    again, again_reply, _ = post_chat(a, messages, cache_salt="client-1")
    assert again_reply.headers["x-cache"] == "HIT"  # the same salt: the same response-cache entry
    repeat, _, _ = post_chat(a, messages, fresh=True, cache_salt="client-1")
    assert cached_of(repeat) == repeat["usage"]["prompt_tokens"] - 1
    # Anthropic and Responses clients send it as a body field too; the dialects share one canonical request, so
    # client-1's Anthropic copy of the conversation is a prefix hit and client-3's is not.
    for salt, hit in (("client-1", True), ("client-3", False)):
        body = {"model": MODEL_NAME, "max_tokens": 1, "temperature": 0, "messages": messages, "cache_salt": salt}
        reply = a.post("/v1/messages", json=body, headers={"Cache-Control": "no-cache"})
        assert reply.status_code == 200, reply.text
        assert (reply.json()["usage"]["cache_read_input_tokens"] > 0) is hit, (salt, reply.json()["usage"])
    body = {"model": MODEL_NAME, "input": "hi", "max_output_tokens": 2, "temperature": 0, "cache_salt": "client-1"}
    assert a.post("/v1/responses", json=body).status_code == 200
    refused = a.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages, "cache_salt": ""})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"

    # B's cache statistics are B's own: its one miss and entry, nothing of A's; no prefix-cache counters.
    stats = b.get("/v1/cache/stats").json()
    own = stats["response_cache"]
    assert stats["scope"] == "key" and "prefix_cache" not in stats
    assert own["hits"] == 0 and own["misses"] == 1 and own["cached_items"] == 1, own
    theirs = http(svc, KEYS_A[0]).get("/v1/cache/stats").json()["response_cache"]
    assert theirs["hits"] == 0 and theirs["misses"] == 2 and theirs["bypass"] == 1 and theirs["cached_items"] == 2
    mine = a.get("/v1/cache/stats").json()["response_cache"]
    assert mine["hits"] == 1 and mine["cached_items"] > 3

    # /health without a key: up or not, and nothing about what anyone asked or how much; the details behind a key.
    bare = httpx.get(f"{svc.base}/health").json()
    assert bare["status"] == "ok" and bare["model_loaded"] and bare["worker"]["alive"]
    assert set(bare) == {"status", "broker", "model", "model_loaded", "models", "worker", "time"}, bare
    assert set(bare["worker"]) == {"alive", "count", "error"}
    detailed = b.get("/health").json()
    assert detailed["cache"]["hits"] >= 1 and "counters" in detailed and detailed["prefix_cache"]["entries"] > 0
    assert not any("@" in name for name in detailed["counters"])  # each key's own counters stay its own


@pytest.mark.e2e
def test_two_keys_on_two_workers_share_nothing(
    tmp_path: Path, tiny_model: Path, service_factory, pg_url: str, redis_url: tuple[str, str]
):
    url, prefix = redis_url
    env = service_env(
        tmp_path,
        tiny_model,
        MLXQ_API_KEYS=KEYS,
        MLXQ_DATABASE_URL=pg_url,
        MLXQ_BROKER_URL=url,
        MLXQ_QUEUE=prefix,
        MLXQ_REDIS_PREFIX=prefix,
    )
    svc = service_factory(env).start(worker=False)
    for name in ("w1", "w2"):
        svc.add_worker(name)
    svc.wait_workers({"w1", "w2"})
    check_isolation(svc, workers=2)
    stats = http(svc, KEYS_B[0]).get("/v1/cache/stats").json()["response_cache"]
    assert stats["hits"] == 0 and stats["cached_items"] == 1


def test_a_global_scope_shares_across_keys_as_documented(tmp_path: Path, tiny_model: Path, service_factory):
    env = service_env(tmp_path, tiny_model, MLXQ_API_KEYS=KEYS, MLXQ_CACHE_SCOPE="global", MLXQ_HEALTH_DETAILS="true")
    svc = service_factory(env).start()
    a, b = http(svc, KEYS_A[0]), http(svc, KEYS_B[0])
    messages = long_prompt(f"shared-{uuid.uuid4().hex[:8]}")
    post_chat(a, messages)
    _, reply, _ = post_chat(b, messages)
    assert reply.headers["x-cache"] == "HIT"  # one response cache
    theirs, _, _ = post_chat(b, messages, fresh=True)
    assert cached_of(theirs) == theirs["usage"]["prompt_tokens"] - 1  # one prefix cache
    # A salt still separates: its own response-cache entry and prefix-cache partition.
    salted, salted_reply, _ = post_chat(b, messages, cache_salt="private")
    assert salted_reply.headers["x-cache"] == "MISS" and cached_of(salted) == 0
    # The statistics are the service's, for every key; and MLXQ_HEALTH_DETAILS shows /health's details to anyone.
    stats = b.get("/v1/cache/stats").json()
    assert stats["scope"] == "global" and stats["response_cache"]["hits"] >= 1 and "entries" in stats["prefix_cache"]
    assert "cache" in httpx.get(f"{svc.base}/health").json()
