"""What the api refuses up front, beyond the shapes the request models check (api.protocol).

Everything here runs before a job is created: a refused request never reaches the queue. The
request models say what a valid value looks like; these checks say what this server cannot honour
(response_format, logit_bias, best_of, audio), what the settings bound (messages, tools, stop
strings, prompts), what depends on several fields at once (tool_choice against tools) and what
depends on the model the workers serve (top_k and token ids against the vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from api.errors import APIError
from api.model_info import ModelInfo
from mlxq.settings import Settings

# Deeper than any real request (a tool schema nests a few levels); past it the canonical form's
# json.dumps could exhaust the recursion limit.
MAX_DEPTH = 64


def _dotted(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path)


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _keys_ok(mapping: dict[Any, Any]) -> bool:
    return all(_utf8_ok(k) for k in mapping if type(k) is str)


def _not_unicode(path: list[str | int], *, key: bool = False) -> tuple[str, str | None]:
    where = _dotted(path)
    what = f"Invalid key in '{where or 'body'}'" if key else f"Invalid value for '{where}'"
    return f"{what}: the string is not valid Unicode (it holds a lone surrogate such as \\ud800).", where or None


def json_value_problem(body: Any) -> tuple[str, str | None] | None:
    """(message, param) for the first lone surrogate (in a string or a key), NaN or infinity, or nesting
    past MAX_DEPTH anywhere in a parsed body; None when there is none.

    Hand-written rather than a pydantic validator: JSON `\\ud800` escapes parse into Python strings that
    every `str` field accepts but that cannot be encoded (the cache key, the database and the worker all
    encode them), and they can sit in any field, in untyped dicts (tool schemas) and in unknown extras;
    Python's parser also accepts NaN, which is not JSON. One walk over the whole body covers them all.
    It runs on every request, on the event loop: iterative (a deep body cannot exhaust the stack), in
    document order, and a path is only built for a problem (16 MB of token ids take ~0.5 s, like parsing).
    """
    if not isinstance(body, dict | list):
        return None
    if isinstance(body, dict) and not _keys_ok(body):
        return _not_unicode([], key=True)
    keys: list[str | int] = []  # the path to the container on top of `walking`
    walking: list[Iterator[tuple[Any, Any]]] = [iter(body.items()) if isinstance(body, dict) else enumerate(body)]
    while walking:
        if len(walking) > MAX_DEPTH:
            return f"The request body nests deeper than {MAX_DEPTH} levels.", _dotted(keys)
        for key, value in walking[-1]:
            kind = type(value)
            if kind is str:
                if not _utf8_ok(value):
                    return _not_unicode([*keys, key])
            elif kind is float:
                if not math.isfinite(value):
                    where = _dotted([*keys, key])
                    return f"Invalid value for '{where}': NaN and Infinity are not JSON numbers.", where
            elif kind is dict:
                if not _keys_ok(value):
                    return _not_unicode([*keys, key], key=True)
                keys.append(key)
                walking.append(iter(value.items()))
                break
            elif kind is list:
                keys.append(key)
                walking.append(enumerate(value))
                break
        else:  # this container is done: back to its parent, where its iterator left off
            walking.pop()
            if keys:
                keys.pop()
    return None


def check_json_values(body: dict[str, Any]) -> None:
    """Raise json_value_problem's answer as a 400."""
    if problem := json_value_problem(body):
        message, param = problem
        raise APIError(400, message, param=param)


def _at_most(count: int, limit: int, what: str, param: str) -> None:
    if count > limit:
        raise APIError(400, f"Too many {what}: {count}; at most {limit} are accepted.", param=param)


def _check_common(body: GenerationRequest, settings: Settings) -> None:
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported.", param="logit_bias")
    if isinstance(body.stop, list):
        _at_most(len(body.stop), settings.max_stop, "stop sequences", "stop")


def _check_chat(body: ChatCompletionRequest, settings: Settings) -> None:
    _at_most(len(body.messages), settings.max_messages, "messages", "messages")
    tools = body.tools or []
    _at_most(len(tools), settings.max_tools, "tools", "tools")
    names = [t.function.name for t in tools]
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        if not tools:
            raise APIError(400, "tool_choice names a function, but no tools are given.", param="tool_choice")
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function `{choice.function.name}`, which is not among "
                f"the tools: {', '.join(names)}.",
                param="tool_choice",
            )
    elif choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs tools.", param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400,
            f"response_format `{body.response_format.type}` is not supported yet; only `text` is.",
            param="response_format",
        )
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    if body.audio is not None or (body.modalities and "audio" in body.modalities):
        raise APIError(
            400,
            "This model is text-only: audio output is not supported.",
            param="audio" if body.audio is not None else "modalities",
        )


def prompt_list(prompt: str | list[Any]) -> list[str | list[int]]:
    """The prompts of a completions request: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _check_completion(body: CompletionRequest, settings: Settings) -> list[list[int]]:
    """Checks that need no model; returns the token-id prompts for the vocabulary check."""
    if body.best_of not in (None, 1):
        raise APIError(400, "Only best_of=1 is supported.", param="best_of")
    prompts = prompt_list(body.prompt)
    _at_most(len(prompts), settings.max_prompts, "prompts", "prompt")
    ids = [p for p in prompts if isinstance(p, list)]
    for tokens in ids:
        if (low := min(tokens, default=0)) < 0:
            raise APIError(
                400, f"Prompt token ids must not be negative; got {low}.", param="prompt", code="invalid_token_id"
            )
    return ids


async def check_generation(body: GenerationRequest, *, settings: Settings, model_info: ModelInfo) -> None:
    """Refuse what the request models cannot see (module doc); the model is read only when needed."""
    _check_common(body, settings)
    ids: list[list[int]] = []
    if isinstance(body, ChatCompletionRequest):
        _check_chat(body, settings)
    elif isinstance(body, CompletionRequest):
        ids = _check_completion(body, settings)
    if not (body.top_k or ids):
        return
    info = await model_info.get()
    vocab = (info or {}).get("vocab_size")
    if not isinstance(vocab, int):  # no worker has published yet: the worker checks these itself
        return
    if body.top_k and body.top_k > vocab:
        raise APIError(400, f"top_k must be at most the vocabulary size, {vocab}; got {body.top_k}.", param="top_k")
    if (high := max((max(tokens) for tokens in ids), default=-1)) >= vocab:
        raise APIError(
            400, f"Prompt token ids must be in [0, {vocab}); got {high}.", param="prompt", code="invalid_token_id"
        )
