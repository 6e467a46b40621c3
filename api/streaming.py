"""SSE framing: job events (or a cached result) as OpenAI chunk streams. The one place for SSE."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from api.errors import APIError
from api.protocol import usage_block
from mlxq import events
from mlxq.contract import job_error

DONE = ServerSentEvent(data="[DONE]", sep="\n")


def sse(payload: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(payload, ensure_ascii=False), sep="\n")


def replay(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a finished result would have produced: how a cache hit streams."""
    usage = result.get("usage") or {}
    replayed: list[dict[str, Any]] = [events.started(usage.get("prompt_tokens", 0), usage.get("cached_tokens", 0))]
    if result.get("text") or result.get("logprobs"):
        replayed.append(events.delta(result.get("text", ""), result.get("logprobs")))
    if result.get("tool_calls"):
        replayed.append(events.tool_calls(result["tool_calls"]))
    replayed.append(events.done(result))
    return replayed


async def from_list(items: Iterable[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for event in items:
        yield event


class ChunkWriter:
    """Turns job events into OpenAI chunks for one stream: one id and `created` throughout."""

    def __init__(self, *, kind: str, model: str, include_usage: bool) -> None:
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": [{"index": 0, **choice}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [self._chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]

    def delta(self, content: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
        if self.kind == "chat":
            return self._chunk({"delta": {"content": content},
                                "logprobs": {"content": logprobs} if logprobs else None, "finish_reason": None})
        return self._chunk({"text": content, "logprobs": None, "finish_reason": None})

    def tool_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The first fragment of each index carries id, type and name; the next the arguments.
        chunks = []
        for i, call in enumerate(calls):
            head = {"index": i, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            body = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, body):
                chunks.append(self._chunk({"delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}))
        return chunks

    def finish(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        reason = result.get("finish_reason", "stop")
        if self.kind == "chat":
            chunks = [self._chunk({"delta": {}, "logprobs": None, "finish_reason": reason})]
        else:
            chunks = [self._chunk({"text": "", "logprobs": None, "finish_reason": reason})]
        if self.include_usage:
            chunks.append({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                           "choices": [], "usage": usage_block(result.get("usage", {}))})
        return chunks


async def guard(source: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """An APIError raised once the stream has begun (shutdown, timeout, a lost worker) as an error event:
    the status line is sent by then, so the error can only travel in the stream."""
    try:
        async for event in source:
            yield event
    except APIError as exc:
        yield events.error(job_error(exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param))


async def openai_stream(source: AsyncIterator[dict[str, Any]], writer: ChunkWriter,
                        prefix: str = "") -> AsyncIterator[ServerSentEvent]:
    """Relay events as SSE at once; progress becomes a keepalive comment, errors an error object."""
    for chunk in writer.start():
        yield sse(chunk)
    if prefix:
        yield sse(writer.delta(prefix, None))
    sent = ""
    async for event in guard(source):
        kind = event["type"]
        if kind == "delta":
            sent += event["content"]
            yield sse(writer.delta(event["content"], event.get("logprobs")))
        elif kind == "tool_calls":
            for chunk in writer.tool_calls(event["tool_calls"]):
                yield sse(chunk)
        elif kind == "progress":
            yield ServerSentEvent(comment=f"keepalive {event['processed']}/{event['total']}", sep="\n")
        elif kind == "waiting":
            yield ServerSentEvent(comment=f"keepalive {event.get('status', 'queued')}", sep="\n")
        elif kind == "done":
            text = (event.get("result") or {}).get("text") or ""
            if len(text) > len(sent) and text.startswith(sent):  # joined a job nobody streamed: the rest now
                yield sse(writer.delta(text[len(sent) :], None))
            for chunk in writer.finish(event.get("result") or {}):
                yield sse(chunk)
            break
        elif kind == "error":
            error = event.get("error") or {}
            yield sse({"error": {"message": error.get("message", "generation failed"),
                                 "type": error.get("type", "server_error"),
                                 "param": error.get("param"), "code": error.get("code")}})
            break
    yield DONE


def event_source(stream: AsyncIterator[ServerSentEvent], headers: dict[str, str], ping_s: float) -> EventSourceResponse:
    return EventSourceResponse(stream, headers=headers, ping=ping_s, sep="\n")
