"""OpenAI request and response schemas, in the order of the official spec.

Unknown fields are allowed (clients send many); non-spec extras are fenced below.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlxq.contract import Priority


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class GenerationRequest(OpenAIBaseModel):
    """The sampling and delivery fields chat and legacy completions share."""

    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    # "flex" (OpenAI's slower, cheaper tier) runs at low priority: after interactive requests.
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # -- non-spec extras -------------------------------------------------------------------
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    # LiteLLM-style per-request cache controls: {"no-cache": true, "no-store": true, "ttl": 60}.
    cache: dict[str, Any] | None = None

    @property
    def priority(self) -> Priority:
        return "low" if self.service_tier == "flex" else "interactive"


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_block(usage: dict[str, int]) -> dict[str, Any]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


def chat_completion(result: dict[str, Any], *, model: str) -> dict[str, Any]:
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
            {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": result.get("finish_reason", "stop")}
        ],
        "usage": usage_block(result.get("usage", {})),
    }


def text_completion(results: list[dict[str, Any]], *, model: str, prefixes: list[str] | None = None) -> dict[str, Any]:
    """Render worker results (one per prompt) as an OpenAI `text_completion` object."""
    usage = {"prompt_tokens": sum(r.get("usage", {}).get("prompt_tokens", 0) for r in results),
             "completion_tokens": sum(r.get("usage", {}).get("completion_tokens", 0) for r in results),
             "cached_tokens": sum(r.get("usage", {}).get("cached_tokens", 0) for r in results)}
    return {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": (prefixes[i] if prefixes else "") + r.get("text", ""), "logprobs": None,
             "finish_reason": r.get("finish_reason", "stop")}
            for i, r in enumerate(results)
        ],
        "usage": usage_block(usage),
    }


def model_list(model: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "mlxq"}]}
