"""Bad input through the real api process: a clear OpenAI-style 4xx naming the field, and nothing enqueued.

One api process without a worker serves the table of bad bodies (a request that got past the checks
would be enqueued, and the job count says so); the vocabulary checks need what a worker publishes,
so they run beside a worker on the tiny model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

USER = {"role": "user", "content": "Hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


class Api:
    """A running service and what it enqueued."""

    def __init__(self, service: Service, root: Path) -> None:
        self.svc = service
        self.base = service.base
        self.engine = create_engine(f"sqlite:///{root / 'data' / 'mlxq.sqlite'}")
        self.oa = openai.OpenAI(base_url=f"{service.base}/v1", api_key="unused", max_retries=0, timeout=60)

    def jobs(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()

    def assert_nothing_enqueued(self, jobs_before: int) -> None:
        assert self.jobs() == jobs_before
        assert self.svc.health()["queue_depth"] == 0


def start(root: Path, model: Path, *, worker: bool) -> Iterator[Api]:
    (root / "logs").mkdir()
    # A request that slipped through would wait for a worker: a short timeout makes that a quick failure.
    env = service_env(root, model, MLXQ_REQUEST_TIMEOUT_S="5")
    service = Service(env, root / "logs").start(worker=worker)
    api = Api(service, root)
    try:
        yield api
    finally:
        service.stop()
        api.engine.dispose()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("validation")
    yield from start(root, root / "no-model", worker=False)  # the api never loads the model


def chat(**body: Any) -> tuple[str, dict[str, Any]]:
    return "chat", {"messages": [USER], **body}


def completion(**body: Any) -> tuple[str, dict[str, Any]]:
    return "completion", {"prompt": "Hi", **body}


# (id, (endpoint, body), param, a piece of the message, code)
BAD = [
    (
        "text-part-number",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        "messages.0.content.0.text",
        "valid string",
        None,
    ),
    (
        "image-part",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    ],
                }
            ]
        ),
        "messages.0.content.1",
        "text-only",
        None,
    ),
    (
        "audio-part",
        chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        "messages.0.content.0",
        "text-only",
        None,
    ),
    (
        "unknown-part",
        chat(messages=[{"role": "user", "content": [{"type": "hologram"}]}]),
        "messages.0.content.0",
        "hologram",
        None,
    ),
    ("empty-parts", chat(messages=[{"role": "user", "content": []}]), "messages.0.content", "at least 1", None),
    ("content-number", chat(messages=[{"role": "user", "content": 5}]), "messages.0.content", "string or a list", None),
    ("user-without-content", chat(messages=[{"role": "user"}]), "messages.0.content", "Missing", None),
    ("system-without-content", chat(messages=[{"role": "system"}, USER]), "messages.0.content", "Missing", None),
    (
        "assistant-says-nothing",
        chat(messages=[USER, {"role": "assistant"}, USER]),
        "messages.1",
        "content` or `tool_calls",
        None,
    ),
    (
        "tool-without-call-id",
        chat(messages=[USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "sunny"}]),
        "messages.2.tool_call_id",
        "Missing",
        None,
    ),
    (
        "tool-call-without-function",
        chat(messages=[USER, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function"}]}]),
        "messages.1.tool_calls.0.function",
        "Missing",
        None,
    ),
    (
        "tool-calls-unanswered-before-a-user-turn",
        chat(messages=[USER, {"role": "assistant", "tool_calls": [CALL]}, USER]),
        "messages.2.role",
        "The following tool_call_ids did not have response messages: call_1",
        None,
    ),
    (
        "tool-calls-unanswered-at-the-end",
        chat(
            messages=[
                USER,
                {"role": "assistant", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
            ]
        ),
        "messages.2.role",
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'",
        None,
    ),
    (
        "tool-call-ids-twice",
        chat(messages=[USER, {"role": "assistant", "tool_calls": [CALL, CALL]}]),
        "messages.1.tool_calls.1.id",
        "Duplicate tool_call id 'call_1'",
        None,
    ),
    (
        "tool-call-function-string",
        chat(
            messages=[
                USER,
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": "get_weather"}]},
            ]
        ),
        "messages.1.tool_calls.0.function",
        "dictionary",
        None,
    ),
    (
        "tool-call-without-name",
        chat(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"arguments": "{}"}}],
                },
            ]
        ),
        "messages.1.tool_calls.0.function.name",
        "Missing",
        None,
    ),
    (
        "tool-call-arguments-number",
        chat(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": 5}}],
                },
            ]
        ),
        "messages.1.tool_calls.0.function.arguments",
        "JSON string",
        None,
    ),
    ("unknown-role", chat(messages=[{"role": "boss", "content": "Hi"}]), "messages.0.role", "boss", None),
    ("message-not-object", chat(messages=["Hi"]), "messages.0", "dictionary", None),
    (
        "name-not-string",
        chat(messages=[{"role": "user", "content": "Hi", "name": 5}]),
        "messages.0.name",
        "valid string",
        None,
    ),
    ("no-messages", chat(messages=[]), "messages", "at least 1", None),
    (
        "tools-function-string",
        chat(tools=[{"type": "function", "function": "get_weather"}]),
        "tools.0.function",
        "dictionary",
        None,
    ),
    (
        "tools-without-name",
        chat(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tools.0.function.name",
        "Missing",
        None,
    ),
    (
        "tools-wrong-type",
        chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]),
        "tools.0.type",
        "'function'",
        None,
    ),
    ("tool-choice-unknown-mode", chat(tools=[TOOL], tool_choice="sometimes"), "tool_choice", "'required'", None),
    (
        "tool-choice-unknown-tool",
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice",
        "`nope`",
        None,
    ),
    ("tool-choice-without-tools", chat(tool_choice="required"), "tool_choice", "needs tools", None),
    ("tools-one-name-twice", chat(tools=[TOOL, TOOL], tool_choice="required"), "tools", "unique", None),
    ("top-k-negative", chat(top_k=-1), "top_k", "greater than or equal to 0", None),
    ("seed-negative", chat(seed=-1), "seed", "greater than or equal to 0", None),
    ("seed-past-int64", chat(seed=2**63), "seed", "less than or equal to", None),
    (
        "response-format-schema-feature",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
        "response_format",
        '["not"]',
        "invalid_schema",
    ),
    (
        "response-format-schema-missing",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        "response_format.json_schema.schema",
        "Missing",
        None,
    ),
    (
        "response-format-bad-pattern",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}},
            }
        ),
        "response_format",
        "cannot be enforced",
        "invalid_schema",
    ),
    (
        "response-format-schema-no-answer-follows",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
                },
            }
        ),
        "response_format",
        "no answer can follow it",
        "invalid_schema",
    ),
    ("stop-with-number", chat(stop=["END", 5]), "stop.1", "valid string", None),
    ("stop-empty-string", chat(stop=["END", ""]), "stop.1", "at least 1 character", None),
    ("too-many-stops", chat(stop=[f"s{i}" for i in range(17)]), "stop", "at most 16", None),
    ("logit-bias", chat(logit_bias={"50256": -100}), "logit_bias", "not supported", None),
    # Ignored, they would answer in text where the client asked for a call.
    ("legacy-functions", chat(functions=[{"name": "f", "parameters": {}}]), "functions", "`tools`", None),
    ("legacy-function-call", chat(function_call="auto"), "function_call", "`tool_choice`", None),
    ("stream-options-string", chat(stream=True, stream_options="usage"), "stream_options", "dictionary", None),
    ("max-tokens-zero", chat(max_tokens=0), "max_tokens", "greater than or equal to 1", None),
    # Typed as OpenAI types them: a number in a string, a boolean or a decimal is not an integer, a word not a boolean.
    ("max-tokens-string", chat(max_tokens="5"), "max_tokens", "valid integer", None),
    ("max-tokens-boolean", chat(max_tokens=True), "max_tokens", "valid integer", None),
    ("max-tokens-decimal", completion(max_tokens=5.0), "max_tokens", "valid integer", None),
    ("stream-word", chat(stream="yes"), "stream", "valid boolean", None),
    ("temperature-too-high", chat(temperature=3), "temperature", "less than or equal to 2", None),
    ("top-logprobs-without-logprobs", chat(top_logprobs=3), "top_logprobs", "logprobs", None),
    ("audio-out", chat(modalities=["text", "audio"]), "modalities", "text-only", None),
    ("too-many-messages", chat(messages=[USER] * 2049), "messages", "at most 2048", None),
    (
        "too-many-tools",
        chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
        "tools",
        "at most 128",
        None,
    ),
    ("prompt-negative-id", completion(prompt=[1, 2, -3]), "prompt", "negative", "invalid_token_id"),
    ("prompt-negative-id-in-list", completion(prompt=[[1, 2], [-1]]), "prompt", "negative", "invalid_token_id"),
    ("prompt-mixed-list", completion(prompt=[1, "two"]), "prompt.1", "valid integer", None),
    ("prompt-empty-list", completion(prompt=[]), "prompt", "at least 1", None),
    ("prompt-object", completion(prompt={"text": "Hi"}), "prompt", "list of token ids", None),
    ("too-many-prompts", completion(prompt=["Hi"] * 257), "prompt", "at most 256", None),
    ("best-of", completion(best_of=3), "best_of", "best_of=1", None),
    ("completion-seed-negative", completion(seed=-1), "seed", "greater than or equal to 0", None),
]


def send(api: Api, endpoint: str, body: dict[str, Any]) -> Any:
    """Through the official client: what it raises is what a client sees."""
    body = dict(body)
    if endpoint == "chat":
        return api.oa.chat.completions.create(model=MODEL_NAME, messages=body.pop("messages"), extra_body=body)
    return api.oa.completions.create(model=MODEL_NAME, prompt=body.pop("prompt"), extra_body=body)


@pytest.mark.parametrize(
    ("request_", "param", "message", "code"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_input_is_a_400_naming_the_field_and_nothing_is_enqueued(api: Api, request_, param, message, code):
    endpoint, body = request_
    before = api.jobs()
    with pytest.raises(openai.BadRequestError) as exc:
        send(api, endpoint, body)
    error = exc.value
    assert error.status_code == 400
    assert error.param == param, error.message
    assert message in error.message
    assert error.code == code
    assert error.body["type"] == "invalid_request_error"
    api.assert_nothing_enqueued(before)


def test_a_refusal_carries_a_request_id_each_sdk_reads(api: Api):
    with pytest.raises(openai.BadRequestError) as refused:
        send(api, *chat(seed=-1))
    with pytest.raises(anthropic.BadRequestError) as anthropic_refused:
        anthropic.Anthropic(base_url=api.base, api_key="unused", max_retries=0).messages.create(
            model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": ""}]
        )
    with pytest.raises(openai.NotFoundError) as unknown:  # not a route's: the app's own 404
        api.oa.get("/nowhere", cast_to=object)
    ids = [refused.value.request_id, anthropic_refused.value.request_id, unknown.value.request_id]
    assert all(i and i.startswith("req_") for i in ids) and len(set(ids)) == 3
    # A refusal of the body limit (answered before the app) carries one too.
    r = httpx.post(f"{api.base}/v1/chat/completions", content=b"x" * (17 * 2**20), timeout=60)
    assert r.status_code == 413 and r.headers["x-request-id"] == r.headers["request-id"]


RAW = [
    # JSON's \ud800 escape parses into a Python string that cannot be encoded.
    (
        "surrogate-content",
        '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "messages.0.content",
    ),
    (
        "surrogate-in-part",
        '{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
        "messages.0.content.0.text",
    ),
    ("surrogate-model", '{"model": "\\ud800", "messages": [{"role": "user", "content": "Hi"}], "x": "%s"}', "model"),
    ("surrogate-role", '{"model": "%s", "messages": [{"role": "\\ud800", "content": "Hi"}]}', "messages.0.role"),
    (
        "surrogate-tool-schema",
        '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": '
        '"function", "function": {"name": "f", "parameters": {"d": "\\ud83d"}}}]}',
        "tools.0.function.parameters.d",
    ),
    (
        "surrogate-key",
        '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "metadata": {"\\ud800": 1}}',
        "metadata",
    ),
    (
        "surrogate-extra-field",
        '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "x": ["\\ud800"]}',
        "x.0",
    ),
    (
        "nan-temperature",
        '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        "temperature",
    ),
    (
        "infinity-in-schema",
        '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": '
        '"function", "function": {"name": "f", "parameters": {"max": Infinity}}}]}',
        "tools.0.function.parameters.max",
    ),
    (
        "too-deep",
        '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "x": ' + "[" * 100 + "]" * 100 + "}",
        None,
    ),
]


@pytest.mark.parametrize(("raw", "param"), [case[1:] for case in RAW], ids=[case[0] for case in RAW])
def test_unencodable_or_non_json_values_are_a_400_naming_the_field(api: Api, raw: str, param: str | None):
    before = api.jobs()
    r = httpx.post(
        f"{api.base}/v1/chat/completions",
        content=(raw % MODEL_NAME).encode(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    else:
        assert "deeper" in error["message"]
    api.assert_nothing_enqueued(before)


def test_a_body_over_the_limit_is_a_413_declared_or_chunked(api: Api):
    before = api.jobs()
    big = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * (20 * 2**20)}]}).encode()
    r = httpx.post(
        f"{api.base}/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 413
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }
    assert "16 MB" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(big), 2**20):
            yield big[start : start + 2**20]

    r = httpx.post(
        f"{api.base}/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # An Anthropic client reads Anthropic's error object, declared or chunked.
    for content in (big, chunks()):
        r = httpx.post(
            f"{api.base}/v1/messages", content=content, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert r.status_code == 413
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "request_too_large"
        assert "16 MB" in r.json()["error"]["message"]
    api.assert_nothing_enqueued(before)
    # The api still serves after refusing (and a chunked body under the limit goes through whole).
    small = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "seed": -1}).encode()
    r = httpx.post(
        f"{api.base}/v1/chat/completions",
        content=iter([small[:10], small[10:]]),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_unparsable_and_missing_bodies_are_a_400(api: Api):
    before = api.jobs()
    for content in (b'{"model": ', b""):
        r = httpx.post(
            f"{api.base}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    api.assert_nothing_enqueued(before)


# -- against the vocabulary a worker publishes -------------------------------------------------


def wait_for_model_block(api: Api, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with api.engine.connect() as conn:
            for (stats,) in conn.execute(text("SELECT stats FROM workers")):
                block = (json.loads(stats) if isinstance(stats, str) else stats or {}).get("model")
                if block:
                    return block
        time.sleep(0.2)
    raise AssertionError("no worker heartbeat carries stats['model'] (vocab_size, context_length, fingerprint)")


@pytest.fixture(scope="module")
def with_worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from start(tmp_path_factory.mktemp("validation-vocab"), tiny_model, worker=True)


def test_top_k_and_token_ids_past_the_vocabulary_are_a_400(with_worker: Api):
    api = with_worker
    vocab = wait_for_model_block(api)["vocab_size"]
    assert vocab == 49152  # the tiny model's
    before = api.jobs()
    with pytest.raises(openai.BadRequestError) as exc:
        send(api, *chat(top_k=100_000))
    assert exc.value.param == "top_k" and str(vocab) in exc.value.message
    for prompt in ([1, 2, vocab], [[1, 2], [vocab + 7]]):
        with pytest.raises(openai.BadRequestError) as exc:
            send(api, *completion(prompt=prompt))
        assert (exc.value.param, exc.value.code) == ("prompt", "invalid_token_id")
        assert str(vocab) in exc.value.message
    api.assert_nothing_enqueued(before)

    # The edges are served: top_k equal to the vocabulary (no filtering) and the last token id.
    ok = api.oa.chat.completions.create(
        model=MODEL_NAME, messages=[USER], max_tokens=2, temperature=0.5, seed=1, extra_body={"top_k": vocab}
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
    ok = api.oa.completions.create(model=MODEL_NAME, prompt=[1, vocab - 1], max_tokens=1, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_tools_on_auto_with_schema_keywords_the_engine_lacks_are_served(with_worker: Api):
    # Agents send their tools' schemas as they are (MCP servers' included): with tool_choice auto the call grammar
    # is best effort, so a keyword llguidance lacks, or a pattern it cannot compile, never refuses the request.
    odd = {
        "type": "object",
        "properties": {"tags": {"type": "array", "uniqueItems": True}, "u": {"type": "string", "format": "uri"}},
        "propertyNames": {"pattern": "^[a-z]+$"},
    }
    broken = {"type": "object", "properties": {"p": {"type": "string", "pattern": "(?=look-ahead)"}}}
    tools = [
        {"type": "function", "function": {"name": "tag", "parameters": odd}},
        {"type": "function", "function": {"name": "probe", "parameters": broken}},
    ]
    answer = with_worker.oa.chat.completions.create(
        model=MODEL_NAME, messages=[USER], tools=tools, max_tokens=4, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as exc:  # forced, the same schema is refused and named
        with_worker.oa.chat.completions.create(
            model=MODEL_NAME, messages=[USER], tools=tools[:1], tool_choice="required", max_tokens=4
        )
    assert (exc.value.param, exc.value.code) == ("tools", "invalid_schema")
