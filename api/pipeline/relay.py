"""The one stream relay: a job's events (live or replayed, api.pipeline.streaming) in, a dialect's SSE events out.

The relay holds the loop every dialect shares: guard the source (an APIError once streaming is an error event),
start, relay text as it comes, keep the connection alive while the job waits or prefills, end with the result (the
text a joined job's stream missed, then the tool calls), or with the error, then the closing event if the dialect has
one. What each event looks like is the dialect's: its `StreamWriter` (api.dialects.*.render).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from sse_starlette import ServerSentEvent

from api.pipeline.streaming import guard
from mlxq.events import Event

# One event as a writer builds it, before it is framed as SSE.
Payload = dict[str, Any]


class StreamWriter(Protocol):
    """One stream's events in a dialect's shapes. Each method returns the payloads to send (maybe none), in order;
    the writer keeps whatever state its dialect numbers or nests events by."""

    def start(self, started: Event | None) -> list[Payload]:
        """What opens the stream, before the job's other events: `started` (the prompt's tokens, the cached ones) when
        that is the first, as it is unless the job waits in the queue."""
        ...

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[Payload]:
        """Text (and its logprobs, where the dialect sends them)."""
        ...

    def tool_calls(self, calls: list[dict[str, Any]]) -> list[Payload]:
        """The parsed calls (a job sends them once, at the end)."""
        ...

    def missed(self, text: str) -> list[Payload]:
        """The end of the text a stream missed (a joined job nobody streamed from the start), sent before `finish`."""
        ...

    def finish(self, result: dict[str, Any]) -> list[Payload]:
        """The end of a job that succeeded."""
        ...

    def error(self, error: dict[str, Any]) -> list[Payload]:
        """The end of a job that failed (a job error, mlxq.contract.JobError)."""
        ...

    def keepalive(self, event: Event) -> ServerSentEvent:
        """What keeps the connection open while the job waits (`waiting`) or prefills (`progress`)."""
        ...

    def frame(self, payload: Payload) -> ServerSentEvent:
        """One payload as the dialect frames it."""
        ...

    def close(self) -> ServerSentEvent | None:
        """What ends every stream, after the last event (None: nothing)."""
        ...


def keepalive_comment(event: Event) -> ServerSentEvent:
    """A keepalive as an SSE comment (clients skip it): the prefill's progress, or the job's queue state."""
    if event["type"] == "progress":
        return ServerSentEvent(comment=f"keepalive {event['processed']}/{event['total']}", sep="\n")
    return ServerSentEvent(comment=f"keepalive {event.get('status', 'queued')}", sep="\n")


async def _chain(first: Event | None, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    if first is None:
        return
    yield first
    async for event in rest:
        yield event


def missed_text(result: dict[str, Any], sent: str) -> str:
    """What a finished result's text has past what the stream sent ("" unless the stream sent a prefix of it)."""
    text = result.get("text") or ""
    return text[len(sent) :] if len(text) > len(sent) and text.startswith(sent) else ""


async def relay(source: AsyncIterator[Event], writer: StreamWriter) -> AsyncIterator[ServerSentEvent]:
    """Relay job events as the writer's SSE events, each as soon as it comes. A first `started` goes to the writer's
    start (Anthropic's `message_start` carries the prompt's usage); otherwise `started` and `restarted` say nothing
    here (the followers drop a restart's repeated text before this)."""
    guarded = guard(source)
    # At once: a live job's first events were read before the response began (api.pipeline.streaming.job_events).
    first = await anext(guarded, None)
    for payload in writer.start(first if first is not None and first["type"] == "started" else None):
        yield writer.frame(payload)
    sent = ""
    calls: list[dict[str, Any]] = []
    async for event in _chain(first, guarded):
        kind = event["type"]
        payloads: list[Payload] = []
        if kind == "delta":
            sent += event["content"]
            payloads = writer.delta(event["content"], event.get("logprobs"))
        elif kind == "tool_calls":
            # Sent with the end, which follows at once: a stream that joined a job nobody streamed has the text
            # only then, and it goes before the calls, as in the answer (a text block after the tool_use blocks).
            calls = event["tool_calls"]
        elif kind in ("progress", "waiting"):
            yield writer.keepalive(event)
        elif kind == "done":
            result = event.get("result") or {}
            rest = missed_text(result, sent)
            payloads = [
                *(writer.missed(rest) if rest else []),
                *(writer.tool_calls(calls) if calls else []),
                *writer.finish(result),
            ]
        elif kind == "error":
            payloads = writer.error(event.get("error") or {})
        for payload in payloads:
            yield writer.frame(payload)
        if kind in ("done", "error"):
            break
    if (closing := writer.close()) is not None:
        yield closing
