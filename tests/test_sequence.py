"""A sequence's end: cut-off answers stay text, and the stream always equals the final text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.blas import preload_openblas

preload_openblas()

import mlx.core as mx  # noqa: E402
from mlx_lm.tokenizer_utils import load as load_tokenizer  # noqa: E402

from worker.engine import Engine  # noqa: E402
from worker.sequence import Sequence  # noqa: E402
from worker.sequence_builder import typed  # noqa: E402
from worker.tool_parse import ToolStreamFilter, parse_tool_calls  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
# A call whose outer object never closes: the parser repairs it, so only the finish reason says it was cut.
CUT_CALL = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    return load_tokenizer(smollm2)


def run(tokenizer, text: str, finish: str | None) -> tuple[dict, list[dict]]:
    """Feed `text` token by token into a Sequence; the last token ends it with `finish` (None: cancelled)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    seq = Sequence(
        prompt=[1],
        max_tokens=len(ids),
        sampler=None,
        processors=[],
        stops=[],
        tool_filter=ToolStreamFilter(TOOLS),
        detokenizer=tokenizer.detokenizer,
        decode=tokenizer.decode,
    )
    seq.detokenizer.reset()
    logprobs = mx.zeros((tokenizer.vocab_size,))
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        if seq.add_token(token, logprobs, finish if last and finish else None):
            break
    if finish is None:
        seq.finish = "cancelled"
    seq.complete()
    events = []
    while (event := seq.events.get()) is not None:
        events.append(event)
    assert seq.result is not None
    return dict(seq.result), events


def streamed(events: list[dict]) -> str:
    return "".join(e["content"] for e in events if e["type"] == "delta")


def test_a_repairable_call_is_really_a_call_when_it_ends():
    assert parse_tool_calls(CUT_CALL, TOOLS)[1], "the cases below must be ones the parser would take"


@pytest.mark.parametrize("finish", ["length", None])
def test_cut_off_call_stays_text_and_the_stream_releases_what_it_held(tokenizer, finish):
    result, events = run(tokenizer, CUT_CALL, finish)
    assert result["finish_reason"] == (finish or "cancelled")
    assert "tool_calls" not in result and not any(e["type"] == "tool_calls" for e in events)
    assert result["text"] == CUT_CALL
    assert streamed(events) == result["text"]


def test_finished_call_is_a_call(tokenizer):
    result, events = run(tokenizer, CUT_CALL, "stop")
    assert result["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in result["tool_calls"]] == ["get_weather"]
    assert result["text"] == "Let me check." and streamed(events) == "Let me check."


@pytest.fixture(scope="module")
def smol(smollm2: Path):
    engine = Engine.load(str(smollm2))
    yield engine
    engine.close()


def test_real_model_cut_by_max_tokens_inside_a_call(smol: Engine):
    # With tool_choice "required" SmolLM2 writes its call under the call grammar (compact JSON); two tokens
    # short of its end the text already parses (repaired), yet a length-cut answer is never a call.
    request = {
        "messages": [{"role": "user", "content": "Use get_weather for Paris."}],
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0.0,
    }
    whole = smol.generate("chat", {**request, "max_tokens": 60})
    assert whole["finish_reason"] == "tool_calls"
    events: list[dict] = []
    cut_at = whole["usage"]["completion_tokens"] - 2
    cut = smol.generate("chat", {**request, "max_tokens": cut_at}, emit=events.append)
    assert parse_tool_calls(cut["text"], TOOLS)[1], f"no longer cut inside a parseable call: {cut['text']!r}"
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut
    assert cut["text"].startswith("<tool_call>")
    assert streamed(events) == cut["text"]


def test_a_final_assistant_message_is_continued_unless_a_grammar_holds_the_whole_answer(smol: Engine):
    """The prefill: the prompt ends in the assistant's text, no new turn opened. Under a schema or a forced call the
    grammar starts the answer, so those open a new turn; a final turn of tool calls is no prefill."""
    user = {"role": "user", "content": "What is the capital of France?"}
    prefill = {"role": "assistant", "content": "The capital of France is"}

    def prompt(**request: object) -> str:
        return str(smol.tokenizer.decode(smol.chat_tokens({"messages": [user, prefill], **request})))

    assert prompt().endswith("<|im_start|>assistant\nThe capital of France is")
    assert prompt(tools=TOOLS).endswith("The capital of France is")  # a call the model opens on its own may follow
    new_turn = "The capital of France is<|im_end|>\n<|im_start|>assistant\n"
    assert prompt(response_format={"type": "json_object"}).endswith(new_turn)
    assert (
        prompt(tools=TOOLS, tool_choice="required")
        .split("<|im_start|>assistant\n")[-2]
        .endswith("The capital of France is<|im_end|>\n")
    )
    calls = {
        **prefill,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
    }
    tokens = smol.chat_tokens({"messages": [user, calls]})
    assert smol.tokenizer.decode(tokens).endswith("<|im_start|>assistant\n")
    for request in ({}, {"response_format": {"type": "json_object"}}, {"tools": TOOLS, "tool_choice": "required"}):
        body = typed({"messages": [user, prefill], **request}, smol.key.path)
        built = smol.builder.build("chat", body)  # the sequence decides as the prompt alone does
        assert built.prompt == smol.chat_tokens(body)
        assert built.keep_space == (request == {})
    answer = smol.generate("chat", {"messages": [user, prefill], "max_tokens": 4, "temperature": 0})
    assert answer["text"].startswith(" Paris")


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A SentencePiece-style tokenizer (a `▁` marks a word's space; decoding strips the first one), built here:
    Llama 2's, Mistral's and Gemma's are of this kind, and mlx-lm streams them with its SPM detokenizer."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁The": 3, "▁capital": 4, "▁is": 5, "▁Paris": 6, ".": 7}
    spm = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spm.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    folder = tmp_path_factory.mktemp("spm")
    spm.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(folder)


@pytest.mark.parametrize("keep_space", [True, False])
def test_a_continued_answer_keeps_its_first_space_with_a_sentencepiece_tokenizer(spm_tokenizer, keep_space: bool):
    """`The capital is` + `▁Paris.`: a continuation reads " Paris." (its decode alone says "Paris."); a new turn
    starts at the word."""
    assert type(spm_tokenizer.detokenizer).__name__ == "SPMStreamingDetokenizer"
    seq = Sequence(
        prompt=[3, 4, 5],
        max_tokens=2,
        sampler=None,
        processors=[],
        stops=[],
        tool_filter=ToolStreamFilter([]),
        detokenizer=spm_tokenizer.detokenizer,
        decode=spm_tokenizer.decode,
        keep_space=keep_space,
    )
    seq.detokenizer.reset()
    logprobs = mx.zeros((len(spm_tokenizer.vocab),))
    seq.add_token(6, logprobs, None)
    seq.add_token(7, logprobs, "length")
    assert seq.text == (" Paris." if keep_space else "Paris.")


def test_logprobs_bytes_are_each_tokens_own_bytes(smol: Engine):
    # An emoji is several byte-level tokens, each decoding to U+FFFD alone: the bytes clients join to rebuild it
    # must be each token's own, not U+FFFD's.
    request = {
        "messages": [{"role": "user", "content": "Reply only with emojis: \U0001f680\U0001f525"}],
        "temperature": 0.0,
        "max_tokens": 8,
        "logprobs": True,
        "top_logprobs": 2,
    }
    result = smol.generate("chat", request)
    entries = result["logprobs"]
    assert bytes(b for entry in entries for b in entry["bytes"]).decode(errors="replace") == result["text"]
    pieces = [entry["bytes"] for entry in entries] + [
        top["bytes"] for entry in entries for top in entry["top_logprobs"]
    ]
    assert [0xEF, 0xBF, 0xBD] not in pieces  # U+FFFD's bytes: a piece of a character decoded alone
