"""The Responses dialect's pure parts: request models, the conversion to the OpenAI chat form (one conversation,
one cache key in both dialects), the `response` renderer, the event stream and error objects, checked against the
official `openai` SDK's response and stream-event models (and its own stream accumulator)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from api.dialects.openai.protocol import ChatCompletionRequest
from api.dialects.openai.render import chat_completion
from api.dialects.responses.protocol import (
    CUSTOM_TOOL_PARAMETERS,
    UNTIL_CONTEXT_ENDS,
    ResponsesRequest,
    custom_tool_names,
    hosted_tools,
    to_chat,
    tool_namespaces,
)
from api.dialects.responses.render import (
    ResponseStreamWriter,
    failed_response,
    item_id,
    new_response_id,
    response_object,
)
from api.errors import APIError, invalid_body
from api.pipeline.relay import relay
from api.pipeline.streaming import from_list, replay
from mlxq import events
from mlxq.contract import CANCELLED, job_error
from mlxq.events import Event
from mlxq.keys import canonical_chat, request_key

STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "weather", "description": "Weather now", "parameters": WEATHER_SCHEMA}
CHAT_WEATHER = {
    "type": "function",
    "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER_SCHEMA},
}
APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /.+/s'},
}


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "Hi", **fields}


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate(responses(**fields))


def converted(body: dict[str, Any], previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """to_chat's body, checked to be one the OpenAI dialect accepts."""
    out = to_chat(ResponsesRequest.model_validate(body), previous=previous)
    ChatCompletionRequest.model_validate(out)
    return out


def key(openai_body: dict[str, Any]) -> str:
    raw = ChatCompletionRequest.model_validate(openai_body).model_dump(exclude_none=True)
    canonical = canonical_chat(raw, default_temperature=1.0, default_max_tokens=512)
    return request_key("chat", canonical, weights="w")


def refused(body: dict[str, Any]) -> APIError:
    """The 400 a route answers for a body its model refuses (api.errors names the field)."""
    with pytest.raises(ValidationError) as info:
        ResponsesRequest.model_validate(body)
    return invalid_body(info.value, body)


def refused_by_conversion(body: dict[str, Any], previous: list[dict[str, Any]] | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        to_chat(ResponsesRequest.model_validate(body), previous=previous)
    assert info.value.status == 400
    return info.value


# -- requests ----------------------------------------------------------------------------------


def test_string_input_is_one_user_message():
    # No max_output_tokens: to the end of the context, as OpenAI's responses run.
    assert converted(responses()) == {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": UNTIL_CONTEXT_ENDS,
    }


def test_instructions_are_the_first_message():
    out = converted(responses(instructions="Be brief."))
    assert out["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_message_items_of_every_role_and_both_content_forms():
    out = converted(
        responses(
            input=[
                {"role": "system", "content": "S"},
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "D"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "phase": "final_answer",
                    "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
                },
                {"role": "assistant", "content": "Plain."},
                {"role": "user", "content": []},
            ]
        )
    )
    assert out["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "system", "content": [{"type": "text", "text": "D"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "assistant", "content": "Plain."},
        {"role": "user", "content": ""},
    ]
    # Parts flatten as chat parts do: the same key as the same turns said as strings.
    plain = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "developer", "content": "D"},
            {"role": "user", "content": "ab"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "assistant", "content": "Plain."},
            {"role": "user", "content": ""},
        ],
        "max_tokens": UNTIL_CONTEXT_ENDS,
    }
    assert key(out) == key(plain)


def test_function_calls_and_outputs_round_trip():
    out = converted(
        responses(
            input=[
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
                {
                    "type": "function_call",
                    "id": "fc_2",
                    "call_id": "call_2",
                    "name": "weather",
                    "arguments": '{"city":"Rome"}',
                    "status": "completed",
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "21C"}],
                },
                {"role": "user", "content": "Which is warmer?"},
                {"type": "function_call", "call_id": "call_3", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_3", "output": "?"},
            ],
            tools=[WEATHER],
            tool_choice="auto",
        )
    )
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Checking."}],
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
        {"role": "user", "content": "Which is warmer?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_3", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": "?"},
    ]
    assert out["tools"] == [CHAT_WEATHER]
    assert out["tool_choice"] == "auto"


def test_custom_tool_calls_round_trip():
    out = converted(
        responses(
            input=[
                {"role": "user", "content": "Fix it."},
                {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch", "input": "*** Begin Patch é"},
                {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done."},
            ],
            tools=[APPLY_PATCH, {"type": "custom", "name": "note"}],
            tool_choice={"type": "custom", "name": "apply_patch"},
        )
    )
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_p",
                    "type": "function",
                    "function": {"name": "apply_patch", "arguments": '{"input": "*** Begin Patch é"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_p", "content": "Done."},
    ]
    patch, note = out["tools"]
    assert patch["function"]["name"] == "apply_patch"
    assert patch["function"]["parameters"] == CUSTOM_TOOL_PARAMETERS
    description = patch["function"]["description"]
    assert description.startswith("Apply a patch.") and "free-form" in description and "lark" in description
    assert 'start: "*** Begin Patch"' in description
    assert note["function"]["description"].startswith("This tool takes free-form text")
    assert out["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}
    assert custom_tool_names(ResponsesRequest.model_validate(responses(tools=[APPLY_PATCH, WEATHER]))) == {
        "apply_patch"
    }


def test_reasoning_items_are_dropped():
    out = converted(
        responses(
            input=[
                {"role": "user", "content": "Hi"},
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Greet."}]},
                {"role": "assistant", "content": "Hello!"},
            ]
        )
    )
    assert out["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_hosted_tools_are_dropped_and_reported():
    body = responses(
        tools=[
            {"type": "web_search"},
            WEATHER,
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            {"type": "mcp", "server_label": "x", "server_url": "https://example.com"},
            {"type": "web_search"},
            {"type": "local_shell"},
        ]
    )
    assert converted(body)["tools"] == [CHAT_WEATHER]
    assert hosted_tools(ResponsesRequest.model_validate(body)) == ["web_search", "file_search", "mcp", "local_shell"]
    only_hosted = converted(responses(tools=[{"type": "code_interpreter", "container": {"type": "auto"}}]))
    assert "tools" not in only_hosted


def test_a_tool_choice_of_a_hosted_tool_is_refused():
    error = refused(responses(tools=[{"type": "web_search_preview"}], tool_choice={"type": "web_search_preview"}))
    assert error.param == "tool_choice.type"
    assert "hosted tool" in error.message


def test_namespace_tools_are_flattened_and_calls_keep_the_namespace():
    body = responses(
        tools=[
            WEATHER,
            {
                "type": "namespace",
                "name": "mcp__files__",
                "description": "Tools from the files MCP server.",
                "tools": [
                    {"type": "function", "name": "read", "parameters": {"type": "object"}, "strict": False},
                    {"type": "custom", "name": "scribble"},
                ],
            },
        ],
        input=[
            {"role": "user", "content": "Read a."},
            {"type": "function_call", "call_id": "c", "name": "read", "namespace": "mcp__files__", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "A"},
        ],
    )
    out = converted(body)
    assert [t["function"]["name"] for t in out["tools"]] == ["weather", "read", "scribble"]
    assert out["tools"][1] == {
        "type": "function",
        "function": {"name": "read", "parameters": {"type": "object"}, "strict": False},
    }
    assert out["messages"][1]["tool_calls"][0]["function"]["name"] == "read"
    parsed = ResponsesRequest.model_validate(body)
    assert tool_namespaces(parsed) == {"read": "mcp__files__", "scribble": "mcp__files__"}
    assert custom_tool_names(parsed) == {"scribble"}


def test_one_name_names_one_tool():
    error = refused_by_conversion(
        responses(tools=[WEATHER, {"type": "namespace", "name": "ns", "description": "", "tools": [WEATHER]}])
    )
    assert error.param == "tools.1.tools.0.name"
    assert "declared twice" in error.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ({"format": {"type": "text"}, "verbosity": "low"}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {
                "format": {
                    "type": "json_schema",
                    "name": "city",
                    "schema": WEATHER_SCHEMA,
                    "strict": True,
                    "description": "A city.",
                }
            },
            {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": WEATHER_SCHEMA, "strict": True, "description": "A city."},
            },
        ),
        (
            {"format": {"type": "json_schema", "name": "city", "schema": WEATHER_SCHEMA}},
            {"type": "json_schema", "json_schema": {"name": "city", "schema": WEATHER_SCHEMA}},
        ),
    ],
)
def test_text_format(text: dict[str, Any], expected: dict[str, Any] | None):
    out = converted(responses(text=text))
    assert out.get("response_format") == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
    ],
)
def test_tool_choice(choice: Any, expected: Any):
    assert converted(responses(tools=[WEATHER], tool_choice=choice))["tool_choice"] == expected


def test_allowed_tools_offers_only_those():
    out = converted(
        responses(
            tools=[WEATHER, APPLY_PATCH],
            tool_choice={
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "custom", "name": "apply_patch"}],
            },
        )
    )
    assert [t["function"]["name"] for t in out["tools"]] == ["apply_patch"]
    assert out["tool_choice"] == "required"
    error = refused_by_conversion(
        responses(
            tools=[WEATHER],
            tool_choice={"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "nope"}]},
        )
    )
    assert error.param == "tool_choice.tools.0"


def test_sampling_and_extras_are_carried_and_the_rest_dropped():
    out = converted(
        responses(
            max_output_tokens=64,
            temperature=0,
            top_p=0.9,
            parallel_tool_calls=False,
            service_tier="flex",
            user="u",
            stream=True,
            seed=7,
            top_k=40,
            metadata={"k": "v"},
            prompt_cache_key="pck",
            truncation="auto",
            include=["reasoning.encrypted_content"],
            reasoning={"effort": "high", "summary": "auto"},
            store=False,
            background=False,
            client_metadata={"x": 1},
            safety_identifier="s",
            max_tool_calls=3,
            text={"verbosity": "medium"},
            unknown_future_field={"a": 1},
        )
    )
    assert out == {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 64,
        "temperature": 0,
        "top_p": 0.9,
        "parallel_tool_calls": False,
        "stream": True,
        "user": "u",
        "seed": 7,
        "top_k": 40,
        "service_tier": "flex",
        "prompt_cache_key": "pck",  # the session routing keeps on one worker (not in the cache key)
        "truncation": "auto",  # honoured by the worker (worker.sequence_builder)
    }
    assert request(service_tier="flex").priority == "low"
    assert request().priority == "interactive"
    assert converted(responses(service_tier="fast"))["service_tier"] == "priority"


def test_logprobs_are_asked_for_through_include_or_top_logprobs():
    out = converted(responses(include=["message.output_text.logprobs"], top_logprobs=3))
    assert (out["logprobs"], out["top_logprobs"]) == (True, 3)
    assert converted(responses(include=["message.output_text.logprobs"]))["logprobs"] is True
    assert "logprobs" not in converted(responses())


def test_previous_items_come_after_the_instructions_and_answer_call_ids():
    previous = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
    ]
    out = converted(
        responses(
            instructions="Be brief.",
            previous_response_id="resp_1",
            input=[{"type": "function_call_output", "call_id": "call_1", "output": "18C"}],
            tools=[WEATHER],
        ),
        previous=previous,
    )
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool"]
    assert out["messages"][0] == {"role": "system", "content": "Be brief."}
    error = refused_by_conversion(responses(previous_response_id="resp_1"), previous=[{"type": "web_search_call"}])
    assert error.param == "previous_response_id"


# -- refusals ----------------------------------------------------------------------------------


def test_an_unknown_item_type_is_refused_naming_it():
    error = refused(responses(input=[{"role": "user", "content": "Hi"}, {"type": "teleport", "where": "moon"}]))
    assert error.param == "input.1.type"
    assert "'teleport'" in error.message
    error = refused(responses(input=[{"type": "web_search_call", "id": "ws_1", "status": "completed"}]))
    assert error.param == "input.0.type"
    assert "hosted tools" in error.message


def test_an_output_that_answers_no_call_is_refused():
    error = refused_by_conversion(
        responses(
            input=[
                {"role": "user", "content": "Hi"},
                {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
                {"type": "function_call_output", "call_id": "call_9", "output": "?"},
            ]
        )
    )
    assert error.param == "input.3.call_id"
    assert "call_9" in error.message
    # An output before its call answers nothing either.
    error = refused_by_conversion(
        responses(
            input=[
                {"type": "custom_tool_call_output", "call_id": "c", "output": "x"},
                {"type": "custom_tool_call", "call_id": "c", "name": "apply_patch", "input": ""},
            ]
        )
    )
    assert error.param == "input.0.call_id"


def test_a_call_without_an_output_later_in_the_input_is_refused_as_openai_refuses_it():
    call = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"}
    for rest in ([], [{"role": "user", "content": "And?"}]):
        error = refused_by_conversion(responses(input=[{"role": "user", "content": "Hi"}, call, *rest]))
        assert (error.param, error.message) == ("input", "No tool output found for function call call_1.")
    custom = {"type": "custom_tool_call", "call_id": "c_1", "name": "apply_patch", "input": ""}
    error = refused_by_conversion(responses(input=[custom]))
    assert error.message == "No tool output found for custom tool call c_1."
    # Answered later (a user turn between), or in this input for a call the previous response made: served.
    output = {"type": "function_call_output", "call_id": "call_1", "output": "18C"}
    converted(responses(input=[call, {"role": "user", "content": "Go on"}, output]))
    previous = [{"type": "message", "role": "user", "content": "Hi"}, call]
    assert converted(responses(input=[output]), previous=previous)["messages"][-1]["role"] == "tool"


@pytest.mark.parametrize("role", ["tool", "function", "robot"])
def test_a_message_of_another_role_is_refused(role: str):
    error = refused(responses(input=[{"role": "user", "content": "Hi"}, {"role": role, "content": "x"}]))
    assert error.param == "input.1.role"


@pytest.mark.parametrize(
    ("part", "what"),
    [
        ({"type": "input_image", "image_url": "https://example.com/a.png"}, "text-only"),
        ({"type": "input_file", "file_id": "file_1"}, "text-only"),
        ({"type": "hologram"}, "'hologram'"),
    ],
)
def test_parts_that_are_not_text_are_refused(part: dict[str, Any], what: str):
    error = refused(responses(input=[{"role": "user", "content": [part]}]))
    assert error.param == "input.0.content.0.type"
    assert what in error.message
    in_output = responses(
        input=[
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": [part]},
        ]
    )
    if part["type"] == "hologram":
        assert refused(in_output).param == "input.1.output.0.type"
    else:
        # A tool's image (Codex's view_image) is a note to a text-only model, never a 400: the history, which
        # every later turn sends again, would be refused for good.
        (tool_message,) = [m for m in converted(in_output)["messages"] if m["role"] == "tool"]
        assert "omitted: this model reads text only" in tool_message["content"][0]["text"]


def test_item_references_are_refused():
    for item in ({"type": "item_reference", "id": "msg_1"}, {"id": "msg_1"}):
        error = refused_by_conversion(responses(input=[item]))
        assert error.param == "input.0.id"
        assert "previous_response_id" in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"input": []}, "input"),
    ],
)
def test_what_is_stored_elsewhere_or_missing_is_refused(fields: dict[str, Any], param: str):
    assert refused_by_conversion(responses(**fields)).param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
        ({"input": [{"content": "no role"}]}, "input.0.role"),
        ({"input": 3}, "input"),
        ({"tools": [{"type": "function", "name": "has space"}]}, "tools.0.name"),
        ({"tools": [{"type": "custom", "name": "c", "format": {"type": "grammar", "syntax": "ebnf"}}]}, None),
        ({"text": {"format": {"type": "xml"}}}, None),
        ({"service_tier": "gold"}, "service_tier"),
    ],
)
def test_bad_values_are_refused(fields: dict[str, Any], param: str | None):
    error = refused(responses(**fields))
    assert error.status == 400
    if param is not None:
        assert error.param == param


# -- one conversation, one key -----------------------------------------------------------------


def test_one_conversation_one_key():
    """A Codex-style turn (instructions, developer and user messages, a call, its output) and the same
    conversation as a chat client sends it."""
    r = responses(
        instructions="You are a coding agent.",
        input=[
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: none."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
            {"type": "function_call", "call_id": "call_abc", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_abc", "output": "18C"},
        ],
        tools=[WEATHER, {"type": "web_search"}],
        tool_choice="auto",
        parallel_tool_calls=True,
        max_output_tokens=100,
        temperature=0,
        store=False,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="session-1",
    )
    chat = {
        "model": "m",
        "max_tokens": 100,
        "temperature": 0,
        "parallel_tool_calls": True,
        "messages": [
            {"role": "system", "content": "You are a coding agent."},
            {"role": "developer", "content": "Sandbox: none."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_0123456789",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_0123456789", "content": "18C"},
        ],
        "tools": [CHAT_WEATHER],
        "tool_choice": "auto",
    }
    assert key(converted(r)) == key(chat)


def test_an_answer_sent_back_has_the_key_of_the_chat_answer_sent_back():
    """A response's output, continued through `previous`, says what the chat answer to the same request says
    when a chat client sends it back."""
    call = {"id": "call_w", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    result = {"text": "Checking.", "finish_reason": "tool_calls", "tool_calls": [call], "usage": USAGE}
    first = responses(input="Weather in Paris?", tools=[WEATHER])
    answer = response_object(
        result, model="m", response_id="resp_1", created_at=1.0, request=ResponsesRequest.model_validate(first)
    )
    previous = [{"role": "user", "content": "Weather in Paris?"}, *answer["output"]]
    second = responses(
        input=[{"type": "function_call_output", "call_id": "call_w", "output": "18C"}],
        previous_response_id="resp_1",
        tools=[WEATHER],
    )
    chat_answer = chat_completion(result, model="m")["choices"][0]["message"]
    chat = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            chat_answer,
            {"role": "tool", "tool_call_id": "call_w", "content": "18C"},
        ],
        "tools": [CHAT_WEATHER],
        "max_tokens": UNTIL_CONTEXT_ENDS,
    }
    assert key(converted(second, previous=previous)) == key(chat)


# -- the response object -----------------------------------------------------------------------

USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "cached_tokens": 100}
CALL = {"id": "call_0123abc", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
PATCH_CALL = {
    "id": "call_patch",
    "type": "function",
    "function": {"name": "apply_patch", "arguments": '{"input": "*** Begin Patch\\n*** End Patch"}'},
}


def render(result: dict[str, Any], **fields: Any) -> tuple[dict[str, Any], Response]:
    body = request(**fields)
    out = response_object(
        result, model="mlxq-model", response_id="resp_x", created_at=1700000000, request=body, hosted_dropped=()
    )
    return out, Response.model_validate(out)


def test_response_with_text():
    out, sdk = render({"text": "Paris.", "finish_reason": "stop", "usage": USAGE}, instructions="Be brief.")
    assert sdk.output_text == "Paris."
    assert (out["id"], out["object"], out["status"], out["model"]) == ("resp_x", "response", "completed", "mlxq-model")
    assert out["output"] == [
        {
            "type": "message",
            "id": item_id("resp_x", "msg", 0),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Paris.", "annotations": [], "logprobs": []}],
        }
    ]
    assert out["output"][0]["id"].startswith("msg_")
    assert out["usage"] == {
        "input_tokens": 120,
        "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 129,
    }
    assert (out["error"], out["incomplete_details"], out["instructions"]) == (None, None, "Be brief.")
    assert (sdk.tool_choice, sdk.parallel_tool_calls, sdk.tools) == ("auto", True, [])
    assert "mlxq" not in out


def test_response_echoes_the_request():
    out, sdk = render(
        {"text": "{}", "usage": USAGE},
        tools=[WEATHER, APPLY_PATCH, {"type": "web_search"}],
        tool_choice={"type": "function", "name": "weather"},
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.5,
        max_output_tokens=50,
        previous_response_id="resp_0",
        text={"format": {"type": "json_schema", "name": "n", "schema": WEATHER_SCHEMA, "strict": True}},
        reasoning={"effort": "low"},
        metadata={"k": "v"},
        store=False,
        service_tier="flex",
        truncation="auto",
        user="u",
        prompt_cache_key="pck",
    )
    # A function as the specification's function tool has it: `strict` (null: not given) and `parameters` always.
    assert out["tools"] == [{**WEATHER, "strict": None}, APPLY_PATCH, {"type": "web_search"}]
    assert out["tool_choice"] == {"type": "function", "name": "weather"}
    assert out["text"] == {"format": {"type": "json_schema", "name": "n", "schema": WEATHER_SCHEMA, "strict": True}}
    assert (sdk.parallel_tool_calls, sdk.temperature, sdk.top_p, sdk.max_output_tokens) == (False, 0.2, 0.5, 50)
    assert (sdk.previous_response_id, sdk.store, sdk.service_tier, sdk.truncation) == ("resp_0", False, "flex", "auto")
    assert (sdk.user, sdk.prompt_cache_key, sdk.metadata) == ("u", "pck", {"k": "v"})
    assert sdk.reasoning is not None and sdk.reasoning.effort == "low"


def test_response_with_tool_calls():
    namespaced = {"id": "call_r", "type": "function", "function": {"name": "read", "arguments": "{}"}}
    result = {"text": "", "finish_reason": "tool_calls", "tool_calls": [CALL, PATCH_CALL, namespaced], "usage": USAGE}
    tools = [
        WEATHER,
        APPLY_PATCH,
        {
            "type": "namespace",
            "name": "mcp__files__",
            "description": "Files.",
            "tools": [{"type": "function", "name": "read"}],
        },
    ]
    out, sdk = render(result, tools=tools)
    assert sdk.output_text == ""
    assert out["output"] == [
        {
            "type": "function_call",
            "id": item_id("resp_x", "fc", 0),
            "call_id": "call_0123abc",
            "name": "weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
        {
            "type": "custom_tool_call",
            "id": item_id("resp_x", "ctc", 1),
            "call_id": "call_patch",
            "name": "apply_patch",
            "input": "*** Begin Patch\n*** End Patch",
        },
        {
            "type": "function_call",
            "id": item_id("resp_x", "fc", 2),
            "call_id": "call_r",
            "name": "read",
            "arguments": "{}",
            "status": "completed",
            "namespace": "mcp__files__",
        },
    ]
    assert [item.type for item in sdk.output] == ["function_call", "custom_tool_call", "function_call"]


def test_text_then_a_call():
    _, sdk = render({"text": "Checking.", "finish_reason": "tool_calls", "tool_calls": [CALL]}, tools=[WEATHER])
    assert [item.type for item in sdk.output] == ["message", "function_call"]
    assert sdk.output_text == "Checking."


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"input": "x"}', "x"),
        ('{"patch": "y"}', "y"),  # the one string the model wrote, under another name
        ('{"a": 1, "b": "2"}', '{"a": 1, "b": "2"}'),
        ("not json", "not json"),
        ({"input": "z"}, "z"),
    ],
)
def test_custom_tool_input_from_the_arguments(arguments: Any, expected: str):
    call = {"id": "c", "type": "function", "function": {"name": "apply_patch", "arguments": arguments}}
    out, _ = render({"text": "", "finish_reason": "tool_calls", "tool_calls": [call]}, tools=[APPLY_PATCH])
    assert out["output"][0]["input"] == expected


def test_cut_by_max_output_tokens_is_incomplete():
    out, sdk = render({"text": "Par", "finish_reason": "length", "usage": USAGE}, max_output_tokens=1)
    assert (sdk.status, sdk.incomplete_details and sdk.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert out["output"][0]["status"] == "incomplete"


def test_cancelled_and_queued():
    out, _ = render({"text": "Pa", "finish_reason": "cancelled", "usage": USAGE})
    assert out["status"] == "cancelled"
    body = request(background=True)
    queued = response_object({}, model="m", response_id="resp_q", created_at=1, request=body, status="queued")
    sdk = Response.model_validate(queued)
    assert (sdk.status, sdk.output, sdk.usage, sdk.background) == ("queued", [], None, True)


def test_dropped_hosted_tools_are_reported():
    body = request(tools=[{"type": "web_search"}, WEATHER])
    out = response_object(
        {"text": "x"}, model="m", response_id="resp_1", created_at=1, request=body, hosted_dropped=hosted_tools(body)
    )
    Response.model_validate(out)
    assert out["mlxq"] == {"dropped_tools": ["web_search"]}


def test_logprobs_are_rendered_in_the_text():
    entry = {
        "token": "Hi",
        "logprob": -0.1,
        "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
    }
    _, sdk = render({"text": "Hi", "logprobs": [entry]})
    part = sdk.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs is not None and part.logprobs[0].token == "Hi"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_prompt"), (429, "rate_limit_exceeded"), (500, "server_error"), (503, "server_error")],
)
def test_failed_response(status: int, code: str):
    error = job_error(status, "worker lost", code="worker_lost")
    out = failed_response(error, model="m", response_id="resp_f", created_at=1, request=request())
    sdk = Response.model_validate(out)
    assert sdk.status == "failed" and sdk.error is not None
    assert (sdk.error.code, sdk.error.message) == (code, "worker lost")
    assert out["mlxq"]["error"] == {"status": status, "type": "server_error", "code": "worker_lost", "param": None}
    cancelled = failed_response(CANCELLED, model="m", response_id="resp_c", created_at=1, request=request())
    assert (Response.model_validate(cancelled).status, cancelled["error"]) == ("cancelled", None)


def test_response_ids():
    assert new_response_id().startswith("resp_") and new_response_id() != new_response_id()
    assert item_id("resp_1", "msg", 0) == item_id("resp_1", "msg", 0) != item_id("resp_1", "msg", 1)
    assert item_id("resp_1", "fc", 0) != item_id("resp_2", "fc", 0)


# -- the event stream --------------------------------------------------------------------------

Sent = list[tuple[str, dict[str, Any]]]


COMPLETED_AT = 1700000001


def run_stream(
    items: list[Event] | AsyncIterator[Event],
    body: dict[str, Any] | None = None,
    *,
    response_id: str = "resp_s",
    starting_after: int | None = None,
) -> Sent:
    """The events a stream sends (keepalive comments left out), each checked against the SDK's event union."""
    source = from_list(items) if isinstance(items, list) else items
    writer = ResponseStreamWriter(
        model="mlxq-model",
        response_id=response_id,
        created_at=1700000000,
        request=ResponsesRequest.model_validate(body or responses()),
        starting_after=starting_after,
        completed_at=COMPLETED_AT,  # as a late reader's writer has it (the job's end), so renders compare equal
    )

    async def collect() -> Sent:
        return [(str(e.event), json.loads(e.data)) async for e in relay(source, writer) if e.data is not None]

    sent = asyncio.run(collect())
    for name, data in sent:
        assert name == data["type"]  # `event:` names the type the data carries
        STREAM_EVENT.validate_python(data)
    return sent


def check_order(sent: Sent, first: int = 0) -> None:
    assert [data["sequence_number"] for _, data in sent] == list(range(first, first + len(sent)))


def accumulate(sent: Sent) -> Response:
    """The response a client builds from the stream, by the SDK's own accumulator; checked to agree with the
    terminal event's response."""
    state: Any = ResponseStreamState(input_tools=omit, text_format=omit)
    last: Any = None
    for _, data in sent:
        for event in state.handle_event(STREAM_EVENT.validate_python(data)):
            last = event
    assert last is not None and last.type in ("response.completed", "response.incomplete", "response.failed")
    final = Response.model_validate(sent[-1][1]["response"])
    fields = {"id", "status", "output"}  # the SDK's parsed models add `parsed: None`
    assert last.response.model_dump(include=fields, exclude_none=True) == final.model_dump(
        include=fields, exclude_none=True
    )
    return final


def names(sent: Sent) -> list[str]:
    return [name for name, _ in sent]


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
    assert names(sent) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    check_order(sent)
    for _, data in sent[:2]:
        assert (data["response"]["status"], data["response"]["output"]) == ("in_progress", [])
    deltas = [d for n, d in sent if n == "response.output_text.delta"]
    message_id = item_id("resp_s", "msg", 0)
    assert all((d["item_id"], d["output_index"], d["content_index"]) == (message_id, 0, 0) for d in deltas)
    assert "".join(d["delta"] for d in deltas) == "Hello there."
    assert sent[6][1]["text"] == "Hello there."
    final = accumulate(sent)
    assert final.output_text == "Hello there."
    expected = response_object(
        result,
        model="mlxq-model",
        response_id="resp_s",
        created_at=1700000000,
        request=request(),
        completed_at=COMPLETED_AT,
    )
    assert sent[-1][1]["response"] == expected


def test_stream_of_text_then_tool_calls():
    result = {"text": "Checking.", "finish_reason": "tool_calls", "tool_calls": [CALL, PATCH_CALL], "usage": USAGE}
    body = responses(tools=[WEATHER, APPLY_PATCH])
    sent = run_stream([events.delta("Checking."), events.tool_calls([CALL, PATCH_CALL]), events.done(result)], body)
    assert names(sent)[2:] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.completed",
    ]
    check_order(sent)
    indexed = [(n, d["output_index"], d.get("item_id") or d["item"]["id"]) for n, d in sent if "output_index" in d]
    assert {(i, item) for _, i, item in indexed} == {
        (0, item_id("resp_s", "msg", 0)),
        (1, item_id("resp_s", "fc", 1)),
        (2, item_id("resp_s", "ctc", 2)),
    }
    added = sent[8][1]["item"]
    assert (added["type"], added["arguments"], added["status"], added["call_id"]) == (
        "function_call",
        "",
        "in_progress",
        "call_0123abc",
    )
    assert sent[10][1]["arguments"] == '{"city": "Paris"}'
    assert sent[14][1]["input"] == "*** Begin Patch\n*** End Patch"
    final = accumulate(sent)
    expected = response_object(
        result,
        model="mlxq-model",
        response_id="resp_s",
        created_at=1700000000,
        request=ResponsesRequest.model_validate(body),
        completed_at=COMPLETED_AT,
    )
    assert sent[-1][1]["response"] == expected
    assert final.output_text == "Checking."


def test_a_pure_tool_call_answer_has_no_message():
    result = {"text": "", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    sent = run_stream([events.started(120, 100), events.tool_calls([CALL]), events.done(result)])
    assert names(sent) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(d.get("output_index", 0) == 0 for _, d in sent)
    final = accumulate(sent)
    assert [item.type for item in final.output] == ["function_call"]


def test_a_stream_cut_by_max_output_tokens_is_incomplete():
    result = {"text": "Hel", "finish_reason": "length", "usage": USAGE}
    sent = run_stream([events.delta("Hel"), events.done(result)], responses(max_output_tokens=1))
    assert names(sent)[-1] == "response.incomplete"
    final = accumulate(sent)
    assert (final.status, final.incomplete_details and final.incomplete_details.reason) == (
        "incomplete",
        "max_output_tokens",
    )
    assert sent[-2][1]["item"]["status"] == "incomplete"


def test_a_failed_job_ends_with_response_failed():
    sent = run_stream([events.started(3, 0), events.delta("Hi"), events.error(job_error(503, "worker lost"))])
    assert names(sent)[-1] == "response.failed"
    assert "response.completed" not in names(sent)
    check_order(sent)
    final = Response.model_validate(sent[-1][1]["response"])
    assert final.status == "failed" and final.error is not None
    assert (final.error.code, final.error.message) == ("server_error", "worker lost")
    assert final.output_text == "Hi" and final.output[0].status == "incomplete"  # type: ignore[union-attr]
    accumulate(sent)


def test_an_api_error_after_the_start_is_response_failed():
    async def failing() -> AsyncIterator[Event]:
        yield events.waiting("queued")
        raise APIError(504, "timed out waiting for the worker")

    sent = run_stream(failing())
    assert names(sent) == ["response.created", "response.in_progress", "response.failed"]
    assert sent[-1][1]["response"]["error"] == {"code": "server_error", "message": "timed out waiting for the worker"}


def test_a_cancelled_job_ends_cancelled():
    sent = run_stream([events.delta("Hi"), events.error(CANCELLED)])
    assert (names(sent)[-1], sent[-1][1]["response"]["status"]) == ("response.incomplete", "cancelled")


def test_a_cache_hit_streams_the_same_response():
    body = responses(tools=[WEATHER, APPLY_PATCH])
    for result in (
        {"text": "Paris.", "finish_reason": "stop", "usage": USAGE},
        {"text": "On it.", "finish_reason": "tool_calls", "tool_calls": [CALL, PATCH_CALL], "usage": USAGE},
        {"text": "", "finish_reason": "tool_calls", "tool_calls": [PATCH_CALL], "usage": USAGE},
    ):
        sent = run_stream(replay(result), body)
        check_order(sent)
        final = accumulate(sent)
        expected = response_object(
            result,
            model="mlxq-model",
            response_id="resp_s",
            created_at=1700000000,
            request=ResponsesRequest.model_validate(body),
        )
        assert final.model_dump(include={"output", "usage", "status"}) == Response.model_validate(expected).model_dump(
            include={"output", "usage", "status"}
        )


def test_a_joined_job_gets_the_text_it_missed_and_its_calls():
    result = {"text": "Hello there.", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    final = accumulate(run_stream([events.delta("Hello"), events.done(result)]))
    assert final.output_text == "Hello there."
    assert [item.type for item in final.output] == ["message", "function_call"]


def test_keepalives_carry_no_sequence_number():
    async def collect() -> list[Any]:
        writer = ResponseStreamWriter(model="m", response_id="resp_k", created_at=1, request=request())
        source = from_list([events.waiting("queued"), events.progress(1, 2), events.done({"text": "x"})])
        return [e async for e in relay(source, writer)]

    sent = asyncio.run(collect())
    comments = [e for e in sent if e.data is None]
    assert [c.comment for c in comments] == ["keepalive queued", "keepalive 1/2"]


def test_a_late_reader_gets_the_same_events_after_starting_after():
    """Background responses: a reader joining with starting_after=N regenerates the stream from the job's events
    (however many keepalives it waited through) and is sent only those numbered after N."""
    result = {"text": "Hello there.", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    job = [events.started(120, 100), events.delta("Hello"), events.delta(" there."), events.tool_calls([CALL])]
    first = run_stream([*job, events.done(result)], response_id="resp_bg")
    again = run_stream(
        [events.waiting("queued"), *job, events.progress(1, 2), events.done(result)], response_id="resp_bg"
    )
    assert again == first
    for n in (0, 4, len(first) - 2):
        late = run_stream([*job, events.done(result)], response_id="resp_bg", starting_after=n)
        assert late == first[n + 1 :]
        check_order(late, first=n + 1)
    writer = ResponseStreamWriter(model="mlxq-model", response_id="resp_bg", created_at=1700000000, request=request())
    writer.start_after(3)
    assert writer.start() == []
    assert [e["sequence_number"] for e in writer.delta("Hello")] == [4]


def test_streamed_logprobs_reach_the_deltas_and_the_text():
    entry = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    result = {"text": "Hi", "finish_reason": "stop", "logprobs": [entry], "usage": USAGE}
    sent = run_stream([events.delta("Hi", [entry]), events.done(result)], responses(top_logprobs=0))
    delta = next(d for n, d in sent if n == "response.output_text.delta")
    assert delta["logprobs"] == [entry]
    final = accumulate(sent)
    assert final.output[0].content[0].logprobs[0].logprob == -0.1  # type: ignore[union-attr,index]


def test_a_custom_tool_answer_sent_back_continues():
    body = request(input="Fix it.", tools=[APPLY_PATCH])
    result = {"text": "", "finish_reason": "tool_calls", "tool_calls": [PATCH_CALL], "usage": USAGE}
    answer = response_object(result, model="m", response_id="resp_p", created_at=1, request=body)
    previous = [{"role": "user", "content": "Fix it."}, *answer["output"]]
    out = converted(
        responses(
            input=[{"type": "custom_tool_call_output", "call_id": "call_patch", "output": "Done."}], tools=[APPLY_PATCH]
        ),
        previous=previous,
    )
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == PATCH_CALL["function"]["arguments"]
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "call_patch", "content": "Done."}


def test_a_namespace_without_a_description_is_echoed_as_the_sdk_requires():
    _, sdk = render({"text": "x"}, tools=[{"type": "namespace", "name": "ns", "tools": [WEATHER]}])
    assert sdk.tools[0].type == "namespace"


def test_a_stream_that_joined_a_job_nobody_streamed_has_its_text_and_then_its_calls():
    # Such a job publishes no deltas, only its calls and its end: the text the stream missed, sent after the calls,
    # was lost (the response's output only the function call).
    result = {"text": "Checking.", "finish_reason": "tool_calls", "tool_calls": [CALL], "usage": USAGE}
    sent = run_stream([events.started(120, 100), events.tool_calls([CALL]), events.done(result)])
    added = [data["item"]["type"] for name, data in sent if name == "response.output_item.added"]
    final = sent[-1][1]["response"]
    assert added == [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Checking."
