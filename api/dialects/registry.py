"""The dialects this service speaks, one record each: what the app, /metrics, the error handlers, the job and batch
endpoints and the batch lifecycle read, so that a new dialect is registered here and nowhere else.

A record names its routes (the routers that serve it), its generation endpoints (each with its path, its label in
/metrics, its job kind, the body it takes and its adapter to the neutral request (api.pipeline.incoming), its JSON renderer,
its stream writer (api.pipeline.relay), its rendering of a finished job (a job's `result`, a batch line's body) and,
where a job or a batch line may name it, the adapter for those), and the shape
of its errors (the paths whose errors it renders, and how; OpenAI's error object where it names none).

Route modules are named, not imported here: they import api.pipeline.prepare, which reads this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.dialects.anthropic import adapter as anthropic_adapter
from api.dialects.anthropic.protocol import MessagesRequest
from api.dialects.anthropic.render import MessageStreamWriter, error_body, message
from api.dialects.openai import adapter as openai_adapter
from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest
from api.dialects.openai.render import ChunkWriter, chat_completion, text_completion
from api.dialects.responses import adapter as responses_adapter
from api.dialects.responses.protocol import ResponsesRequest
from api.dialects.responses.render import unstored
from api.errors import APIError, ErrorShape
from api.pipeline.incoming import Incoming
from api.pipeline.relay import StreamWriter
from mlxq.request import JobKind
from mlxq.sql import Job

# A parsed body as the neutral request(s) the one pipeline takes (api.pipeline.prepare).
Adapter = Callable[[Any], Incoming]
# Results (one per prompt) and the model that answered, as the dialect's answer body.
JSONRenderer = Callable[[list[dict[str, Any]], str], dict[str, Any]]
# A fresh writer of one answer's stream, for the model that answers.
WriterFactory = Callable[[str], StreamWriter]


@dataclass(frozen=True)
class Route:
    """One generation endpoint of a dialect."""

    path: str
    label: str  # its `endpoint` label in /metrics (mlxq_requests_total, mlxq_request_seconds) and the request log
    kind: JobKind
    body: type[BaseModel]  # the body its route takes
    adapt: Adapter
    render: JSONRenderer
    writer: WriterFactory
    # A finished job's answer, its id made of the job's and its times the job's (`answered`): what a batch line's
    # `response.body` and a job's `result` show, the same however often it is read.
    render_job: Callable[[Job], dict[str, Any]]
    # The adapter of a body a job or a batch line names this path with (None: they may not name it).
    job: Adapter | None = None


def answered(job: Job) -> int:
    """When a finished job answered (its end; its start for a row that never kept one)."""
    return int(job.finished_at or job.created_at)


def answer_id(prefix: str, job: Job) -> str:
    """The id of a finished job's answer: the dialect's prefix and the job's id, one id however often it is read."""
    return f"{prefix}{job.id.replace('-', '')}"


@dataclass(frozen=True)
class Dialect:
    name: str
    # Its routers: a route module's name (imported when the app is built), or the router itself.
    routes: tuple[str | APIRouter, ...]
    endpoints: tuple[Route, ...]
    # The body of an error (status, message) on the paths under `error_paths`; None: OpenAI's error object.
    error_body: ErrorShape | None = None
    error_paths: tuple[str, ...] = ()

    def routers(self) -> list[APIRouter]:
        return [importlib.import_module(r).router if isinstance(r, str) else r for r in self.routes]


# -- the three dialects ----------------------------------------------------------------------------------


def _stateless(body: ResponsesRequest) -> Incoming:
    """A Responses body of a job or a batch line: nothing stored to continue from."""
    if body.previous_response_id is not None:
        raise APIError(
            400, "previous_response_id is not supported here; send the whole input.", param="previous_response_id"
        )
    return responses_adapter.incoming(body)


OPENAI = Dialect(
    name="openai",
    routes=("api.dialects.openai.routes",),
    endpoints=(
        Route(
            path="/v1/chat/completions",
            label="chat",
            kind="chat",
            body=ChatCompletionRequest,
            adapt=openai_adapter.chat,
            render=lambda results, model: chat_completion(results[0], model=model),
            writer=lambda model: ChunkWriter(kind="chat", model=model),
            render_job=lambda job: {
                **chat_completion(job.result or {}, model=job.model),
                "id": answer_id("chatcmpl-", job),
                "created": answered(job),
            },
            job=openai_adapter.chat,
        ),
        Route(
            path="/v1/completions",
            label="completion",
            kind="completion",
            body=CompletionRequest,
            adapt=openai_adapter.completion,
            render=lambda results, model: text_completion(results, model=model),
            writer=lambda model: ChunkWriter(kind="completion", model=model),
            render_job=lambda job: {
                **text_completion([job.result or {}], model=job.model),
                "id": answer_id("cmpl-", job),
                "created": answered(job),
            },
            job=openai_adapter.completion,
        ),
    ),
)

ANTHROPIC = Dialect(
    name="anthropic",
    routes=("api.dialects.anthropic.routes",),
    endpoints=(
        Route(
            path="/v1/messages",
            label="messages",
            kind="chat",
            body=MessagesRequest,
            adapt=anthropic_adapter.incoming,
            render=lambda results, model: message(results[0], model=model),
            writer=lambda model: MessageStreamWriter(model=model),
            render_job=lambda job: {**message(job.result or {}, model=job.model), "id": answer_id("msg_", job)},
        ),
    ),
    error_body=error_body,
    error_paths=("/v1/messages",),
)

RESPONSES = Dialect(
    name="responses",
    routes=("api.dialects.responses.routes",),
    endpoints=(
        Route(
            path="/v1/responses",
            label="responses",
            kind="chat",
            body=ResponsesRequest,
            adapt=responses_adapter.incoming,
            render=lambda results, model: unstored(model).render(results[0]),
            writer=lambda model: unstored(model).stream_writer(),
            # The sampling it ran with, from its canonical request; created when the job was, completed when it
            # finished.
            render_job=lambda job: unstored(
                job.model, job.request, response_id=answer_id("resp_", job), created_at=int(job.created_at)
            ).render(job.result or {}, completed_at=job.finished_at),
            job=_stateless,
        ),
    ),
)

DIALECTS: tuple[Dialect, ...] = (OPENAI, ANTHROPIC, RESPONSES)


# -- what the rest of the api reads ----------------------------------------------------------------------


def _dialects(dialects: Sequence[Dialect] | None) -> Sequence[Dialect]:
    return DIALECTS if dialects is None else dialects


def routes(dialects: Sequence[Dialect] | None = None) -> dict[str, Route]:
    """Every generation endpoint, by path (a path served twice is refused)."""
    found: dict[str, Route] = {}
    labels: dict[str, str] = {}
    for dialect in _dialects(dialects):
        for route in dialect.endpoints:
            if route.path in found or labels.get(route.label, route.path) != route.path:
                raise ValueError(f"dialect {dialect.name!r}: {route.path} or its label {route.label!r} is taken")
            found[route.path], labels[route.label] = route, route.path
    return found


def route(path: str, dialects: Sequence[Dialect] | None = None) -> Route | None:
    """The generation endpoint at `path`, if any."""
    return routes(dialects).get(path)


def routers(dialects: Sequence[Dialect] | None = None) -> list[APIRouter]:
    """Every dialect's routers, in order."""
    return [router for dialect in _dialects(dialects) for router in dialect.routers()]


def endpoint_labels(dialects: Sequence[Dialect] | None = None) -> dict[str, str]:
    """Each generation path's /metrics label (api.operations.metrics), for requests refused before they have an outcome."""
    return {path: r.label for path, r in routes(dialects).items()}


def error_shapes(dialects: Sequence[Dialect] | None = None) -> list[tuple[str, ErrorShape]]:
    """(path prefix, error body) of every dialect whose errors are not OpenAI's (api.errors.install)."""
    return [
        (prefix, dialect.error_body)
        for dialect in _dialects(dialects)
        if dialect.error_body is not None
        for prefix in dialect.error_paths
    ]


def job_endpoints(dialects: Sequence[Dialect] | None = None) -> dict[str, tuple[type[BaseModel], Adapter]]:
    """The endpoints a job or a batch line may name: the body each takes and its adapter to the neutral request
    (its job kind: `route(path).kind`)."""
    return {path: (r.body, r.job) for path, r in routes(dialects).items() if r.job is not None}
