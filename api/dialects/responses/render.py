"""The Responses dialect's answers: a worker result as a `response` object, job events as the Responses event
stream, errors as OpenAI error objects.

Everything rendered for one response is a function of its id, `created_at`, the request (and the canonical request
it ran: the sampling values it reports), the job's events and, once completed, `completed_at` (the job's end when
it is known, else the moment it is rendered):
item ids are derived from the response id and the item's place (`msg_…`, `fc_…`, `ctc_…`), sequence numbers
count the events from 0. So a reader that joins late (a background response streamed with `starting_after=N`)
regenerates the same events from the same job events and is sent only those after N; and the stored response
(`response_object`) has the ids its stream had.

Usage: `input_tokens` is the whole prompt, `input_tokens_details.cached_tokens` the part of it the prefix cache
held (OpenAI counts them so), `cache_write_tokens` 0 (the prefix cache stores every prompt, at no extra cost),
`reasoning_tokens` 0 (the model's thinking, if any, is in its text).

Extension: where the request declared hosted tools (dropped: module doc of .protocol), the response says so in
`"mlxq": {"dropped_tools": ["web_search", ...]}`; a failed response keeps mlxq's own error there too
(`"mlxq": {"error": {status, type, code, param}}`), since `error.code` takes only OpenAI's codes. The SDK's
models allow extra fields.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import ServerSentEvent

from api.dialects.responses.protocol import (
    ResponsesRequest,
    TextConfig,
    custom_tool_names,
    hosted_tools,
    tool_namespaces,
)
from api.pipeline.relay import keepalive_comment
from mlxq.contract import CANCELLED
from mlxq.events import Event
from mlxq.sql import Job
from mlxq.states import RESPONSE_ANSWERED, FinishReason, JobStatus, ResponseStatus

# The stream's terminal event for each final status; a cancelled response ends as an incomplete one does (the
# event union has no `response.cancelled`), its own status saying which.
TERMINAL_EVENTS = {
    ResponseStatus.COMPLETED: "response.completed",
    ResponseStatus.INCOMPLETE: "response.incomplete",
    ResponseStatus.CANCELLED: "response.incomplete",
    ResponseStatus.FAILED: "response.failed",
}
TERMINAL_EVENT_TYPES = frozenset(TERMINAL_EVENTS.values())
# A job's state as the response's status, while it has no result.
PENDING = {JobStatus.QUEUED: ResponseStatus.QUEUED, JobStatus.RUNNING: ResponseStatus.IN_PROGRESS}


def new_response_id() -> str:
    """A fresh `resp_…` id."""
    return f"resp_{uuid.uuid4().hex}"


def item_id(response_id: str, prefix: str, output_index: int) -> str:
    """The id of the output item at `output_index` of a response: the same every time it is rendered."""
    return f"{prefix}_{_digest(response_id, output_index)}"


def _digest(response_id: str, output_index: int) -> str:
    return hashlib.sha256(f"{response_id}/{output_index}".encode()).hexdigest()[:40]


def sse(payload: dict[str, Any]) -> ServerSentEvent:
    """One event as the Responses API frames it: `event:` its type, `data:` its JSON."""
    return ServerSentEvent(event=payload["type"], data=json.dumps(payload, ensure_ascii=False), sep="\n")


def usage_block(usage: Mapping[str, int]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def final_status(result: Mapping[str, Any]) -> ResponseStatus:
    """completed, incomplete (cut by max_output_tokens or the context) or cancelled, by the finish reason."""
    reason = result.get("finish_reason", FinishReason.STOP)
    ends = {FinishReason.LENGTH: ResponseStatus.INCOMPLETE, FinishReason.CANCELLED: ResponseStatus.CANCELLED}
    return ends.get(reason, ResponseStatus.COMPLETED)


def item_status(status: ResponseStatus) -> ResponseStatus:
    """A finished message item's status: incomplete in an incomplete response, else completed."""
    return ResponseStatus.INCOMPLETE if status == ResponseStatus.INCOMPLETE else ResponseStatus.COMPLETED


def response_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """A job error as the response's `error`. `code` is one of OpenAI's: a rate limit is `rate_limit_exceeded`, a
    prompt over the context `context_length_exceeded` (what OpenAI sends, and what Codex shows as "ran out of room
    in the model's context window" without retrying, though the SDK's model does not list it), another refusal
    `invalid_prompt`, the rest `server_error`."""
    status = int(error.get("status") or 500)
    if error.get("code") == "context_length_exceeded":
        code = "context_length_exceeded"
    else:
        code = "rate_limit_exceeded" if status == 429 else "invalid_prompt" if 400 <= status < 500 else "server_error"
    return {"code": code, "message": error.get("message") or "generation failed"}


def is_cancelled(error: Mapping[str, Any]) -> bool:
    """Whether a job error is a cancellation (mlxq.contract.CANCELLED), which ends a response as `cancelled`."""
    return error.get("code") == "cancelled" or error.get("type") == "cancelled"


# -- output items --------------------------------------------------------------------------------


class ToolKinds:
    """What a request's tools say about how a call is rendered: a custom tool's call as `custom_tool_call`, a
    namespace's tool's call with its `namespace`."""

    def __init__(self, request: ResponsesRequest) -> None:
        self.custom = custom_tool_names(request)
        self.namespaces = tool_namespaces(request)


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return None
    return arguments


def custom_input(arguments: Any) -> str:
    """A custom tool's free-form input from the call's arguments: the `input` string the model was asked for;
    else the one string argument it wrote under another name; else the arguments as they are."""
    value = _arguments_object(arguments)
    if isinstance(value, dict):
        if isinstance(value.get("input"), str):
            return value["input"]
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(value) == 1 and strings:
            return strings[0]
    if isinstance(value, str):
        return value
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def call_item(call: Mapping[str, Any], *, response_id: str, output_index: int, kinds: ToolKinds) -> dict[str, Any]:
    """A worker tool call ({id, type: function, function: {name, arguments}}) as its output item, done: a
    `custom_tool_call` for a custom tool, else a `function_call`. `call_id` is the worker's call id (one call,
    one id however often it is rendered)."""
    function = call.get("function") or {}
    name = function.get("name", "")
    # A call without an id (none the worker makes) gets one from its place, as every other id here.
    call_id = call.get("id") or f"call_{_digest(response_id, output_index)[:24]}"
    item: dict[str, Any]
    if name in kinds.custom:
        item = {
            "type": "custom_tool_call",
            "id": item_id(response_id, "ctc", output_index),
            "call_id": call_id,
            "name": name,
            "input": custom_input(function.get("arguments")),
        }
    else:
        item = {
            "type": "function_call",
            "id": item_id(response_id, "fc", output_index),
            "call_id": call_id,
            "name": name,
            "arguments": _arguments_text(function.get("arguments")),
            "status": ResponseStatus.COMPLETED,
        }
    if name in kinds.namespaces:
        item["namespace"] = kinds.namespaces[name]
    return item


def _text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs or [])}


def message_item(
    text: str,
    *,
    response_id: str,
    output_index: int,
    status: ResponseStatus,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The assistant's text as a `message` output item."""
    return {
        "type": "message",
        "id": item_id(response_id, "msg", output_index),
        "status": status,
        "role": "assistant",
        "content": [_text_part(text, logprobs)],
    }


def output_items(result: Mapping[str, Any], *, response_id: str, request: ResponsesRequest) -> list[dict[str, Any]]:
    """A result's output: its text as a message (none when there is no text), then one item per tool call."""
    items: list[dict[str, Any]] = []
    if result.get("text"):
        status = item_status(final_status(result))
        items.append(
            message_item(
                result["text"], response_id=response_id, output_index=0, status=status, logprobs=result.get("logprobs")
            )
        )
    kinds = ToolKinds(request)
    for call in result.get("tool_calls") or []:
        items.append(call_item(call, response_id=response_id, output_index=len(items), kinds=kinds))
    return items


# -- the response object -----------------------------------------------------------------------------


def _dumped(value: Any) -> Any:
    """A request field as the client sent it (models dumped under their wire names, unset fields left out)."""
    if isinstance(value, list):
        return [_dumped(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, exclude_none=True)
    return value


def _text_echo(text: TextConfig | None) -> dict[str, Any]:
    echoed = _dumped(text) if text is not None else {}
    return {"format": {"type": "text"}, **echoed}


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    """A declared tool as the response lists it: a function always with `parameters` and `strict` (null when not
    given), as the specification's function tool requires them; inside a namespace too."""
    if tool.get("type") == "function":
        return {"parameters": None, "strict": None, **tool}
    if tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
        return {**tool, "tools": [_tool_echo(inner) for inner in tool["tools"]]}
    return tool


def _echo(request: ResponsesRequest) -> dict[str, Any]:
    """The request's parameters the response object carries back (the SDK's model requires `tools`,
    `tool_choice` and `parallel_tool_calls`); OpenAI's defaults where the request left one out."""
    tier = request.service_tier
    return {
        "instructions": request.instructions,
        "tools": [_tool_echo(tool) for tool in _dumped(request.tools or [])],
        "tool_choice": _dumped(request.tool_choice) if request.tool_choice is not None else "auto",
        "parallel_tool_calls": request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "previous_response_id": request.previous_response_id,
        "text": _text_echo(request.text),
        "reasoning": request.reasoning,
        "metadata": request.metadata or {},
        "store": request.store if request.store is not None else True,
        "background": request.background if request.background is not None else False,
        # OpenAI answers the tier that served: "auto" is the default one, fast and ultrafast read as priority.
        "service_tier": {None: "default", "auto": "default", "fast": "priority", "ultrafast": "priority"}.get(
            tier, tier
        ),
        "truncation": request.truncation or "disabled",
        "user": request.user,
        "safety_identifier": request.safety_identifier,
        "prompt_cache_key": request.prompt_cache_key,
    }


# The sampler's default temperature (mlxq.settings `default_temperature`, which the canonical request fills in):
# what a response reports when it has no canonical request to read.
DEFAULT_TEMPERATURE = 1.0


def sampling_used(canonical: Mapping[str, Any] | None, request: ResponsesRequest | None = None) -> dict[str, Any]:
    """The sampling values a response ran with, as the Responses object reports them (required there, numbers, never
    null): read from the canonical request (mlxq.keys: the temperature default filled in) as the worker's sampler
    reads it (worker.sequence_builder.sampling_settings: 0 is off), so nucleus sampling off is `top_p` 1 and no
    penalty is 0. Without a canonical request (a batch line rendered from its model alone), the request's own."""
    source: Mapping[str, Any] = (
        canonical if canonical is not None else (request.model_dump(exclude_none=True) if request is not None else {})
    )
    temperature = source.get("temperature")
    top_p = source.get("top_p")
    return {
        "temperature": float(temperature) if temperature is not None else DEFAULT_TEMPERATURE,
        "top_p": float(top_p) if top_p else 1.0,
        "presence_penalty": float(source.get("presence_penalty") or 0.0),
        "frequency_penalty": float(source.get("frequency_penalty") or 0.0),
        "top_logprobs": int(source.get("top_logprobs") or 0),
    }


@dataclass(frozen=True)
class ResponseContext:
    """One response: what renders it besides the job's result or events (its id, `created_at`, the request, the
    model that answers, the items of the responses it continues), and whether its client cancelled it."""

    request: ResponsesRequest
    model: str
    id: str = field(default_factory=new_response_id)
    created_at: float = field(default_factory=lambda: float(int(time.time())))
    previous: list[dict[str, Any]] = field(default_factory=list)  # the items of the responses it continues
    cancelled: bool = False
    # The hosted tools the answer says it dropped (None: the request's, `hosted_tools`).
    dropped: tuple[str, ...] | None = None
    # The canonical request it runs (mlxq.keys, wire form): the sampling values it reports (`sampling_used`).
    canonical: Mapping[str, Any] | None = None

    @property
    def hosted(self) -> list[str]:
        return list(self.dropped) if self.dropped is not None else hosted_tools(self.request)

    def render(
        self, result: Mapping[str, Any], status: ResponseStatus | None = None, *, completed_at: float | None = None
    ) -> dict[str, Any]:
        """A worker result as the `response` object (what `openai.types.responses.Response` validates).

        `status` defaults to the result's (`final_status`); pass queued or in_progress (with an empty result) for
        a background response not finished yet: no output, no usage. `completed_at` is sent when completed."""
        status = status or final_status(result)
        finished = status in RESPONSE_ANSWERED
        return _response(
            self,
            status=status,
            output=output_items(result, response_id=self.id, request=self.request) if finished else [],
            usage=(result.get("usage") or {}) if finished else None,
            completed_at=completed_at,
        )

    def render_failed(self, error: Mapping[str, Any]) -> dict[str, Any]:
        """The response of a job that failed (`error`: a job error, mlxq.contract.JobError): failed with the
        error, no output; a cancelled job's response is cancelled instead, with no error."""
        if is_cancelled(error):
            return _response(self, status=ResponseStatus.CANCELLED, output=[])
        return _response(self, status=ResponseStatus.FAILED, output=[], error=error)

    def render_job(self, job: Job) -> dict[str, Any]:
        """The response as its job stands now (or cancelled by its client, whatever a shared job does next)."""
        if self.cancelled:
            return self.render_failed(dict(CANCELLED))
        if job.status in PENDING:
            return self.render({}, status=PENDING[JobStatus(job.status)])
        if job.status == JobStatus.SUCCEEDED:
            return self.render(job.result or {}, completed_at=job.finished_at)
        return self.render_failed(job.error or (dict(CANCELLED) if job.status == JobStatus.CANCELLED else {}))

    def stream_writer(
        self, starting_after: int | None = None, *, completed_at: float | None = None
    ) -> ResponseStreamWriter:
        """The writer of this response's event stream (for a late reader, only the events after `starting_after`;
        `completed_at`, when its job had ended, so the late terminal event says what the first one said)."""
        return ResponseStreamWriter(
            model=self.model,
            response_id=self.id,
            created_at=self.created_at,
            request=self.request,
            hosted_dropped=self.hosted,
            starting_after=starting_after,
            canonical=self.canonical,
            completed_at=completed_at,
        )


def _response(
    context: ResponseContext,
    *,
    status: ResponseStatus,
    output: list[dict[str, Any]],
    usage: Mapping[str, int] | None = None,
    error: Mapping[str, Any] | None = None,
    completed_at: float | None = None,
) -> dict[str, Any]:
    failed = error is not None and status == ResponseStatus.FAILED
    body: dict[str, Any] = {
        "id": context.id,
        "object": "response",
        "created_at": int(context.created_at),  # whole seconds, as the specification types it
        "status": status,
        "model": context.model,
        "output": output,
        "usage": usage_block(usage) if usage is not None else None,
        "error": response_error(error) if error is not None and failed else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == ResponseStatus.INCOMPLETE else None,
        **_echo(context.request),
        **sampling_used(context.canonical, context.request),
        # Required, and null but when completed (then now, unless the job's end is known).
        "completed_at": int(completed_at if completed_at is not None else time.time())
        if status == ResponseStatus.COMPLETED
        else None,
    }
    extension: dict[str, Any] = {}
    if dropped := context.hosted:
        extension["dropped_tools"] = dropped
    if error is not None and failed:
        extension["error"] = {k: error.get(k) for k in ("status", "type", "code", "param")}
    if extension:
        body["mlxq"] = extension
    return body


def response_object(
    result: Mapping[str, Any],
    *,
    model: str,
    response_id: str,
    created_at: float,
    request: ResponsesRequest,
    status: ResponseStatus | None = None,
    hosted_dropped: Iterable[str] = (),
    completed_at: float | None = None,
) -> dict[str, Any]:
    """`ResponseContext.render` of a response named by its parts."""
    context = ResponseContext(
        request=request, model=model, id=response_id, created_at=created_at, dropped=tuple(hosted_dropped)
    )
    return context.render(result, status, completed_at=completed_at)


def unstored(
    model: str,
    canonical: Mapping[str, Any] | None = None,
    *,
    response_id: str | None = None,
    created_at: int | None = None,
) -> ResponseContext:
    """The context of a response nothing stored and no request but its model names (a job's or a batch line's, a
    stream writer's made from the model alone), and the canonical request it ran when known: a fresh id, made now,
    unless its id and time are given (a job's answer, the same however often it is read)."""
    return ResponseContext(
        request=ResponsesRequest.model_validate({"model": model}),
        model=model,
        id=response_id or new_response_id(),
        created_at=int(time.time()) if created_at is None else created_at,
        canonical=canonical,
    )


def failed_response(
    error: Mapping[str, Any],
    *,
    model: str,
    response_id: str,
    created_at: float,
    request: ResponsesRequest,
    hosted_dropped: Iterable[str] = (),
) -> dict[str, Any]:
    """`ResponseContext.render_failed` of a response named by its parts."""
    context = ResponseContext(
        request=request, model=model, id=response_id, created_at=created_at, dropped=tuple(hosted_dropped)
    )
    return context.render_failed(error)


# -- the event stream ----------------------------------------------------------------------------------


class ResponseStreamWriter:
    """The Responses dialect's stream writer (api.pipeline.relay.StreamWriter): job events as the Responses event stream for
    one response, `response.created` and `response.in_progress` first, a message item opened at the first text,
    one item per tool call, then the terminal event carrying the whole response (`response.failed` for a failed
    job, or an APIError once streaming). Each event has a `sequence_number`, from 0; keepalives are SSE comments
    with none (a late reader's numbering must not depend on how long anyone waited).

    Deterministic (module doc): given the same job events it writes the same events, so a late reader made with
    `starting_after=N` (or after `start_after(N)`) regenerates them and is handed only those numbered after N.
    """

    def __init__(
        self,
        *,
        model: str,
        response_id: str,
        created_at: float,
        request: ResponsesRequest,
        hosted_dropped: Iterable[str] = (),
        starting_after: int | None = None,
        canonical: Mapping[str, Any] | None = None,
        completed_at: float | None = None,
    ) -> None:
        self.context = ResponseContext(
            request=request,
            model=model,
            id=response_id,
            created_at=created_at,
            dropped=tuple(hosted_dropped),
            canonical=canonical,
        )
        self.completed_at = completed_at
        self.response_id = response_id
        self.kinds = ToolKinds(request)
        self.skip_through = starting_after if starting_after is not None else -1
        self.sequence = 0  # the next event's number
        self.output: list[dict[str, Any]] = []  # the items so far, each as it is now
        self.text = ""  # the text streamed into the open message
        self.logprobs: list[dict[str, Any]] = []
        self.message_index: int | None = None  # the open message's output index
        self.calls_sent = False

    def start_after(self, sequence_number: int) -> None:
        """Hand out only the events numbered after `sequence_number` (the earlier ones are still counted)."""
        self.skip_through = sequence_number

    def _emit(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        number, self.sequence = self.sequence, self.sequence + 1
        # The terminal event always goes out: a reader resuming at or past it (`starting_after` beyond the last
        # event) still gets a stream that ends, with the final response, rather than an empty one.
        if number <= self.skip_through and payload["type"] not in TERMINAL_EVENT_TYPES:
            return []
        return [{"type": payload["type"], "sequence_number": number, **payload}]

    def snapshot(
        self,
        status: ResponseStatus,
        *,
        usage: Mapping[str, int] | None = None,
        error: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response as it stands, with `status` (a copy: later events do not change it)."""
        output = copy.deepcopy(self.output)
        return _response(
            self.context, status=status, output=output, usage=usage, error=error, completed_at=self.completed_at
        )

    def start(self, started: Event | None = None) -> list[dict[str, Any]]:
        """`response.created` and `response.in_progress`, both in progress with no output."""
        return [
            *self._emit({"type": "response.created", "response": self.snapshot(ResponseStatus.IN_PROGRESS)}),
            *self._emit({"type": "response.in_progress", "response": self.snapshot(ResponseStatus.IN_PROGRESS)}),
        ]

    def _open_message(self) -> list[dict[str, Any]]:
        index = len(self.output)
        self.message_index, self.text, self.logprobs = index, "", []
        item = message_item("", response_id=self.response_id, output_index=index, status=ResponseStatus.IN_PROGRESS)
        item["content"] = []
        self.output.append(item)
        return [
            *self._emit({"type": "response.output_item.added", "output_index": index, "item": copy.deepcopy(item)}),
            *self._emit(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": _text_part("", None),
                }
            ),
        ]

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Text: the message item opened at the first non-empty text, then `response.output_text.delta`."""
        if not text:
            return []
        events = self._open_message() if self.message_index is None else []
        assert self.message_index is not None
        self.text += text
        self.logprobs += logprobs or []
        events += self._emit(
            {
                "type": "response.output_text.delta",
                "item_id": self.output[self.message_index]["id"],
                "output_index": self.message_index,
                "content_index": 0,
                "delta": text,
                "logprobs": list(logprobs or []),
            }
        )
        return events

    def _close_message(self, status: ResponseStatus) -> list[dict[str, Any]]:
        """The open message's text done, its part done, the item done with `status`."""
        index = self.message_index
        if index is None:
            return []
        self.message_index = None
        item = message_item(
            self.text, response_id=self.response_id, output_index=index, status=status, logprobs=self.logprobs
        )
        self.output[index] = item
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            *self._emit(
                {"type": "response.output_text.done", **where, "text": self.text, "logprobs": list(self.logprobs)}
            ),
            *self._emit({"type": "response.content_part.done", **where, "part": copy.deepcopy(item["content"][0])}),
            *self._emit({"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)}),
        ]

    def _call(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One call: its item added (empty), its whole arguments (or input) as one delta, done, the item done."""
        index = len(self.output)
        item = call_item(call, response_id=self.response_id, output_index=index, kinds=self.kinds)
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "custom_tool_call":
            added = {**item, "input": ""}
            streamed = [
                {"type": "response.custom_tool_call_input.delta", **where, "delta": item["input"]},
                {"type": "response.custom_tool_call_input.done", **where, "input": item["input"]},
            ]
        else:
            added = {**item, "arguments": "", "status": ResponseStatus.IN_PROGRESS}
            streamed = [
                {"type": "response.function_call_arguments.delta", **where, "delta": item["arguments"]},
                {"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]},
            ]
        events = self._emit({"type": "response.output_item.added", "output_index": index, "item": added})
        for payload in streamed:
            events += self._emit(payload)
        return events + self._emit({"type": "response.output_item.done", "output_index": index, "item": dict(item)})

    def tool_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The parsed calls (the job sends them once, at the end): the message closed first, then each call."""
        events = self._close_message(ResponseStatus.COMPLETED)
        self.calls_sent = self.calls_sent or bool(calls)
        for call in calls:
            events += self._call(call)
        return events

    def missed(self, text: str) -> list[dict[str, Any]]:
        """The text a joined job's stream missed, into the message (none once calls went out: the message is
        output 0, before them)."""
        return [] if self.calls_sent else self.delta(text)

    def finish(self, result: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The end: the message closed, calls not sent yet, then `response.completed` (or `.incomplete` when cut
        by max_output_tokens)."""
        status = final_status(result)
        events = self._close_message(item_status(status))
        if result.get("tool_calls") and not self.calls_sent:
            events += self.tool_calls(result["tool_calls"])
        response = self.snapshot(status, usage=result.get("usage") or {})
        return events + self._emit({"type": TERMINAL_EVENTS[status], "response": response})

    def error(self, error: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A failed job: `response.failed` with the error, and the output so far (an open message incomplete); a
        cancelled one ends as `cancelled` (TERMINAL_EVENTS)."""
        if self.message_index is not None:
            index, self.message_index = self.message_index, None
            self.output[index] = message_item(
                self.text,
                response_id=self.response_id,
                output_index=index,
                status=ResponseStatus.INCOMPLETE,
                logprobs=self.logprobs,
            )
        status = ResponseStatus.CANCELLED if is_cancelled(error) else ResponseStatus.FAILED
        response = self.snapshot(status, error=error)
        return self._emit({"type": TERMINAL_EVENTS[status], "response": response})

    def keepalive(self, event: Event) -> ServerSentEvent:
        return keepalive_comment(event)

    def frame(self, payload: dict[str, Any]) -> ServerSentEvent:
        return sse(payload)

    def close(self) -> None:
        return None
