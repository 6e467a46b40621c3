"""The prefix-trie KV cache on real models (the tiny llama and SmolLM2), never a fake model key."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from worker.blas import preload_openblas

preload_openblas()

from worker import prefix_cache  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.prefix_cache import LOCK, MANIFEST, PrefixCache  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a careful coding agent. " * 40}


def turn(history: list[dict], user: str, **kw) -> dict:
    return {
        "messages": [SYSTEM, *history, {"role": "user", "content": user}],
        "temperature": 0.0,
        "max_tokens": kw.pop("max_tokens", 8),
        **kw,
    }


@pytest.fixture
def tiny(tiny_model: Path) -> Engine:
    engine = Engine.load(str(tiny_model))
    engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    return engine


def test_growing_conversation_prefills_only_the_new_suffix(smollm2: Path):
    engine = Engine.load(str(smollm2))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    first = engine.generate("chat", turn([], "What is the capital of France?"))
    assert first["usage"]["cached_tokens"] == 0
    history = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": first["text"]},
    ]
    second = engine.generate("chat", turn(history, "And of Italy?"))
    prompt1 = first["usage"]["prompt_tokens"]
    # Everything the first turn saw (prompt and answer, re-rendered by the template) is reused.
    assert second["usage"]["cached_tokens"] >= prompt1 + first["usage"]["completion_tokens"] - 1
    assert second["usage"]["prompt_tokens"] - second["usage"]["cached_tokens"] < 20
    snap = prefix.snapshot()
    assert snap["hits"] == 1 and snap["misses"] == 1 and snap["skips"] == 0
    assert snap["tokens_saved"] == second["usage"]["cached_tokens"]


def test_same_greedy_output_with_and_without_the_cache(tiny_model: Path, tiny: Engine):
    plain = Engine.load(str(tiny_model))
    history: list[dict] = []
    for user in ("first question", "second question", "third"):
        req = turn(history, user, max_tokens=10)
        cached, uncached = tiny.generate("chat", req), plain.generate("chat", req)
        assert cached["text"] == uncached["text"]
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": cached["text"]}]
    assert tiny.prefix.stats.tokens_saved > 0


def test_exact_fit_trims_one_token(tiny: Engine):
    req = turn([], "hello", max_tokens=4)
    a = tiny.generate("chat", req)
    b = tiny.generate("chat", req)
    assert b["usage"]["cached_tokens"] == b["usage"]["prompt_tokens"] - 1
    assert a["text"] == b["text"]


def test_entry_bound_evicts_least_recently_used(tiny_model: Path):
    engine = Engine.load(str(tiny_model))
    prefix = engine.enable_prefix_cache(max_entries=2, max_bytes=1 << 30)
    for user in ("alpha", "beta", "gamma"):
        engine.generate(
            "chat", {"messages": [{"role": "user", "content": user * 50}], "temperature": 0, "max_tokens": 2}
        )
    assert prefix.snapshot()["entries"] == 2
    again = engine.generate(
        "chat", {"messages": [{"role": "user", "content": "alpha" * 50}], "temperature": 0, "max_tokens": 2}
    )
    # Evicted: only the template's shared opening (its default system prompt) can still match.
    assert again["usage"]["cached_tokens"] < again["usage"]["prompt_tokens"] - 40


def test_byte_bound_is_enforced(tiny_model: Path):
    engine = Engine.load(str(tiny_model))
    one = Engine.load(str(tiny_model))
    one.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    one.generate("chat", {"messages": [{"role": "user", "content": "alpha " * 100}], "temperature": 0, "max_tokens": 2})
    entry_bytes = one.prefix.snapshot()["bytes"]
    limit = int(entry_bytes * 1.5)
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=limit)
    for word in ("alpha", "beta", "gamma", "delta"):
        engine.generate(
            "chat", {"messages": [{"role": "user", "content": f"{word} " * 100}], "temperature": 0, "max_tokens": 2}
        )
        assert prefix.snapshot()["bytes"] <= limit
    assert prefix.snapshot()["entries"] == 1


def test_cache_failure_falls_back_and_is_counted(tiny: Engine):
    req = turn([], "fallback please")
    expected = tiny.generate("chat", req)

    def broken(*_a, **_k):
        raise RuntimeError("injected")

    tiny.prefix.lru.fetch_nearest_cache = broken
    result = tiny.generate("chat", req)
    assert result["text"] == expected["text"] and result["usage"]["cached_tokens"] == 0
    assert tiny.prefix.stats.skips == 1


def fresh(tiny_model: Path, **kw) -> PrefixCache:
    """A restarted worker's empty prefix cache, for the same weights."""
    return Engine.load(str(tiny_model)).enable_prefix_cache(max_entries=kw.get("max_entries", 8), max_bytes=1 << 30)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def test_save_load_round_trip(tiny_model: Path, tiny: Engine, tmp_path: Path):
    req = turn([], "persist me")
    first = tiny.generate("chat", req)
    assert tiny.save_prefix_cache(tmp_path, 1 << 30) == 1
    (entry,) = manifest(tmp_path)["entries"]
    assert entry["type"] == "assistant"  # an entry stored after generation (checkpoints are "user", "system")
    assert listing(tmp_path) == sorted([LOCK, MANIFEST, entry["file"]])
    assert entry["bytes"] == (tmp_path / entry["file"]).stat().st_size

    restarted = Engine.load(str(tiny_model))
    prefix = restarted.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    assert prefix.load(tmp_path) == 1
    warm = restarted.generate("chat", req)
    assert warm["usage"]["cached_tokens"] == warm["usage"]["prompt_tokens"] - 1
    assert warm["text"] == first["text"]
    # Saved again with nothing new: nothing is rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert tiny.save_prefix_cache(tmp_path, 1 << 30) == 1
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_a_save_writes_one_file_at_a_time_and_gives_way_to_a_request(tiny: Engine, tmp_path: Path):
    """A save holds the engine for one entry's file at a time: a request served between two files, and a save put
    off for a request keeps what it wrote (the next save writes only the rest)."""
    for word in ("alpha", "beta", "gamma"):
        tiny.generate("chat", turn([], f"{word} " * 20))

    asked: list[int] = []
    assert tiny.save_prefix_cache(tmp_path, 1 << 30, put_off=lambda: asked.append(1) or True) is None
    files = [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    assert len(asked) == 1 and len(files) == 1 and not (tmp_path / MANIFEST).exists()
    written = files[0].stat().st_mtime_ns

    def serve_one() -> bool:
        # Called on this thread between two files: the engine thread is free to answer.
        if not asked:
            asked.append(1)
            assert tiny.generate("chat", turn([], "delta " * 20))["usage"]["completion_tokens"] > 0
        return False

    asked.clear()
    assert tiny.save_prefix_cache(tmp_path, 1 << 30, put_off=serve_one) == 4  # the request's entry listed too
    assert files[0].stat().st_mtime_ns == written
    assert {e["file"] for e in manifest(tmp_path)["entries"]} == {
        p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"
    }


def test_a_save_waits_for_the_engine_to_be_idle_a_while_after_a_job_ends(
    tiny: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A save due at a job's end waits until the engine has been idle SAVE_IDLE_S: a conversation's next turn, sent as
    soon as the answer came, then finds the engine free, not writing an entry's file. The heartbeat makes it after."""
    from types import SimpleNamespace

    from mlxq.settings import Settings
    from worker import prefix_saves
    from worker.prefix_index import PrefixIndex

    monkeypatch.setattr(prefix_saves, "SAVE_IDLE_S", 0.5)
    state = SimpleNamespace(
        settings=Settings(data_dir=tmp_path, prefix_cache_save_s=0), engine=tiny, prefix_index=PrefixIndex()
    )
    saves = prefix_saves.PrefixSaves(state)  # type: ignore[arg-type]
    tiny.generate("chat", turn([], "the first turn"))
    saves.save()  # the job's end
    saves.save_due()  # a heartbeat at once
    assert not list(saves.directory.glob("*")), "saved while the next turn may be on its way"

    # The next turn within the wait puts the save off again.
    tiny.generate("chat", turn([], "the second turn"))
    saves.save()
    time.sleep(0.3)
    saves.save_due()
    assert not list(saves.directory.glob("*"))

    time.sleep(0.3)  # idle for the wait since the last job's end
    saves.save_due()
    deadline = time.monotonic() + 30
    while not (saves.directory / MANIFEST).exists():
        assert time.monotonic() < deadline, "the save was never made"
        time.sleep(0.05)
    assert len(manifest(saves.directory)["entries"]) == 2


def test_a_save_that_dies_midway_leaves_the_previous_one_loadable(
    tiny_model: Path, tiny: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    tiny.generate("chat", turn([], "the first save"))
    assert tiny.save_prefix_cache(tmp_path, 1 << 30) == 1
    before = manifest(tmp_path)
    tiny.generate(
        "chat", {"messages": [{"role": "user", "content": "a second entry " * 20}], "temperature": 0, "max_tokens": 2}
    )

    # The process dies after writing the new entry's file, before the manifest is replaced.
    real = prefix_cache._write_atomic

    def dies_at_the_manifest(path: Path, write) -> None:
        if path.name == MANIFEST:
            raise KeyboardInterrupt("killed")
        real(path, write)

    monkeypatch.setattr(prefix_cache, "_write_atomic", dies_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        tiny.save_prefix_cache(tmp_path, 1 << 30)
    monkeypatch.undo()
    assert manifest(tmp_path) == before
    # What else a crash can leave: half-written temporaries and, for good measure, a truncated entry file.
    (tmp_path / f".{MANIFEST}.x1y2.tmp").write_text('{"format": 2, "entries": [')
    (tmp_path / ".0123abcd.safetensors.x1y2.tmp").write_bytes(b"\x00" * 100)
    (tmp_path / "0123abcd.safetensors").write_bytes((tmp_path / before["entries"][0]["file"]).read_bytes()[:500])

    prefix = fresh(tiny_model)
    assert prefix.load(tmp_path) == 1
    assert [tokens for tokens, _ in prefix.entries()] == [before["entries"][0]["tokens"]]
    assert listing(tmp_path) == sorted([LOCK, MANIFEST, before["entries"][0]["file"]])


def test_files_no_longer_listed_are_removed_by_a_save(tiny_model: Path, tmp_path: Path):
    engine = Engine.load(str(tiny_model))
    engine.enable_prefix_cache(max_entries=1, max_bytes=1 << 30)
    # Files of the earlier format (a JSON sidecar per entry) and a stray temporary.
    for name in ("0old.json", "0old.safetensors", ".0new.safetensors.abc.tmp"):
        (tmp_path / name).write_text("{}")
    engine.generate(
        "chat", {"messages": [{"role": "user", "content": "alpha " * 50}], "temperature": 0, "max_tokens": 2}
    )
    assert engine.save_prefix_cache(tmp_path, 1 << 30) == 1
    first = manifest(tmp_path)["entries"][0]["file"]
    assert listing(tmp_path) == sorted([LOCK, MANIFEST, first])
    engine.generate(
        "chat", {"messages": [{"role": "user", "content": "beta " * 50}], "temperature": 0, "max_tokens": 2}
    )  # evicts alpha
    assert engine.save_prefix_cache(tmp_path, 1 << 30) == 1
    second = manifest(tmp_path)["entries"][0]["file"]
    assert second != first and listing(tmp_path) == sorted([LOCK, MANIFEST, second])
    # Within a byte budget too small for anything, nothing is listed and nothing is kept.
    assert engine.save_prefix_cache(tmp_path, 1) == 0
    assert listing(tmp_path) == sorted([LOCK, MANIFEST]) and manifest(tmp_path)["entries"] == []


def test_truncated_garbage_and_foreign_files_are_skipped(
    tiny_model: Path, tiny: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    for word in ("alpha", "beta", "gamma"):
        tiny.generate(
            "chat", {"messages": [{"role": "user", "content": f"{word} " * 50}], "temperature": 0, "max_tokens": 2}
        )
    assert tiny.save_prefix_cache(tmp_path, 1 << 30) == 3
    entries = manifest(tmp_path)["entries"]
    truncated, garbage, good = (tmp_path / e["file"] for e in entries)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(os.urandom(garbage.stat().st_size))  # the right size, so MLX itself must refuse it
    with caplog.at_level(logging.INFO, logger="worker.prefix_cache"):
        prefix = fresh(tiny_model)
        assert prefix.load(tmp_path) == 1
    assert truncated.name in caplog.text and garbage.name in caplog.text
    assert [tokens for tokens, _ in prefix.entries()] == [entries[2]["tokens"]]
    assert good.exists()

    # A garbage manifest, or one of another format, loads nothing and removes nothing.
    files = listing(tmp_path)
    for text in ("{{{{", json.dumps({**manifest(tmp_path), "format": 1}), json.dumps({"format": 2, "entries": 3})):
        (tmp_path / MANIFEST).write_text(text)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="worker.prefix_cache"):
            assert fresh(tiny_model).load(tmp_path) == 0
        assert MANIFEST in caplog.text and listing(tmp_path) == files
    assert fresh(tiny_model).load(tmp_path / "missing") == 0


def test_the_trie_search_finds_what_mlx_lm_s_does():
    """The prefix trie's search (linear in its entries, where mlx-lm's is quadratic in their tails) answers as mlx-lm's
    on random tries: entries added, taken out, and shortened by a trimmable insert (`pop_prefixes`), one partition's
    and another's; of equally short longer entries either may be named."""
    import random

    from mlx_lm.models.cache import PromptTrie

    rng = random.Random(7)
    ours, theirs = prefix_cache._EvictionTrie(), PromptTrie()
    held: dict[str, list[list[int]]] = {"a": [], "b": []}

    def tokens() -> list[int]:
        base = rng.choice([*[e for h in held.values() for e in h], [1, 2, 3, 4]])
        cut = rng.randint(0, len(base))
        return base[:cut] + [rng.randint(0, 3) for _ in range(rng.randint(0, 12))]

    for step in range(3000):
        model = rng.choice("ab")
        action = rng.random()
        if action < 0.35 or not held[model]:
            entry = tokens()
            if entry:
                assert ours.add(model, entry, step) == theirs.add(model, entry, step)
                if entry not in held[model]:
                    held[model].append(entry)
        elif action < 0.45:
            entry = held[model].pop(rng.randrange(len(held[model])))
            assert ours.pop(model, entry) == theirs.pop(model, entry)
            if not held[model]:  # ours drops an emptied partition's root (TieredLRU's own), mlx-lm's keeps it
                theirs._trie.pop(model, None)
        elif action < 0.5:
            entry = rng.choice(held[model])
            assert ours.pop_prefixes(model, entry) == theirs.pop_prefixes(model, entry)
            held[model] = [e for e in held[model] if not (len(e) < len(entry) and entry[: len(e)] == e)]
        query = tokens()
        got, want = ours.search(model, query), theirs.search(model, query)
        assert (got.exact, got.shorter, got.common_prefix) == (want.exact, want.shorter, want.common_prefix), query
        if want.longer is None:
            assert got.longer is None
        else:
            assert got.longer is not None and len(got.longer) == len(want.longer), (query, got.longer, want.longer)
            assert got.longer in held[model] and got.longer[: got.common_prefix] == query[: got.common_prefix]
