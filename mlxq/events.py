"""A job's events: what the worker publishes on the stream channel, what the api relays, and what
`GET /v1/jobs/{id}/events` sends as SSE (`event:` the type, `data:` the JSON object). A public contract.

In order, for one job: `restarted` (only when a dead worker's job runs again: its text starts over; the
api's relays skip what they had already sent, so their clients never see this one),
`started` (prompt admitted), `progress` (prefill, long prompts), `delta`... (text), `tool_calls` (once,
at the end, parsed), then exactly one of `done` (with the whole result) or `error`. The api adds
`waiting` while the job is queued (a keepalive; never published).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from mlxq.contract import GenerationResult, JobError

EventType = Literal["restarted", "started", "progress", "delta", "tool_calls", "waiting", "done", "error"]
FINAL: tuple[EventType, ...] = ("done", "error")


class Restarted(TypedDict):
    type: Literal["restarted"]
    attempt: int


class Started(TypedDict):
    type: Literal["started"]
    prompt_tokens: int
    cached_tokens: int


class Progress(TypedDict):
    type: Literal["progress"]
    processed: int
    total: int


class Delta(TypedDict):
    type: Literal["delta"]
    content: str
    logprobs: list[dict[str, Any]] | None


class ToolCalls(TypedDict):
    type: Literal["tool_calls"]
    tool_calls: list[dict[str, Any]]


class Waiting(TypedDict):
    type: Literal["waiting"]
    status: str


class Done(TypedDict):
    type: Literal["done"]
    result: GenerationResult


class Error(TypedDict):
    type: Literal["error"]
    error: JobError


JobEvent = Restarted | Started | Progress | Delta | ToolCalls | Waiting | Done | Error
# An event as code passes it along: one of the above as built here, or the same object decoded from JSON off
# the stream channel. Read-only (a relay that changes one builds a new dict); every TypedDict above is one.
Event = Mapping[str, Any]


def restarted(attempt: int) -> Restarted:
    return {"type": "restarted", "attempt": attempt}


def started(prompt_tokens: int, cached_tokens: int) -> Started:
    return {"type": "started", "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens}


def progress(processed: int, total: int) -> Progress:
    return {"type": "progress", "processed": processed, "total": total}


def delta(content: str, logprobs: list[dict[str, Any]] | None = None) -> Delta:
    return {"type": "delta", "content": content, "logprobs": logprobs}


def tool_calls(calls: list[dict[str, Any]]) -> ToolCalls:
    return {"type": "tool_calls", "tool_calls": calls}


def waiting(status: str) -> Waiting:
    return {"type": "waiting", "status": status}


def done(result: GenerationResult | dict[str, Any]) -> Done:
    return {"type": "done", "result": result}  # type: ignore[typeddict-item]


def error(err: JobError | dict[str, Any]) -> Error:
    return {"type": "error", "error": err}  # type: ignore[typeddict-item]


def is_final(event: Event) -> bool:
    return event.get("type") in FINAL
