"""Speculative decoding inside the batch (worker.speculative): prompt-lookup drafts verified in the batch's forward
give the plain answers token for token (greedy), alone and batched, under a grammar and with stop strings; the
acceptance rule keeps the target distribution (sampled); the prefix cache and parking work on its caches."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import KVCache, make_prompt_cache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from worker.engine import BatchLimits, Engine, wait  # noqa: E402
from worker.generator import Admission, GeneratorConfig  # noqa: E402
from worker.model_spec import ModelSpec  # noqa: E402
from worker.speculative import (  # noqa: E402
    PromptLookup,
    RaggedKVCache,
    SpeculativeBatch,
    StepCost,
    lookup_draft,
    supports,
)

SOURCE = """import json
from dataclasses import dataclass


@dataclass
class Order:
    item: str
    quantity: int
    price: float


def load(path):
    with open(path) as f:
        return [Order(**row) for row in json.load(f)]


def total(orders):
    result = 0.0
    for order in orders:
        result += order.quantity * order.price
    return result


def cheapest(orders):
    return min(orders, key=lambda order: order.price)


def report(orders):
    lines = []
    for order in orders:
        lines.append(f"{order.item}: {order.quantity} x {order.price:.2f}")
    lines.append(f"total: {total(orders):.2f}")
    return "\\n".join(lines)
"""
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "people": {"type": "integer"}},
    "required": ["city", "country", "people"],
    "additionalProperties": False,
}
CITY = {"city": "Reykjavik", "country": "Iceland", "people": 139875}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def chat(user: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}], "temperature": 0.0, **kw}


EDIT = f"Return this file with the function `total` renamed to `order_total`, and nothing else:\n\n{SOURCE}"
PROMPTS = {
    "edit": chat(EDIT, max_tokens=120),
    "prose": chat("Write a short paragraph about lighthouses.", max_tokens=40),
    "count": chat("Count from 1 to 30, separated by commas.", max_tokens=80),
    "json": chat(
        "Describe Paris as JSON.",
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    ),
    # Under a grammar and under penalties: their drafts are masked and taken as a plain step's would be.
    "json_copy": chat(
        f"Return this JSON object exactly as it is, and nothing else:\n{json.dumps(CITY, separators=(',', ':'))}",
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    ),
    "penalized": chat(EDIT, max_tokens=100, frequency_penalty=0.05, repetition_penalty=1.02),
    "stop": chat(EDIT, max_tokens=100, stop=["statement is"]),
    "tools": chat("What is the weather in Paris? Use the tool.", max_tokens=40, tools=TOOLS),
}


def load(path: Path, mode: str, size: int = 8) -> Engine:
    return Engine.load(str(path), BatchLimits(size=size, speculative=mode))


def together(engine: Engine, requests: list[dict[str, Any]]) -> list[Any]:
    seqs = [engine.submit("chat", r, use_prefix_cache=False) for r in requests]
    return [wait(s, lambda _e: None) for s in seqs]


def same(a: Any, b: Any) -> bool:
    keys = ("text", "finish_reason", "tool_calls")
    return (
        all(a.get(k) == b.get(k) for k in keys) and a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]
    )


# -- greedy: the plain answers, token for token ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2: Path) -> Iterator[dict[str, Engine]]:
    engines = {mode: load(smollm2, mode) for mode in ("off", "lookup")}
    yield engines
    for e in engines.values():
        e.close()


@pytest.fixture(scope="module")
def smol_plain(smol: dict[str, Engine]) -> dict[str, Any]:
    return {name: smol["off"].generate("chat", r, use_prefix_cache=False) for name, r in PROMPTS.items()}


def test_drafting_gives_the_plain_greedy_answers_alone(smol: dict[str, Engine], smol_plain: dict[str, Any]):
    on = smol["lookup"]
    for name, request in PROMPTS.items():
        before = on.draft_stats.accepted
        got = on.generate("chat", request, use_prefix_cache=False)
        assert same(got, smol_plain[name]), f"{name}: {got['text']!r} != {smol_plain[name]['text']!r}"
        # A copy is drafted: several tokens a step. Only where the answer is one: this model answers `edit` greedily
        # with prose about the change (as mlx_lm.generate does), whose drafts are few and taken or not by the step
        # costs this machine measured at the time.
        if name in ("json_copy", "penalized"):
            assert got["text"].startswith(("```python\nimport json", '{"city":"Reykjavik"')), name
            assert on.draft_stats.accepted - before > 10, name
    assert smol_plain["stop"]["finish_reason"] == "stop" and smol_plain["stop"]["usage"]["completion_tokens"] < 100


def test_drafting_gives_the_plain_greedy_answers_in_a_batch(smol: dict[str, Engine], smol_plain: dict[str, Any]):
    names = [*PROMPTS, "edit", "count"]  # two of a kind as well
    results = together(smol["lookup"], [PROMPTS[n] for n in names])
    for name, got in zip(names, results, strict=True):
        assert same(got, smol_plain[name]), f"{name}: {got['text']!r} != {smol_plain[name]['text']!r}"


def test_drafting_gives_the_plain_greedy_answers_on_the_tiny_model(tiny_model: Path):
    requests = [chat(f"{EDIT[: 200 + 40 * i]} {i}", max_tokens=48) for i in range(8)]
    off, on = load(tiny_model, "off"), load(tiny_model, "lookup")
    try:
        plain = [off.generate("chat", r, use_prefix_cache=False) for r in requests]
        alone = [on.generate("chat", r, use_prefix_cache=False) for r in requests[:3]]
        batched = together(on, requests)
        assert all(same(a, b) for a, b in zip(alone, plain, strict=False))
        assert all(same(a, b) for a, b in zip(batched, plain, strict=True))
        assert on.draft_stats.accepted > 0  # its loops are drafted
    finally:
        off.close()
        on.close()


def test_a_draft_model_drafts_where_lookup_finds_nothing(smollm2: Path, tiny_model: Path, smol_plain: dict[str, Any]):
    """A draft model (MLXQ_DRAFT_MODEL, the model spec's `draft`) drafts its greedy continuation for rows that prompt
    lookup finds nothing for: with the model itself as the draft nearly every draft is accepted, with a draft that
    knows nothing (the tiny random model) nearly none; the answers are the plain ones either way, alone and in a
    batch beside rows that draft by lookup."""
    names = ["prose", "json", "edit", "count", "penalized"]
    for draft, good in ((smollm2, True), (tiny_model, False)):
        engine = Engine.load(ModelSpec(str(smollm2), draft=str(draft)), BatchLimits(size=8, speculative="lookup"))
        try:
            assert engine.draft is not None
            got = engine.generate("chat", PROMPTS["prose"], use_prefix_cache=False)
            assert same(got, smol_plain["prose"]), got["text"]
            stats = engine.draft_stats
            if good:  # prose copies nothing from its prompt: only the draft model could draft it
                assert stats.accepted >= 0.8 * stats.drafted and stats.accepted > 20
            else:
                assert stats.accepted <= 0.2 * stats.drafted
            for name, result in zip(names, together(engine, [PROMPTS[n] for n in names]), strict=True):
                assert same(result, smol_plain[name]), f"{name}: {result['text']!r}"
        finally:
            engine.close()


def test_the_clients_prediction_seeds_the_drafts(smol: dict[str, Engine], smol_plain: dict[str, Any]):
    """OpenAI's `prediction`: drafts come from the expected answer (here the plain answer itself, as an editor that
    knows most of the file sends it); the answer is the plain one, and the usage counts what was accepted. A
    prediction that is wrong changes nothing but the rejected count."""
    on, plain = smol["lookup"], smol_plain["prose"]
    predicted = on.generate("chat", {**PROMPTS["prose"], "prediction": plain["text"]}, use_prefix_cache=False)
    assert same(predicted, plain)
    usage = predicted["usage"]
    # Prose copies nothing from its prompt: only the prediction could draft it.
    assert usage["accepted_prediction_tokens"] >= plain["usage"]["completion_tokens"] // 2
    wrong = "Lighthouses are tall towers " * 10
    missed = on.generate("chat", {**PROMPTS["prose"], "prediction": wrong}, use_prefix_cache=False)
    assert same(missed, plain)
    unseeded = on.generate("chat", PROMPTS["prose"], use_prefix_cache=False)
    assert unseeded["usage"]["accepted_prediction_tokens"] == unseeded["usage"]["rejected_prediction_tokens"] == 0


def test_a_seeded_answer_is_the_same_whether_or_not_it_drafts(smol: dict[str, Engine]):
    """A seed reproduces the answer however its steps were drafted (drafting depends on the rest of the batch): the
    n-th token takes the seed's n-th draw, and a rejected draft's draws are drawn again."""
    seeded = {**PROMPTS["edit"], "temperature": 0.3, "seed": 5}
    plain = smol["off"].generate("chat", seeded, use_prefix_cache=False)
    stats = smol["lookup"].draft_stats
    accepted, rejected = stats.accepted, stats.drafted - stats.accepted
    drafted = smol["lookup"].generate("chat", seeded, use_prefix_cache=False)
    assert same(drafted, plain), f"{drafted['text']!r} != {plain['text']!r}"
    assert stats.accepted > accepted and stats.drafted - stats.accepted > rejected  # it drafted, and missed some
    batched = together(smol["lookup"], [seeded, PROMPTS["count"], PROMPTS["prose"]])
    assert same(batched[0], plain)


# -- sampled: the acceptance rule keeps the distribution -----------------------------------------------------------


def small_model(vocab: int = 6) -> llama.Model:
    """A real llama of a small vocabulary (random weights, seeded)."""
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    mx.random.seed(11)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_the_acceptance_rule_keeps_the_target_distribution():
    """The first two sampled tokens after a prompt whose lookup drafts them: their joint frequencies over many draws
    match the model's p(t1)·p(t2 | t1) (chi-square), and drafts were both accepted and rejected along the way."""
    vocab, draws, rows = 6, 3000, 500
    model = small_model(vocab)

    def probs(prompts: list[list[int]]) -> list[list[float]]:
        return cast(list[list[float]], mx.softmax(model(mx.array(prompts))[:, -1], axis=-1).tolist())

    # A repeating prompt (lookup drafts its next tokens) whose first draft is neither certain nor hopeless.
    patterns = [[a, b, c, d] for a in range(vocab) for b in range(vocab) for c in range(vocab) for d in (0, 5)]
    candidates = [(p * 3)[:-2] for p in patterns if len(set(p)) == 4]
    first = probs(candidates)
    prompt = next(c for c, p in zip(candidates, first, strict=True) if 0.2 < p[c[2]] < 0.8)
    assert lookup_draft(PromptLookup(prompt[:-1]), prompt[-1], 2)[:2] == (prompt[2:4], False)
    p1 = probs([prompt])[0]
    p2 = probs([[*prompt, t] for t in range(vocab)])
    expected = [p1[a] * p2[a][b] for a in range(vocab) for b in range(vocab)]

    mx.random.seed(5)
    sampler = make_sampler(temp=1.0)
    stream = mx.default_stream(mx.default_device())
    config = GeneratorConfig(model, eos_ids=(), batch_size=rows, prefill_batch_size=1, prefill_step=64)
    gen = SpeculativeBatch(config, stream)
    counts = [0] * (vocab * vocab)
    for _ in range(draws // rows):
        got: dict[int, list[int]] = {}
        for _ in range(rows):
            admission = Admission(
                rest=list(prompt), max_tokens=3, cache=None, history=[], sampler=sampler, processors=[]
            )
            got[gen.admit(admission)] = []
        while any(len(t) < 3 for t in got.values()):
            for g in gen.step().generated:
                got[g.uid].append(g.token)
        for t in got.values():
            counts[t[0] * vocab + t[1]] += 1
    assert 0 < gen.stats.accepted < gen.stats.drafted
    # Cells expected at least 5 times; the rest pooled into one.
    cells = [(c, e * draws) for c, e in zip(counts, expected, strict=True)]
    big = [(c, e) for c, e in cells if e >= 5]
    small = (sum(c for c, e in cells if e < 5), sum(e for c, e in cells if e < 5))
    if small[1] > 0:
        big.append(small)
    chi2 = sum((c - e) ** 2 / e for c, e in big)
    dof = len(big) - 1
    # The 99.9% quantile of chi-square (Wilson-Hilferty): a correct rule fails about once in a thousand seeds.
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < limit, f"chi2 {chi2:.1f} over {limit:.1f} ({dof} dof)"
    # A rule that took every draft would put its mass on the drafted pair: the test can tell.
    assert expected[prompt[2] * vocab + prompt[3]] < 0.8


def test_a_joins_buffers_are_made_ahead_only_within_the_kv_shares_free_room():
    """Buffers made ahead of a long prompt's join are held for steps, beside the batch's reservation: they are made
    only where the KV share has room for them (GeneratorConfig.room), else the join makes its own as it copies."""
    room = [0]
    stream = mx.default_stream(mx.default_device())
    config = GeneratorConfig(
        small_model(), eos_ids=(), batch_size=4, prefill_batch_size=1, prefill_step=64, room=lambda: room[0]
    )
    gen = SpeculativeBatch(config, stream)
    gen.admit(Admission(rest=[1, 2, 3, 4], max_tokens=50, cache=None, history=[], sampler=None, processors=[]))
    gen.step()  # decoding: the batch has a cache a join extends
    assert gen.warm(3000, seconds=10.0) == 0.0 and gen.ahead_bytes == 0, "made with no room for them"
    room[0] = 1 << 30
    gen.warm(3000, seconds=10.0)
    assert gen.ahead_bytes > 0
    # Two rows of a 3,000-token join, in whole steps of 256 with room for the next write: each layer's keys and
    # values, float32 (2 layers, 2 KV heads of 8 dims).
    rows, size = 2, (3000 + 256) // 256 * 256
    assert gen.ahead_bytes == 2 * 2 * rows * 2 * size * 8 * 4
    room[0] = gen.ahead_bytes - 1  # the batch grew: they go
    assert gen.warm(3000, seconds=10.0) == 0.0 and gen.ahead_bytes == 0


# -- caches: the prefix cache after a speculative turn, a parked sequence ------------------------------------------


def test_the_prefix_cache_hits_after_a_speculative_turn(tiny_model: Path):
    on, off = load(tiny_model, "lookup"), load(tiny_model, "off")
    try:
        on.enable_prefix_cache(max_entries=8)
        first = chat(EDIT, max_tokens=60)
        answer = on.generate("chat", first)
        second = {
            **first,
            "messages": [
                *first["messages"],
                {"role": "assistant", "content": answer["text"]},
                {"role": "user", "content": "Now the same file again, unchanged."},
            ],
        }
        got = on.generate("chat", second)
        assert on.draft_stats.accepted > 0  # the turns were drafted
        assert got["usage"]["cached_tokens"] > len(on.chat_tokens(first)) // 2
        assert same(got, off.generate("chat", second, use_prefix_cache=False))
    finally:
        on.close()
        off.close()


def test_a_parked_speculative_sequence_resumes_with_its_answer(tiny_model: Path):
    engine = load(tiny_model, "lookup", size=2)
    off = load(tiny_model, "off")
    try:
        background = [chat(f"{EDIT[: 300 + 50 * i]}", max_tokens=120) for i in range(6)]
        low = [engine.submit("chat", r, priority="low") for r in background]
        deadline = time.monotonic() + 60
        while sum(len(s.generated) >= 2 for s in low) < 2:  # the batch is full of low-priority work, decoding
            assert time.monotonic() < deadline
            time.sleep(0.002)
        interactive = engine.submit("chat", chat("I am a person waiting", max_tokens=8))
        assert wait(interactive, lambda _e: None)["usage"]["completion_tokens"] == 8
        results = [wait(s, lambda _e: None) for s in low]
        assert engine.batcher.stats()["preempted"] >= 1
        assert engine.draft_stats.accepted > 0
        plain = [off.generate("chat", r, use_prefix_cache=False) for r in background]
        for got, want in zip(results, plain, strict=True):
            assert same(got, want)
    finally:
        engine.close()
        off.close()


# -- pieces ------------------------------------------------------------------------------------------------------


def test_rows_join_with_their_own_caches_and_a_long_row_that_ends_leaves_the_others_length():
    """Prefilled sequences join the ragged batch cache from their own caches, each row reading back its tokens, and
    the batch's writes never change a sequence's own cache. When the long row ends, the buffer shrinks to the other
    rows' length: every later forward and copy would otherwise carry its 700 positions."""

    def own(n: int, seed: int) -> tuple[KVCache, mx.array, mx.array]:
        keys, values = (mx.random.normal((1, 2, n, 8), key=mx.random.key(seed + k)) for k in (0, 100))
        cache = KVCache()
        cache.update_and_fetch(keys, values)
        return cache, keys, values

    rows = [own(40, 1), own(700, 2), own(90, 3)]
    batch = RaggedKVCache.single(rows[0][0])
    batch.extend(*(RaggedKVCache.single(c) for c, _, _ in rows[1:]))
    before = [mx.array(c.keys) for c, _, _ in rows]
    batch.update_and_fetch(mx.ones((3, 2, 1, 8)), mx.ones((3, 2, 1, 8)))
    batch.advance([0, 0, 0])  # written, not kept
    for i, (cache, keys, values) in enumerate(rows):
        row = batch.extract(i)
        assert mx.array_equal(row.keys, keys) and mx.array_equal(row.values, values), i
        assert mx.array_equal(cache.keys, before[i]), "the sequence's own cache is left as it was"
    assert batch.keys is not None and batch.keys.shape[2] >= 700

    batch.filter([0, 2])
    assert batch.keys is not None and batch.keys.shape[0] == 2 and batch.keys.shape[2] <= RaggedKVCache.step
    for i, (_, keys, values) in zip((0, 1), (rows[0], rows[2]), strict=True):
        row = batch.extract(i)
        assert mx.array_equal(row.keys, keys) and mx.array_equal(row.values, values), i


def test_lookup_drafts_the_latest_continuation_and_continues_a_loop():
    context = PromptLookup([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 5])
    assert lookup_draft(context, 6, 4) == ([7, 1, 2, 3], False, 7)  # "5 6" last continued with 7 1 2 3
    assert lookup_draft(context, 42, 4) == ([], False, None)
    loop = PromptLookup([1, 2, 1, 2, 1])
    assert lookup_draft(loop, 2, 5)[:2] == ([1, 2, 1, 2, 1], False)  # past the end it repeats the loop
    seed = PromptLookup([9, 9, 3, 4, 6, 6])
    assert lookup_draft(PromptLookup([0, 3]), 4, 2, seed) == ([6, 6], True, None)  # the client's prediction first
    # A copy being followed goes on where it is, not at the latest occurrence: "5 6" at 0 is followed by 7 8 9.
    assert lookup_draft(context, 6, 3, follow=1) == ([7, 8, 9], False, 2)
    assert lookup_draft(context, 6, 3, follow=2)[2] == 7  # `last` is not the token there: the copy is lost


def test_step_cost_prices_only_what_was_measured_and_one_doubling_past_it():
    cost = StepCost()
    assert cost.estimate(8) is None  # nothing measured: nothing is drafted until the plain step has been
    # A bucket's first forward builds its kernels (on a GPU, MLX compiles them for new shapes): it is not counted.
    cost.add(8, 3.0)
    assert not cost.measured(8) and cost.estimate(8) is None
    # Eight rows measured compute-bound on a CPU (bench figures: 0.12 s plain, 0.16 s at 2, 0.42 s at 9 each).
    cost.add(8, 0.12)
    assert cost.measured(8) and not cost.measured(9) and cost.estimate(8) == 0.12
    assert cost.estimate(16) == 0.12  # one doubling past: tried at the measured price
    assert cost.estimate(17) is None  # further: not tried until 16 has been
    cost.add(16, 2.5)
    assert cost.estimate(16) == 0.12  # its first forward told nothing: tried again at the price below
    cost.add(16, 0.16)
    cost.add(72, 1.0)
    cost.add(72, 0.42)  # bucket 128
    assert cost.estimate(12) == 0.16  # the same bucket
    assert cost.estimate(4) == 0.12  # fewer positions than any measured cost at most the smallest
    assert 0.16 < cast(float, cost.estimate(40)) < 0.42  # between measured buckets: interpolated
    assert cost.estimate(200) == 0.42 and cost.estimate(300) is None
    cost.add(8, 0.2)  # a later measurement moves the average (decaying)
    assert 0.12 < cast(float, cost.estimate(8)) < 0.2


def priced_batch(tiny_model: Path, costs: list[tuple[int, float]]) -> SpeculativeBatch:
    """Eight decoding rows whose drafts have all been accepted so far, at these measured step costs."""
    from mlx_lm import load

    model = load(str(tiny_model))[0]
    config = GeneratorConfig(model=model, eos_ids=(), batch_size=8, prefill_batch_size=8, prefill_step=512)
    batch = SpeculativeBatch(config, mx.default_stream(mx.default_device()))
    for cost in costs:
        batch.cost.add(*cost)  # a bucket's first forward is not counted
        batch.cost.add(*cost)
    for i in range(8):
        batch.admit(
            Admission(rest=[1, 2, 3, i + 4], max_tokens=32, cache=None, history=[], sampler=None, processors=[])
        )
    batch._join()
    for row in batch._rows:
        row.alpha = [1.0, 1.0]
    return batch


def test_step_cost_prices_a_deep_context_apart():
    """Every position attends to its row's whole cache: a long prompt that joined a drafting stream was verified at
    the stream's shallow price (a 595 ms step beside 50 ms plain ones on this CPU). A deeper context bucket is priced
    by what was measured there, from its plain step up, as a batch starts."""
    cost = StepCost()
    for _ in range(2):
        cost.add(1, 0.05, context=200)
        cost.add(16, 0.06, context=200)
    assert cost.estimate(16, context=400) == 0.06  # one shallow bucket
    assert cost.estimate(16, context=3000) is None and not cost.measured(1, context=3000)
    for _ in range(2):
        cost.add(1, 0.1, context=3000)
    assert cost.measured(1, context=2500) and cost.estimate(2, context=3000) == 0.1
    assert cost.estimate(16, context=3000) is None, "not tried until the doublings below it are measured there"


def test_eight_rows_on_a_compute_bound_forward_do_not_draft_nine_positions(tiny_model: Path):
    """A step's length is chosen by the measured cost where the batch runs: with one row's sure draft and seven
    without, nine positions a row at 3.5x a plain step's price cannot pay (8 + 8 tokens for 3.5x the time)."""
    batch = priced_batch(tiny_model, [(8, 0.12), (16, 0.16), (32, 0.24), (72, 0.42)])
    sure = [[7] * 8] + [[] for _ in range(7)]
    assert batch._trim(sure) == [[]] * 8
    eager = [[7] * 8 for _ in range(8)]  # every row copies: longer steps pay
    assert len(batch._trim(eager)[0]) >= 1
    batch.prefill_waits = True  # while prompts wait for prefill, no drafting step dearer than a plain one
    assert batch._trim(eager) == [[]] * 8


def test_a_few_copying_rows_do_not_slow_the_rest(tiny_model: Path):
    """Memory-bound prices (nine positions a row for 2x a plain step): two rows sure of eight drafts beside six
    with none would raise the batch's total tokens per second (6 + 2·9 tokens for 2x the time), but every other
    row's tokens would come at half the rate. The step length maximizes the geometric mean of the rows' rates:
    the two draft little, and when every row copies, all of them draft (nearly) in full."""
    batch = priced_batch(tiny_model, [(8, 0.10), (16, 0.11), (32, 0.13), (72, 0.20)])
    plain, nine = batch.cost.estimate(8), batch.cost.estimate(72)
    assert plain is not None and nine is not None and (6 + 2 * 9) / nine > 8 / plain  # the total would draft 8
    few = [[7] * 8, [7] * 8] + [[] for _ in range(6)]
    assert len(batch._trim(few)[0]) <= 2
    every = [[7] * 8 for _ in range(8)]
    assert len(batch._trim(every)[0]) >= 6


def test_models_whose_cache_cannot_take_ragged_rows_decode_with_mlx_lm(family_models: Any):
    from mlx_lm import load as mlx_load

    model, _ = mlx_load(str(family_models("gemma3_text")))
    assert not supports(model)  # sliding-window layers
    llama_model, _ = mlx_load(str(family_models("llama")))
    assert supports(llama_model)


def test_concurrent_clients_see_their_own_answers(tiny_model: Path):
    """Requests that arrive while others decode (rows join a batch in flight, of other lengths) still get theirs."""
    engine, off = load(tiny_model, "lookup"), load(tiny_model, "off")
    try:
        requests = [chat(f"{EDIT[: 150 + 60 * i]}", max_tokens=30 + 5 * i) for i in range(6)]
        results: list[Any] = [{}] * len(requests)

        def one(i: int) -> None:
            time.sleep(0.05 * i)
            results[i] = engine.generate("chat", requests[i], use_prefix_cache=False)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for got, r in zip(results, requests, strict=True):
            assert same(got, off.generate("chat", r, use_prefix_cache=False))
    finally:
        engine.close()
        off.close()


def test_a_rows_first_token_is_never_read_after_a_timed_forward(monkeypatch: pytest.MonkeyPatch):
    # A timed plain step reads its tokens after its own forward: the step that reports a row's first token is not
    # timed, whatever the schedule says (here: every step), so its client does not wait a decode step more for it.
    monkeypatch.setattr("worker.speculative.PLAIN_TIMED_EVERY", 1)
    model = small_model(vocab=32)
    config = GeneratorConfig(model, eos_ids=(), batch_size=4, prefill_batch_size=4, prefill_step=64)
    batch = SpeculativeBatch(config, mx.default_stream(mx.default_device()))
    monkeypatch.setattr(batch, "_drafts", lambda: None)  # plain steps only: a verify step reads its tokens after it
    timed: list[int] = []
    add = batch.cost.add
    monkeypatch.setattr(batch.cost, "add", lambda *a, **k: (timed.append(steps), add(*a, **k)))

    def admit(prompt: list[int]) -> int:
        cache = make_prompt_cache(model)
        model(mx.array(prompt[:-1])[None], cache=cache)
        mx.eval([c.state for c in cache])
        return batch.admit(
            Admission(rest=prompt[-1:], max_tokens=6, cache=cache, history=prompt[:-1], sampler=None, processors=[])
        )

    firsts: dict[int, int] = {}
    uids = [admit([1, 5, 7, 9, 3])]
    for steps in range(8):
        if steps == 3:
            uids.append(admit([4, 4, 2, 8]))
        for g in batch.step().generated:
            firsts.setdefault(g.uid, steps)
    assert set(firsts) == set(uids)
    assert firsts[uids[1]] not in timed and firsts[uids[0]] not in timed, (firsts, timed)
    assert len(timed) >= 5  # and the plain steps that report no first token were timed
