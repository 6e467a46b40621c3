"""Continuous batching in the engine, on the tiny random llama: many requests share each decoding step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.blas import preload_openblas

preload_openblas()

from worker.batcher import KvLimit  # noqa: E402
from worker.engine import BatchLimits, Engine, wait  # noqa: E402


def chat(user: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": user}], "temperature": 0.0, "max_tokens": 16, **kw}


def run_together(engine: Engine, requests: list[dict], **kw) -> list[dict]:
    results: list[dict] = [{}] * len(requests)

    def one(i: int) -> None:
        results[i] = engine.generate("chat", requests[i], **kw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Iterator[Engine]:
    engine = Engine.load(str(tiny_model), BatchLimits(size=8))
    yield engine
    engine.close()  # a running engine thread can abort the interpreter's exit (MLX's thread-locals)


def test_concurrent_greedy_requests_get_what_they_get_alone(tiny: Engine):
    requests = [chat(f"question {i}: " + "why " * i, max_tokens=12 + i) for i in range(8)]
    alone = [tiny.generate("chat", r) for r in requests]
    together = run_together(tiny, requests)
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["usage"] for r in together] == [r["usage"] for r in alone]


def test_seeded_sampling_is_reproducible_inside_a_batch(tiny: Engine):
    seeded = chat("tell me a story", temperature=1.0, seed=11, max_tokens=20)
    alone = tiny.generate("chat", seeded)
    together = run_together(tiny, [seeded, chat("a", temperature=1.0, max_tokens=20), chat("b", max_tokens=20)])
    assert together[0]["text"] == alone["text"]


def test_the_engine_decodes_them_together(tiny: Engine):
    seen = []
    seqs = [tiny.submit("chat", chat(f"interleave {i}", max_tokens=30)) for i in range(4)]
    lock = threading.Lock()

    def relay(i: int) -> None:
        wait(seqs[i], lambda e: e["type"] == "delta" and _append(lock, seen, i))

    threads = [threading.Thread(target=relay, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # Deltas of different requests alternate, not one request after another.
    switches = sum(1 for a, b in zip(seen, seen[1:], strict=False) if a != b)
    assert switches > 4, seen


def _append(lock: threading.Lock, seen: list[int], i: int) -> bool:
    with lock:
        seen.append(i)
    return True


def test_cancelling_one_leaves_the_others_untouched(tiny: Engine):
    requests = [chat(f"cancel test {i}", max_tokens=40) for i in range(4)]
    alone = [tiny.generate("chat", r) for r in requests]
    seqs = [tiny.submit("chat", r) for r in requests]
    seqs[1].cancelled.set()
    results = [wait(s, lambda _e: None) for s in seqs]
    assert results[1]["finish_reason"] == "cancelled"
    assert [results[i]["text"] for i in (0, 2, 3)] == [alone[i]["text"] for i in (0, 2, 3)]


def test_prefix_cache_inside_a_batch(tiny_model: Path):
    engine = Engine.load(str(tiny_model), BatchLimits(size=8))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    system = {"role": "system", "content": "You are a careful agent. " * 30}
    first = engine.generate(
        "chat", {"messages": [system, {"role": "user", "content": "turn one"}], "temperature": 0, "max_tokens": 8}
    )
    history = [system, {"role": "user", "content": "turn one"}, {"role": "assistant", "content": first["text"]}]
    follow_up = {"messages": [*history, {"role": "user", "content": "turn two"}], "temperature": 0, "max_tokens": 8}
    others = [chat(f"unrelated {i}", max_tokens=20) for i in range(3)]
    results = run_together(engine, [follow_up, *others])
    assert results[0]["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    # The follow-up extended the first turn's entry: it was moved out of the trie, not copied.
    assert prefix.stats.taken >= 1


def test_a_prefix_a_waiting_request_shares_is_copied_not_taken(tiny_model: Path):
    engine = Engine.load(str(tiny_model), BatchLimits(size=8))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    base = {"messages": [{"role": "user", "content": "shared " * 40}], "temperature": 0, "max_tokens": 4}
    engine.generate("chat", base)
    [(entry, _cache)] = prefix.entries()
    taken = prefix.stats.taken
    fetched = engine.batcher.call(lambda: prefix.fetch(entry + [5, 6], others=[entry + [7, 8]]))
    assert fetched.cached_tokens == len(entry) and prefix.stats.taken == taken
    assert prefix.snapshot()["entries"] == 1  # still there for the waiting request
    fetched = engine.batcher.call(lambda: prefix.fetch(entry + [5, 6]))
    assert fetched.cached_tokens == len(entry) and prefix.stats.taken == taken + 1
    assert prefix.snapshot()["entries"] == 0  # moved out: the request inserts its extension when done


def test_interactive_request_overtakes_a_full_batch_of_low_priority_work(tiny_model: Path):
    engine = Engine.load(str(tiny_model), BatchLimits(size=4))
    low = [engine.submit("chat", chat(f"background job {i}", max_tokens=60), priority="low") for i in range(32)]
    # The batch is full of low-priority work none of which ends within the next steps: the interactive request
    # cannot take a slot freed as it comes, it must park one (a group that has gone too far is let finish).
    deadline = time.monotonic() + 60
    while not (
        len(running := [s for s in low if s.generated and not s.done.is_set()]) == 4
        and all(len(s.generated) <= 30 for s in running)
    ):
        assert time.monotonic() < deadline, "the batch never filled"
        time.sleep(0.001)
    interactive = engine.submit("chat", chat("I am a person waiting", max_tokens=8))
    result = wait(interactive, lambda _e: None)
    unfinished = sum(1 for s in low if not s.done.is_set())
    assert result["usage"]["completion_tokens"] == 8
    assert unfinished >= 24, f"only {unfinished} low-priority requests were still running"
    low_results = [wait(s, lambda _e: None) for s in low]
    assert all(r["usage"]["completion_tokens"] == 60 for r in low_results)
    # Preempted sequences resumed from their own cache and still give their greedy answer.
    assert engine.batcher.stats()["preempted"] >= 1
    alone = [engine.generate("chat", chat(f"background job {i}", max_tokens=60)) for i in range(4)]
    assert [r["text"] for r in low_results[:4]] == [r["text"] for r in alone]


@pytest.mark.parametrize("age_s", [1.0, 0.0])
def test_an_interactive_flood_that_never_lets_up_does_not_starve_low_priority_work(tiny_model: Path, age_s: float):
    """Six clients keep a batch of two full and its queue never empty; a low-priority request that has waited `age_s`
    is admitted as an interactive one and ends while the flood goes on. 0: strict priority, which holds it to the end."""
    engine = Engine.load(str(tiny_model), BatchLimits(size=2, low_age_s=age_s))
    flooding = threading.Event()
    flooding.set()

    def client(i: int) -> None:
        n = 0
        while flooding.is_set():
            engine.generate("chat", chat(f"client {i} turn {n}", max_tokens=24))
            n += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.5)
        low = engine.submit("chat", chat("a batch line", max_tokens=8), priority="low")
        ended = low.done.wait(timeout=age_s + 15 if age_s else 8)
        assert ended == bool(age_s), "strict priority let it in" if not age_s else "still starved"
    finally:
        flooding.clear()
        for t in clients:
            t.join(timeout=60)
    assert wait(low, lambda _e: None)["usage"]["completion_tokens"] == 8
    engine.close()


def test_request_over_the_token_budget_waits_and_completes(tiny_model: Path):
    engine = Engine.load(str(tiny_model), BatchLimits(size=8, tokens=200))
    big = chat("a long question " * 20, max_tokens=80)  # over the budget beside anything else
    small = [chat(f"small {i}", max_tokens=40) for i in range(3)]
    results = run_together(engine, [*small, big])
    assert all(r["finish_reason"] == "length" for r in results)
    assert results[-1]["usage"]["completion_tokens"] == 80
    assert engine.batcher.stats()["active"] == engine.batcher.stats()["waiting"] == 0


def test_engine_work_outside_the_step_that_pauses_the_batch_is_logged(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
):
    """What the engine thread does besides the generator's step (the prefix cache's insert when a sequence ends, its
    fetch when one is admitted) pauses every decoding stream as a step does: when it runs long it is logged, so a
    pause can be traced to it; a sequence ending as usual is not."""
    engine = Engine.load(str(tiny_model), BatchLimits(size=4))
    prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
    with caplog.at_level("WARNING", logger="worker.batcher"):
        engine.generate("chat", chat("an ordinary end", max_tokens=4))
        assert not [r for r in caplog.records if "slow" in r.getMessage()]
        insert = prefix.insert

        def slow_insert(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.4)
            return insert(*args, **kwargs)

        prefix.insert = slow_insert  # type: ignore[method-assign]
        engine.generate("chat", chat("an end that takes long", max_tokens=4))
        # The answer is complete once the insert is done; the aftermath is logged just after, on the engine thread.
        deadline = time.monotonic() + 10
        while not (slow := [r.getMessage() for r in caplog.records if "slow step's aftermath" in r.getMessage()]):
            assert time.monotonic() < deadline, "never logged"
            time.sleep(0.05)
    assert len(slow) == 1 and "(1 ended)" in slow[0], slow


def test_the_heap_goes_back_once_the_batch_has_rested_not_between_turns(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
):
    # An agent's next turn comes a few ms after the answer before it: the heap is trimmed after a rest, not in between.
    trims: list[float] = []
    # This engine's trims only: an earlier test's engine, still alive, trims when its batch rests too.
    mine: list[threading.Thread] = []
    monkeypatch.setattr(
        "worker.batcher.trim_heap", lambda: threading.current_thread() in mine and trims.append(time.monotonic())
    )
    monkeypatch.setattr("worker.batcher.IDLE_TRIM_S", 2.0)  # a loaded machine's pause between turns is not a rest
    engine = Engine.load(str(tiny_model), BatchLimits(size=4))
    mine.append(engine.batcher._thread)
    try:
        engine.generate("chat", chat("Name a colour.", max_tokens=4))
        trims.clear()  # the load's warm-up rested before this
        for turn in range(3):
            last = time.monotonic()
            engine.generate("chat", chat(f"Turn {turn}: name a fruit.", max_tokens=4))
        assert trims == []
        deadline = time.monotonic() + 20
        while not trims and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(trims) == 1 and trims[0] - last >= 2.0, trims
    finally:
        engine.close()


def test_a_finished_sequence_counts_as_in_flight_until_its_cache_is_stored(tiny_model: Path):
    # /health reads the batch from another thread: between a sequence leaving the batch and its cache reaching the
    # prefix cache (with the entries that insert evicts on their way to disk), its KV was counted nowhere.
    engine = Engine.load(str(tiny_model), BatchLimits(size=4))
    try:
        prefix = engine.enable_prefix_cache(max_entries=8, max_bytes=1 << 30)
        seen: list[dict[str, int]] = []
        insert = prefix.insert

        def counted_insert(*args: Any, **kw: Any) -> Any:
            seen.append(engine.batcher.stats())
            return insert(*args, **kw)

        prefix.insert = counted_insert  # type: ignore[method-assign]
        engine.generate("chat", chat("Name a colour.", max_tokens=4))
        assert seen and all(s["active"] == 1 and s["kv_bytes"] > 0 for s in seen), seen
        assert engine.batcher.stats()["active"] == 0
    finally:
        engine.close()


def test_a_parked_cache_counts_within_the_kv_share(tiny_model: Path):
    """A parked sequence keeps its cache only while it leaves the room it was parked for: the batch and the parked
    caches together stay within the KV share (a parked cache once counted nowhere), and /health shows them."""
    engine = Engine.load(str(tiny_model), BatchLimits(size=4))
    try:
        prefix = engine.enable_prefix_cache(max_entries=16)  # a parked cache whose room is wanted goes there
        batcher = engine.batcher
        requests = [chat(f"background job {i}", max_tokens=200) for i in range(4)]
        answers = [engine.generate("chat", r) for r in requests]
        alone = [a["text"] for a in answers]
        seen: list[tuple[int, int, int]] = []  # at each admission: sequences in the batch, its KV and the parked caches
        start = batcher._start

        def counted_start(seq: Any, others: Any) -> None:
            start(seq, others)
            memory = engine.memory()
            seen.append((len(batcher._active), memory["kv_in_flight"], memory["kv_parked"]))

        batcher._start = counted_start  # type: ignore[method-assign]

        def park_one() -> list[dict]:
            seen.clear()
            low = [engine.submit("chat", r, priority="low") for r in requests]
            deadline = time.monotonic() + 60
            while not all(len(s.generated) >= 20 for s in low):
                assert time.monotonic() < deadline, "the batch never filled"
                time.sleep(0.005)
            interactive = wait(engine.submit("chat", chat("I am a person waiting", max_tokens=8)), lambda _e: None)
            assert interactive["usage"]["completion_tokens"] == 8
            return [wait(s, lambda _e: None) for s in low]

        # The batch is full by its size, with KV to spare: the parked cache is kept, and counted.
        results = park_one()
        assert [r["text"] for r in results] == alone
        assert any(parked > 0 for _n, _kv, parked in seen), seen
        assert all(kv + parked <= batcher.kv.bytes for _n, kv, parked in seen)

        # The batch is full by its KV share: the interactive request needs the parked cache's room, so it goes to the
        # prefix cache, and the sequence resumes from there with the same answer.
        shape = batcher.kv.shape
        tight = shape.reservation(answers[0]["usage"]["prompt_tokens"] + 200, 4) + 8 * shape.per_token
        batcher.call(lambda: setattr(batcher, "kv", KvLimit(bytes=tight, shape=shape)))
        batcher.call(prefix.clear)  # the lines' earlier answers would serve their resume: only the parked cache may
        cached: list[int] = []  # what each prefix-cache lookup found
        fetch = prefix.fetch

        def counted_fetch(tokens: list[int], **kw: Any) -> Any:
            found = fetch(tokens, **kw)
            cached.append(found.cached_tokens)
            return found

        prefix.fetch = counted_fetch  # type: ignore[method-assign]
        results = park_one()
        assert [r["text"] for r in results] == alone
        assert batcher.stats()["preempted"] >= 2
        assert all(n == 1 or kv + parked <= tight for n, kv, parked in seen), (seen, tight)
        # A line resumed with more than its prompt cached: its own tokens, generated before it was parked.
        assert max(cached) > answers[0]["usage"]["prompt_tokens"], f"no resume from the parked cache: {cached}"
        assert engine.memory()["kv_parked"] == 0
    finally:
        engine.close()
