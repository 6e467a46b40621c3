"""What the api refuses up front, beyond the shapes the request models check (api.protocol).

Everything here runs before a job is created: a refused request never reaches the queue. The
request models say what a valid value looks like; these checks say what this server cannot honour
(logit_bias, best_of, audio), what the grammar engine cannot compile (a schema feature it lacks), what the settings bound (messages, tools, stop
strings, prompts), what depends on several fields at once (tool_choice against tools) and what
depends on the model the workers serve (top_k and token ids against the vocabulary).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from api.errors import APIError
from api.json_values import json_value_problem
from api.model_info import ModelInfo
from mlxq.grammar import Constraint, constraint_for, problem
from mlxq.settings import Settings


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
    if len(set(names)) < len(names):  # a call names its tool: two of one name make it ambiguous
        twice = next(n for n in names if names.count(n) > 1)
        raise APIError(400, f"Two tools are named `{twice}`; tool names must be unique.", param="tools")
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
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    if body.audio is not None or (body.modalities and "audio" in body.modalities):
        raise APIError(
            400,
            "This model is text-only: audio output is not supported.",
            param="audio" if body.audio is not None else "modalities",
        )


# A grammar that takes longer than this to check is refused as too complex (llguidance's own limits bound the
# work too; this bounds the wait).
GRAMMAR_CHECK_S = 5.0


# Grammars whose check ran past GRAMMAR_CHECK_S (by key, oldest first): the thread that checks one cannot be
# stopped, so a repeat is refused without starting another.
_TOO_SLOW: dict[str, None] = {}


@functools.lru_cache(maxsize=256)
def _grammar_problem(constraint: Constraint) -> str | None:
    return problem(constraint)  # by the constraint's grammar: a batch's one schema is checked once


async def check_grammar(canonical: dict[str, Any]) -> None:
    """Refuse an answer constraint (a JSON schema, a forced tool's parameters) the engine cannot compile, naming
    the feature, so the worker never gets a request it would refuse."""
    try:
        constraint = constraint_for(canonical)
    except ValueError as exc:  # llguidance refuses the schema's JSON outright
        raise APIError(400, f"Invalid JSON schema: {exc}", param="response_format") from None
    if constraint is None or not constraint.required:
        return  # nothing to enforce, or best effort: the worker leaves the answer free if it cannot compile
    too_slow = f"it took longer than {GRAMMAR_CHECK_S:g} s to compile (too complex)"
    if constraint.key in _TOO_SLOW:  # refused at once: a repeat must not start another compile that runs on
        why: str | None = too_slow
    else:
        try:
            why = await asyncio.wait_for(asyncio.to_thread(_grammar_problem, constraint), GRAMMAR_CHECK_S)
        except TimeoutError:
            _TOO_SLOW[constraint.key] = None
            while len(_TOO_SLOW) > 256:
                _TOO_SLOW.pop(next(iter(_TOO_SLOW)))
            why = too_slow
    if why:
        raise APIError(
            400,
            f"The {constraint.param} schema cannot be enforced: {why}",
            param=constraint.param,
            code="invalid_schema",
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
    info = await model_info.get(body.model)  # the resolved model (api.prepare)
    vocab = (info or {}).get("vocab_size")
    if not isinstance(vocab, int):  # no worker has published yet: the worker checks these itself
        return
    if body.top_k and body.top_k > vocab:
        raise APIError(400, f"top_k must be at most the vocabulary size, {vocab}; got {body.top_k}.", param="top_k")
    if (high := max((max(tokens) for tokens in ids), default=-1)) >= vocab:
        raise APIError(
            400, f"Prompt token ids must be in [0, {vocab}); got {high}.", param="prompt", code="invalid_token_id"
        )
