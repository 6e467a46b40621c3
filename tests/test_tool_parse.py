"""Tool-call parsing on outputs in the formats model families really emit."""

from __future__ import annotations

import json

import pytest

from worker.tool_parse import ToolStreamFilter, model_tool_format, parse_tool_calls

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "tags": {"type": "array"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_shell",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
        },
    },
]


def calls_of(text: str, parser: str | None = None):
    content, calls = parse_tool_calls(text, TOOLS, model_tool_format(parser))
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls], calls


CASES = {
    "qwen2.5 / hermes": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
        "json_tools",
    ),
    "qwen3 with think": (
        '<think>\nI should call get_weather({"city": "Rome"}) maybe.\n</think>\n\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
        "json_tools",
    ),
    "llama 3.1 json": ('{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None),
    "llama python_tag": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', None),
    "mistral list": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', "mistral"),
    "mistral v11": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}', "mistral"),
    "bare json fenced": ('```json\n{"tool": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n```', None),
    "function syntax": ('get_weather({"city": "Paris", "days": 3})', None),
    "python kwargs": ('get_weather(city="Paris", days=3)', None),
    "openai shaped": (
        '{"type": "function", "function": {"name": "get_weather", "arguments": '
        '"{\\"city\\": \\"Paris\\", \\"days\\": 3}"}}',
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_formats(name):
    text, parser = CASES[name]
    content, calls, raw = calls_of(text, parser)
    assert calls == [("get_weather", {"city": "Paris", "days": 3})], name
    assert isinstance(raw[0]["function"]["arguments"], str)
    assert raw[0]["id"].startswith("call_") and raw[0]["type"] == "function"
    assert "tool_call" not in content and "get_weather(" not in content.split("</think>")[-1]


def test_same_formats_without_the_model_parser():
    for name, (text, _parser) in CASES.items():
        assert calls_of(text)[1] == [("get_weather", {"city": "Paris", "days": 3})], name


def test_qwen3_coder_xml_parameters_are_typed_by_schema():
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
        "<parameter=days>\n5\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
        '<parameter=ratio>\n0.5\n</parameter>\n<parameter=tags>\n["a", "b"]\n</parameter>\n'
        "</function>\n</tool_call>"
    )
    for parser in ("qwen3_coder", None):
        _, calls, _ = calls_of(text, parser)
        assert calls == [
            ("get_weather", {"city": "New York", "days": 5, "metric": True, "ratio": 0.5, "tags": ["a", "b"]})
        ]


def test_nested_json_and_braces_inside_strings():
    args = {"command": "echo '{not json}' && printf \"}\"", "env": {"A": {"B": [1, {"c": "}"}]}}}
    text = f"<tool_call>{json.dumps({'name': 'run_shell', 'arguments': args})}</tool_call>"
    assert calls_of(text)[1] == [("run_shell", args)]


def test_two_calls_kept_identical_duplicates_dropped():
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    two = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    _, calls, raw = calls_of(one + two + one)
    assert calls == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert raw[0]["id"] != raw[1]["id"]


def test_ids_unique_across_requests():
    ids = {calls_of(CASES["function syntax"][0])[2][0]["id"] for _ in range(50)}
    assert len(ids) == 50


def test_not_tool_calls():
    assert calls_of("I can use get_weather to look that up if you like.")[1] == []
    assert calls_of('<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>')[1] == []
    assert calls_of('<tool_call>{"name": "get_weather", "arguments": {"city": "Par')[1] == []
    assert calls_of('{"city": "Paris"}')[1] == []
    content, calls, _ = calls_of("Sure.\n<tool_call>{not json}</tool_call>")
    assert calls == [] and "{not json}" in content
    assert parse_tool_calls(CASES["function syntax"][0], None) == (CASES["function syntax"][0], [])


def test_content_around_a_call_is_kept():
    content, calls, _ = calls_of(
        'Let me check.\n<tool_call>{"name": "run_shell", "arguments": {"command": "ls"}}</tool_call>'
    )
    assert content == "Let me check." and calls == [("run_shell", {"command": "ls"})]


def stream(text: str, step: int = 3) -> tuple[str, str, list]:
    f = ToolStreamFilter(TOOLS)
    shown, out = 0, ""
    for end in range(step, len(text) + step, step):
        safe = f.safe_length(text[:end])
        if safe > shown:
            out += text[shown:safe]
            shown = safe
    rest, calls = f.finish(text, shown)
    return out, rest, calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_never_shows_part_of_a_call(name):
    text = "Checking the weather now.\n" + CASES[name][0]
    shown, rest, calls = stream(text)
    assert len(calls) == 1, name
    assert shown.startswith("Checking the weather now.")
    assert shown.split("</think>")[-1].strip() in ("Checking the weather now.", "")
    for marker in ("<tool_call", "{", "[TOOL", "get_weather(", "```", "<|python"):
        assert marker not in shown.split("</think>")[-1], (name, shown)


def test_streaming_plain_text_passes_through():
    text = "The capital of France is Paris. get_weather is a tool I have."
    shown, rest, calls = stream(text)
    assert shown + rest == text and calls == []


def test_streaming_think_section_is_not_held():
    text = '<think>maybe {"x": 1} or get_weather(</think>\nIt is sunny.'
    shown, rest, calls = stream(text)
    assert calls == [] and shown.startswith("<think>maybe {") and shown + rest == text


def test_unclosed_outer_object_is_repaired():
    # Real SmolLM2 output with a forced tool: the arguments close, the outer object does not.
    text = '<tool_call>\n{"name": "get_weather", "arguments": \n{"city": "Paris"}\n</tool_call>\n\nIt is'
    content, calls, _ = calls_of(text)
    assert calls == [("get_weather", {"city": "Paris"})] and content == "It is"


def test_text_around_a_call_keeps_its_spacing_in_the_stream_and_the_result():
    text = 'Let me check.\n<tool_call>{"name": "run_shell", "arguments": {"command": "ls"}}</tool_call>\nDone.'
    content, calls, _ = calls_of(text)
    assert content == "Let me check.\nDone." and calls == [("run_shell", {"command": "ls"})]
    shown, rest, _ = stream(text, step=1)
    assert shown == "Let me check." and shown + rest == content


def test_outputs_that_once_raised_are_not_calls():
    # Python-only values, NaN, a schema that is `true`, and looping answers nested past the recursion limit.
    tools = [*TOOLS, {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": True}}}}]
    for text in (
        "get_weather(city=1j)",
        "get_weather(city={[1]: 2})",
        "get_weather(city={1, 2})",
        "get_weather(city=1e999)",
        '{"name": "run_shell", "arguments": {"command": NaN}}',
        "[" * 5000,
        '{"a":' * 3000,
        "get_weather(x=" + "1+" * 3000 + "1)",
        "get_weather(" * 3000,
    ):
        assert parse_tool_calls(text, tools) == (text, []), text[:30]
    _, calls = parse_tool_calls("<tool_call><function=f><parameter=x>1</parameter></function></tool_call>", tools)
    assert [c["function"]["arguments"] for c in calls] == ['{"x": 1}']


def test_function_syntax_respects_names_and_strings():
    tools = [{"type": "function", "function": {"name": n}} for n in ("get", "x-get")]
    assert calls_of_tools('x-get({"q": 1})', tools) == [("x-get", {"q": 1})]  # not also `get`
    assert calls_of_tools("get(path=\"a)b\", note='(')", tools) == [("get", {"path": "a)b", "note": "("})]
    # A call written inside another's arguments is part of them.
    assert calls_of_tools('get({"cmd": "x-get({})"})', tools) == [("get", {"cmd": "x-get({})"})]


def test_family_parser_result_in_another_shape_keeps_its_arguments():
    text = '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>'
    assert calls_of(text, "json_tools")[1] == [("get_weather", {"city": "Paris"})]


def calls_of_tools(text: str, tools: list[dict]) -> list:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parse_tool_calls(text, tools)[1]]


def test_an_answer_that_opens_with_a_code_fence_streams_as_it_is_written():
    # Coding agents' answers often open with a fence: held whole, it arrived as one chunk after 30 s.
    code = "```python\ndef area(r):\n    return 3.14159 * r * r\n```\n"
    text = code + "That computes the area."
    f = ToolStreamFilter(TOOLS)
    inside = text.index("return")
    assert f.safe_length(text[: inside + 6]) >= text.index("def area")  # before the fence closes
    shown, rest, calls = stream(text)
    assert calls == [] and shown + rest == text and len(shown) >= len(code) - 1


def test_code_whose_braces_hold_a_stray_quote_streams_on():
    # A dict in code is read as the start of a JSON value; a quote mark inside single quotes opened a JSON string in
    # the scan, the value never closed, and the rest of the answer (569 of 582 characters) came in one piece at the end.
    code = '```python\nd = {"q": \'"\', "b": 1}\n' + "".join(f"x{i} = {i}\n" for i in range(40)) + "```\n"
    f = ToolStreamFilter(TOOLS)
    assert f.safe_length(code[: code.index("x20")]) >= code.index("x19")
    shown, rest, calls = stream(code)
    assert calls == [] and shown + rest == code and len(shown) > code.index("x39")  # all but the closing fence


def test_json_that_is_not_a_call_is_released_once_it_closes():
    text = 'The config is {"id": 7, "level": 3} as asked.\nDone.'
    f = ToolStreamFilter(TOOLS)
    assert f.safe_length(text[: text.index("level")]) <= text.index("{")  # may still be a call
    assert f.safe_length(text[: text.index("as asked")]) >= text.index("}")  # closed: not a call
    shown, rest, calls = stream(text)
    assert calls == [] and shown + rest == text


def test_a_json_answer_streams_once_its_first_key_shows_it_is_no_call():
    # A JSON answer (fenced or bare) with tools offered was held until it closed: 443 characters in one chunk after
    # 10 s on this CPU. A call opens with a call's key; an object that opens with another is content as it comes.
    body = '{"debug": true, "items": [' + ", ".join(f'{{"id": {i}}}' for i in range(30)) + "]}"
    for text in (f"```json\n{body}\n```\nDone.", f"Here: {body} then\n", f"[{body}]"):
        f = ToolStreamFilter(TOOLS)
        mid = text.index('"id": 20')
        assert f.safe_length(text[:mid]) >= text.index('"id": 19'), text[:20]  # before it closes
        shown, rest, calls = stream(text)
        assert calls == [] and shown + rest == text
        assert parse_tool_calls(text, TOOLS) == (text, [])
    # Neither way is an object that opens with another key a call, though it holds a call's keys later on.
    text = '{"answer": 1, "name": "get_weather", "arguments": {"city": "Paris"}}'
    assert parse_tool_calls(text, TOOLS) == (text, []) and stream(text)[2] == []
    # A call after such a value is still found, and not shown.
    text = '{"debug": true}\n{"name": "run_shell", "arguments": {"command": "ls"}}'
    shown, rest, calls = stream(text)
    assert [c["function"]["name"] for c in calls] == ["run_shell"] and "run_shell" not in shown
    # A call's shape naming no offered tool is shown once its name has closed: SmolLM2's JSON answer with tools offered.
    args = '"arguments": {"fruits": [' + ", ".join(f'{{"name": "f{i}", "colour": "red"}}' for i in range(20)) + "]}}"
    for text in ('{"type": "function", "function": {"name": "fruit_1", ' + args + "}", '{"name": "nope", ' + args):
        f = ToolStreamFilter(TOOLS)
        assert f.safe_length(text[: text.index('"f10"')]) >= text.index('"f9"'), text[:30]
        shown, rest, calls = stream(text)
        assert calls == [] and shown + rest == text and parse_tool_calls(text, TOOLS) == (text, [])
    # One naming an offered tool is still held, and is a call; so is one whose name comes after its arguments.
    for text in (
        '{"type": "function", "function": {"name": "get_weather", ' + args + "}",
        "{" + args[:-1] + ', "name": "get_weather"}',
    ):
        f = ToolStreamFilter(TOOLS)
        assert f.safe_length(text[: text.index('"f10"')]) == 0, text[:30]
        shown, rest, calls = stream(text)
        assert shown == "" and [c["function"]["name"] for c in calls] == ["get_weather"], text[:30]
    # Inside a call's marker the first key is not asked for.
    text = '<tool_call>{"thought": "list", "name": "run_shell", "arguments": {"command": "ls"}}</tool_call>'
    assert calls_of(text)[1] == [("run_shell", {"command": "ls"})]


def test_a_fenced_call_is_held_from_its_fence():
    text = 'Sure.\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    shown, rest, calls = stream(text)
    assert shown.strip() == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert "```" not in shown


def test_a_tool_name_inside_code_streams_as_text_and_a_spaced_call_is_one():
    # A method or a longer name that ends in a tool's name is no call to the one-shot parse; streamed, it was held from
    # the name on and came out as a call of that tool: `client.get_weather(city="Paris")` in an answer's code.
    for text in (
        '```python\nw = client.get_weather(city="Paris")\nprint(w)\n```\nThat is all.',
        'Use api.get_weather({"city": "Paris"}) or my_get_weather(city="Rome") to fetch it.',
    ):
        f = ToolStreamFilter(TOOLS)
        mid = text.index("Paris") + 8
        assert f.safe_length(text[:mid]) >= text.index("Paris"), text  # shown as it comes
        shown, rest, calls = stream(text)
        assert calls == [] and shown + rest == text == parse_tool_calls(text, TOOLS)[0]
    # And a space before the parenthesis, which the one-shot parse reads as a call, is held as one.
    text = 'Checking.\nget_weather ({"city": "Paris"})'
    shown, rest, calls = stream(text, step=1)
    assert shown == "Checking." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert (shown + rest, calls_of(text)[1]) == (calls_of(text)[0], [("get_weather", {"city": "Paris"})])


def test_a_tool_name_in_code_that_is_no_call_is_held_only_until_its_parenthesis_closes():
    # SmolLM2 asked to explain a tool writes `def get_weather(data):` in a fence: held from there to the end of the
    # answer (207 characters in one chunk, after 16 s), though once `(data)` closes it is no call.
    code = "```python\ndef get_weather(data):\n" + "".join(f"    x{i} = data[{i}]\n" for i in range(20)) + "```\n"
    f = ToolStreamFilter(TOOLS)
    assert f.safe_length(code[: code.index("x10")]) >= code.index("x9")
    shown, rest, calls = stream(code)
    assert calls == [] and shown + rest == code == parse_tool_calls(code, TOOLS)[0]
    assert len(shown) >= code.index("x19")
    # A call in that syntax is still held from its name, and one not closed yet too.
    text = 'Sure.\nget_weather(city="Paris")'
    assert ToolStreamFilter(TOOLS).safe_length(text[:-3]) == len("Sure.")
    shown, rest, calls = stream(text, step=1)
    assert shown == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather"]
