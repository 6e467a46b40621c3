"""When an answer is constrained and to what (mlxq.grammar), and the worker's per-sequence mask
(worker.constrained) with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxq.grammar import CALL_CLOSE, constraint_for, forced_prefill, problem
from worker.blas import preload_openblas

preload_openblas()
import mlx.core as mx  # noqa: E402

from worker.constrained import Grammars  # noqa: E402

PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "noop"}},
]


@pytest.fixture(scope="module")
def grammars(smollm2: Path) -> Grammars:
    from transformers import AutoTokenizer

    return Grammars(AutoTokenizer.from_pretrained(str(smollm2)), 49152)


def accepts(grammars: Grammars, request: dict, text: str) -> bool:
    constraint = constraint_for(request)
    assert constraint is not None
    matcher = grammars.processor(constraint).matcher
    tokens = grammars.tokenizer().tokenize_str(text)
    return matcher.consume_tokens(tokens) and not matcher.is_error() and matcher.is_accepting()


def test_what_is_constrained():
    assert constraint_for({"messages": []}) is None
    assert constraint_for({"response_format": {"type": "text"}}) is None
    assert constraint_for({"tools": TOOLS, "tool_choice": "auto"}).trigger == "<tool_call>"  # armed, not active
    assert constraint_for({"tools": TOOLS, "tool_choice": "none"}) is None
    assert constraint_for({"tools": TOOLS, "tool_choice": "required"}).param == "tools"
    named = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert constraint_for(named).param == "tool_choice"
    assert constraint_for(named, native_tools=True) is None  # the model's own call format is its own
    assert constraint_for({"response_format": {"type": "json_object"}}).param == "response_format"
    # A forced call wins over a response format: the answer is the call.
    assert constraint_for({**named, "response_format": {"type": "json_object"}}).param == "tool_choice"


def test_a_feature_the_engine_lacks_is_named():
    bad = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}
    assert '["not"]' in (problem(constraint_for(bad)) or "")
    good = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": PARAMS}}}
    assert problem(constraint_for(good)) is None


def test_a_forced_call_grammar_takes_the_rest_of_the_call_after_its_prefill(grammars: Grammars):
    named = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert forced_prefill("get_weather").endswith('"arguments": ')
    assert accepts(grammars, named, '{"city":"Paris","unit":"c"}}' + CALL_CLOSE)
    assert not accepts(grammars, named, '{"city":"Paris","unit":"kelvin"}}' + CALL_CLOSE)
    required = {"tools": TOOLS, "tool_choice": "required"}
    assert forced_prefill(None) == "<tool_call>\n"
    assert accepts(
        grammars, required, json.dumps({"name": "noop", "arguments": {}}, separators=(",", ":")) + CALL_CLOSE
    )
    assert not accepts(grammars, required, '{"name":"launch","arguments":{}}' + CALL_CLOSE)


def test_the_mask_leaves_only_what_the_grammar_allows(grammars: Grammars):
    processor = grammars.processor(constraint_for({"response_format": {"type": "json_object"}}))
    logits = mx.zeros((1, 49152))
    masked = processor(mx.array([1, 2, 3]), logits)  # the first call: no answer token yet
    allowed = [i for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]
    assert allowed and all(grammars.tokenizer().decode_str([i]).lstrip().startswith("{") for i in allowed)
    brace = grammars.tokenizer().tokenize_str("{")[0]
    masked = processor(mx.array([1, 2, 3, brace]), logits)  # the next call consumes the sampled "{"
    after = [grammars.tokenizer().decode_str([i]) for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]
    assert after and all(t[0] in '"}' for t in after)  # a key or the end: compact JSON, no whitespace


def test_with_auto_text_is_free_until_the_model_opens_a_call_then_the_call_is_constrained(grammars: Grammars):
    constraint = constraint_for({"tools": TOOLS, "tool_choice": "auto"})
    assert constraint is not None and constraint.trigger == "<tool_call>"
    processor = grammars.processor(constraint)
    tokenizer = grammars.tokenizer()
    logits = mx.zeros((1, 49152))

    context = [1]  # the prompt, then each token sampled

    def allowed_after(text: str) -> list[str]:
        masked = logits
        for token in tokenizer.tokenize_str(text):
            context.append(token)
            masked = processor(mx.array(context), logits)
        return [tokenizer.decode_str([i]) for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]

    processor(mx.array(context), logits)  # the first call: the prompt's last token
    assert len(allowed_after("Let me check the weather. ")) == 49152  # free text
    opened = allowed_after("<tool_call>\n")
    assert opened and all(t.strip() == "" or t.lstrip().startswith("{") for t in opened)
    named = allowed_after('{"name":"')
    assert named and all("get_weather".startswith(t) or "noop".startswith(t) for t in named if t)
    assert len(allowed_after('get_weather","arguments":{"city":"Paris","unit":"c"}}\n</tool_call>')) == 49152


def test_a_resumed_sequence_does_not_hand_its_grammar_a_token_twice(grammars: Grammars):
    # mlx-lm runs the processor on a token in the step that returns it; a sequence preempted after that step is
    # fed the same token again when it resumes, with a context of the same length.
    processor = grammars.processor(constraint_for({"response_format": {"type": "json_object"}}))
    tokenizer, logits = grammars.tokenizer(), mx.zeros((1, 49152))
    context = [1]
    processor(mx.array(context), logits)
    for token in tokenizer.tokenize_str('{"a":{"b":1}'):
        context.append(token)
        processor(mx.array(context), logits)
    masked = processor(mx.array(context), logits)  # resumed: the last token again
    allowed = [tokenizer.decode_str([i]) for i, v in enumerate(masked[0].tolist()) if v != float("-inf")]
    assert "}" in allowed and not processor.matcher.is_error()  # the outer object is still open
    context.append(tokenizer.tokenize_str("}")[0])
    processor(mx.array(context), logits)
    assert processor.matcher.is_accepting()


def test_auto_tools_with_keywords_the_engine_lacks_stay_best_effort(grammars: Grammars):
    # Agents send their tools' schemas as they are; with tool_choice auto nothing may refuse them.
    odd = {
        "type": "object",
        "properties": {"tags": {"type": "array", "uniqueItems": True}, "x": {"not": {"type": "string"}}},
        "propertyNames": {"pattern": "^[a-z]+$"},
    }
    tools = [{"type": "function", "function": {"name": "tag", "parameters": odd}}]
    auto = constraint_for({"tools": tools})
    assert auto is not None and not auto.required
    assert grammars.processor(auto).matcher is not None  # compiles, the keywords it lacks ignored
    forced = constraint_for({"tools": tools, "tool_choice": "required"})
    assert forced is not None and forced.required and problem(forced)  # forced: refused, named
    broken = [
        {"type": "function", "function": {"name": "g", "parameters": {"properties": {"p": {"pattern": "(?=a)"}}}}}
    ]
    assert not constraint_for({"tools": broken}).required


def test_strict_holds_an_answer_to_exactly_its_declared_fields(grammars: Grammars):
    loose = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}

    def schema_request(strict: bool | None) -> dict:
        return {
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": loose, "strict": strict}}
        }

    assert accepts(grammars, schema_request(None), '{"a":1,"zzz":2}')  # JSON Schema's defaults allow it
    assert accepts(grammars, schema_request(None), '{"a":1}')
    assert not accepts(grammars, schema_request(True), '{"a":1,"zzz":2}')  # no undeclared field
    assert not accepts(grammars, schema_request(True), '{"a":1}')  # every declared one
    assert accepts(grammars, schema_request(True), '{"a":1,"b":"x"}')
    tool = {"type": "function", "function": {"name": "f", "parameters": loose, "strict": True}}
    named = {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}}
    assert not accepts(grammars, named, '{"a":1}}' + CALL_CLOSE)
    assert accepts(grammars, named, '{"a":1,"b":"x"}}' + CALL_CLOSE)


def test_a_tools_arguments_take_only_the_keys_it_declares_unless_it_says_otherwise(grammars: Grammars):
    def named(parameters: dict) -> dict:
        tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
        return {"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}}

    nested = {"type": "object", "properties": {"q": {"type": "string"}, "opts": {"type": "object", "properties": {}}}}
    assert accepts(grammars, named(nested), '{"q":"x","opts":{}}}' + CALL_CLOSE)
    assert not accepts(grammars, named(nested), '{"q":"x","type":{"type":1}}}' + CALL_CLOSE)  # the runaway
    assert not accepts(grammars, named(nested), '{"q":"x","opts":{"z":1}}}' + CALL_CLOSE)
    required = {"tools": [named(nested)["tools"][0]], "tool_choice": "required"}
    assert not accepts(grammars, required, '{"name":"f","arguments":{"q":"x","z":1}}' + CALL_CLOSE)
    # What a schema says of other keys stands, and so does an object with no declared keys, or one that requires
    # a key it does not declare (closing it would allow no object at all).
    for open_ in (
        {**nested, "additionalProperties": True},
        {**nested, "additionalProperties": {"type": "integer"}},
        {"type": "object"},
        {**nested, "required": ["z"]},
    ):
        assert accepts(grammars, named(open_), '{"q":"x","z":1}}' + CALL_CLOSE), open_
    both = {"allOf": [{"properties": {"q": {"type": "string"}}}, {"properties": {"z": {"type": "integer"}}}]}
    assert accepts(grammars, named(both), '{"q":"x","z":1}}' + CALL_CLOSE)
    # response_format keeps JSON Schema's reading: only `strict` closes its objects.
    loose = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": nested}}}
    assert accepts(grammars, loose, '{"q":"x","z":1}')


# Schemas that compile and cannot be followed: a reference to itself alone, and a property that requires itself.
UNFOLLOWABLE = {
    "self-reference": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
    "endless": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
}


def schema_request(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


@pytest.mark.parametrize("name", sorted(UNFOLLOWABLE))
def test_a_schema_no_answer_can_follow_is_refused_up_front(name: str):
    assert "no answer can follow it" in (problem(constraint_for(schema_request(UNFOLLOWABLE[name]))) or "")
    recursive = {"type": "object", "properties": {"a": {"$ref": "#"}}}  # optional: `{}` ends it
    assert problem(constraint_for(schema_request(recursive))) is None


def test_an_answer_whose_grammar_breaks_fails_instead_of_going_on_free(grammars: Grammars, smollm2: Path):
    """In the worker (the api's probe aside): the parser gives up mid-answer, and the answer ends as a 400 naming
    the schema, never a 200 whose text does not match it."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from worker.sequence import Sequence
    from worker.tool_parse import ToolStreamFilter

    processor = grammars.processor(constraint_for(schema_request(UNFOLLOWABLE["endless"])))
    tokenizer = load_tokenizer(smollm2)
    seq = Sequence(
        prompt=[1],
        max_tokens=8,
        sampler=None,
        processors=[processor],
        stops=[],
        tool_filter=ToolStreamFilter([]),
        detokenizer=tokenizer.detokenizer,
        decode=tokenizer.decode,
    )
    seq.detokenizer.reset()
    logits, brace = mx.zeros((1, 49152)), grammars.tokenizer().tokenize_str("{")[0]
    processor(mx.array([1]), logits)
    assert not seq.add_token(brace, logits[0], None)
    processor(mx.array([1, brace]), logits)  # the next step hands the matcher "{": the parser gives up
    assert processor.broken
    assert seq.add_token(brace, logits[0], None), "it ends rather than going on unconstrained"
    seq.complete()
    assert seq.result is None and seq.error is not None
    error = seq.error.error  # type: ignore[attr-defined]
    assert (error["status"], error["code"], error["param"]) == (400, "invalid_schema", "response_format")


def test_a_tool_schema_with_local_refs_is_constrained_in_every_call_grammar(grammars: Grammars):
    # pydantic writes nested models as `$defs` and `#/$defs/...` refs: nested under a call's `arguments`, those
    # refs must still name the tool's own definitions (else a forced call is a 400 and an auto one goes free).
    params = {
        "type": "object",
        "$defs": {"Unit": {"enum": ["c", "f"]}},
        "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["city", "unit"],
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params}}, TOOLS[1]]
    # A schema with its own `$id` is a resource of its own: its refs resolve inside it, and are left as they are.
    own = {
        "$id": "https://example.com/t",
        "$defs": {"N": {"type": "integer"}},
        "properties": {"n": {"$ref": "#/$defs/N"}},
    }
    tools.append({"type": "function", "function": {"name": "count", "parameters": own}})
    for choice in ("required", "auto"):
        constraint = constraint_for({"tools": tools, "tool_choice": choice})
        assert constraint is not None and problem(constraint) is None, choice
    call = '{"name":"get_weather","arguments":{"city":"Paris","unit":"c"}}' + CALL_CLOSE
    assert accepts(grammars, {"tools": tools, "tool_choice": "required"}, call)
    assert not accepts(grammars, {"tools": tools, "tool_choice": "required"}, call.replace('"c"', '"k"'))
