"""Response objects against the published JSON schema, not the client's permissive types (which make every field
optional): each `response` the Responses routes answer (sync, streamed, background, read back, a batch line) is
valid against Open Responses' `ResponseResource` (tests/schemas/open_responses_ResponseResource.json: which fields
are required, which may be null), its parts checked by OpenAI's own schemas of them (tests/schemas/
openai_response.json: output items, usage, tools, text, tool choice); and the sampling values are the ones the
request ran with, defaults filled in, `completed_at` when it completed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

SCHEMAS = Path(__file__).parent / "schemas"
OPENAI = "#/components/schemas/"

# Open Responses' parts (its relative `$ref`s, not vendored) as OpenAI's schema of the same part. The tool choices
# of hosted tools match nothing: this server never answers one (hosted tools are dropped), and left open they would
# make its `oneOf` ambiguous.
PARTS: dict[str, Any] = {
    "IncompleteDetails": {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string"}}},
    "PromptInstructionMessage": {"$ref": OPENAI + "InputItem"},
    "ItemField": {"$ref": OPENAI + "OutputItem"},
    "Error": {"$ref": OPENAI + "ResponseError"},
    "Tool": {"$ref": OPENAI + "Tool"},
    "FunctionToolChoice": {"$ref": OPENAI + "ToolChoiceFunction"},
    "CustomToolChoice": {"$ref": OPENAI + "ToolChoiceCustom"},
    "AllowedToolChoice": {"$ref": OPENAI + "ToolChoiceAllowed"},
    "ToolChoiceValueEnum": {"$ref": OPENAI + "ToolChoiceOptions"},
    "TruncationEnum": {"type": "string", "enum": ["auto", "disabled"]},
    "TextField": {"$ref": OPENAI + "ResponseTextParam"},
    "Reasoning": {"$ref": OPENAI + "Reasoning"},
    "Usage": {"$ref": OPENAI + "ResponseUsage"},
    "MetadataParam": {"$ref": OPENAI + "Metadata"},
}
HOSTED_CHOICES = (
    *("CodeInterpreter", "MCP", "FileSearch", "WebSearch", "ImageGen"),
    *("Computer", "LocalShell", "FunctionShell", "ApplyPatch"),
)


def _linked(node: Any, names: set[str]) -> Any:
    """Open Responses' document with each `./X.json` pointing into this document's `$defs` (X added to `names`)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("./"):
            name = ref[2:].removesuffix(".json")
            names.add(name)
            return {**{k: v for k, v in node.items() if k != "$ref"}, "$ref": f"#/$defs/{name}"}
        return {k: _linked(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_linked(v, names) for v in node]
    return node


def validator() -> Draft202012Validator:
    open_responses = json.loads((SCHEMAS / "open_responses_ResponseResource.json").read_text())
    openai = json.loads((SCHEMAS / "openai_response.json").read_text())
    names: set[str] = set()
    linked = _linked(open_responses, names)
    defs: dict[str, Any] = {name: PARTS.get(name, {}) for name in names}  # a part not listed: any value
    defs |= {f"{kind}ToolChoice": False for kind in HOSTED_CHOICES}
    schema = {**linked, "$defs": defs, "components": openai["components"]}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


VALIDATOR = validator()


def assert_valid(response: dict[str, Any]) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in VALIDATOR.iter_errors(response)]
    assert not errors, errors


def test_the_schema_refuses_what_the_issue_found():
    """The validator can fail: a response without the sampling fields, or with them null, is refused."""
    good = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "completed_at": 2,
        "status": "completed",
        "incomplete_details": None,
        "model": "m",
        "previous_response_id": None,
        "instructions": None,
        "output": [],
        "error": None,
        "tools": [],
        "tool_choice": "auto",
        "truncation": "disabled",
        "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}},
        "top_p": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_logprobs": 0,
        "temperature": 1.0,
        "reasoning": None,
        "user": None,
        "usage": None,
        "max_output_tokens": None,
        "max_tool_calls": None,
        "store": True,
        "background": False,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }
    assert_valid(good)
    for field in ("completed_at", "presence_penalty", "frequency_penalty"):
        assert not VALIDATOR.is_valid({k: v for k, v in good.items() if k != field})
    for field in ("temperature", "top_p", "top_logprobs"):
        assert not VALIDATOR.is_valid({**good, field: None})
    assert not VALIDATOR.is_valid({**good, "tools": [{"type": "function", "name": "f"}]})  # OpenAI's part


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("responses-schema")
    (root / "logs").mkdir()
    service = Service(service_env(root, smollm2), root / "logs").start()
    try:
        yield service
    finally:
        service.stop()


TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FORCED = {"tools": [TOOL, {"type": "web_search"}], "tool_choice": {"type": "function", "name": "get_weather"}}
SAMPLED = {"temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.25, "seed": 7}
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_logprobs": 0}


def create(api: Service, **body: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{api.base}/v1/responses", json={"model": MODEL_NAME, "input": "Weather in Paris?", **body}, timeout=120
    )
    assert r.status_code == 200, r.text
    return r.json()


def events(api: Service, method: str, url: str, **kw: Any) -> list[dict[str, Any]]:
    with httpx.stream(method, api.base + url, timeout=120, **kw) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def sampling(response: dict[str, Any]) -> dict[str, Any]:
    return {k: response[k] for k in DEFAULTS}


def test_a_completed_response_is_valid_with_the_sampling_it_ran_with(api: Service):
    before = int(time.time())
    response = create(api, **FORCED, temperature=0, max_output_tokens=60)
    assert_valid(response)
    assert response["status"] == "completed"
    assert before <= response["created_at"] <= response["completed_at"] <= time.time()
    assert sampling(response) == {**DEFAULTS, "temperature": 0.0}
    assert response["tools"][0]["strict"] is None and response["tools"][0]["parameters"] == TOOL["parameters"]


def test_defaults_filled_and_given_values_reported(api: Service):
    cut = create(api, max_output_tokens=3)  # no sampling field: the service's defaults
    assert_valid(cut)
    assert cut["status"] == "incomplete" and cut["completed_at"] is None
    assert sampling(cut) == DEFAULTS
    given = create(api, max_output_tokens=3, top_logprobs=2, include=["message.output_text.logprobs"], **SAMPLED)
    assert_valid(given)
    assert sampling(given) == {**{k: SAMPLED.get(k, 0) for k in DEFAULTS}, "top_logprobs": 2}


def test_streamed_and_background_responses_are_valid_and_read_back_the_same(api: Service):
    body = {"model": MODEL_NAME, "input": "Weather in Rome?", **FORCED, "temperature": 0, "stream": True}
    streamed = events(api, "POST", "/v1/responses", json=body)
    with_response = [e for e in streamed if "response" in e]
    assert [e["type"] for e in with_response] == ["response.created", "response.in_progress", "response.completed"]
    for event in with_response:
        assert_valid(event["response"])
    final = with_response[-1]["response"]
    assert final["completed_at"] is not None and with_response[0]["response"]["completed_at"] is None
    read = httpx.get(f"{api.base}/v1/responses/{final['id']}", timeout=30).json()
    assert_valid(read)
    assert sampling(read) == sampling(final)

    queued = create(api, **FORCED, temperature=0, input="Weather in Oslo?", background=True)
    assert_valid(queued)
    assert queued["status"] == "queued" and queued["completed_at"] is None
    deadline = time.time() + 120
    while (done := httpx.get(f"{api.base}/v1/responses/{queued['id']}", timeout=30).json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.time() < deadline
        time.sleep(0.3)
    assert_valid(done)
    assert done["status"] == "completed" and done["completed_at"] >= done["created_at"]
    again = httpx.get(f"{api.base}/v1/responses/{queued['id']}", timeout=30).json()
    assert again["completed_at"] == done["completed_at"]  # when its job finished, not when it is read
    # Resumed past its last event: the stream still ends with the terminal event, the same response.
    late = events(api, "GET", f"/v1/responses/{queued['id']}", params={"stream": "true", "starting_after": 10_000})
    assert [e["type"] for e in late] == ["response.completed"]
    assert_valid(late[0]["response"])
    assert late[0]["response"]["completed_at"] == done["completed_at"]


def test_a_batch_lines_response_is_valid(api: Service):
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": MODEL_NAME, "input": "Weather in Lima?", **FORCED, **SAMPLED},
    }
    upload = httpx.post(
        f"{api.base}/v1/files",
        files={"file": ("lines.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
        timeout=30,
    ).json()
    batch = httpx.post(
        f"{api.base}/v1/batches",
        json={"input_file_id": upload["id"], "endpoint": "/v1/responses", "completion_window": "24h"},
        timeout=30,
    ).json()
    deadline = time.time() + 180
    while (batch := httpx.get(f"{api.base}/v1/batches/{batch['id']}", timeout=30).json())["status"] != "completed":
        assert time.time() < deadline and batch["status"] in ("validating", "in_progress", "finalizing"), batch
        time.sleep(0.5)
    output = httpx.get(f"{api.base}/v1/files/{batch['output_file_id']}/content", timeout=30).text
    body = json.loads(output.splitlines()[0])["response"]["body"]
    assert_valid(body)
    assert sampling(body) == {**{k: SAMPLED.get(k, 0) for k in DEFAULTS}, "top_logprobs": 0}
