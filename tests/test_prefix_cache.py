"""The prefix-trie KV cache on real models (the tiny llama and SmolLM2), never a fake model key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from worker.blas import preload_openblas

preload_openblas()

from worker.engine import Engine  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a careful coding agent. " * 40}


def turn(history: list[dict], user: str, **kw) -> dict:
    return {"messages": [SYSTEM, *history, {"role": "user", "content": user}], "temperature": 0.0,
            "max_tokens": kw.pop("max_tokens", 8), **kw}


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
    history = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": first["text"]}]
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
        engine.generate("chat", {"messages": [{"role": "user", "content": user * 50}], "temperature": 0,
                                 "max_tokens": 2})
    assert prefix.snapshot()["entries"] == 2
    again = engine.generate("chat", {"messages": [{"role": "user", "content": "alpha" * 50}], "temperature": 0,
                                     "max_tokens": 2})
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
        engine.generate("chat", {"messages": [{"role": "user", "content": f"{word} " * 100}], "temperature": 0,
                                 "max_tokens": 2})
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


def test_save_load_round_trip_and_bad_files_are_skipped(tiny_model: Path, tiny: Engine, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    req = turn([], "persist me")
    first = tiny.generate("chat", req)
    assert tiny.save_prefix_cache(tmp_path, 1 << 30) == 1
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"]

    restarted = Engine.load(str(tiny_model))
    prefix = restarted.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    assert prefix.load(tmp_path) == 1
    warm = restarted.generate("chat", req)
    assert warm["usage"]["cached_tokens"] == warm["usage"]["prompt_tokens"] - 1
    assert warm["text"] == first["text"]

    bad = {"format": 1, "model": prefix.fingerprint(), "mlx_lm": __import__("mlx_lm").__version__, "tokens": [1, 2]}
    (tmp_path / "0bad.json").write_text(json.dumps(bad))
    (tmp_path / "0bad.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "1other.json").write_text('{"format": 1, "model": "someothermodel", "tokens": [1]}')
    (tmp_path / "2junk.json").write_text("{{{{")
    fresh = Engine.load(str(tiny_model)).enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    with caplog.at_level(logging.INFO, logger="worker.prefix_cache"):
        assert fresh.load(tmp_path) == 1
    assert "0bad.json" in caplog.text and "1other.json" in caplog.text and "2junk.json" in caplog.text
