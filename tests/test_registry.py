"""The dialect registry (api.dialects.registry): a dialect registered in one place, its record, is served, counted
in /metrics under its own label and answers its errors in its own shape; the three built-in dialects keep theirs.

The app runs in this process on SQLite, with no worker: the fourth dialect here answers without a job (its answer
rendered by the OpenAI renderers its record reuses, its stream by the one relay)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

from api.app import create_app
from api.auth import AUTHENTICATED
from api.dialects import registry
from api.dialects.openai.render import ChunkWriter, chat_completion
from api.dialects.registry import DIALECTS, Dialect, Route
from api.errors import APIError
from api.pipeline.incoming import Incoming
from api.pipeline.relay import relay
from api.pipeline.streaming import event_source, from_list, replay
from mlxq.settings import Settings

# -- a fourth dialect, all of it here ---------------------------------------------------------------------


class EchoRequest(BaseModel):
    model: str
    text: str
    stream: bool = False


def echo_error(status: int, message: str) -> dict[str, Any]:
    return {"echo_error": {"status": status, "message": message}}


def echo_incoming(body: EchoRequest) -> Incoming:
    chat = {"model": body.model, "messages": [{"role": "user", "content": body.text}]}
    return Incoming.of("chat", [chat], body.model_dump(), stream=body.stream)


echo_router = APIRouter(dependencies=AUTHENTICATED)

ECHO = Dialect(
    name="echo",
    routes=(echo_router,),
    endpoints=(
        Route(
            path="/v1/echo",
            label="echo",
            kind="chat",
            body=EchoRequest,
            adapt=echo_incoming,
            render=lambda results, model: chat_completion(results[0], model=model),
            writer=lambda model: ChunkWriter(kind="chat", model=model),
            render_job=lambda job: chat_completion(job.result or {}, model=job.model),
        ),
    ),
    error_body=echo_error,
    error_paths=("/v1/echo",),
)


@echo_router.post("/v1/echo")
async def echo(body: EchoRequest) -> Response:
    if not body.text:
        raise APIError(400, "Nothing to echo.", param="text")
    (route,) = ECHO.endpoints
    result = {"text": body.text, "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    if body.stream:
        return event_source(relay(from_list(replay(result)), route.writer(body.model)), {}, 15.0)
    return JSONResponse(route.render([result], body.model))


# -- the app ----------------------------------------------------------------------------------------------


def client_of(tmp_path: Path, dialects: tuple[Dialect, ...] | None) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path / "data", api_keys=""), dialects=dialects)
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_of(tmp_path, (*DIALECTS, ECHO))


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[TestClient]:
    yield from client_of(tmp_path, None)


def requests_total(client: TestClient, endpoint: str, status: int) -> float:
    text = client.get("/metrics").text
    line = f'mlxq_requests_total{{cache="none",endpoint="{endpoint}",status="{status}"}}'
    found = [row.split()[-1] for row in text.splitlines() if row.startswith(line)]
    return float(found[0]) if found else 0.0


def test_a_registered_dialect_is_served(client: TestClient):
    answer = client.post("/v1/echo", json={"model": "echo-1", "text": "Hello."})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["object"], body["model"]) == ("chat.completion", "echo-1")
    assert body["choices"][0]["message"]["content"] == "Hello."


def test_a_registered_dialect_streams_through_the_relay(client: TestClient):
    answer = client.post("/v1/echo", json={"model": "echo-1", "text": "Hello.", "stream": True})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in answer.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello."
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_its_errors_come_in_its_shape_and_are_counted_under_its_label(client: TestClient):
    refused = client.post("/v1/echo", json={"model": "echo-1", "text": ""})
    assert refused.status_code == 400
    assert refused.json() == {"echo_error": {"status": 400, "message": "Nothing to echo."}}
    invalid = client.post("/v1/echo", json={"model": "echo-1"})  # refused by its body's model
    assert invalid.status_code == 400
    assert set(invalid.json()) == {"echo_error"} and "text" in invalid.json()["echo_error"]["message"]
    assert requests_total(client, "echo", 400) == 2
    # The other dialects keep their own shapes and labels beside it.
    anthropic = client.post("/v1/messages", json={"model": "m"})
    assert anthropic.status_code == 400 and anthropic.json()["type"] == "error"
    openai = client.post("/v1/chat/completions", json={"model": "m"})
    assert openai.status_code == 400 and set(openai.json()["error"]) == {"message", "type", "param", "code"}
    assert requests_total(client, "messages", 400) == 1
    assert requests_total(client, "chat", 400) == 1


def test_a_dialect_not_registered_is_not_served(plain: TestClient):
    missing = plain.post("/v1/echo", json={"model": "echo-1", "text": "Hello."})
    assert missing.status_code == 404 and "error" in missing.json()  # OpenAI's shape: no dialect claims the path
    assert requests_total(plain, "echo", 404) == 0


def test_the_registry_refuses_a_path_or_a_label_served_twice():
    twin = Dialect(name="twin", routes=(), endpoints=(ECHO.endpoints[0],))
    with pytest.raises(ValueError, match="/v1/echo"):
        registry.routes((*DIALECTS, ECHO, twin))
    relabelled = Route(**{**vars(ECHO.endpoints[0]), "path": "/v1/echo2"})
    with pytest.raises(ValueError, match="echo"):
        registry.routes((ECHO, Dialect(name="relabelled", routes=(), endpoints=(relabelled,))))


def test_what_the_registry_tells_the_rest_of_the_api():
    assert registry.endpoint_labels() == {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completion",
        "/v1/messages": "messages",
        "/v1/responses": "responses",
    }
    assert [prefix for prefix, _ in registry.error_shapes()] == ["/v1/messages"]
    jobs = registry.job_endpoints()
    assert list(jobs) == ["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    assert {path: registry.routes()[path].kind for path in jobs} == {
        "/v1/chat/completions": "chat",
        "/v1/completions": "completion",
        "/v1/responses": "chat",
    }
    with pytest.raises(APIError, match="previous_response_id"):
        body, adapt = jobs["/v1/responses"]
        adapt(body.model_validate({"model": "m", "input": "Hi", "previous_response_id": "resp_1"}))


def test_batch_lines_render_as_their_endpoint_answers():
    job: Any = SimpleNamespace(
        id="0b5e-77",
        model="m",
        result={"text": "Paris.", "finish_reason": "stop", "usage": {}},
        request={"model": "m", "temperature": 0.0},  # the canonical request it ran
        created_at=1699999999.0,
        finished_at=1700000000.5,
    )
    lines = {path: route.render_job(job) for path, route in registry.routes().items()}
    # One id (the job's) and one time (its end) however often it is read.
    assert lines == {path: route.render_job(job) for path, route in registry.routes().items()}
    assert [lines[path]["id"] for path in registry.routes()] == [
        "chatcmpl-0b5e77",
        "cmpl-0b5e77",
        "msg_0b5e77",
        "resp_0b5e77",
    ]
    assert lines["/v1/chat/completions"]["created"] == lines["/v1/completions"]["created"] == 1700000000
    assert lines["/v1/chat/completions"]["choices"][0]["message"]["content"] == "Paris."
    assert lines["/v1/completions"]["choices"][0]["text"] == "Paris."
    assert lines["/v1/messages"]["content"] == [{"type": "text", "text": "Paris."}]
    response = lines["/v1/responses"]
    assert (response["object"], response["status"], response["model"]) == ("response", "completed", "m")
    assert response["output"][0]["content"][0]["text"] == "Paris."
    assert response["created_at"] == 1699999999
    assert (response["temperature"], response["top_p"], response["completed_at"]) == (0.0, 1.0, 1700000000)
