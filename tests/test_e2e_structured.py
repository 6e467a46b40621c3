"""Structured output on real api and worker processes: JSON schemas and forced tool calls decoded under a grammar
inside the continuous batch (the tiny model for the many schemas, SmolLM2 for what a real model writes)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

STR = {"type": "string", "maxLength": 12}
# Twenty schemas of increasing difficulty. Every string, array, number and object is bounded (maxLength,
# maxItems, multipleOf, additionalProperties: false), so even the tiny random model's answer ends inside its
# token budget: what is tested is that the grammar holds, whatever the weights.
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"a": STR}, "required": ["a"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": -5, "maximum": 5, "multipleOf": 0.25}},
        "required": ["x"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"a": STR, "b": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": STR, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "none"}]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"name": STR}, "required": ["name"], "additionalProperties": False}
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": 0, "maximum": 9},
                        "y": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["points"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"day": {"enum": ["mon", "tue"]}, "hour": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["day", "hour"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}},
        "required": ["email"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "shape": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"r": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["r"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {
                            "w": {"type": "integer", "minimum": 1, "maximum": 9},
                            "h": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                        "required": ["w", "h"],
                        "additionalProperties": False,
                    },
                ]
            }
        },
        "required": ["shape"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"a": STR, "b": STR, "c": STR},
        "required": ["a", "c"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "matrix": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 1},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 2,
            }
        },
        "required": ["matrix"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01},
            "currency": {"const": "EUR"},
        },
        "required": ["price", "currency"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{8}$"},
            "meta": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 3}},
                "required": ["ok"],
                "additionalProperties": False,
            },
            "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["id", "meta", "items"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "lines": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                "qty": {"type": "integer", "minimum": 1, "maximum": 5},
                                "gift": {"type": ["boolean", "null"]},
                            },
                            "required": ["sku", "qty"],
                            "additionalProperties": False,
                        },
                        "minItems": 1,
                        "maxItems": 2,
                    },
                    "status": {"enum": ["new", "paid"]},
                },
                "required": ["lines", "status"],
                "additionalProperties": False,
            }
        },
        "required": ["order"],
        "additionalProperties": False,
    },
]


def schema_format(i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i], "strict": True}}


def request(i: int, **extra) -> dict:
    return {
        "model": MODEL_NAME,
        "temperature": 0,
        "max_tokens": 400,
        "messages": [{"role": "user", "content": f"Answer with JSON number {i}."}],
        "response_format": schema_format(i),
        **extra,
    }


def valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def client(svc: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Service:
    tmp_path = tmp_path_factory.mktemp("structured-tiny")
    (tmp_path / "logs").mkdir()
    service = Service(service_env(tmp_path, tiny_model), tmp_path / "logs").start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Service:
    tmp_path = tmp_path_factory.mktemp("structured-smol")
    (tmp_path / "logs").mkdir()
    service = Service(service_env(tmp_path, smollm2), tmp_path / "logs").start()
    yield service
    service.stop()


def test_twenty_schemas_hold_sync_streamed_and_in_a_batch(tiny: Service):
    oa = client(tiny)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: oa.chat.completions.create(**request(i)), range(len(SCHEMAS))))
    for i, answer in enumerate(answers):
        assert answer.choices[0].finish_reason == "stop", (i, answer.choices[0].message.content)
        valid(answer.choices[0].message.content, SCHEMAS[i])
    for i in range(len(SCHEMAS)):
        chunks = oa.chat.completions.create(**request(i), stream=True, extra_headers={"Cache-Control": "no-cache"})
        valid("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), SCHEMAS[i])
    lines = [
        {"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions", "body": request(i, seed=i)}
        for i in range(len(SCHEMAS))
    ]
    upload = oa.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
    batch = oa.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        batch = oa.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == len(SCHEMAS)
    for line in oa.files.content(batch.output_file_id).text.splitlines():
        out = json.loads(line)
        i = int(out["custom_id"][1:])
        valid(out["response"]["body"]["choices"][0]["message"]["content"], SCHEMAS[i])


def test_constrained_and_free_requests_in_one_batch_each_get_their_solo_text(tiny: Service):
    oa = client(tiny)

    def ask(i: int) -> str:
        body = request(i % 4, max_tokens=60) if i % 2 else {**request(0, max_tokens=60), "response_format": None}
        body["messages"] = [{"role": "user", "content": f"Request {i}: say something."}]
        body = {k: v for k, v in body.items() if v is not None}
        answer = oa.chat.completions.create(**body, extra_headers={"Cache-Control": "no-cache"})
        return answer.choices[0].message.content or ""

    solo = [ask(i) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == solo
    for i in range(1, 8, 2):
        valid(solo[i], SCHEMAS[i % 4])


def test_json_object_and_a_cut_answer_with_smollm2(smol: Service):
    oa = client(smol)
    answer = oa.chat.completions.create(
        model=MODEL_NAME,
        temperature=0,
        max_tokens=120,
        messages=[{"role": "user", "content": "Describe a cat."}],
        response_format={"type": "json_object"},
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    cut = oa.chat.completions.create(
        model=MODEL_NAME,
        temperature=0,
        max_tokens=4,
        messages=[{"role": "user", "content": "Describe a cat."}],
        response_format=schema_format(19),
    )
    assert cut.choices[0].finish_reason == "length"


def test_a_forced_tool_call_with_smollm2_parses_and_its_arguments_validate(smol: Service):
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        answer = client(smol).chat.completions.create(
            model=MODEL_NAME,
            temperature=0,
            max_tokens=80,
            messages=[{"role": "user", "content": "How warm is it in Paris?"}],
            tools=tools,
            tool_choice=choice,
        )
        assert answer.choices[0].finish_reason == "tool_calls"
        (call,) = answer.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_anthropic_output_config_and_responses_text_format(smol: Service):
    schema = SCHEMAS[11]
    message = anthropic.Anthropic(base_url=smol.base, api_key="unused", max_retries=0).messages.create(
        model=MODEL_NAME,
        max_tokens=80,
        messages=[{"role": "user", "content": "Pick a meeting slot."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body={"temperature": 0},
    )
    valid(message.content[0].text, schema)
    response = client(smol).responses.create(
        model=MODEL_NAME,
        input="Pick a meeting slot.",
        temperature=0,
        max_output_tokens=80,
        text={"format": {"type": "json_schema", "name": "slot", "schema": schema, "strict": True}},
    )
    valid(response.output_text, schema)


def test_a_schema_the_engine_cannot_compile_is_a_400_and_nothing_is_enqueued(tiny: Service):
    before = sum(tiny.health()["jobs"].values())
    body = {
        **request(0),
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
    }
    refused = httpx.post(f"{tiny.base}/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "response_format" and '"not"' in error["message"]
    assert sum(tiny.health()["jobs"].values()) == before


def test_a_responses_custom_tool_with_a_regex_grammar_is_decoded_under_it(smol: Service):
    pattern = r"(yes|no)-[0-9]{2}"
    tool = {
        "type": "custom",
        "name": "verdict",
        "format": {"type": "grammar", "syntax": "regex", "definition": pattern},
    }
    response = client(smol).responses.create(
        model=MODEL_NAME,
        input="Is the sky blue? Give your verdict with a two-digit confidence.",
        temperature=0,
        max_output_tokens=40,
        tools=[tool],
        tool_choice={"type": "custom", "name": "verdict"},
    )
    (call,) = [item for item in response.output if item.type == "custom_tool_call"]
    assert call.name == "verdict" and re.fullmatch(pattern, call.input), call.input
