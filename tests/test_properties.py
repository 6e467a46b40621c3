"""Properties, checked on generated inputs: request canonicalization and the tool-call parser."""

from __future__ import annotations

import json
import keyword
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlxq.keys import canonical_chat, canonical_completion, request_key, strip_volatile
from worker.tool_parse import ModelToolFormat, ToolStreamFilter, model_tool_format, parse_tool_calls

# Bounded so the file runs in seconds; a module's own settings, not a profile that would change other files'.
PROPS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

DEFAULTS = {"default_temperature": 1.0, "default_max_tokens": 512}
WEIGHTS = "0123456789abcdef"

# Any code point but a surrogate (a lone one is refused by the api), with the astral planes well represented.
texts = st.text(max_size=24) | st.text(st.characters(min_codepoint=0x10000, exclude_categories=("Cs",)), max_size=6)


def chat_key(body: dict) -> str:
    return request_key("chat", canonical_chat(body, **DEFAULTS), weights=WEIGHTS)


# -- canonicalization --------------------------------------------------------------------------

roles = st.sampled_from(["user", "assistant", "system"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=4)
tool_defs = st.lists(
    st.builds(
        lambda n, d: {"type": "function", "function": {"name": n, "description": d, "parameters": {"type": "object"}}},
        st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True),
        texts,
    ),
    min_size=1,
    max_size=3,
)
temperatures = st.floats(min_value=0.0, max_value=2.0, allow_nan=False) | st.just(0.0)
options = {
    "temperature": temperatures,
    "max_tokens": st.integers(1, 4096),
    "seed": st.integers(0, 2**31),
    "top_p": st.floats(min_value=0.01, max_value=1.0),
    "stop": st.lists(texts.filter(bool), min_size=1, max_size=3),
    "tools": tool_defs,
    "presence_penalty": st.floats(min_value=-2.0, max_value=2.0),
    "logprobs": st.booleans(),
}
chat_bodies = st.builds(
    lambda m, o: {"model": "m", "messages": m, **o}, messages, st.fixed_dictionaries({}, optional=options)
)


@PROPS
@given(chat_bodies)
def test_key_is_64_hex_and_canonicalizing_is_idempotent(body):
    canon = canonical_chat(body, **DEFAULTS)
    key = request_key("chat", canon, weights=WEIGHTS)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    again = canonical_chat(canon, **DEFAULTS)
    assert again == canon
    assert request_key("chat", again, weights=WEIGHTS) == key


@PROPS
@given(chat_bodies)
def test_key_survives_a_json_round_trip(body):
    # The canonical request travels as JSON (job rows, task messages): the worker must hash the same thing.
    canon = canonical_chat(body, **DEFAULTS)
    assert request_key("chat", json.loads(json.dumps(canon)), weights=WEIGHTS) == request_key(
        "chat", canon, weights=WEIGHTS
    )
    assert chat_key(json.loads(json.dumps(body, ensure_ascii=False))) == chat_key(body)


def reorder(value):
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reorder(v) for v in value]
    return value


@PROPS
@given(chat_bodies, st.booleans(), texts, st.data())
def test_key_ignores_what_does_not_change_the_answer(body, stream, user, data):
    key = chat_key(body)
    assert (
        chat_key(
            {
                **body,
                "stream": stream,
                "user": user,
                "metadata": {"k": user},
                "stream_options": {"include_usage": stream},
            }
        )
        == key
    )
    assert chat_key(reorder(body)) == key
    # Text content as a list of text parts, split anywhere.
    parts_body = {**body, "messages": []}
    for m in body["messages"]:
        text = m["content"]
        cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=3)))
        bounds = [0, *cuts, len(text)]
        parts = [{"type": "text", "text": text[a:b]} for a, b in zip(bounds, bounds[1:], strict=False)]
        parts_body["messages"].append({**m, "content": parts})
    assert chat_key(parts_body) == key
    # Zero is zero, whatever its sign.
    zeros = {k: -0.0 if isinstance(v, float) and v == 0 else v for k, v in body.items()}
    assert chat_key(zeros) == key
    # `developer` is `system`.
    dev = [{**m, "role": "developer"} if m["role"] == "system" else m for m in body["messages"]]
    assert chat_key({**body, "messages": dev}) == key
    # One stop string, bare or in a list.
    if isinstance(body.get("stop"), list) and len(body["stop"]) == 1:
        assert chat_key({**body, "stop": body["stop"][0]}) == key
    # Defaults given explicitly, and their aliases.
    if "temperature" not in body:
        assert chat_key({**body, "temperature": DEFAULTS["default_temperature"]}) == key
        assert chat_key({**body, "temperature": int(DEFAULTS["default_temperature"])}) == key
    if "max_tokens" not in body:
        assert chat_key({**body, "max_tokens": DEFAULTS["default_max_tokens"]}) == key
    else:
        alias = {k: v for k, v in body.items() if k != "max_tokens"}
        assert chat_key({**alias, "max_completion_tokens": body["max_tokens"]}) == key


@PROPS
@given(chat_bodies, st.data())
def test_key_changes_with_whatever_changes_the_answer(body, data):
    key = chat_key(body)
    i = data.draw(st.integers(0, len(body["messages"]) - 1))
    old = body["messages"][i]["content"]
    new = data.draw(texts.filter(lambda t: t != old))
    if body["messages"][i]["role"] == "system":
        assume(strip_volatile(new) != strip_volatile(old))
    changed = [dict(m) for m in body["messages"]]
    changed[i]["content"] = new
    assert chat_key({**body, "messages": changed}) != key

    temperature = data.draw(temperatures.filter(lambda t: t != body.get("temperature", 1.0)))
    assert chat_key({**body, "temperature": temperature}) != key
    max_tokens = data.draw(st.integers(1, 4096).filter(lambda n: n != body.get("max_tokens", 512)))
    assert chat_key({**body, "max_tokens": max_tokens}) != key
    seed = data.draw(st.integers(0, 2**31).filter(lambda s: s != body.get("seed")))
    assert chat_key({**body, "seed": seed}) != key
    tools = data.draw(tool_defs.filter(lambda t: t != body.get("tools")))
    assert chat_key({**body, "tools": tools}) != key


@PROPS
@given(texts | st.lists(st.integers(0, 50000), min_size=1, max_size=8), st.booleans(), st.integers(1, 100))
def test_completion_key_is_idempotent_and_ignores_stream(prompt, stream, max_tokens):
    body = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": max_tokens}
    canon = canonical_completion(body, prompt, **DEFAULTS)
    key = request_key("completion", canon, weights=WEIGHTS)
    assert canonical_completion(canon, canon["prompt"], **DEFAULTS) == canon
    noisy = canonical_completion({**body, "stream": stream, "user": "u"}, prompt, **DEFAULTS)
    assert request_key("completion", noisy, weights=WEIGHTS) == key
    assert request_key("completion", json.loads(json.dumps(canon)), weights=WEIGHTS) == key
    other = canonical_completion({**body, "max_tokens": max_tokens + 1}, prompt, **DEFAULTS)
    assert request_key("completion", other, weights=WEIGHTS) != key


# -- the tool-call parser -------------------------------------------------------------------------

tool_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,11}", fullmatch=True)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | texts
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)
arguments = st.dictionaries(texts, json_values, max_size=4)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda k: not keyword.iskeyword(k))

# Prose that holds no tool-call marker: nothing a call can start with, and no "(" after a name.
PLAIN_ALPHABET = st.characters(exclude_categories=("Cs",), exclude_characters="<[{`(|")
plain = st.text(PLAIN_ALPHABET, max_size=30)


def offered(names: list[str], props: dict | None = None) -> list[dict]:
    params = {"type": "object", "properties": props or {}}
    return [{"type": "function", "function": {"name": n, "parameters": params}} for n in names]


def call(name: str, args: dict, key: str = "arguments") -> str:
    return json.dumps({"name": name, key: args}, ensure_ascii=False)


def kwargs(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


# name -> (render(name, arguments), family parsers to try besides none, needs identifier names and keys,
#          ends with a closing marker, so text after it is content)
FORMATS = {
    "hermes": (lambda n, a: f"<tool_call>\n{call(n, a)}\n</tool_call>", ["json_tools"], False, True),
    "hermes parameters": (
        lambda n, a: f"<tool_call>\n{call(n, a, 'parameters')}\n</tool_call>",
        ["json_tools"],
        False,
        True,
    ),
    "hermes unclosed": (lambda n, a: f"<tool_call>\n{call(n, a)[:-1]}\n</tool_call>", [], False, True),
    "mistral list": (lambda n, a: f"[TOOL_CALLS] [{call(n, a)}]", ["mistral"], False, False),
    "mistral v11": (
        lambda n, a: f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a, ensure_ascii=False)}",
        ["mistral"],
        False,
        False,
    ),
    "llama python_tag": (lambda n, a: f"<|python_tag|>{call(n, a, 'parameters')}", [], False, False),
    "bare json": (lambda n, a: call(n, a), [], False, True),
    "fenced json": (lambda n, a: f"```json\n{call(n, a)}\n```", [], False, True),
    "openai shaped": (
        lambda n, a: json.dumps({"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}),
        [],
        False,
        True,
    ),
    "function json": (lambda n, a: f"{n}({json.dumps(a, ensure_ascii=False)})", [], False, True),
    "function kwargs": (lambda n, a: f"{n}({kwargs(a)})", [], True, True),
    "pythonic": (lambda n, a: f"<|tool_call_start|>[{n}({kwargs(a)})]<|tool_call_end|>", ["pythonic"], True, True),
}
CASES = [(name, parser) for name, (_, parsers, _, _) in FORMATS.items() for parser in [None, *parsers]]


def fmt(parser: str | None) -> ModelToolFormat | None:
    return model_tool_format(parser) if parser else None


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def streamed(text: str, tools: list[dict], model_format: ModelToolFormat | None, cuts: list[int]):
    """What a client sees when the text arrives in pieces ending at `cuts`: (content, calls)."""
    f = ToolStreamFilter(tools, model_format)
    shown, out = 0, ""
    for end in [*sorted(set(cuts)), len(text)]:
        safe = f.safe_length(text[:end])
        if safe > shown:
            out += text[shown:safe]
            shown = safe
    rest, calls = f.finish(text, shown)
    return out + rest, calls


@st.composite
def rendered(draw, case: tuple[str, str | None]):
    """(text, tools, model format, the call, expected content or None where it is not pinned down)."""
    name, parser = case
    render, _, python_only, closed = FORMATS[name]
    names = draw(st.lists(tool_names, min_size=1, max_size=3, unique=True))
    chosen = draw(st.sampled_from(names))
    if python_only:
        assume(chosen.isidentifier() and not keyword.iskeyword(chosen))
        args = draw(st.dictionaries(identifiers, json_values, max_size=3))
    else:
        args = draw(arguments)
    # A format with no end marker ends where the next one starts; its markers are special tokens,
    # which a model never writes inside arguments.
    # And a "</think>" before a call ends thinking that the prompt opened: not in arguments either.
    assume(not any(m in json.dumps(args, ensure_ascii=False) for m in ("[TOOL_CALLS]", "<|python_tag|>", "</think>")))
    prefix = draw(plain)
    # A bare call starts a line (as a stream can only hold it there); any other is set off by whitespace.
    sep = draw(st.sampled_from(["\n", "\n\n"] if name in ("bare json", "openai shaped") else ["\n", " ", "\n\n"]))
    # After a call that closes, more prose; after one that runs to the end of the text, nothing.
    tail = draw(st.sampled_from(["\n", " ", "\n\n"])) + draw(plain) if closed else ""
    text = (prefix + sep if prefix else "") + render(chosen, args) + tail
    expected = None
    # Without its family parser a pythonic call is still found, by its `name(...)`, but not its wrapper.
    if closed and (name, parser) != ("pythonic", None):  # whitespace before a call goes, after it only
        # where nothing precedes it
        head = prefix.rstrip()
        expected = (head + (tail if head else tail.lstrip())).rstrip()
    return text, offered(names), fmt(parser), (chosen, args), expected


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{p or 'generic'}" for n, p in CASES])
@settings(PROPS, max_examples=30)
@given(data=st.data())
def test_any_call_in_every_format_parses_back(case, data):
    text, tools, model_format, (name, args), expected = data.draw(rendered(case))
    content, calls = parse_tool_calls(text, tools, model_format)
    assert calls_of(calls) == [(name, args)], text
    assert all(isinstance(strict_json(c["function"]["arguments"]), dict) and c["id"].startswith("call_") for c in calls)
    if expected is not None:
        assert content == expected
    # Split anywhere, the stream shows the same content and ends with the same calls.
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    seen, stream_calls = streamed(text, tools, model_format, cuts)
    assert seen == content
    assert calls_of(stream_calls) == calls_of(calls)


xml_values = st.one_of(
    st.tuples(st.just("string"), texts.filter(lambda t: "<" not in t and t.lower() != "null")),
    st.tuples(st.just("integer"), st.integers(-(2**53), 2**53)),
    st.tuples(st.just("boolean"), st.booleans()),
    st.tuples(st.just("array"), st.lists(st.integers(-1000, 1000), max_size=3)),
)


@pytest.mark.parametrize("parser", [None, "qwen3_coder"])
@settings(PROPS, max_examples=100)
@given(
    name=tool_names,
    params=st.dictionaries(identifiers, xml_values, max_size=4),
    prefix=plain,
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_qwen3_coder_xml_calls_parse_back_typed_by_the_schema(parser, name, params, prefix, cuts):
    # mlx-lm's own qwen3_coder parser reads a string "null" as null: such strings are left out above.
    props = {k: {"type": kind} for k, (kind, _) in params.items()}
    args = {k: v for k, (_, v) in params.items()}

    def render(v):
        return json.dumps(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v)

    body = "".join(f"<parameter={k}>\n{render(v)}\n</parameter>\n" for k, v in args.items())
    text = (prefix + "\n" if prefix else "") + f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"
    tools = offered([name], props)
    content, calls = parse_tool_calls(text, tools, fmt(parser))
    assert calls_of(calls) == [(name, args)]
    assert content == prefix.rstrip()
    assert streamed(text, tools, fmt(parser), cuts)[0] == content


@PROPS
@given(
    st.lists(tool_names, min_size=1, max_size=3, unique=True), st.lists(arguments, min_size=2, max_size=3), st.data()
)
def test_several_calls_come_back_in_order_without_duplicates(names, args, data):
    assume("</think>" not in json.dumps(args, ensure_ascii=False))
    calls = [(data.draw(st.sampled_from(names)), a) for a in args]
    text = "\n".join(f"<tool_call>\n{call(n, a)}\n</tool_call>" for n, a in [*calls, calls[0]])
    unique = list(dict.fromkeys((n, json.dumps(a, sort_keys=True)) for n, a in calls))
    got = calls_of(parse_tool_calls(text, offered(names))[1])
    assert [(n, json.dumps(a, sort_keys=True)) for n, a in got] == unique


@PROPS
@given(plain, st.lists(tool_names, min_size=1, max_size=3, unique=True), st.lists(st.integers(0, 60), max_size=8))
def test_text_without_markers_passes_through(text, names, cuts):
    tools = offered(names)
    assert parse_tool_calls(text, tools) == (text, [])
    assert streamed(text, tools, None, cuts) == (text, [])


# Pieces of every syntax the parser knows, glued at random: its nooks, not just random noise.
FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<think>",
    "</think>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<function=f>",
    "<parameter=x>",
    "</parameter>",
    "</function>",
    "```",
    "```json",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    '"',
    "'",
    ":",
    ",",
    "=",
    " ",
    "\n",
    '"name"',
    '"arguments"',
    '"parameters"',
    "f",
    "g-h",
    "1",
    "1e999",
    "NaN",
    "true",
    "null",
    "1j",
    "{1, 2}",
    "{[1]: 2}",
    "\\",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
]
soup = st.lists(st.sampled_from(FRAGMENTS) | texts, max_size=40).map("".join)
PARSERS = [None, "json_tools", "mistral", "qwen3_coder", "pythonic"]


@PROPS
@given(st.text() | soup, st.sampled_from(PARSERS), st.lists(st.integers(0, 400), max_size=8))
def test_parser_and_stream_never_raise(text, parser, cuts):
    tools = offered(["f", "g-h"], {"x": True, "y": {"type": "integer"}})  # `true` is a valid JSON schema
    content, calls = parse_tool_calls(text, tools, fmt(parser))
    seen, stream_calls = streamed(text, tools, fmt(parser), cuts)
    assert isinstance(content, str) and isinstance(seen, str)
    for c in calls + stream_calls:
        assert c["function"]["name"] in ("f", "g-h")
        assert isinstance(strict_json(c["function"]["arguments"]), dict)


def strict_json(text: str):
    """JSON as a client's parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)
