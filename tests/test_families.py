"""Every mlx-lm family users run, on the real engine (issue 24): plain, 4-bit quantized, hybrid (linear attention,
Mamba2), sliding-window, mixture-of-experts and mixed-per-layer models, tiny and built here (tests.families).

For each: greedy answers equal mlx-lm's own, alone and batched; grammar-constrained answers are valid and the same
batched; a chat session reuses its prompt on every turn, and still everything before an assistant message the
client edited; the memory parts add up. `mlxq models check` says what each directory is."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx_lm import stream_generate  # noqa: E402

from cli.main import app  # noqa: E402
from mlxq.contract import GenerationResult  # noqa: E402
from tests.families import MODELS  # noqa: E402
from worker.engine import Engine, wait  # noqa: E402

MIB = 1 << 20
# Prefill in chunks this long: the test prompts (25-120 tokens) cross chunks, the 32-token window, Mamba2's
# 32-token chunks, and are right-padded against each other in a batch.
PREFILL_STEP = 16
ANSWER = 8  # tokens per answer: a few are enough to tell models apart, and keep each family fast

each_family = pytest.mark.parametrize("family_model", list(MODELS), indirect=True)

PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Tell me about the sea and the sky and everything in between, please."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Count to five."}],
    [{"role": "user", "content": "What is 2+2? Explain in a long way with many words."}],
]
TURNS = [
    "Hello! Who are you, and what can you do?",
    "Tell me a story about a cat on a boat.",
    "Make it shorter, please.",
    "Thanks. Now one about a dog.",
]
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
JSON_ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def load(path: Path, *, prefix: bool = False) -> Engine:
    engine = Engine.load(str(path))
    engine.prefill_step = PREFILL_STEP  # read when the engine thread starts, on first use
    engine.chunks_grow = False  # a tiny model's forward is mostly fixed cost: its chunks would grow past 16
    if prefix:
        engine.enable_prefix_cache(max_entries=64, max_bytes=1 << 30)
    return engine


@pytest.fixture(scope="module")
def engine(family_model: Path) -> Iterator[Engine]:
    """One family's engine, no prefix cache: answers depend on the prompt alone."""
    engine = load(family_model)
    yield engine
    engine.close()


@pytest.fixture
def cached(family_model: Path) -> Iterator[Engine]:
    """A fresh engine with a prefix cache: what it reuses comes from this test's own requests."""
    engine = load(family_model, prefix=True)
    yield engine
    engine.close()


def chat(messages: list[dict[str, str]], **kw: Any) -> dict[str, Any]:
    return {"messages": messages, "temperature": 0.0, "max_tokens": ANSWER, **kw}


def run(engine: Engine, requests: list[dict[str, Any]]) -> list[tuple[GenerationResult, list[int]]]:
    """Submit every request at once, then wait for each: (result, the tokens generated)."""
    seqs = [engine.submit("chat", request) for request in requests]
    return [(wait(seq, lambda _event: None), seq.generated) for seq in seqs]


def reference(engine: Engine, request: dict[str, Any]) -> list[int]:
    """mlx-lm's own greedy answer on the same weights in memory (the engine's, dequantized on the CPU), prompt and
    length, its end-of-sequence token included as the engine's."""
    prompt = engine.chat_tokens(request)
    return [r.token for r in stream_generate(engine.model, engine.tokenizer, prompt, max_tokens=request["max_tokens"])]


def starts_at(engine: Engine, messages: list[dict[str, str]], k: int) -> int:
    """The prompt position where messages[k] starts: the tokens that render messages[:k] exactly."""
    text = engine.tokenizer.apply_chat_template(messages[:k], add_generation_prompt=False, tokenize=False)
    head = engine.tokenizer.encode(text, add_special_tokens=False)
    prompt = engine.chat_tokens(chat(messages))
    assert prompt[: len(head)] == head, "the template renders the earlier messages the same in the longer prompt"
    return len(head)


def session(engine: Engine, users: list[str]) -> list[dict[str, Any]]:
    """A chat at temperature 0 whose client sends back each decoded answer as the assistant message: each turn's
    request and result, each answer checked against mlx-lm's on the whole prompt."""
    messages: list[dict[str, str]] = []
    turns = []
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        request = chat(list(messages))
        ((result, tokens),) = run(engine, [request])
        assert tokens == reference(engine, request), f"turn {i + 1}: reusing the prompt changed the answer"
        turns.append({"request": request, "result": result, "usage": result["usage"]})
        messages.append({"role": "assistant", "content": result["text"]})
    return turns


# -- greedy answers ------------------------------------------------------------------------------------------


@each_family
def test_greedy_answers_equal_mlx_lm_alone_and_four_at_once(engine: Engine):
    requests = [chat(messages) for messages in PROMPTS]
    expected = [reference(engine, request) for request in requests]
    assert len({t for tokens in expected for t in tokens}) > 4, "the tiny model must not answer one token over"
    alone = [run(engine, [request])[0][1] for request in requests]
    assert alone == expected
    before = engine.speculation()
    together = [tokens for _result, tokens in run(engine, requests)]
    assert together == expected
    # /health's decode counters count every family's decode batch, mlx-lm's (hybrid, windowed) as well as mlxq's.
    after = engine.speculation()
    produced = sum(len(tokens) for tokens in together)
    assert 0 < after["decode_steps"] - before["decode_steps"] < produced
    assert produced - len(requests) <= after["decode_tokens"] - before["decode_tokens"] <= produced


@each_family
def test_grammar_answers_are_valid_and_the_same_batched(engine: Engine):
    requests = [chat(messages, max_tokens=48, response_format=JSON_ANSWER) for messages in PROMPTS]
    alone = [run(engine, [request])[0] for request in requests]
    for result, _tokens in alone:
        assert result["finish_reason"] == "stop", result
        answer = json.loads(result["text"])
        assert set(answer) == {"color", "ok"}
        assert answer["color"] in ("red", "green", "blue") and isinstance(answer["ok"], bool)
    together = run(engine, requests)
    assert [tokens for _r, tokens in together] == [tokens for _r, tokens in alone]
    assert [r["text"] for r, _t in together] == [r["text"] for r, _t in alone]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@each_family
def test_a_forced_tool_call_is_a_valid_call_alone_and_batched(engine: Engine):
    # Random weights never choose a call themselves: a named tool_choice makes every family decode one under the
    # grammar (quantized and mixture-of-experts weights, recurrent and windowed caches alike), and the tool-call
    # parser must read it back.
    forced = {"type": "function", "function": {"name": "get_weather"}}
    requests = [chat(messages, max_tokens=64, tools=[WEATHER], tool_choice=forced) for messages in PROMPTS[:2]]
    alone = [run(engine, [request])[0] for request in requests]
    for result, _tokens in alone:
        assert result["finish_reason"] == "tool_calls", result
        (call,) = result["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        arguments = json.loads(call["function"]["arguments"])
        assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f")
    together = run(engine, requests)
    functions = [[c["function"] for c in r["tool_calls"]] for r, _t in alone]
    assert [[c["function"] for c in r["tool_calls"]] for r, _t in together] == functions


# -- the prefix cache ----------------------------------------------------------------------------------------


@each_family
def test_a_chat_session_reuses_its_prompt_on_every_turn(cached: Engine):
    turns = session(cached, TURNS)
    assert turns[0]["usage"]["cached_tokens"] == 0
    for i in range(1, len(turns)):
        usage, messages = turns[i]["usage"], turns[i]["request"]["messages"]
        # At least everything up to the answer before: the last turn's prompt, as the template renders it now.
        before_answer = starts_at(cached, messages, len(messages) - 2)
        assert 0 < before_answer <= usage["cached_tokens"] < usage["prompt_tokens"], (i + 1, usage, before_answer)


@each_family
def test_an_edited_answer_still_reuses_everything_before_it(cached: Engine):
    turns = session(cached, TURNS[:3])
    messages = [*turns[-1]["request"]["messages"], {"role": "assistant", "content": turns[-1]["result"]["text"]}]
    # The client changed its copy of the first answer: the prompt differs from where that answer starts.
    messages[1] = {"role": "assistant", "content": "I would rather talk about the weather today."}
    assert messages[1]["content"] != turns[0]["result"]["text"]
    messages.append({"role": "user", "content": TURNS[3]})
    request = chat(messages)
    ((result, tokens),) = run(cached, [request])
    assert tokens == reference(cached, request)
    edited_at = starts_at(cached, messages, 1)
    assert edited_at <= result["usage"]["cached_tokens"] < result["usage"]["prompt_tokens"], (
        result["usage"],
        edited_at,
    )


# -- memory --------------------------------------------------------------------------------------------------


@each_family
def test_memory_parts_add_up_and_the_prefix_cache_holds_what_it_counts(family_model: Path):
    # MLX counts memory per process: measured on top of what is held before this engine.
    gc.collect()
    held_before = mx.get_active_memory()
    engine = load(family_model, prefix=True)
    try:
        session(engine, TURNS[:2])
        run(engine, [chat(messages) for messages in PROMPTS])  # entries extracted from a batch of four
        memory = engine.memory()
        assert memory["kv_in_flight"] == 0
        assert 0 < memory["prefix_cache"] <= memory["prefix"], "every family's prompts are kept for reuse"
        parts = memory["weights"] + memory["kv_in_flight"] + memory["prefix_cache"]
        # Beyond the parts: the generator's last step (a row of log-probabilities per sequence of the batch of
        # four) and the few small batch buffers MLX leaves under the views mlx-lm extracts (< 32 KiB each).
        assert abs(memory["mlx_active"] - held_before - parts) < 3 * MIB // 2, memory
        # Dropping the entries frees at least what they were counted at, and leaves no more than the weights
        # (and that last step) held: nothing else (the quantized weights before dequantizing, say) stays behind.
        assert engine.prefix is not None
        active = mx.get_active_memory()
        engine.batcher.call(engine.prefix.clear)
        assert active - mx.get_active_memory() >= memory["prefix_cache"]
        assert mx.get_active_memory() - held_before - memory["weights"] < MIB
    finally:
        engine.close()


# -- mlxq models check ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "quantization", "caches", "trimmable"),
    [
        ("llama-q4", "llama", {"bits": 4, "group_size": 32}, ["KVCache"] * 2, True),
        ("qwen3_next", "qwen3_next", None, ["ArraysCache"] * 3 + ["KVCache"], False),
        ("gemma3_text", "gemma3_text", None, ["RotatingKVCache(32)", "KVCache"] * 2, False),
        ("falcon_h1", "falcon_h1", None, ["CacheList(ArraysCache, KVCache)"] * 2, False),
    ],
)
def test_models_check_says_what_a_directory_is_and_that_mlxq_serves_it(
    family_models, name: str, family: str, quantization: dict | None, caches: list[str], trimmable: bool
):
    path = family_models(name)
    runner = CliRunner()
    result = runner.invoke(app, ["models", "check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["family"] == family and report["quantization"] == quantization
    assert report["caches"] == caches and report["trimmable"] is trimmable
    assert report["serves"] is True and report["problems"] == []
    text = runner.invoke(app, ["models", "check", str(path)])
    assert text.exit_code == 0 and family in text.output and "yes" in text.output
    assert ("checkpoints" in text.output) is not trimmable


@pytest.mark.parametrize(
    ("options", "quantization", "says"),
    [
        (
            {"quant_predicate": "mixed_3_6"},
            {"bits": 4, "group_size": 64, "layer_bits": {"3": 13, "6": 2}},
            "4-bit, group size 64 (by layer: 3-bit ×13, 6-bit ×2)",
        ),
        (
            {"q_mode": "mxfp4", "q_group_size": 32, "q_bits": 4},
            {"bits": 4, "group_size": 32, "mode": "mxfp4"},
            "mxfp4, 4-bit, group size 32",
        ),
    ],
)
def test_models_check_names_a_mixed_or_floating_point_quantization(
    family_models, tmp_path: Path, options: dict[str, Any], quantization: dict[str, Any], says: str
):
    """mlx_lm.convert's mixed recipes give every layer its own bits and leave the top-level bits a default no layer
    may have (a 3- and 6-bit model was said to be 4-bit); its other modes are not affine integers."""
    from mlx_lm.convert import convert

    convert(str(family_models("llama")), mlx_path=str(tmp_path / "q"), quantize=True, **options)
    runner = CliRunner()
    result = runner.invoke(app, ["models", "check", str(tmp_path / "q"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quantization"] == quantization
    text = runner.invoke(app, ["models", "check", str(tmp_path / "q")], terminal_width=200)
    assert f"quantization   {says}\n" in text.output


def test_models_check_refuses_what_is_not_a_model(tmp_path: Path):
    result = CliRunner().invoke(app, ["models", "check", str(tmp_path)])
    assert result.exit_code == 1 and "config.json" in result.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    result = CliRunner().invoke(app, ["models", "check", str(tmp_path), "--json"])
    assert result.exit_code == 1 and not json.loads(result.stdout)["serves"]


@pytest.mark.parametrize("name", list(MODELS))
def test_a_prompts_chunk_may_grow_only_where_every_layers_cache_grows_with_the_sequence(
    name: str, family_models: Any
) -> None:
    """On a GPU a prompt's chunk grows past prefill_step to the prefill share's tokens (worker.generator
    .ChunkedPrefill.chunk_size); not for a sliding window (it briefly holds a chunk more than its size, and the KV
    budget counts prefill_step) nor a recurrent layer (its scan's transients may grow with the chunk's square)."""
    engine = Engine.load(str(family_models(name)))
    assert engine.chunks_grow == (name in {"llama", "llama-q4", "qwen3_moe", "deepseek_v3"})
    engine.close()
