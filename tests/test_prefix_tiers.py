"""The prefix cache's tiers (issue 24), on real models: idle entries quantized under byte pressure (more of them fit
the same budget) and dequantized on a hit into a KVCache the batch merges; entries evicted from memory kept on disk
within the disk bound, indexed by their tokens, served back on the next request with the answer the uncached path
gives, and still there after a restart."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache, QuantizedKVCache  # noqa: E402

from mlxq.settings import Settings  # noqa: E402
from worker import prefix_cache  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.prefix_cache import (  # noqa: E402
    DISK_MIN_TOKENS,
    ENTRY_SUFFIX,
    MANIFEST,
    DiskEntry,
    DiskTier,
    cache_bytes,
    layers,
    quantized,
    thawed,
)

SYSTEM = "You are a careful coding agent. Read the repository, make a plan, then act on it step by step. " * 24


def chat(user: str, *, system: str = SYSTEM, history: list[dict[str, str]] | None = None, **kw: Any) -> dict:
    return {
        "messages": [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": user}],
        "temperature": 0.0,
        "max_tokens": kw.pop("max_tokens", 8),
        **kw,
    }


def disk_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.name.endswith(ENTRY_SUFFIX)}


# -- the disk tier's index, alone --------------------------------------------------------------


def test_the_disk_index_finds_the_nearest_entry(tmp_path: Path):
    tier = DiskTier(tmp_path, 1 << 30)
    for i, tokens in enumerate(([1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 9, 9], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8])):
        tier.add(DiskEntry(f"{i}{ENTRY_SUFFIX}", tokens, 10, "assistant", 0))
    # The longest shared prefix, whether the entry is shorter or longer than the prompt (trimmable caches).
    assert tier.nearest([1, 2, 3, 4, 5, 6, 0], prefix_only=False) == (tier.entries()[4], 6)
    assert tier.nearest([1, 2, 9, 9, 9], prefix_only=False) == (tier.entries()[2], 4)
    # The longest entry that is a prefix of the prompt (caches that cannot be trimmed).
    assert tier.nearest([1, 2, 3, 4, 5, 6, 0], prefix_only=True) == (tier.entries()[1], 5)
    assert tier.nearest([1, 2, 3, 4], prefix_only=True) == (tier.entries()[0], 3)
    assert tier.nearest([1, 2, 4], prefix_only=True) is None
    assert tier.nearest([5], prefix_only=False) is None
    assert [e.tokens for e in tier.prefixes_of([1, 2, 3, 4, 5, 6])] in (
        [[1, 2, 3], [1, 2, 3, 4, 5]],
        [[1, 2, 3, 4, 5], [1, 2, 3]],
    )
    # Least recently used first out, and its file with it.
    (tmp_path / f"0{ENTRY_SUFFIX}").write_bytes(b"x")
    assert [e.file for e in tier.evict_to(30)] == [f"{i}{ENTRY_SUFFIX}" for i in (0, 1)]
    assert not (tmp_path / f"0{ENTRY_SUFFIX}").exists() and tier.nbytes == 30 and len(tier) == 3
    assert tier.nearest([1, 2, 3, 4, 5, 6, 0], prefix_only=True) is None


def test_bits_setting_takes_what_mx_quantize_takes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLXQ_PREFIX_CACHE_BITS", "4")
    assert Settings().prefix_cache_bits == 4
    assert Settings(prefix_cache_bits=0).prefix_cache_bits == 0
    with pytest.raises(ValueError):
        Settings(prefix_cache_bits=7)


# -- the idle form: quantized under pressure ----------------------------------------------------


def test_an_idle_entry_is_quantized_rather_than_evicted_and_served_as_a_kv_cache(smollm2: Path):
    engine = Engine.load(str(smollm2))
    probe = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    first = chat("List the files, then read the README.")
    answer = engine.generate("chat", first)
    ((tokens, cache),) = probe.entries()
    exact = cache_bytes(cache)
    q8, q4 = engine.batcher.call(lambda: (quantized(cache, 8), quantized(cache, 4)))
    assert q8 is not None and q4 is not None
    assert all(isinstance(c, QuantizedKVCache) and c.group_size == 64 for c in q8 + q4)
    # float32 KV (this CPU): 8 bits + a float32 scale and bias per 64 values, 9 bits a value against 32.
    assert exact / cache_bytes(q8) >= 3.4 and exact / cache_bytes(q4) >= 6
    back = engine.batcher.call(lambda: thawed(q8))
    assert all(type(c) is KVCache and c.offset == len(tokens) for c in back)
    assert all(c.keys.shape == o.keys[..., : o.offset, :].shape for c, o in zip(back, cache, strict=True))
    worst = max(float(mx.abs(c.keys - o.keys[..., : o.offset, :]).max()) for c, o in zip(back, cache, strict=True))
    assert worst < 0.05 * max(float(mx.abs(o.keys).max()) for o in cache)
    KVCache.merge([back[0], cache[0]])  # what the batch does with caches of several sequences

    # A budget of one exact entry and a half: the second request's entry stays, the first is quantized.
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=int(exact * 1.5))
    prefix.bits = 8
    assert engine.generate("chat", first)["text"] == answer["text"]
    engine.generate("chat", chat("Which tests fail?"))
    snap = prefix.snapshot()
    assert snap["entries"] == 2 and snap["quantized"] == 1 and snap["bytes"] <= int(exact * 1.5)
    quantized_entries = [c for _, c in prefix.entries() if any(isinstance(x, QuantizedKVCache) for x in c)]
    assert len(quantized_entries) == 1
    # Its next turn starts from it, dequantized in the batch.
    history = [{"role": "user", "content": "List the files, then read the README."}]
    history.append({"role": "assistant", "content": answer["text"]})
    later = engine.generate("chat", chat("Now run the tests.", history=history))
    assert later["usage"]["cached_tokens"] >= len(tokens) - 1
    assert prefix.snapshot()["memory_hits"] == 2


def test_the_bytes_other_threads_read_never_pass_the_bound_even_during_an_insert():
    """Other threads read the bytes held at any moment (the heartbeat's memory parts): in the middle of an insert the
    count passes the bound until the insert applies it (quantizing, then evicting), so they read `held`, the count
    between operations (the memory e2e test once read the cache over its share in the middle of an insert)."""

    def entry(tokens: int) -> list[Any]:
        layer = KVCache()
        kv = mx.random.normal((1, 2, tokens, 64))
        layer.update_and_fetch(kv, kv)
        mx.eval(layer.state)
        return [layer]

    size = cache_bytes(entry(100))
    counted: list[int] = []
    read: list[int] = []

    def cheapen(cache: list[Any]) -> list[Any] | None:
        counted.append(lru.nbytes)
        read.append(lru.held)
        return quantized(cache, 8) if not any(isinstance(c, QuantizedKVCache) for c in cache) else None

    def spill(model: Any, tokens: list[int], evicted: Any) -> None:
        counted.append(lru.nbytes)
        read.append(lru.held)

    lru = prefix_cache.TieredLRU(max_size=64, max_bytes=int(size * 2.5), cheapen=cheapen, spill=spill)
    for i in range(8):
        lru.insert_cache("model", [i] * 100, entry(100))
        assert lru.held == lru.nbytes <= size * 2.5
    assert max(counted) > size * 2.5, "the test must catch an insert over the bound"
    assert max(read) <= size * 2.5, read


def test_turns_served_from_8_bit_entries_answer_as_uncached(smollm2: Path):
    # Measured over four agent-like conversations (12 turns, 8 of them hits on an entry quantized to 8 bits, answers
    # of 48 and 128 tokens): every greedy answer equal to the uncached one; at 4 bits, 4 of the 8 differed.
    engine, plain = Engine.load(str(smollm2)), Engine.load(str(smollm2))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    prefix.bits = 8
    system = (
        "You are a SQL expert. Given a schema, write queries. Schema: users(id, name, email, created_at), "
        "orders(id, user_id, total, created_at), items(id, order_id, sku, qty, price). " * 5
    )
    history: list[dict[str, str]] = []
    for user in ("Total spent per user in 2024.", "Now only users with more than 3 orders.", "Add the average."):
        request = chat(user, system=system, history=history, max_tokens=32)
        # Pressure, as the memory budget's shed makes it: every idle entry quantized, none evicted.
        engine.batcher.call(lambda: prefix.lru.trim_to(n_bytes=int(prefix.lru.nbytes) - 1))
        got, want = engine.generate("chat", request), plain.generate("chat", request)
        assert got["text"] == want["text"]
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": want["text"]}]
    snap = prefix.snapshot()
    assert snap["quantized"] == 2 and snap["memory_hits"] == 2 and snap["entries"] == 1


def test_without_bits_the_byte_bound_evicts_as_before(smollm2: Path):
    engine = Engine.load(str(smollm2))
    probe = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    engine.generate("chat", chat("one"))
    exact = probe.snapshot()["bytes"]
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=int(exact * 1.5))
    for user in ("one", "two", "three"):
        engine.generate("chat", chat(user))
    snap = prefix.snapshot()
    assert snap["entries"] == 1 and snap["quantized"] == 0


# -- the disk tier ----------------------------------------------------------------------------


def test_an_entry_evicted_from_memory_is_served_from_disk(tiny_model: Path, tmp_path: Path):
    engine, plain = Engine.load(str(tiny_model)), Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    prefix.attach_disk(tmp_path, 1 << 30)
    alpha, beta = chat("alpha: what changed?"), chat("beta: what broke?")
    first = engine.generate("chat", alpha)
    assert first["usage"]["prompt_tokens"] >= DISK_MIN_TOKENS
    engine.generate("chat", beta)  # the entry bound evicts alpha: to disk
    snap = prefix.snapshot()
    assert snap["entries"] == 1 and snap["spills"] == 1 and snap["disk_entries"] == 1 and snap["disk_hits"] == 0
    prefix.flush()  # its file is written off the engine thread
    assert len(disk_files(tmp_path)) == 1

    again = engine.generate("chat", alpha)
    # Memory holds beta, which shares only the system prompt; the disk holds all of alpha.
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["text"] == first["text"] == plain.generate("chat", alpha)["text"]
    snap = prefix.snapshot()
    assert snap["disk_hits"] == 1 and snap["hits"] == 2 and snap["memory_hits"] == 1 and snap["skips"] == 0

    # A later turn of beta (now on disk in its turn) extends it from disk too, and answers as uncached.
    history = [{"role": "user", "content": "beta: what broke?"}]
    history.append({"role": "assistant", "content": plain.generate("chat", beta)["text"]})
    turn = chat("and how do we fix it?", history=history, max_tokens=10)
    later = engine.generate("chat", turn)
    assert later["usage"]["cached_tokens"] > beta_tokens(engine, beta) - 2
    assert later["text"] == plain.generate("chat", turn)["text"]
    assert prefix.snapshot()["disk_hits"] == 2


def test_an_evicted_entry_is_written_off_the_engine_thread(tiny_model: Path, tmp_path: Path, monkeypatch):
    """Writing an evicted entry's file (2.7 ms a MB here; gigabytes for an agent's long context on a large model) is
    not the batch's wait: the engine serves other requests while it is written, and a hit on it waits for the file."""
    engine, plain = Engine.load(str(tiny_model)), Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    prefix.attach_disk(tmp_path, 1 << 30)
    release, written, writers = threading.Event(), threading.Event(), []
    write = prefix_cache._write_entry

    def held(path: Path, cache: list[Any]) -> int | None:
        writers.append(threading.current_thread().name)
        release.wait(30)
        written.set()
        return write(path, cache)

    monkeypatch.setattr(prefix_cache, "_write_entry", held)
    alpha, beta, gamma = chat("alpha: what changed?"), chat("beta: what broke?"), chat("gamma: what next?")
    first = engine.generate("chat", alpha)
    engine.generate("chat", beta)  # evicts alpha: listed by the tier at once, its file held back
    assert prefix.snapshot()["disk_entries"] == 1 and not disk_files(tmp_path)
    engine.generate("chat", gamma)  # evicts beta, while alpha's file is still being written
    assert not written.is_set(), "the engine waited for a file"
    assert writers and all(name.startswith("prefix-disk") for name in writers)
    assert prefix.snapshot()["spills"] == 2 and prefix.snapshot()["disk_entries"] == 2
    # Held in memory until written, and /health says so.
    assert engine.memory()["prefix_spilling"] == sum(e.nbytes for e in prefix.disk.entries()) > 0

    release.set()
    again = engine.generate("chat", alpha)  # served from its file, once written
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["text"] == first["text"] == plain.generate("chat", alpha)["text"]
    prefix.flush()
    assert prefix.disk is not None and set(disk_files(tmp_path)) == {e.file for e in prefix.disk.entries()}
    assert prefix.snapshot()["disk_hits"] == 1
    assert engine.memory()["prefix_spilling"] == 0


def beta_tokens(engine: Engine, request: dict) -> int:
    return len(engine.chat_tokens(request))


def test_the_disk_tier_stays_within_its_bound(tiny_model: Path, tmp_path: Path):
    engine = Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    disk = prefix.attach_disk(tmp_path, 1 << 30)
    engine.generate("chat", chat("question number 0"))
    engine.generate("chat", chat("question number 1"))
    size = disk.nbytes  # one entry's file
    assert size > 0
    bound = int(size * 2.5)
    disk.max_bytes = bound
    for i in range(2, 7):
        engine.generate("chat", chat(f"question number {i}"))
        assert disk.nbytes <= bound and sum(disk_files(tmp_path).values()) <= bound
    assert len(disk) == 2 and prefix.snapshot()["spills"] == 6
    # The oldest went: only the system prompt is left to reuse (from the entry in memory).
    old = engine.generate("chat", chat("question number 0"))
    assert old["usage"]["cached_tokens"] < old["usage"]["prompt_tokens"] - 3
    # A save lists what memory and disk hold, within the same bound.
    assert engine.save_prefix_cache(tmp_path, bound) == len(json.loads((tmp_path / MANIFEST).read_text())["entries"])
    listed = json.loads((tmp_path / MANIFEST).read_text())["entries"]
    assert sum(e["bytes"] for e in listed) <= bound and {e["file"] for e in listed} == set(disk_files(tmp_path))


def test_a_restart_reads_what_fits_and_serves_the_rest_from_disk(tiny_model: Path, tmp_path: Path):
    engine, plain = Engine.load(str(tiny_model)), Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=4, max_bytes=1 << 30)
    prefix.attach_disk(tmp_path, 1 << 30)
    asks = [chat(f"task {i}: summarize the diff") for i in range(3)]
    answers = [engine.generate("chat", a)["text"] for a in asks]
    assert engine.save_prefix_cache(tmp_path, 1 << 30) == 3

    restarted = Engine.load(str(tiny_model))
    warm = restarted.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    warm.attach_disk(tmp_path, 1 << 30)
    assert warm.load(tmp_path) == 3
    assert warm.snapshot()["entries"] == 1 and warm.snapshot()["disk_entries"] == 3
    ((held, _),) = warm.entries()  # the most recent
    assert held[: len(engine.chat_tokens(asks[2]))] == engine.chat_tokens(asks[2])
    got = restarted.generate("chat", asks[0])
    assert got["usage"]["cached_tokens"] == got["usage"]["prompt_tokens"] - 1
    assert got["text"] == answers[0] == plain.generate("chat", asks[0])["text"]
    assert warm.snapshot()["disk_hits"] == 1
    # The entry ids routing publishes include the disk's.
    assert len(warm.entry_ids()) >= 3


def test_quantized_entries_on_disk_are_not_served_when_bits_are_off(smollm2: Path, tmp_path: Path):
    engine = Engine.load(str(smollm2))
    prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    prefix.bits = 8
    prefix.attach_disk(tmp_path, 1 << 30)
    engine.generate("chat", chat("alpha"))
    engine.generate("chat", chat("beta"))  # alpha goes to disk, quantized
    assert prefix.snapshot()["spills"] == 1
    assert engine.save_prefix_cache(tmp_path, 1 << 30) == 2
    bits = sorted(e["bits"] for e in json.loads((tmp_path / MANIFEST).read_text())["entries"])
    assert bits == [0, 8]  # beta, still in memory and exact; alpha quantized

    exact = Engine.load(str(smollm2)).enable_prefix_cache(max_entries=4, max_bytes=1 << 30)
    exact.attach_disk(tmp_path, 1 << 30)
    assert exact.load(tmp_path) == 1
    assert all(not any(isinstance(c, QuantizedKVCache) for c in layers(cache)) for _, cache in exact.entries())


@pytest.mark.parametrize("family_model", ["qwen3_next"], indirect=True)
def test_a_model_that_checkpoints_is_served_from_disk_too(family_model: Path, tmp_path: Path):
    engine, plain = Engine.load(str(family_model)), Engine.load(str(family_model))
    prefix = engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)  # 4 entries: a turn's checkpoints
    assert prefix.checkpoints
    prefix.attach_disk(tmp_path, 1 << 30)
    first = chat("Tell me a story about a cat on a boat.", max_tokens=10)
    answer = engine.generate("chat", first)["text"]
    assert answer == plain.generate("chat", first)["text"]
    for i in range(2):  # other sessions push the first one's entries out of memory
        engine.generate("chat", chat("Hello!", system=f"You are assistant number {i}. " * 40))
    assert prefix.snapshot()["spills"] >= 2
    history = [{"role": "user", "content": "Tell me a story about a cat on a boat."}]
    history.append({"role": "assistant", "content": answer})
    turn = chat("Make it shorter, please.", history=history, max_tokens=10)
    got = engine.generate("chat", turn)
    # At least the checkpoint at the end of the first prompt (before the decoder's last token), read from disk.
    assert got["usage"]["cached_tokens"] >= len(engine.chat_tokens(first)) - 1
    assert got["text"] == plain.generate("chat", turn)["text"]
    assert prefix.snapshot()["disk_hits"] == 1


@pytest.mark.parametrize("family_model", ["qwen3_next"], indirect=True)
def test_an_entry_read_back_from_disk_serves_its_request_though_memory_holds_only_its_system_prompt(
    family_model: Path, tmp_path: Path
):
    """Memory is kept balanced between the kinds of entries (answers go first, system prompts last): with only a system
    prompt left in memory, an answer or end-of-prompt checkpoint read back from disk was the one entry of its kind, so
    the insert that loaded it evicted it again before its lookup, and the turn was prefilled from its system prompt."""
    engine, plain = Engine.load(str(family_model)), Engine.load(str(family_model))
    try:
        prefix = engine.enable_prefix_cache(max_entries=16, max_bytes=1 << 30)
        prefix.attach_disk(tmp_path, 1 << 30)
        first = chat("Tell me a story about a cat on a boat.", max_tokens=10)
        answer = engine.generate("chat", first)["text"]

        def squeeze() -> None:
            """A bound that holds the system prompt and none of the session's other entries beside it."""
            typed = prefix.typed_entries()
            system = sum(cache_bytes(c) for _, c, kind in typed if kind == "system")
            prefix.lru.max_bytes = system + min(cache_bytes(c) for _, c, kind in typed if kind != "system") - 1
            prefix.lru.trim_to(n_bytes=prefix.lru.max_bytes)

        engine.batcher.call(squeeze)
        assert [kind for _, _, kind in prefix.typed_entries()] == ["system"] and prefix.snapshot()["spills"] >= 2
        history = [{"role": "user", "content": "Tell me a story about a cat on a boat."}]
        history.append({"role": "assistant", "content": answer})
        turn = chat("Make it shorter, please.", history=history, max_tokens=10)
        got = engine.generate("chat", turn)
        assert got["usage"]["cached_tokens"] >= len(engine.chat_tokens(first)) - 1, got["usage"]
        assert got["text"] == plain.generate("chat", turn)["text"]
        assert prefix.snapshot()["disk_hits"] == 1
        assert prefix.snapshot()["bytes"] <= prefix.lru.max_bytes
    finally:
        engine.close()
        plain.close()
