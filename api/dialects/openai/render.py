"""OpenAI's answers: a worker result as `chat.completion` / `text_completion`, job events as chunk streams."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

from sse_starlette import ServerSentEvent

from api.dialects.openai.protocol import ServedTier
from api.errors import openai_error_body
from api.pipeline.relay import keepalive_comment
from mlxq.events import Event
from mlxq.grammar import tool_choice_of
from mlxq.request import Request
from mlxq.states import FinishReason

DONE = ServerSentEvent(data="[DONE]", sep="\n")


def sse(payload: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(payload, ensure_ascii=False), sep="\n")


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_block(usage: dict[str, int]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
        "completion_tokens_details": {
            "accepted_prediction_tokens": usage.get("accepted_prediction_tokens", 0),
            "rejected_prediction_tokens": usage.get("rejected_prediction_tokens", 0),
        },
    }


def chat_completion(result: dict[str, Any], *, model: str, service_tier: ServedTier = "default") -> dict[str, Any]:
    """Render a worker result as an OpenAI `chat.completion` object (fresh id on every answer)."""
    message: dict[str, Any] = {"role": "assistant", "content": result.get("text", "")}
    if result.get("tool_calls"):
        message["tool_calls"] = result["tool_calls"]
        message["content"] = message["content"] or None
    logprobs = {"content": result["logprobs"]} if result.get("logprobs") is not None else None
    return {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": result.get("finish_reason", FinishReason.STOP),
            }
        ],
        "usage": usage_block(result.get("usage", {})),
        "service_tier": service_tier,
    }


def text_completion(results: list[dict[str, Any]], *, model: str, prefixes: list[str] | None = None) -> dict[str, Any]:
    """Render worker results (one per prompt) as an OpenAI `text_completion` object."""
    usage = {
        "prompt_tokens": sum(r.get("usage", {}).get("prompt_tokens", 0) for r in results),
        "completion_tokens": sum(r.get("usage", {}).get("completion_tokens", 0) for r in results),
        "cached_tokens": sum(r.get("usage", {}).get("cached_tokens", 0) for r in results),
    }
    return {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": (prefixes[i] if prefixes else "") + r.get("text", ""),
                "logprobs": None,
                "finish_reason": r.get("finish_reason", FinishReason.STOP),
            }
            for i, r in enumerate(results)
        ],
        "usage": usage_block(usage),
    }


def model_list(models: list[str]) -> dict[str, Any]:
    """The served models, in OpenAI's list and Anthropic's at once (each client reads its own fields)."""
    data = [
        {
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": "mlxq",
            "type": "model",
            "display_name": model,
            "created_at": "1970-01-01T00:00:00Z",
        }
        for model in models
    ]
    return {"object": "list", "data": data, "has_more": False, "first_id": models[0], "last_id": models[-1]}


def forces_a_call(request: Request) -> bool:
    """Whether the canonical chat `request`'s answer is a tool call from its start (tool_choice "required" or a named
    function, with tools offered)."""
    tools, _, mode = tool_choice_of({"tools": request.tools, "tool_choice": request.tool_choice})
    return bool(tools) and mode == "required"


class ChunkWriter:
    """OpenAI's stream writer (api.pipeline.relay.StreamWriter): job events as OpenAI chunks for one stream, one id and
    `created` throughout; `[DONE]` closes it, an error is an error object. `prefix`: what a completion's `echo`
    puts before the text; `forced_call`: the answer is a tool call (`forces_a_call`); `service_tier`: what a chat's
    chunks say served it."""

    def __init__(
        self,
        *,
        kind: str,
        model: str,
        stream_options: Mapping[str, Any] | None = None,
        prefix: str = "",
        forced_call: bool = False,
        service_tier: ServedTier = "default",
    ) -> None:
        self.kind, self.model, self.prefix, self.forced_call = kind, model, prefix, forced_call
        self.service_tier = service_tier
        self.include_usage = bool((stream_options or {}).get("include_usage"))
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _head(self) -> dict[str, Any]:
        """What every chunk of the stream opens with."""
        head: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        if self.kind == "chat":
            head["service_tier"] = self.service_tier
        return head

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._head(), "choices": [{"index": 0, **choice}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def start(self, started: Event | None = None) -> list[dict[str, Any]]:
        chunks = []
        if self.kind == "chat":
            # OpenAI opens a tool call's message with no content (null), a text answer's with "": clients that
            # tell the two apart by it see a forced call as the call it is.
            content = None if self.forced_call else ""
            chunks.append(
                self._chunk(
                    {"delta": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": None}
                )
            )
        if self.prefix:
            chunks += self.delta(self.prefix)
        return chunks

    def delta(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        if self.kind == "chat":
            choice = {"delta": {"content": text}, "logprobs": {"content": logprobs} if logprobs else None}
            return [self._chunk({**choice, "finish_reason": None})]
        return [self._chunk({"text": text, "logprobs": None, "finish_reason": None})]

    def missed(self, text: str) -> list[dict[str, Any]]:
        return self.delta(text)

    def tool_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The first fragment of each index carries id, type and name; the next the arguments.
        chunks = []
        for i, call in enumerate(calls):
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            body = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, body):
                chunks.append(self._chunk({"delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}))
        return chunks

    def finish(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        reason = result.get("finish_reason", FinishReason.STOP)
        if self.kind == "chat":
            chunks = [self._chunk({"delta": {}, "logprobs": None, "finish_reason": reason})]
        else:
            chunks = [self._chunk({"text": "", "logprobs": None, "finish_reason": reason})]
        if self.include_usage:
            chunks.append({**self._head(), "choices": [], "usage": usage_block(result.get("usage", {}))})
        return chunks

    def error(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            openai_error_body(
                error.get("message", "generation failed"),
                type=error.get("type", "server_error"),
                code=error.get("code"),
                param=error.get("param"),
            )
        ]

    def keepalive(self, event: Event) -> ServerSentEvent:
        return keepalive_comment(event)

    def frame(self, payload: dict[str, Any]) -> ServerSentEvent:
        return sse(payload)

    def close(self) -> ServerSentEvent:
        return DONE
