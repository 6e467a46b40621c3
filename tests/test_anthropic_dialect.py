"""The Anthropic dialect's pure parts: request models, the conversion to the OpenAI form (one conversation, one
cache key in both dialects), the `message` renderer, the event stream and error objects, checked against the
official `anthropic` SDK's response and stream-event models."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter, ValidationError

from api.dialects.anthropic.protocol import CountTokensRequest, MessagesRequest, check_system_turns, to_chat
from api.dialects.anthropic.render import (
    MessageStreamWriter,
    error_body,
    message,
    tool_use_id,
)
from api.dialects.openai.protocol import ChatCompletionRequest
from api.errors import APIError
from api.pipeline.relay import relay
from api.pipeline.streaming import from_list, replay
from mlxq import events
from mlxq.contract import job_error
from mlxq.keys import canonical_chat, request_key

STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def anthropic(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}], **fields}


def converted(body: dict[str, Any]) -> dict[str, Any]:
    """to_chat's body, checked to be one the OpenAI dialect accepts."""
    out = to_chat(MessagesRequest.model_validate(body))
    ChatCompletionRequest.model_validate(out)
    return out


def key(openai_body: dict[str, Any]) -> str:
    raw = ChatCompletionRequest.model_validate(openai_body).model_dump(exclude_none=True)
    canonical = canonical_chat(raw, default_temperature=1.0, default_max_tokens=512)
    return request_key("chat", canonical, weights="w")


def refusal(body: dict[str, Any], model: type = MessagesRequest) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return info.value.errors()


# -- requests ----------------------------------------------------------------------------------


def test_system_string_is_the_first_message():
    out = converted(anthropic(system="Be brief."))
    assert out["messages"][0] == {"role": "system", "content": "Be brief."}
    assert out["messages"][1] == {"role": "user", "content": "Hi"}


def test_system_blocks_are_text_parts_and_the_billing_block_is_dropped():
    out = converted(
        anthropic(
            system=[
                {
                    "type": "text",
                    "text": "x-anthropic-billing-header: cc_version=2.1.3.abc; cc_entrypoint=cli; cch=1f;",
                },
                {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "\nBe careful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            ]
        )
    )
    assert out["messages"][0] == {
        "role": "system",
        "content": [{"type": "text", "text": "You are Claude Code."}, {"type": "text", "text": "\nBe careful."}],
    }
    # The block's own volatile line never takes the next block's first line with it (as flattening first would).
    plain = converted(anthropic(system="You are Claude Code.\nBe careful."))
    assert key(out) == key(plain)


def test_a_system_of_only_the_billing_line_is_no_system_message():
    out = converted(anthropic(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1;"}]))
    assert out["messages"] == [{"role": "user", "content": "Hi"}]


def test_user_text_blocks_flatten_like_openai_text_parts():
    blocks = converted(
        anthropic(
            messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        )
    )
    assert blocks["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    as_string = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "ab"}]}
    assert key(blocks) == key(as_string)


def test_tool_use_and_tool_result_round_trip():
    out = converted(
        anthropic(
            messages=[
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "21C"}],
                            "is_error": False,
                        },
                        {"type": "text", "text": "Which is warmer?"},
                    ],
                },
            ],
            tools=[{"name": "weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA}],
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        )
    )
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Checking."}],
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "21C"}]},
        {"role": "user", "content": [{"type": "text", "text": "Which is warmer?"}]},
    ]
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER_SCHEMA},
        }
    ]
    assert out["tool_choice"] == "auto"


def test_an_assistant_turn_of_tool_calls_only_has_no_content():
    out = converted(
        anthropic(
            messages=[
                {"role": "user", "content": "Go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            ]
        )
    )
    assert out["messages"][1]["content"] is None
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "t", "content": ""}


def test_a_tool_use_is_answered_in_the_next_turn_a_system_turn_aside_and_counted_alike():
    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}
    system = {"role": "system", "content": "Agents: none."}  # the mid-conversation-system beta's turn
    converted(anthropic(messages=[{"role": "user", "content": "Go"}, use, system, result]))
    for model in (MessagesRequest, CountTokensRequest):
        late = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Go"}, use, use, result]}
        with pytest.raises(APIError) as refused:
            to_chat(model.model_validate(late))
        assert refused.value.message.startswith("messages.1: `tool_use` ids were found without `tool_result` blocks")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any):
    tools = [{"name": "weather", "input_schema": WEATHER_SCHEMA}]
    assert converted(anthropic(tools=tools, tool_choice=choice))["tool_choice"] == expected


def test_sampling_stop_and_extras_are_carried_and_the_rest_dropped():
    out = converted(
        anthropic(
            temperature=0,
            top_p=0.9,
            top_k=40,
            stop_sequences=["END", "STOP"],
            stream=True,
            metadata={"user_id": "u"},
            service_tier="auto",
            thinking={"type": "enabled", "budget_tokens": 2048},
            seed=7,
            context_management={"edits": []},  # an unknown field Claude Code sends
        )
    )
    assert out == {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64,
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 40,
        "stream": True,
        "seed": 7,
        "stop": ["END", "STOP"],
        "metadata": {"user_id": "u"},  # Claude Code's session: routing keeps it on one worker (not in the key)
    }


def test_thinking_blocks_are_dropped():
    out = converted(
        anthropic(
            messages=[
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Greet back.", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "Hello!"},
                    ],
                },
                {"role": "user", "content": "Bye"},
            ]
        )
    )
    assert out["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}


def test_count_tokens_request_has_no_max_tokens():
    body = CountTokensRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    out = to_chat(body)
    assert out == {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    ChatCompletionRequest.model_validate(out)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}],
        [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}],
    ],
)
def test_media_blocks_are_refused_as_text_only(content: list[dict[str, Any]]):
    errors = refusal(anthropic(messages=[{"role": "user", "content": content}]))
    assert errors[0]["type"] == "unsupported_content_block"
    assert "text-only" in errors[0]["msg"]


@pytest.mark.parametrize("kind", ["image", "document"])
def test_a_tool_results_media_is_a_note_to_the_text_only_model_never_a_400(kind: str):
    # Claude Code's Read of an image or a PDF answers with such a block; a 400 would refuse every later turn too,
    # since each sends the history again.
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]}
    media = {"type": kind, "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "x"}, media]}
    out = converted(
        anthropic(messages=[{"role": "user", "content": "Look"}, call, {"role": "user", "content": [result]}])
    )
    assert out["messages"][-1]["content"] == [
        {"type": "text", "text": "x"},
        {"type": "text", "text": f"[{kind} omitted: this model reads text only]"},
    ]


def test_blocks_in_the_wrong_turn_are_refused():
    errors = refusal(
        anthropic(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}])
    )
    assert "'tool_use' are not supported in a user message" in errors[0]["msg"]
    errors = refusal(
        anthropic(messages=[{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}])
    )
    assert "'tool_result' are not supported in an assistant message" in errors[0]["msg"]


def test_anthropic_defined_tools_are_refused():
    errors = refusal(anthropic(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]))
    assert errors[0]["type"] == "unsupported_tool"
    assert "web_search_20250305" in errors[0]["msg"]
    ok = converted(anthropic(tools=[{"type": "custom", "name": "f", "input_schema": {"type": "object"}}]))
    assert ok["tools"][0]["function"]["name"] == "f"


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"temperature": 1.5},
        {"messages": []},
        {"tool_choice": {"type": "tool"}},
        {"stop_sequences": [""]},
        {"tools": [{"name": "has space", "input_schema": {}}]},
    ],
)
def test_bad_values_are_refused(fields: dict[str, Any]):
    refusal(anthropic(**fields))


def test_max_tokens_is_required():
    body = anthropic()
    del body["max_tokens"]
    assert refusal(body)[0]["type"] == "missing"


# -- one conversation, one key -----------------------------------------------------------------


def tool_conversation(*, call_id: str, arguments: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same conversation (a tool call and its result) in both dialects: OpenAI's with the tool call's id and
    arguments as an OpenAI client sends them back, Anthropic's as the SDK does."""
    tools = [{"name": "weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA}]
    a = {
        "model": "m",
        "max_tokens": 100,
        "temperature": 0,
        "system": "You are helpful.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": tool_use_id(call_id), "name": "weather", "input": {"city": "Paris"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use_id(call_id), "content": "18C"}],
            },
        ],
        "tools": tools,
        "tool_choice": {"type": "auto"},
    }
    o = {
        "model": "m",
        "max_tokens": 100,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "weather", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "18C"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER_SCHEMA},
            }
        ],
        "tool_choice": "auto",
    }
    return a, o


def test_one_conversation_one_key():
    # Arguments as the worker writes them (and an OpenAI client sends an answer's call back), ids the same.
    a, o = tool_conversation(call_id="toolu_01abc", arguments='{"city": "Paris"}')
    assert key(converted(a)) == key(o)


def test_one_key_whatever_the_arguments_formatting():
    a, o = tool_conversation(call_id="toolu_01abc", arguments='{"city":"Paris"}')
    assert key(converted(a)) == key(o)


def test_one_key_whatever_the_tool_call_ids():
    a, o = tool_conversation(call_id="call_0123456789abcdef01234567", arguments='{"city": "Paris"}')
    assert key(converted(a)) == key(o)


@pytest.mark.parametrize("content", ["no such city", [{"type": "text", "text": "no such city"}]])
def test_a_tool_result_marked_as_an_error_tells_the_model_so(content: Any):
    """`is_error`: the OpenAI form has no such flag, so the result's text says it (and the key differs from a
    success's): the model is told its call failed."""
    a, _ = tool_conversation(call_id="toolu_01abc", arguments='{"city": "Paris"}')
    result = a["messages"][-1]["content"][0]
    tool_messages = {}
    for flag in (None, False, True):
        result.update(content=content, **({} if flag is None else {"is_error": flag}))
        tool_messages[flag] = converted(a)["messages"][-1]
    assert tool_messages[None] == tool_messages[False] != tool_messages[True]
    text = [tool_messages[True]["content"]] if isinstance(tool_messages[True]["content"], str) else None
    text = text or [p["text"] for p in tool_messages[True]["content"]]
    assert "".join(text) == "Error: no such city"


# -- message -----------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "cached_tokens": 100}
CALL = {"id": "call_0123abc", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}


def test_message_with_text():
    out = message({"text": "Paris.", "finish_reason": "stop", "usage": USAGE}, model="claude-x")
    Message.model_validate(out)
    assert out["id"].startswith("msg_")
    assert (out["type"], out["role"], out["model"]) == ("message", "assistant", "claude-x")
    assert out["content"] == [{"type": "text", "text": "Paris."}]
    assert (out["stop_reason"], out["stop_sequence"]) == ("end_turn", None)
    assert out["usage"] == {
        "input_tokens": 20,
        "output_tokens": 9,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 100,
    }


def test_message_with_tool_calls():
    broken = {"id": "toolu_keep", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    out = message({"text": "", "finish_reason": "tool_calls", "tool_calls": [CALL, broken], "usage": USAGE}, model="m")
    Message.model_validate(out)
    assert out["content"] == [
        {"type": "tool_use", "id": "toolu_0123abc", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_keep", "name": "f", "input": {}},
    ]
    assert out["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("result", "reason", "sequence"),
    [
        ({"finish_reason": "stop"}, "end_turn", None),
        ({"finish_reason": "length"}, "max_tokens", None),
        ({"finish_reason": "tool_calls"}, "tool_use", None),
        ({"finish_reason": "stop", "stop_sequence": "END"}, "stop_sequence", "END"),
        ({"finish_reason": "cancelled"}, "end_turn", None),
    ],
)
def test_stop_reasons(result: dict[str, Any], reason: str, sequence: str | None):
    out = message({"text": "x", **result}, model="m")
    assert (out["stop_reason"], out["stop_sequence"]) == (reason, sequence)


def test_tool_use_ids():
    assert tool_use_id("toolu_01A") == "toolu_01A"
    assert tool_use_id("call_abc") == tool_use_id("call_abc") == "toolu_abc"
    assert tool_use_id("chatcmpl-tool.1") == "toolu_chatcmpl-tool1"
    assert tool_use_id(None).startswith("toolu_") and len(tool_use_id(None)) > len("toolu_")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (499, "api_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_error_body(status: int, kind: str):
    assert error_body(status, "nope") == {"type": "error", "error": {"type": kind, "message": "nope"}}


# -- the event stream --------------------------------------------------------------------------


def run_stream(items: list[dict[str, Any]] | AsyncIterator[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    source = from_list(items) if isinstance(items, list) else items

    async def collect() -> list[tuple[str, dict[str, Any]]]:
        writer = MessageStreamWriter(model="claude-x")
        return [(e.event, json.loads(e.data)) async for e in relay(source, writer)]

    sent = asyncio.run(collect())
    for name, data in sent:
        assert name == data["type"]  # `event:` names the type the data carries
        if name not in ("ping", "error"):
            STREAM_EVENT.validate_python(data)
    return sent


def accumulate(sent: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The message a client builds from the stream, as the SDK's accumulator does it (checked against it)."""
    snapshot: dict[str, Any] | None = None
    partial: dict[int, str] = {}
    for name, data in sent:
        if name == "message_start":
            snapshot = copy.deepcopy(data["message"])
        elif name == "content_block_start":
            assert snapshot is not None and data["index"] == len(snapshot["content"])
            snapshot["content"].append(copy.deepcopy(data["content_block"]))
        elif name == "content_block_delta":
            assert snapshot is not None
            block, delta = snapshot["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
                block["input"] = json.loads(partial[data["index"]])
        elif name == "message_delta":
            assert snapshot is not None
            snapshot.update(data["delta"])
            snapshot["usage"].update(data["usage"])
    assert snapshot is not None
    Message.model_validate(snapshot)
    try:
        from anthropic.lib.streaming._messages import accumulate_event
    except ImportError:  # a private helper: the hand-built snapshot above stands on its own
        return snapshot
    sdk: Any = None
    bufs: dict[int, bytes] = {}
    for name, data in sent:
        if name not in ("ping", "error"):
            sdk = accumulate_event(event=STREAM_EVENT.validate_python(data), current_snapshot=sdk, json_bufs=bufs)
    assert sdk.model_dump(include={"content", "stop_reason", "stop_sequence"}, exclude_none=True) == {
        k: snapshot[k] for k in ("content", "stop_reason", "stop_sequence") if snapshot[k] is not None
    }
    assert sdk.usage.model_dump(exclude_none=True) == snapshot["usage"]
    return snapshot


def test_stream_of_text():
    result = {"text": "Hello there.", "finish_reason": "stop", "usage": USAGE}
    sent = run_stream(
        [
            events.waiting("queued"),
            events.started(120, 100),
            events.progress(64, 120),
            events.delta("Hello"),
            events.delta(""),
            events.delta(" there."),
            events.done(result),
        ]
    )
    assert [name for name, _ in sent] == [
        "message_start",
        "ping",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert sent[0][1]["message"]["content"] == [] and sent[0][1]["message"]["stop_reason"] is None
    final = accumulate(sent)
    assert final["content"] == [{"type": "text", "text": "Hello there."}]
    assert (final["stop_reason"], final["usage"]) == ("end_turn", message(result, model="m")["usage"])
    assert final["id"].startswith("msg_") and final["model"] == "claude-x"


def test_message_start_carries_the_prompts_usage_once_the_job_has_started():
    # As Anthropic's does: the input and cache-read tokens from the start (before, 0 until `message_delta`).
    result = {"text": "Hi.", "finish_reason": "stop", "usage": USAGE}
    sent = run_stream([events.started(120, 100), events.delta("Hi."), events.done(result)])
    usage = sent[0][1]["message"]["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["output_tokens"]) == (20, 100, 0)
    # A job still queued when the stream opens: not known yet.
    sent = run_stream([events.waiting("queued"), events.started(120, 100), events.delta("Hi."), events.done(result)])
    assert sent[0][1]["message"]["usage"]["input_tokens"] == 0
    assert accumulate(sent)["usage"] == message(result, model="m")["usage"]


def test_stream_of_text_then_tool_calls():
    second = {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}
    result = {"text": "Checking.", "finish_reason": "tool_calls", "tool_calls": [CALL, second], "usage": USAGE}
    sent = run_stream(
        [events.started(120, 100), events.delta("Checking."), events.tool_calls([CALL, second]), events.done(result)]
    )
    blocks = [(name, data.get("index")) for name, data in sent if name.startswith("content_block")]
    assert blocks == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
    ]
    assert sent[4][1]["content_block"] == {"type": "tool_use", "id": "toolu_0123abc", "name": "weather", "input": {}}
    final = accumulate(sent)
    assert final["stop_reason"] == "tool_use"
    assert final["content"] == message(result, model="m")["content"]


def test_stream_of_a_tool_call_alone_starts_at_index_0():
    result = {"text": "", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    sent = run_stream([events.started(120, 100), events.tool_calls([CALL]), events.done(result)])
    assert [(n, d.get("index")) for n, d in sent if n == "content_block_start"] == [("content_block_start", 0)]
    assert accumulate(sent)["content"][0]["input"] == {"city": "Paris"}


def test_a_cache_hit_streams_the_same_message():
    for result in (
        {"text": "Paris.", "finish_reason": "stop", "stop_sequence": "\n\n", "usage": USAGE},
        {"text": "On it.", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE},
    ):
        final = accumulate(run_stream(replay(result)))
        answer = message(result, model="claude-x")
        for field in ("content", "stop_reason", "stop_sequence", "usage"):
            assert final[field] == answer[field]


def test_a_joined_job_gets_the_text_it_missed_and_its_calls():
    result = {"text": "Hello there.", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    final = accumulate(run_stream([events.delta("Hello"), events.done(result)]))
    assert final["content"] == message(result, model="m")["content"]


def test_an_error_ends_the_stream_with_an_error_event():
    sent = run_stream([events.started(3, 0), events.delta("Hi"), events.error(job_error(503, "worker lost"))])
    assert sent[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "worker lost"}})
    assert "message_stop" not in [name for name, _ in sent]


def test_an_api_error_after_the_start_is_an_error_event():
    async def failing() -> AsyncIterator[dict[str, Any]]:
        yield events.waiting("queued")
        raise APIError(504, "timed out waiting for the worker")

    sent = run_stream(failing())
    assert [name for name, _ in sent] == ["message_start", "ping", "error"]
    assert sent[-1][1]["error"] == {"type": "timeout_error", "message": "timed out waiting for the worker"}


def test_what_anthropic_refuses_is_refused_a_system_turn_and_an_empty_turn():
    """A system turn among the messages is Anthropic's 400 unless the request names the mid-conversation-system beta
    (Claude Code sends it so, with its agent list): then it reaches the model as the `<system-reminder>` Claude Code
    itself writes without the beta. Any other role is refused whatever the beta."""
    system_turn = anthropic(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    body = MessagesRequest.model_validate(system_turn)
    with pytest.raises(APIError) as refused:
        check_system_turns(body, "claude-code-20250219")
    assert refused.value.param == "messages.0" and "`system`" in refused.value.message
    check_system_turns(body, "claude-code-20250219,mid-conversation-system-2026-04-07")
    reminder = {"role": "user", "content": "<system-reminder>\nBe brief.\n</system-reminder>"}
    assert to_chat(body)["messages"] == [reminder, {"role": "user", "content": "Hi"}]
    (error,) = refusal(anthropic(messages=[{"role": "developer", "content": "x"}]))
    assert error["type"] == "unexpected_role" and error["loc"][:2] == ("messages", 0) and "`system`" in error["msg"]
    empty = anthropic(messages=[{"role": "user", "content": []}])
    (error,) = refusal(empty)
    assert error["type"] == "empty_content" and error["loc"][:3] == ("messages", 0, "user")
    prefill = anthropic(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The"}])
    assert MessagesRequest.model_validate(prefill).messages[1].role == "assistant"


USER_HI = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("fields", "kind", "loc"),
    [
        ({"messages": [{"role": "user", "content": ""}]}, "empty_content", ("messages", 0, "user", "content")),
        (
            {"messages": [USER_HI, {"role": "assistant", "content": ""}, USER_HI]},
            "empty_content",
            (),  # the request's own check: only the last turn's position tells the prefill apart
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "empty_text", ("messages", 0)),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": " \n"}]}]}, "blank_text", ("messages", 0)),
        ({"system": [{"type": "text", "text": ""}]}, "empty_text", ("system",)),
        ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, "greater_than_equal", ("thinking",)),
        ({"thinking": {"type": "enabled"}}, "missing", ("thinking",)),
        ({"thinking": {"type": "sometimes"}}, "union_tag_invalid", ("thinking",)),
    ],
    ids=[
        "empty-user",
        "empty-assistant-mid",
        "empty-block",
        "blank-block",
        "empty-system-block",
        "budget",
        "no-budget",
        "thinking-type",
    ],
)
def test_what_anthropic_refuses_in_text_and_thinking_is_refused(fields: dict[str, Any], kind: str, loc: tuple):
    (error,) = refusal(anthropic(**fields))
    assert error["type"] == kind and tuple(error["loc"][: len(loc)]) == loc, error
    if kind == "empty_content" and not loc:
        assert error["msg"].startswith("messages.1: all messages must have non-empty content")


def test_what_anthropic_takes_in_text_and_thinking_is_taken():
    """A final assistant turn may be empty (a prefill of nothing), a tool result may be empty, the system prompt may
    be an empty string; thinking is checked, not used, under each of its types (the budget may pass max_tokens, as
    Anthropic allows under interleaved thinking)."""
    for fields in (
        {"messages": [USER_HI, {"role": "assistant", "content": ""}]},
        {"system": ""},
        {
            "messages": [
                USER_HI,
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": ""}]},
            ]
        },
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"thinking": {"type": "enabled", "budget_tokens": 31999}},
        {"thinking": {"type": "disabled"}},
        {"thinking": {"type": "adaptive"}},
    ):
        MessagesRequest.model_validate(anthropic(**fields))
        CountTokensRequest.model_validate({k: v for k, v in anthropic(**fields).items() if k != "max_tokens"})


def test_a_stream_that_joined_a_job_nobody_streamed_has_its_text_before_its_calls():
    # Such a job publishes no deltas, only its calls and its end: the text the stream missed came after the calls, a
    # text block after the tool_use blocks, where the same answer not streamed has it first.
    result = {"text": "Checking.", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    sent = run_stream([events.started(120, 100), events.tool_calls([CALL]), events.done(result)])
    assert accumulate(sent)["content"] == message(result, model="m")["content"]
    assert [block["type"] for block in accumulate(sent)["content"]] == ["text", "tool_use"]
