"""Prefix-cache checkpoints for caches that cannot be trimmed (issue 24), on the real engine with tiny hybrid
(qwen3_next: GatedDeltaNet), SSM-hybrid (granitemoehybrid: Mamba2) and sliding-window (gemma3_text, a 32-token window
shorter than every prompt here) models (tests.families).

A session reuses its prefix on every later turn and, after the client edited an earlier answer, everything before
it; a restart keeps the checkpoints; routing sends a session to the worker that holds its checkpoint; a parked
sequence (prefilling, or decoding: its cache cannot be trimmed back) finishes with the answer it has alone. Every
answer equals mlx-lm's own greedy answer on the same weights. Message boundaries (worker.boundaries) are the tokens
that render each leading part of the conversation."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402
from mlx_lm.models.cache import ArraysCache, RotatingKVCache  # noqa: E402
from mlx_lm.tokenizer_utils import load as load_tokenizer  # noqa: E402

from mlxq.delivery import WorkerView, choose  # noqa: E402
from mlxq.keys import prefix_hashes  # noqa: E402
from mlxq.states import RouteReason  # noqa: E402
from worker.boundaries import chat_marks, completion_marks, spaced, stops  # noqa: E402
from worker.engine import BatchLimits, Engine, wait  # noqa: E402
from worker.prefix_cache import MANIFEST, materialize  # noqa: E402
from worker.prefix_index import PrefixIndex  # noqa: E402
from worker.sequence import Sequence  # noqa: E402
from worker.sequence_builder import typed  # noqa: E402

HYBRIDS = ["qwen3_next", "granitemoehybrid", "nemotron_h", "gemma3_text"]
each_hybrid = pytest.mark.parametrize("family_model", HYBRIDS, indirect=True)
PREFILL_STEP = 16  # prompts cross chunks, and the window
ANSWER = 12
TURNS = [
    "Hello! Who are you, and what can you do?",
    "Tell me a story about a cat on a boat.",
    "Make it shorter, please.",
    "Thanks. Now one about a dog.",
]
LONG = "Tell me everything about the sea, the sky, the mountains and the rivers between them. " * 8


def load(path: Path, *, batch: BatchLimits | None = None, prefix: bool = True) -> Engine:
    engine = Engine.load(str(path), batch)
    engine.prefill_step = PREFILL_STEP  # read when the engine thread starts, on first use
    if prefix:
        engine.enable_prefix_cache(max_entries=16, max_bytes=1 << 30)
    return engine


@pytest.fixture
def engine(family_model: Path) -> Iterator[Engine]:
    engine = load(family_model)
    yield engine
    engine.close()


def chat(messages: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
    return {"messages": messages, "temperature": 0.0, "max_tokens": ANSWER, **kw}


def reference(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's greedy answer on the engine's weights (its end-of-sequence token included, as the engine's)."""
    return [r.token for r in stream_generate(engine.model, engine.tokenizer, prompt, max_tokens=max_tokens)]


def ask(engine: Engine, request: dict[str, Any], **kw: Any) -> tuple[Any, Sequence]:
    seq = engine.submit("chat", request, **kw)
    result = wait(seq, lambda _event: None)
    assert seq.generated == reference(engine, seq.prompt, request["max_tokens"]), "the answer changed"
    return result, seq


def session(engine: Engine, users: list[str], messages: list[dict[str, str]] | None = None) -> list[Sequence]:
    """A chat whose client sends back each decoded answer; each turn's sequence."""
    messages = list(messages or [])
    seqs = []
    for user in users:
        messages.append({"role": "user", "content": user})
        result, seq = ask(engine, chat(list(messages)))
        seqs.append(seq)
        messages.append({"role": "assistant", "content": result["text"]})
    return seqs


def answer(seq: Sequence) -> str:
    """The answer's text as the client got it (and sends it back)."""
    assert seq.result is not None
    return seq.result["text"]


def hashes(engine: Engine, messages: list[dict[str, str]]) -> list[str]:
    return prefix_hashes("chat", typed(chat(messages), engine.key.path).wire())


def publish(index: PrefixIndex, engine: Engine, messages: list[dict[str, str]], seq: Sequence) -> None:
    """What worker.job_runner records after a request of a model that checkpoints."""
    index.record_checkpoints(hashes(engine, messages), seq.prefix_entry, seq.checkpoint_entries)


def on_engine_thread(engine: Engine, fn: Callable[[], Any]) -> Any:
    return engine.batcher.call(fn)


# -- message boundaries --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Any:
    return load_tokenizer(smollm2)


CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
    {"role": "assistant", "content": "\n\n  Why did the chicken\ncross?  "},
    {"role": "user", "content": "ok"},
]


def test_each_boundary_is_the_tokens_that_render_the_messages_before_it(tokenizer: Any):
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    tokens, marks = chat_marks(tokenizer, CONVERSATION, None, text, last=len(CONVERSATION), min_gap=0)
    assert tokens == tokenizer.encode(text, add_special_tokens=False)
    end = len(tokens) - 1
    assert marks[end] == ("user", len(CONVERSATION)), "the end of the prompt, less the decoder's token"
    found = {k: pos for pos, (_type, k) in marks.items() if pos != end}
    assert set(found) == set(range(1, len(CONVERSATION) + 1)), marks
    for k, pos in found.items():
        head = tokenizer.apply_chat_template(CONVERSATION[:k], add_generation_prompt=False, tokenize=False)
        assert tokens[:pos] == tokenizer.encode(head, add_special_tokens=False), k
    assert marks[found[1]][0] == "system" and all(marks[found[k]][0] == "user" for k in range(2, 7))


def test_only_the_system_boundary_the_last_few_and_the_end_spaced_apart(tokenizer: Any):
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    tokens, marks = chat_marks(tokenizer, CONVERSATION, None, text, last=2)
    end = len(tokens) - 1
    # The system boundary and the end. The end of the last message is a few tokens before the end of the prompt, the
    # end of the last answer (messages[:5]) only a short "ok" before that: one copy of nearly the same cache is enough.
    assert sorted(k or 0 for _type, k in marks.values()) == [1, 6]
    assert marks[end] == ("user", 6)
    longer = [*CONVERSATION[:-1], {"role": "user", "content": "Tell me another one, about a horse and a cart, please."}]
    longer_text = tokenizer.apply_chat_template(longer, add_generation_prompt=True, tokenize=False)
    _tokens, spread = chat_marks(tokenizer, longer, None, longer_text, last=2)
    assert sorted(k or 0 for _type, k in spread.values()) == [1, 5, 6]
    assert all(
        b - a >= 16 for a, b in zip(sorted(spread), sorted(spread)[1:], strict=False) if spread[a][0] != "system"
    )
    # A system message the worker put first (the tool-prompt fallback) has no hash: k counts the client's messages.
    _tokens, shifted = chat_marks(tokenizer, CONVERSATION, None, text, shift=1)
    assert ("system", None) in shifted.values() and shifted[end] == ("user", 5)
    assert completion_marks([5, 6, 7]) == {2: ("user", 1)} and completion_marks([5]) == {}
    assert spaced({3: ("user", 1), 10: ("user", 2), 12: ("user", 3)}, 12, 4) == {3: ("user", 1), 12: ("user", 3)}


def test_a_prefill_stops_only_where_a_stop_closes_what_a_forward_is_worth():
    """A stop ends a chunk: one that closes fewer than `least` tokens since the prefill's start or the last stop (a later
    turn's cache hit two tokens before its last answer's boundary) is passed by; the system boundary never is."""
    marks = {40: ("system", None), 90: ("user", 2), 92: ("user", 3), 130: ("user", 4)}
    assert stops(marks, 0, 16) == (40, 90, 130)
    assert stops(marks, 88, 16) == (130,), "90 closes 2 tokens after the hit; 92 only 4"
    assert stops(marks, 88, 64) == (), "42 tokens are worth less than a forward (the batcher keeps the end anyway)"
    assert stops(marks, 30, 64) == (40, 130), "the system boundary, however close"
    assert stops(marks, 130, 16) == ()


def test_a_template_that_renders_earlier_turns_otherwise_leaves_those_boundaries_out(tokenizer: Any):
    # The whole prompt's text does not start with the rendering of messages[:k] (as when a template drops earlier
    # reasoning, or stamps the time): no checkpoint claims those boundaries.
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    changed = text.replace("Hello! How can I help?", "Hello!")
    tokens, marks = chat_marks(tokenizer, CONVERSATION, None, changed, last=len(CONVERSATION), min_gap=0)
    assert sorted(k or 0 for _type, k in marks.values()) == [1, 2, 6]


class Thinking:
    """SmolLM2's tokenizer as a model that thinks would have it: its generation prompt opens `<think>`."""

    has_thinking = True

    def __init__(self, tokenizer: Any) -> None:
        self._wrapped = tokenizer
        self.think = tokenizer.encode("<think>", add_special_tokens=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def rfind_think_start(self, tokens: list[int], start: int = 0) -> int:
        n = len(self.think)
        return next((i for i in range(len(tokens) - n, start - 1, -1) if tokens[i : i + n] == self.think), -1)


def test_the_end_of_a_thinking_prompt_is_before_its_think(tokenizer: Any):
    thinking = Thinking(tokenizer)
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) + "<think>\n"
    tokens, marks = chat_marks(thinking, CONVERSATION, None, text)
    opens = thinking.rfind_think_start(tokens)
    assert 0 < opens < len(tokens) - 1 and max(marks) == opens and marks[opens] == ("user", len(CONVERSATION))
    # The next turn's template renders the answer without its reasoning: it starts with everything before `<think>`.
    later = [*CONVERSATION, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More"}]
    assert (
        tokenizer.encode(tokenizer.apply_chat_template(later, tokenize=False), add_special_tokens=False)[:opens]
        == tokens[:opens]
    )


# -- a session -------------------------------------------------------------------------------------------------


@each_hybrid
def test_a_four_turn_session_reuses_its_prefix_on_every_later_turn(engine: Engine):
    assert engine.checkpoints and engine.prefix is not None and engine.prefix.checkpoints
    seqs = session(engine, TURNS)
    assert seqs[0].cached_tokens == 0
    for before, seq in zip(seqs, seqs[1:], strict=False):
        # At least the turn before's prompt less its last token (its end-of-prompt checkpoint); never all of it.
        assert len(before.prompt) - 1 <= seq.cached_tokens < len(seq.prompt), (seq.cached_tokens, len(before.prompt))
        assert seq.checkpoint_entries, "each turn keeps checkpoints of what it prefilled"
    snap = engine.prefix.snapshot()
    assert snap["checkpoints"] >= len(TURNS) and snap["skips"] == 0 and snap["hits"] == len(TURNS) - 1


@pytest.mark.parametrize("family_model", ["gemma3_text"], indirect=True)
def test_a_sliding_windows_checkpoint_holds_its_window_and_no_more(engine: Engine):
    # Prefilled in 16-token chunks, a 32-token window held up to 47 tokens when a checkpoint was taken; every turn
    # still gets mlx-lm's own answer (`session` checks) from checkpoints cut to the window.
    seqs = session(engine, TURNS[:3])
    assert all(seq.cached_tokens > 0 for seq in seqs[1:])
    windows = [
        layer
        for _tokens, cache in engine.prefix.entries()
        for layer in cache
        if isinstance(layer, RotatingKVCache) and layer.offset > layer.max_size
    ]
    assert windows and engine.prefix.snapshot()["checkpoints"] >= 3
    assert max(layer.keys.shape[2] for layer in windows) == windows[0].max_size


@each_hybrid
def test_an_edited_earlier_answer_still_reuses_everything_before_it(engine: Engine):
    seqs = session(engine, TURNS[:3])
    # The client's copy of the first answer changed (its reasoning dropped, its text edited): the fourth turn
    # shares the conversation up to the first user message, and nothing after it.
    edited = "I would rather talk about the weather."
    assert edited != answer(seqs[0])
    messages = [
        {"role": "user", "content": TURNS[0]},
        {"role": "assistant", "content": edited},
        {"role": "user", "content": TURNS[1]},
        {"role": "assistant", "content": answer(seqs[1])},
        {"role": "user", "content": TURNS[2]},
        {"role": "assistant", "content": answer(seqs[2])},
        {"role": "user", "content": TURNS[3]},
    ]
    first_user = engine.tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False, tokenize=True)
    _result, seq = ask(engine, chat(messages))
    assert seq.prompt[: len(first_user)] == first_user
    assert len(first_user) <= seq.cached_tokens < len(seq.prompt), (seq.cached_tokens, len(first_user))


# -- restart, routing ------------------------------------------------------------------------------------------


@each_hybrid
def test_a_restart_keeps_the_checkpoints(family_model: Path, engine: Engine, tmp_path: Path):
    assert engine.prefix is not None
    index = PrefixIndex()
    seqs = session(engine, TURNS[:2])
    text = [answer(s) for s in seqs]
    turn2 = [
        {"role": "user", "content": TURNS[0]},
        {"role": "assistant", "content": text[0]},
        {"role": "user", "content": TURNS[1]},
    ]
    publish(index, engine, turn2, seqs[1])
    saved = engine.save_prefix_cache(tmp_path, 1 << 30)
    index.save(tmp_path)
    assert saved == len(engine.prefix.entries())
    types = {e["type"] for e in json.loads((tmp_path / MANIFEST).read_text())["entries"]}
    assert {"user", "assistant"} <= types

    restarted = load(family_model)
    try:
        assert restarted.prefix is not None and restarted.prefix.load(tmp_path) == saved
        reloaded = PrefixIndex()
        reloaded.load(tmp_path)
        held = set(reloaded.held(restarted.prefix.entry_ids()))
        assert hashes(engine, turn2)[-1] in held, "the restarted worker still claims the conversation"
        turn3 = [*turn2, {"role": "assistant", "content": text[1]}, {"role": "user", "content": TURNS[2]}]
        _result, seq = ask(restarted, chat(turn3))
        assert len(seqs[1].prompt) - 1 <= seq.cached_tokens < len(seq.prompt)
    finally:
        restarted.close()


@pytest.mark.parametrize("family_model", ["qwen3_next"], indirect=True)
def test_two_workers_route_a_session_to_its_checkpoint(family_model: Path, engine: Engine):
    other = load(family_model)
    try:
        indexes = {"a": PrefixIndex(), "b": PrefixIndex()}
        engines = {"a": engine, "b": other}

        def views() -> list[WorkerView]:
            return [
                WorkerView(name, "m", 0, frozenset(indexes[name].held(e.prefix.entry_ids())))  # type: ignore[union-attr]
                for name, e in engines.items()
            ]

        mine = [{"role": "system", "content": "You help with boats."}, {"role": "user", "content": TURNS[0]}]
        theirs = [{"role": "user", "content": "Something else entirely, about trains."}]
        result, seq = ask(engine, chat(mine))
        publish(indexes["a"], engine, mine, seq)
        # Its index holds the request's boundaries: the system prompt's (its checkpoint) and the whole request's (the
        # end-of-prompt checkpoint and the entry after generation).
        assert engine.prefix is not None
        assert set(indexes["a"].held(engine.prefix.entry_ids())) == set(hashes(engine, mine))
        _r, seq_b = ask(other, chat(theirs))
        publish(indexes["b"], other, theirs, seq_b)

        later = [*mine, {"role": "assistant", "content": result["text"]}, {"role": "user", "content": TURNS[1]}]
        route = choose(views(), hashes(engine, later), "a session", margin=4)
        assert (route.worker, route.reason, route.matched) == ("a", RouteReason.PREFIX, len(mine))
        # The other worker's session goes there, and a session nobody holds by its session hash alone.
        route = choose(views(), hashes(engine, [*theirs, *later[2:]]), "x", margin=4)
        assert (route.worker, route.matched) == ("b", 1)
        assert choose(views(), hashes(engine, [{"role": "user", "content": "new"}]), "x", 4).matched == 0

        _r, seq2 = ask(engine, chat(later))
        assert seq2.cached_tokens >= len(seq.prompt) - 1
        publish(indexes["a"], engine, later, seq2)
        route = choose(views(), hashes(engine, [*later, {"role": "assistant", "content": "x"}]), "y", margin=4)
        assert (route.worker, route.matched) == ("a", len(later))
    finally:
        other.close()


def test_an_index_saved_before_checkpoints_still_loads(tmp_path: Path):
    (tmp_path / "index.json").write_text(json.dumps({"h1": 5, "h2": [6, 7]}))
    index = PrefixIndex()
    index.load(tmp_path)
    assert sorted(index.held({5, 7})) == ["h1", "h2"] and index.held({7}) == ["h2"]
    index.record_checkpoints(["a", "b", "c"], 9, [(1, 8), (None, 10), (7, 11)])
    assert sorted(index.held({8, 9, 10, 11})) == ["a", "c"]


# -- the prefix cache's entries --------------------------------------------------------------------------------


@pytest.mark.parametrize("family_model", ["qwen3_next"], indirect=True)
def test_checkpoints_are_shared_and_the_answer_is_taken(engine: Engine):
    prefix = engine.prefix
    assert prefix is not None
    system = {"role": "system", "content": "You are a careful agent. " * 6}
    ask(engine, chat([system, {"role": "user", "content": TURNS[0]}]))
    types = {t: tokens for tokens, _c, t in prefix.typed_entries()}
    assert set(types) == {"system", "user", "assistant"}, "the system boundary, the end of the prompt, the answer"
    entries = len(prefix.entries())
    # Another session with the same system prompt: the system checkpoint is copied, never taken.
    other = engine.chat_tokens(chat([system, {"role": "user", "content": "Another question entirely."}]))
    fetched = on_engine_thread(engine, lambda: prefix.fetch(other))
    assert fetched.cached_tokens == len(types["system"]) and fetched.taken is None
    assert len(prefix.entries()) == entries
    # A prompt that extends the answer (the session's next turn) takes it out of the trie (the turn stores its own),
    # unless a waiting prompt extends it too.
    later = [*types["assistant"], 42, 43, 44]
    fetched = on_engine_thread(engine, lambda: prefix.fetch(later, others=[later + [1]]))
    assert fetched.cached_tokens == len(types["assistant"]) and fetched.taken is None
    fetched = on_engine_thread(engine, lambda: prefix.fetch(later))
    assert fetched.cached_tokens == len(types["assistant"]) and fetched.taken is not None
    assert len(prefix.entries()) == entries - 1


def test_a_model_that_can_be_trimmed_keeps_its_path(tiny_model: Path):
    engine = load(tiny_model)
    try:
        assert not engine.checkpoints and engine.prefix is not None and not engine.prefix.checkpoints
        assert engine.prefix.lru.max_size == 16
        _result, seq = ask(engine, chat([{"role": "user", "content": TURNS[0]}]))
        assert seq.checkpoints == {} and seq.checkpoint_entries == []
        assert engine.prefix.snapshot()["checkpoints"] == 0 and len(engine.prefix.entries()) == 1
    finally:
        engine.close()


def test_a_kept_recurrent_state_does_not_pin_the_batchs_buffer():
    batch = ArraysCache(2)
    batch.cache = [mx.random.normal((8, 4, 256, 256)), mx.random.normal((8, 4, 256))]  # 8 sequences, 8 MB
    mx.eval(batch.cache)
    gc.collect()
    before = mx.get_active_memory()
    row = batch.extract(2)
    materialize([row])
    del batch
    gc.collect()
    held = mx.get_active_memory() - before
    own = sum(a.nbytes for a in row.cache)
    assert held < 2 * own, f"the kept row holds {held} bytes, its own {own}: the batch's 8 MB are pinned"


# -- preemption ------------------------------------------------------------------------------------------------


def park_and_resume(engine: Engine, ready: Callable[[Sequence], bool], caplog: pytest.LogCaptureFixture) -> int:
    """A low-priority request parked by an interactive one once `ready`; each finishes with its answer alone.
    How many tokens the parked one kept."""
    low_request = chat([{"role": "user", "content": LONG}], max_tokens=64)
    low = engine.submit("chat", low_request, priority="low")
    interactive: list[Sequence] = []

    def submit_when_ready() -> bool:  # on the engine thread, between two steps
        if ready(low):
            interactive.append(engine.submit("chat", chat([{"role": "user", "content": TURNS[0]}])))
            return True
        return low.done.is_set()

    with caplog.at_level(logging.INFO, logger="worker.batcher"):
        deadline = time.monotonic() + 60
        while not on_engine_thread(engine, submit_when_ready) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert interactive, "the low-priority request ended before it could be parked"
        wait(interactive[0], lambda _event: None)
        wait(low, lambda _event: None)
    assert engine.batcher.stats()["preempted"] >= 1
    assert low.generated == reference(engine, low.prompt, 64), "the parked sequence's answer changed"
    assert interactive[0].generated == reference(engine, interactive[0].prompt, ANSWER)
    (line,) = [r.getMessage() for r in caplog.records if "preempted" in r.getMessage()]
    return int(line.split("(")[1].split()[0])


@each_hybrid
def test_a_sequence_parked_while_prefilling_resumes_from_its_own_cache(
    family_model: Path, caplog: pytest.LogCaptureFixture
):
    engine = load(family_model, batch=BatchLimits(size=1))
    try:
        kept = park_and_resume(
            engine, lambda s: s.uid is not None and 3 * PREFILL_STEP < s.prefilling < len(s.prompt), caplog
        )
        assert kept > 0
    finally:
        engine.close()


@each_hybrid
def test_a_sequence_parked_while_decoding_resumes_from_its_checkpoint(
    family_model: Path, caplog: pytest.LogCaptureFixture
):
    engine = load(family_model, batch=BatchLimits(size=1))
    try:
        kept = park_and_resume(engine, lambda s: len(s.generated) >= 4, caplog)
        # Its cache holds one token too many and cannot be trimmed: dropped, and the prefix cache's end-of-prompt
        # checkpoint serves the resume (only the tokens it generated are prefilled again).
        assert kept == 0
        assert engine.prefix is not None and engine.prefix.stats.hits >= 1
    finally:
        engine.close()


# -- two workers, real processes -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_two_worker_processes_route_a_hybrid_session_to_its_checkpoint(
    family_models: Callable[[str], Path], tmp_path: Path, service_factory: Callable[..., Any]
):
    from tests.conftest import service_env
    from tests.test_e2e_routing import ask as ask_service
    from tests.test_e2e_routing import cluster

    svc = cluster(service_factory, service_env(tmp_path, family_models("qwen3_next")), ["w1", "w2"])
    sessions = [[{"role": "system", "content": f"You are agent {i}. Keep the code small."}] for i in range(3)]
    turns: list[list[tuple[Any, dict[str, Any]]]] = [[] for _ in sessions]
    for step in range(3):
        for i, messages in enumerate(sessions):
            messages.append({"role": "user", "content": f"Step {step} of task {i}."})
            answer_, job = ask_service(svc, messages)
            turns[i].append((answer_.usage, job))  # type: ignore[attr-defined]
            messages.append({"role": "assistant", "content": answer_.choices[0].message.content})  # type: ignore[attr-defined]
    for seen in turns:
        assert len({job["route"]["worker"] for _usage, job in seen}) == 1, seen
        for (before, _job), (usage, job) in zip(seen, seen[1:], strict=False):
            assert job["route"]["reason"] == "prefix", job
            assert usage.prompt_tokens_details.cached_tokens >= before.prompt_tokens - 1, (before, usage)
    health = svc.health()
    assert all(w["prefix_index"] > 0 for w in health["workers"] if w["prefix_entries"])
