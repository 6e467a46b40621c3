"""Canonical requests and their cache keys: the one place that decides what makes two requests equal.

The canonical form is also what the worker executes, so the key always describes
exactly the computation that produced a cached answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from mlxq.request import OUTPUT_FIELDS, Request

__all__ = ["OUTPUT_FIELDS"]

# Bump when the canonical form changes, or what an answer to the same request is (4: tool calls and JSON decoded
# under a grammar): old cache entries then simply stop matching.
KEY_VERSION = 4


# Claude Code puts a per-request billing line at the top of its system prompt; left in, it
# would defeat both the response cache and the prefix cache without changing the answer.
_VOLATILE_LINE = re.compile(r"^x-anthropic-billing-header:[^\n]*(\n|$)", re.MULTILINE)


def strip_volatile(text: str) -> str:
    return _VOLATILE_LINE.sub("", text)


def _content_text(content: Any) -> Any:
    """Flatten OpenAI content parts to one string when they are all text; keep anything else."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    return content


def _arguments(arguments: Any) -> Any:
    """A call's arguments as one JSON text, however the client formatted it (or sent an object)."""
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return arguments


def _renumber_calls(messages: list[dict[str, Any]]) -> None:
    """Tool-call ids by position (call_0, call_1, ...), results pointing at them likewise, arguments in one
    JSON form: ids are minted per answer and per dialect (call_… here, toolu_… for Anthropic clients), so
    the same conversation would otherwise never hash equal twice."""
    ids: dict[Any, str] = {}
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            renamed = []
            for call in calls:
                if isinstance(call, dict):
                    new_id = f"call_{len(ids)}"
                    ids[call.get("id", new_id)] = new_id
                    call = {**call, "id": new_id}
                    if isinstance(call.get("function"), dict) and "arguments" in call["function"]:
                        call["function"] = {**call["function"], "arguments": _arguments(call["function"]["arguments"])}
                renamed.append(call)
            message["tool_calls"] = renamed
        if message.get("role") == "tool" and message.get("tool_call_id") in ids:
            message["tool_call_id"] = ids[message["tool_call_id"]]


def normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if v is not None}
    if "content" in out:
        out["content"] = _content_text(out["content"])
        if isinstance(out["content"], str) and out.get("role") in ("system", "developer"):
            out["content"] = strip_volatile(out["content"])
    if out.get("role") == "developer":
        out["role"] = "system"
    return out


def canonical_chat(body: dict[str, Any], *, default_temperature: float, default_max_tokens: int) -> dict[str, Any]:
    """The canonical chat request: defaults filled, aliases resolved, irrelevant fields dropped."""
    messages = [normalize_message(m) for m in body["messages"]]
    _renumber_calls(messages)
    canon = {"model": body["model"], "messages": messages}
    return _with_output_fields(canon, body, default_temperature, default_max_tokens)


def canonical_completion(
    body: dict[str, Any], prompt: str | list[int], *, default_temperature: float, default_max_tokens: int
) -> dict[str, Any]:
    """The canonical legacy completion request for one prompt (text or token ids)."""
    return _with_output_fields(
        {"model": body["model"], "prompt": prompt}, body, default_temperature, default_max_tokens
    )


def _with_output_fields(
    canon: dict[str, Any], body: dict[str, Any], default_temperature: float, default_max_tokens: int
) -> dict[str, Any]:
    for field in OUTPUT_FIELDS:
        if body.get(field) is not None:
            # + 0.0 turns -0.0 (which `ge=0` admits) into 0.0: equal numbers must hash equal
            canon[field] = body[field] + 0.0 if isinstance(body[field], float) else body[field]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens
    canon["max_tokens"] = int(max_tokens)
    temperature = body["temperature"] if body.get("temperature") is not None else default_temperature
    canon["temperature"] = float(temperature) + 0.0
    if isinstance(canon.get("stop"), str):
        canon["stop"] = [canon["stop"]]
    if canon.get("stop") == []:
        del canon["stop"]
    if canon.get("n") == 1:
        del canon["n"]
    if canon.get("top_p") == 1.0:
        del canon["top_p"]
    if canon.get("logprobs") is False:
        del canon["logprobs"]
    if canon.get("truncation") == "disabled":
        del canon["truncation"]
    if not canon.get("tools"):
        canon.pop("tools", None)
        canon.pop("tool_choice", None)
    return canon


def tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    """The function names a request offers (OpenAI `{"function": {...}}` or a bare function object)."""
    names = []
    for tool in tools or []:
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


def _wire(request: Request | dict[str, Any]) -> dict[str, Any]:
    return request.wire() if isinstance(request, Request) else request


def canonical_request(
    kind: str, body: dict[str, Any], *, default_temperature: float, default_max_tokens: int
) -> Request:
    """The typed canonical request of a neutral chat body (kind "chat" or "count") or a one-prompt completion body."""
    if kind == "completion":
        canonical = canonical_completion(
            body, body["prompt"], default_temperature=default_temperature, default_max_tokens=default_max_tokens
        )
    else:
        canonical = canonical_chat(body, default_temperature=default_temperature, default_max_tokens=default_max_tokens)
    return Request.model_validate(canonical)


def request_key(kind: str, canonical: Request | dict[str, Any], *, weights: str, namespace: str = "") -> str:
    """sha256 of the versioned canonical JSON (sorted keys, no whitespace): equal in every process.

    `weights` is the model's fingerprint (mlxq.weights): an answer is only valid for the weights that
    made it, whatever the model is called. `namespace` is the API key's own cache (MLXQ_CACHE_SCOPE=key):
    a hit must not tell one key what another asked.
    """
    salt = {"v": KEY_VERSION, "kind": kind, "weights": weights, "request": _wire(canonical)}
    if namespace:
        salt["namespace"] = namespace
    blob = json.dumps(
        salt,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def is_deterministic(canonical: Request | dict[str, Any]) -> bool:
    canonical = _wire(canonical)
    return canonical.get("temperature", 1.0) == 0 or canonical.get("seed") is not None


# Hex digits of a prefix hash: 64 bits, so two prefixes of one worker's index never meet by chance.
PREFIX_HASH_CHARS = 16


def cache_partition(namespace: str, salt: str | None) -> str:
    """The prefix KV cache's partition of a request: what a prompt may be served from and what it may serve. Its
    response-cache namespace (the API key's, or "" with MLXQ_CACHE_SCOPE=global or keys off) with its `cache_salt`;
    "" (the one shared partition) when it has neither, so a single user's cache and routing are as without
    partitions. The worker keys its cache entries by it (worker.prefix_cache) and seeds the routing hashes it
    publishes with it (`prefix_hashes`); the api computes the same to route (mlxq.delivery)."""
    if not namespace and not salt:
        return ""
    blob = json.dumps([namespace, salt or ""], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:PREFIX_HASH_CHARS]


def prefix_hashes(kind: str, canonical: Request | dict[str, Any], *, partition: str = "") -> list[str]:
    """One hash per message boundary of a canonical chat request: of its model, tools and `messages[:k]` for
    k = 1..n, seeded by its prefix-cache `partition` (`cache_partition`: another key's copy of a prompt hashes
    apart, as its cache entries are apart). A worker publishes those of the requests whose KV its prefix cache
    holds; the api matches a new request's against them (mlxq.delivery), with no tokenizer: a later turn of a
    conversation repeats every earlier boundary. A completion's prompt (one string) has one. Incremental: linear
    in the request's size."""
    canonical = _wire(canonical)
    if kind == "completion":
        parts = [canonical.get("model"), canonical.get("prompt"), *([partition] if partition else [])]
        blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
        return [hashlib.sha256(blob.encode()).hexdigest()[:PREFIX_HASH_CHARS]]
    if kind != "chat":
        return []
    head = {"model": canonical.get("model"), "tools": canonical.get("tools") or []}
    if partition:
        head["partition"] = partition
    running = hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    out = []
    for message in canonical.get("messages") or []:
        running.update(
            b"\x1e" + json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        )
        out.append(running.copy().hexdigest()[:PREFIX_HASH_CHARS])
    return out
