"""Hostile and odd requests against the real service (api and worker on SmolLM2): one table, each case stating
the endpoint, what is sent (a body, raw bytes and their content type, headers), the status, and the field it
must name, in its dialect's error shape: OpenAI's `{"error": {"message", "type", "param", "code"}}` with `param`
the field, or Anthropic's `{"type": "error", "error": {"type", "message"}}` whose message names the field (it has
no `param`). A refused request enqueues nothing.

Grow it with every dialect and every refusal: a new case is one row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from sqlalchemy import create_engine, text

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

USER = {"role": "user", "content": "Hi"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
# More text than SmolLM2's 8,192-token context could hold whatever its tokens (none stands for more than 81
# bytes, and the bound leaves twice that room), well under the 16 MB body limit: refused before it is tokenized.
HUGE = "hello " * 400_000


@dataclass(frozen=True)
class Case:
    id: str
    method: Literal["GET", "POST", "DELETE"]
    path: str
    status: int
    param: str | None  # the field named: OpenAI's `param`; in Anthropic's message
    says: str = ""  # a piece of the message
    body: Any = None  # sent as JSON (`{model}` strings are the served model); None: nothing, or `raw`
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None  # OpenAI's `code`, when it has one
    before: tuple[tuple[str, Any, dict[str, str]], ...] = ()  # (path, body, headers) posted first

    @property
    def dialect(self) -> str:
        return "anthropic" if self.path.startswith("/v1/messages") else "openai"


def chat(**body: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "messages": [USER], **body}


def completion(**body: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "prompt": "Hi", **body}


def messages(**body: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [USER], **body}


def responses(**body: Any) -> dict[str, Any]:
    return {"model": MODEL_NAME, "input": "Hi", **body}


def batch(**body: Any) -> dict[str, Any]:
    return {"input_file_id": "{batch_file}", "endpoint": "/v1/chat/completions", "completion_window": "24h", **body}


CHAT, COMPLETIONS, MESSAGES, COUNT, RESPONSES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
)
FIRST_JOB = ("/v1/jobs", chat(max_tokens=2, temperature=0), {"Idempotency-Key": "retry-1"})

CASES = [
    # -- the body itself ------------------------------------------------------------------------------------
    Case("chat-text-plain", "POST", CHAT, 400, None, "Content-Type", raw=b"hello", content_type="text/plain"),
    Case("chat-array-body", "POST", CHAT, 400, None, "must be a JSON object; got an array", raw=b"[1, 2]"),
    Case("chat-string-body", "POST", CHAT, 400, None, "must be a JSON object; got a string", raw=b'"hi"'),
    Case("chat-not-json", "POST", CHAT, 400, None, "Could not parse", raw=b'{"model": '),
    Case("chat-no-body", "POST", CHAT, 400, None, "missing"),
    Case(
        "chat-surrogate",
        "POST",
        CHAT,
        400,
        "messages.0.content",
        raw=b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800"}]}',
    ),
    Case(
        "chat-nan",
        "POST",
        CHAT,
        400,
        "temperature",
        raw=b'{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
    ),
    Case("messages-text-plain", "POST", MESSAGES, 400, None, "Content-Type", raw=b"hi", content_type="text/plain"),
    Case("messages-number-body", "POST", MESSAGES, 400, None, "must be a JSON object; got a number", raw=b"5"),
    Case(
        "responses-form-body",
        "POST",
        RESPONSES,
        400,
        None,
        "Content-Type",
        raw=b"input=hi",
        content_type="application/x-www-form-urlencoded",
    ),
    Case("jobs-array-body", "POST", "/v1/jobs", 400, None, "must be a JSON object; got an array", raw=b"[]"),
    Case("batches-text-plain", "POST", "/v1/batches", 400, None, "Content-Type", raw=b"x", content_type="text/plain"),
    # -- chat completions ---------------------------------------------------------------------------------
    Case(
        "chat-tool-result-answers-no-call",
        "POST",
        CHAT,
        400,
        "messages.1.tool_call_id",
        "call_9",
        chat(messages=[USER, {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}]),
    ),
    Case(
        "chat-tool-result-answers-another-call",
        "POST",
        CHAT,
        400,
        "messages.2.tool_call_id",
        "call_2",
        chat(
            messages=[
                USER,
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
            ]
        ),
    ),
    Case(
        "chat-tool-without-call-id",
        "POST",
        CHAT,
        400,
        "messages.2.tool_call_id",
        "Missing",
        chat(messages=[USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x"}]),
    ),
    Case(
        "chat-json-schema-missing",
        "POST",
        CHAT,
        400,
        "response_format.json_schema",
        "Missing",
        chat(response_format={"type": "json_schema"}),
    ),
    Case(
        "chat-json-schema-without-schema",
        "POST",
        CHAT,
        400,
        "response_format.json_schema.schema",
        "Missing",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
    ),
    Case(
        "chat-schema-feature",
        "POST",
        CHAT,
        400,
        "response_format",
        "cannot be enforced",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
        code="invalid_schema",
    ),
    Case(
        "chat-response-format-unknown",
        "POST",
        CHAT,
        400,
        "response_format.type",
        "json_object",
        chat(response_format={"type": "yaml"}),
    ),
    Case(
        "chat-image-part",
        "POST",
        CHAT,
        400,
        "messages.0.content.0",
        "text-only",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ),
    Case(
        "chat-unknown-role",
        "POST",
        CHAT,
        400,
        "messages.0.role",
        "boss",
        chat(messages=[{"role": "boss", "content": "Hi"}]),
    ),
    Case("chat-no-messages", "POST", CHAT, 400, "messages", "at least 1", chat(messages=[])),
    Case("chat-logit-bias", "POST", CHAT, 400, "logit_bias", "not supported", chat(logit_bias={"1": 5})),
    Case("chat-n", "POST", CHAT, 400, "n", "n=1", chat(n=2)),
    Case("chat-seed-negative", "POST", CHAT, 400, "seed", "greater than or equal to 0", chat(seed=-1)),
    Case("chat-temperature", "POST", CHAT, 400, "temperature", "less than or equal to 2", chat(temperature=3)),
    Case("chat-top-logprobs-alone", "POST", CHAT, 400, "top_logprobs", "logprobs", chat(top_logprobs=2)),
    Case(
        "chat-tool-choice-unknown",
        "POST",
        CHAT,
        400,
        "tool_choice",
        "`nope`",
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
    ),
    Case(
        "chat-tool-choice-without-tools", "POST", CHAT, 400, "tool_choice", "needs tools", chat(tool_choice="required")
    ),
    Case("chat-tools-same-name", "POST", CHAT, 400, "tools", "unique", chat(tools=[TOOL, TOOL])),
    Case("chat-audio-out", "POST", CHAT, 400, "modalities", "text-only", chat(modalities=["audio"])),
    Case("chat-top-k-past-vocabulary", "POST", CHAT, 400, "top_k", "vocabulary", chat(top_k=10**9)),
    Case("chat-stop-empty", "POST", CHAT, 400, "stop.0", "at least 1 character", chat(stop=[""])),
    Case("chat-cache-salt-empty", "POST", CHAT, 400, "cache_salt", "at least 1 character", chat(cache_salt="")),
    Case(
        "chat-over-context-untokenized",
        "POST",
        CHAT,
        400,
        "messages",
        "maximum context length",
        chat(messages=[{"role": "user", "content": HUGE}]),
        code="context_length_exceeded",
    ),
    # -- legacy completions ---------------------------------------------------------------------------------
    Case("completion-empty-prompt", "POST", COMPLETIONS, 400, "prompt", "empty", completion(prompt="")),
    Case("completion-best-of", "POST", COMPLETIONS, 400, "best_of", "best_of=1", completion(best_of=2)),
    Case("completion-suffix", "POST", COMPLETIONS, 400, "suffix", "not supported", completion(suffix="x")),
    Case("completion-logprobs", "POST", COMPLETIONS, 400, "logprobs", "chat/completions", completion(logprobs=2)),
    Case(
        "completion-negative-id",
        "POST",
        COMPLETIONS,
        400,
        "prompt",
        "negative",
        completion(prompt=[1, -1]),
        code="invalid_token_id",
    ),
    Case(
        "completion-id-past-vocabulary",
        "POST",
        COMPLETIONS,
        400,
        "prompt",
        "[0, 49152)",
        completion(prompt=[1, 10**8]),
        code="invalid_token_id",
    ),
    Case(
        "completion-stream-many",
        "POST",
        COMPLETIONS,
        400,
        "prompt",
        "single prompt",
        completion(prompt=["a", "b"], stream=True),
    ),
    Case(
        "completion-over-context-untokenized",
        "POST",
        COMPLETIONS,
        400,
        "prompt",
        "maximum context length",
        completion(prompt=HUGE),
        code="context_length_exceeded",
    ),
    # -- Anthropic Messages (the message names the field) -----------------------------------------------------------
    Case(
        "messages-tool-result-unknown-id",
        "POST",
        MESSAGES,
        400,
        "messages.0.content.1.tool_use_id",
        "toolu_9",
        messages(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "tool_result", "tool_use_id": "toolu_9"}],
                }
            ]
        ),
    ),
    Case(
        "messages-tool-result-answers-another-use",
        "POST",
        MESSAGES,
        400,
        "messages.2.content.0.tool_use_id",
        "toolu_2",
        messages(
            messages=[
                USER,
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "x"}]},
            ]
        ),
    ),
    Case(
        "count-tokens-tool-result-unknown-id",
        "POST",
        COUNT,
        400,
        "messages.0.content.0.tool_use_id",
        "toolu_9",
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}]},
    ),
    Case(
        "messages-max-tokens-missing",
        "POST",
        MESSAGES,
        400,
        "max_tokens",
        "Missing",
        {"model": "m", "messages": [USER]},
    ),
    Case(
        "messages-temperature",
        "POST",
        MESSAGES,
        400,
        "temperature",
        "less than or equal to 1",
        messages(temperature=1.5),
    ),
    Case(
        "messages-image",
        "POST",
        MESSAGES,
        400,
        "messages.0.content.0",
        "text-only",
        messages(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
    ),
    Case(
        "messages-system-turn",
        "POST",
        MESSAGES,
        400,
        "messages.0",
        "system",
        messages(messages=[{"role": "system", "content": "x"}, USER]),
    ),
    Case(
        "messages-empty-turn",
        "POST",
        MESSAGES,
        400,
        "messages.0.content",
        "non-empty content",
        messages(messages=[{"role": "user", "content": []}]),
    ),
    Case(
        "messages-empty-string-turn",
        "POST",
        MESSAGES,
        400,
        "messages.0.content",
        "non-empty content",
        messages(messages=[{"role": "user", "content": ""}]),
    ),
    Case(
        "messages-empty-assistant-mid-conversation",
        "POST",
        MESSAGES,
        400,
        None,
        "messages.1: all messages must have non-empty content",
        messages(messages=[USER, {"role": "assistant", "content": ""}, USER]),
    ),
    Case(
        "messages-empty-text-block",
        "POST",
        MESSAGES,
        400,
        "messages.0.content.0.text",
        "text content blocks must be non-empty",
        messages(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]),
    ),
    Case(
        "messages-blank-system-block",
        "POST",
        MESSAGES,
        400,
        "system.0",
        "non-whitespace text",
        messages(system=[{"type": "text", "text": " \n"}]),
    ),
    Case(
        "messages-thinking-budget-under-1024",
        "POST",
        MESSAGES,
        400,
        "thinking.budget_tokens",
        "greater than or equal to 1024",
        messages(thinking={"type": "enabled", "budget_tokens": 512}),
    ),
    Case(
        "messages-thinking-unknown-type",
        "POST",
        MESSAGES,
        400,
        "thinking",
        "enabled",
        messages(thinking={"type": "sometimes"}),
    ),
    Case(
        "messages-over-context-untokenized",
        "POST",
        MESSAGES,
        400,
        None,
        "prompt is too long: ",  # Claude Code's words for it (test_a_prompt_over_the_context_reads_as_both_clients_expect)
        messages(messages=[{"role": "user", "content": HUGE}]),
    ),
    Case(
        "messages-tool-use-unanswered",
        "POST",
        MESSAGES,
        400,
        "messages.1",
        "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_1",
        messages(
            messages=[
                USER,
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
                USER,
            ]
        ),
    ),
    Case(
        "messages-tool-use-ids-twice",
        "POST",
        MESSAGES,
        400,
        "messages.1.content.1",
        "`tool_use` ids must be unique",
        messages(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}] * 2,
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]},
            ]
        ),
    ),
    Case(
        "messages-prefill-trailing-whitespace",
        "POST",
        MESSAGES,
        400,
        "messages.1",
        "final assistant content cannot end with trailing whitespace",
        messages(messages=[USER, {"role": "assistant", "content": [{"type": "text", "text": "The answer is "}]}]),
    ),
    # What the one path checks, worded in Anthropic's terms (api.pipeline.terms; `ANTHROPIC_UNSAID` guards the rest).
    Case(
        "messages-tool-choice-any-without-tools",
        "POST",
        MESSAGES,
        400,
        "tool_choice",
        'tool_choice {"type": "any"} needs tools',
        messages(tool_choice={"type": "any"}),
    ),
    Case(
        "messages-tool-choice-tool-without-tools",
        "POST",
        MESSAGES,
        400,
        "tool_choice",
        "names a tool, but no tools",
        messages(tool_choice={"type": "tool", "name": "get_weather"}),
    ),
    Case(
        "messages-tool-choice-unknown-tool",
        "POST",
        MESSAGES,
        400,
        "tool_choice",
        "names the tool `nope`",
        messages(
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "nope"},
        ),
    ),
    Case(
        "messages-too-many-stop-sequences",
        "POST",
        MESSAGES,
        400,
        "stop_sequences",
        "at most 16",
        messages(stop_sequences=[f"s{i}" for i in range(17)]),
    ),
    Case(
        "messages-output-format-schema-feature",
        "POST",
        MESSAGES,
        400,
        "output_config.format",
        "cannot be enforced",
        messages(output_config={"format": {"type": "json_schema", "schema": {"not": {}}}}),
    ),
    # -- OpenAI Responses ---------------------------------------------------------------------------------------
    Case(
        "responses-output-answers-no-call",
        "POST",
        RESPONSES,
        400,
        "input.1.call_id",
        "call_9",
        responses(input=[USER, {"type": "function_call_output", "call_id": "call_9", "output": "x"}]),
    ),
    Case(
        "responses-call-without-output",
        "POST",
        RESPONSES,
        400,
        "input",
        "No tool output found for function call call_1.",
        responses(input=[USER, {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}, USER]),
    ),
    Case(
        "responses-custom-tool-bad-regex",
        "POST",
        RESPONSES,
        400,
        "tools.0.format.definition",
        "regex",
        responses(
            tools=[
                {"type": "custom", "name": "x", "format": {"type": "grammar", "syntax": "regex", "definition": "(("}}
            ]
        ),
    ),
    Case(
        "responses-namespaced-custom-tool-bad-regex",
        "POST",
        RESPONSES,
        400,
        "tools.0.tools.1.format.definition",
        "regex",
        responses(
            tools=[
                {
                    "type": "namespace",
                    "name": "ns",
                    "tools": [
                        {"type": "function", "name": "f"},
                        {
                            "type": "custom",
                            "name": "x",
                            "format": {"type": "grammar", "syntax": "regex", "definition": "a{2,"},
                        },
                    ],
                }
            ]
        ),
    ),
    Case(
        "responses-item-reference-unknown",
        "POST",
        RESPONSES,
        400,
        "input.0.id",
        "item_x",
        responses(input=[{"type": "item_reference", "id": "item_x"}]),
        code="not_found",
    ),
    Case(
        "responses-previous-unknown",
        "POST",
        RESPONSES,
        404,
        "previous_response_id",
        "resp_nope",
        responses(previous_response_id="resp_nope"),
        code="not_found",
    ),
    Case(
        "responses-conversation",
        "POST",
        RESPONSES,
        400,
        "conversation",
        "not supported",
        responses(conversation="conv_1"),
    ),
    Case("responses-prompt-template", "POST", RESPONSES, 400, "prompt", "not supported", responses(prompt={"id": "p"})),
    Case(
        "responses-background-unstored",
        "POST",
        RESPONSES,
        400,
        "store",
        "background",
        responses(background=True, store=False),
    ),
    Case(
        "responses-json-schema-without-schema",
        "POST",
        RESPONSES,
        400,
        "text.format.schema",
        "Missing",
        responses(text={"format": {"type": "json_schema", "name": "x"}}),
    ),
    Case(
        "responses-unknown-item",
        "POST",
        RESPONSES,
        400,
        "input.0.type",
        "hologram",
        responses(input=[{"type": "hologram"}]),
    ),
    Case(
        "responses-over-context-untokenized",
        "POST",
        RESPONSES,
        400,
        "input",
        "maximum context length",
        responses(input=HUGE),
        code="context_length_exceeded",
    ),
    Case("responses-get-unknown", "GET", "/v1/responses/resp_nope", 404, "response_id", "resp_nope", code="not_found"),
    Case(
        "responses-stream-starting-before-start",
        "GET",
        "/v1/responses/resp_nope?stream=true&starting_after=-5",
        400,
        "starting_after",
        "greater than or equal to -1",
    ),
    Case(
        "responses-cancel-unknown",
        "POST",
        "/v1/responses/resp_nope/cancel",
        404,
        "response_id",
        "resp_nope",
        code="not_found",
    ),
    # -- jobs -----------------------------------------------------------------------------------------------
    Case(
        "jobs-body-refused-as-its-endpoint",
        "POST",
        "/v1/jobs",
        400,
        "messages.0.tool_call_id",
        "call_9",
        chat(messages=[{"role": "tool", "tool_call_id": "call_9", "content": "x"}]),
    ),
    Case(
        "jobs-unknown-endpoint",
        "POST",
        "/v1/jobs",
        400,
        "endpoint",
        "Unsupported endpoint",
        {"endpoint": "/v1/embeddings", "body": {"input": "x"}},
    ),
    Case("jobs-priority", "POST", "/v1/jobs", 400, "priority", "priority", {**chat(), "priority": "urgent"}),
    Case("jobs-stream", "POST", "/v1/jobs", 400, "stream", "events", chat(stream=True)),
    Case(
        "jobs-idempotency-key-other-body",
        "POST",
        "/v1/jobs",
        422,
        "Idempotency-Key",
        "different request body",
        chat(max_tokens=3, temperature=0),
        headers={"Idempotency-Key": "retry-1"},
        code="idempotency_key_reused",
        before=(FIRST_JOB,),
    ),
    Case("jobs-get-unknown", "GET", "/v1/jobs/nope", 404, "job_id", "nope", code="job_not_found"),
    Case("jobs-cancel-unknown", "DELETE", "/v1/jobs/nope", 404, "job_id", "nope", code="job_not_found"),
    Case("jobs-list-limit", "GET", "/v1/jobs?limit=0", 400, "limit", "greater than or equal to 1"),
    # -- files ----------------------------------------------------------------------------------------------
    Case("files-get-unknown", "GET", "/v1/files/file-nope", 404, "file_id", "file-nope", code="file_not_found"),
    Case(
        "files-content-unknown",
        "GET",
        "/v1/files/file-nope/content",
        404,
        "file_id",
        "file-nope",
        code="file_not_found",
    ),
    Case("files-delete-unknown", "DELETE", "/v1/files/file-nope", 404, "file_id", "file-nope", code="file_not_found"),
    # -- batches --------------------------------------------------------------------------------------------
    Case(
        "batches-completion-window",
        "POST",
        "/v1/batches",
        400,
        "completion_window",
        "24h",
        batch(completion_window="1h"),
    ),
    Case(
        "batches-unknown-file",
        "POST",
        "/v1/batches",
        404,
        "input_file_id",
        "file-nope",
        batch(input_file_id="file-nope"),
        code="file_not_found",
    ),
    Case(
        "batches-endpoint",
        "POST",
        "/v1/batches",
        400,
        "endpoint",
        "Unsupported endpoint",
        batch(endpoint="/v1/embeddings"),
    ),
    Case(
        "batches-input-file-missing",
        "POST",
        "/v1/batches",
        400,
        "input_file_id",
        "Missing",
        {"endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ),
    Case(
        "batches-empty-file",
        "POST",
        "/v1/batches",
        400,
        "input_file_id",
        "no lines",
        batch(input_file_id="{empty_file}"),
    ),
    Case("batches-get-unknown", "GET", "/v1/batches/batch_nope", 404, "batch_id", "batch_nope", code="batch_not_found"),
    Case(
        "batches-cancel-unknown",
        "POST",
        "/v1/batches/batch_nope/cancel",
        404,
        "batch_id",
        "batch_nope",
        code="batch_not_found",
    ),
]


class Api:
    def __init__(self, service: Service, root: Path) -> None:
        self.service = service
        self.base = service.base
        self.engine = create_engine(f"sqlite:///{root / 'data' / 'mlxq.sqlite'}")
        self.files: dict[str, str] = {}

    def jobs(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()

    def upload(self, content: bytes) -> str:
        r = httpx.post(
            f"{self.base}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, timeout=30
        )
        assert r.status_code == 200, r.text
        return str(r.json()["id"])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "logs").mkdir()
    service = Service(service_env(root, smollm2, MLXQ_REQUEST_TIMEOUT_S="30"), root / "logs").start()
    api = Api(service, root)
    line = {"custom_id": "a", "method": "POST", "url": CHAT, "body": chat(max_tokens=2)}
    api.files = {"batch_file": api.upload(json.dumps(line).encode() + b"\n"), "empty_file": api.upload(b"")}
    try:
        yield api
    finally:
        service.stop()
        api.engine.dispose()


def filled(value: Any, files: dict[str, str]) -> Any:
    """The case's body with the uploaded files' ids in place of `{batch_file}` and `{empty_file}`."""
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in files:
        return files[value[1:-1]]
    if isinstance(value, dict):
        return {k: filled(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [filled(v, files) for v in value]
    return value


def send(api: Api, case: Case) -> httpx.Response:
    headers = {"Content-Type": case.content_type, **case.headers}
    if case.raw is not None:
        content = case.raw
    elif case.body is not None:
        content = json.dumps(filled(case.body, api.files)).encode()
    else:
        content = b""
    return httpx.request(case.method, api.base + case.path, content=content or None, headers=headers, timeout=60)


# OpenAI's names for what Anthropic calls `any`, `tool`, `stop_sequences`, `output_config.format`, `tool_use`,
# `tool_result`: an Anthropic client never reads them.
ANTHROPIC_UNSAID = re.compile(r"'required'|\bfunction\b|response_format|tool_calls?\b|tool_call_id|[`']stop[`']")


def assert_shape(case: Case, body: dict[str, Any]) -> str:
    """The error in the case's dialect shape; its message."""
    if case.dialect == "anthropic":
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] == ("not_found_error" if case.status == 404 else "invalid_request_error")
        message = str(body["error"]["message"])
        assert not ANTHROPIC_UNSAID.search(message), message
        if case.param is not None:
            assert case.param in message, message  # Anthropic has no `param`: the message names the field
        return message
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == case.param, error
    assert error["code"] == case.code, error
    return str(error["message"])


def test_every_case_has_its_own_id():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_in_the_dialects_shape_naming_the_field(api: Api, case: Case):
    for path, body, headers in case.before:  # what the case needs to have happened first
        r = httpx.post(api.base + path, json=body, headers=headers, timeout=30)
        assert r.status_code < 300, r.text
    before = api.jobs()
    r = send(api, case)
    assert r.status_code == case.status, r.text
    message = assert_shape(case, r.json())
    assert case.says in message, message
    assert api.jobs() == before  # nothing enqueued for a refused request


def test_the_service_is_whole_after_the_table(api: Api):
    """No refusal left anything behind: the service still answers, the queue is empty."""
    r = httpx.post(f"{api.base}{CHAT}", json=chat(max_tokens=2, temperature=0), timeout=120)
    assert r.status_code == 200, r.text
    assert api.service.health()["status"] == "ok"


def test_a_prompt_over_the_context_reads_as_both_clients_expect():
    """OpenAI's words, and Anthropic's, which Claude Code matches (this pattern, from its code) to offer to compact."""
    from mlxq.contract import context_exceeded

    claude_code = re.compile(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", re.IGNORECASE)
    for message in (context_exceeded(21574, 8192), context_exceeded(21574, 8192, at_least=True)):
        assert "maximum context length is 8192 tokens" in message
        match = claude_code.search(message)
        assert match is not None and match.groups() == ("21574", "8192"), message
