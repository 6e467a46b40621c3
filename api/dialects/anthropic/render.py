"""Anthropic's answers: a worker result as a `message` object, job events as the Messages event stream, errors
as Anthropic error objects.

Usage: `input_tokens` counts the prompt tokens the worker computed, `cache_read_input_tokens` those its prefix
cache held (so their sum is the prompt, as Anthropic counts it), and `cache_creation_input_tokens` is 0: the
prefix cache stores every prompt on its own, at no extra cost, so no part of the input is a cache write.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from sse_starlette import ServerSentEvent

from mlxq.events import Event
from mlxq.states import FinishReason

# finish_reason (mlxq.contract) → stop_reason; a stop string that ended the answer is `stop_sequence` instead.
STOP_REASONS = {FinishReason.STOP: "end_turn", FinishReason.LENGTH: "max_tokens", FinishReason.TOOL_CALLS: "tool_use"}
# HTTP status → Anthropic's error type (https://docs.claude.com/en/api/errors); any other 4xx is an
# invalid_request_error, any other 5xx an api_error. mlxq answers 503 when no worker can take the request: the
# overloaded case, which clients retry.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "api_error",  # cancelled (DELETE, a batch cancelled, the worker stopping): the request itself was valid
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def sse(payload: dict[str, Any]) -> ServerSentEvent:
    """One event as Anthropic frames it: `event:` its type, `data:` its JSON."""
    return ServerSentEvent(event=payload["type"], data=json.dumps(payload, ensure_ascii=False), sep="\n")


def error_body(status: int, message: str) -> dict[str, Any]:
    """An Anthropic error object, for a response body or an `error` event."""
    kind = ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def tool_use_id(call_id: str | None) -> str:
    """The `toolu_…` id of a worker tool call: its own id when it is one, else made from it (`call_x` → `toolu_x`),
    so one call has one id however often it is rendered (streamed, answered, replayed from the cache)."""
    if call_id and call_id.startswith("toolu_"):
        return call_id
    rest = _NOT_ID.sub("", (call_id or "").removeprefix("call_").removeprefix("call-"))
    return f"toolu_{rest or uuid.uuid4().hex[:24]}"


def tool_input(arguments: Any) -> dict[str, Any]:
    """A call's arguments (a JSON string, or the object itself) as the `input` object; {} if not one."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return {}
    return arguments if isinstance(arguments, dict) else {}


def stop_reason(result: dict[str, Any]) -> str:
    if result.get("finish_reason", FinishReason.STOP) == FinishReason.STOP and result.get("stop_sequence"):
        return "stop_sequence"
    return STOP_REASONS.get(result.get("finish_reason", FinishReason.STOP), "end_turn")


def usage_block(usage: dict[str, int]) -> dict[str, int]:
    prompt, cached = usage.get("prompt_tokens", 0), usage.get("cached_tokens", 0)
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": usage.get("completion_tokens", 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "type": "tool_use",
        "id": tool_use_id(call.get("id")),
        "name": function.get("name", ""),
        "input": tool_input(function.get("arguments")),
    }


def message(result: dict[str, Any], *, model: str) -> dict[str, Any]:
    """Render a worker result as an Anthropic `message` object (fresh id on every answer)."""
    content: list[dict[str, Any]] = []
    if result.get("text"):
        content.append({"type": "text", "text": result["text"]})
    content.extend(_tool_use(call) for call in result.get("tool_calls") or [])
    reason = stop_reason(result)
    return {
        "id": _id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": result.get("stop_sequence") if reason == "stop_sequence" else None,
        "usage": usage_block(result.get("usage") or {}),
    }


class MessageStreamWriter:
    """Anthropic's stream writer (api.pipeline.relay.StreamWriter): job events as the Messages event stream for one answer,
    one message id throughout, content blocks numbered in order (the text block first, then one `tool_use` block
    per call); `ping` while the job waits or prefills (clients drop a silent connection), an `error` event (and
    nothing after it) if the job fails."""

    def __init__(self, *, model: str) -> None:
        self.model = model
        self.id = _id("msg")
        self.index = 0  # the next content block's index
        self.text_open = False
        self.calls_sent = False

    def start(self, started: Event | None) -> list[dict[str, Any]]:
        """`message_start`: no content; the prompt's usage as Anthropic's has it (input and cache-read tokens) when the
        job has started (`started`), else 0 (a job still queued). `message_delta` carries the whole usage at the end,
        which the SDKs and Claude Code take over the start's."""
        usage = (
            {"prompt_tokens": started["prompt_tokens"], "cached_tokens": started["cached_tokens"]} if started else {}
        )
        return [
            {
                "type": "message_start",
                "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage_block(usage),
                },
            }
        ]

    def ping(self) -> dict[str, Any]:
        return {"type": "ping"}

    def keepalive(self, event: Event) -> ServerSentEvent:
        return sse(self.ping())

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        if not text:
            return []
        events = []
        if not self.text_open:
            self.text_open = True
            events.append(
                {"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}}
            )
        events.append(
            {"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}}
        )
        return events

    def missed(self, text: str) -> list[dict[str, Any]]:
        return self.delta(text)

    def _close_text(self) -> list[dict[str, Any]]:
        if not self.text_open:
            return []
        self.text_open = False
        self.index += 1
        return [{"type": "content_block_stop", "index": self.index - 1}]

    def tool_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Each call: its block with an empty input, then the whole input as one JSON delta, then its stop.
        events = self._close_text()
        self.calls_sent = self.calls_sent or bool(calls)
        for call in calls:
            block = _tool_use(call)
            arguments = json.dumps(block["input"], ensure_ascii=False)
            events += [
                {"type": "content_block_start", "index": self.index, "content_block": {**block, "input": {}}},
                {
                    "type": "content_block_delta",
                    "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": arguments},
                },
                {"type": "content_block_stop", "index": self.index},
            ]
            self.index += 1
        return events

    def finish(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close_text()
        if result.get("tool_calls") and not self.calls_sent:  # joined a job whose calls went out before
            events += self.tool_calls(result["tool_calls"])
        reason = stop_reason(result)
        stop_sequence = result.get("stop_sequence") if reason == "stop_sequence" else None
        return [
            *events,
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                "usage": usage_block(result.get("usage") or {}),
            },
            {"type": "message_stop"},
        ]

    def error(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        return [error_body(int(error.get("status") or 500), error.get("message") or "generation failed")]

    def frame(self, payload: dict[str, Any]) -> ServerSentEvent:
        return sse(payload)

    def close(self) -> None:
        return None
