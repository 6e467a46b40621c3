"""What the api refuses up front, beyond the shapes each dialect's request models check, on the neutral request.

Everything here runs before a job is created: a refused request never reaches the queue. The
request models say what a valid value looks like (and each dialect's adapter refuses what only it can ask
for: OpenAI's logit_bias, best_of, audio); these checks say what this server cannot honour (n > 1), what the grammar engine cannot compile (a schema feature it lacks), what the settings bound (messages, tools, stop
strings, prompts), what depends on several fields at once (tool_choice against tools) and what
depends on the model the workers serve (top_k and token ids against the vocabulary).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from api.errors import APIError
from api.pipeline.json_values import json_value_problem
from api.pipeline.model_info import ModelInfo
from api.pipeline.terms import OPENAI_TERMS, Terms
from mlxq.grammar import Constraint, constraint_for, problem
from mlxq.request import JobKind, Request
from mlxq.settings import Settings


def check_json_values(body: dict[str, Any]) -> None:
    """Raise json_value_problem's answer as a 400."""
    if problem := json_value_problem(body):
        message, param = problem
        raise APIError(400, message, param=param)


def _at_most(count: int, limit: int, what: str, param: str) -> None:
    if count > limit:
        raise APIError(400, f"Too many {what}: {count}; at most {limit} are accepted.", param=param)


def _check_chat(request: Request, settings: Settings, terms: Terms) -> None:
    _at_most(len(request.messages or []), settings.max_messages, "messages", "messages")
    _at_most(len(request.tools or []), settings.max_tools, "tools", "tools")
    names = request.tool_names
    if len(set(names)) < len(names):  # a call names its tool: two of one name make it ambiguous
        twice = next(n for n in names if names.count(n) > 1)
        raise APIError(400, f"Two tools are named `{twice}`; tool names must be unique.", param="tools")
    choice = request.tool_choice
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name")
        if not names:
            raise APIError(400, f"tool_choice names a {terms.tool}, but no tools are given.", param="tool_choice")
        if named not in names:
            raise APIError(
                400,
                f"tool_choice names the {terms.tool} `{named}`, which is not among the tools: {', '.join(names)}.",
                param="tool_choice",
            )
    elif choice == "required" and not names:
        raise APIError(400, f"{terms.any_tool} needs tools.", param="tool_choice")
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")


# A grammar that takes longer than this to check is refused as too complex (llguidance's own limits bound the
# work too; this bounds the wait).
GRAMMAR_CHECK_S = 5.0


# Grammars whose check ran past GRAMMAR_CHECK_S (by key, oldest first): the thread that checks one cannot be
# stopped, so a repeat is refused without starting another.
_TOO_SLOW: dict[str, None] = {}


@functools.lru_cache(maxsize=256)
def _grammar_problem(constraint: Constraint) -> str | None:
    return problem(constraint)  # by the constraint's grammar: a batch's one schema is checked once


async def check_grammar(canonical: Request, terms: Terms = OPENAI_TERMS) -> None:
    """Refuse an answer constraint (a JSON schema, a forced tool's parameters) the engine cannot compile, naming
    the feature and the field (in `terms`), so the worker never gets a request it would refuse."""
    try:
        constraint = constraint_for(canonical.wire())
    except ValueError as exc:  # llguidance refuses the schema's JSON outright
        param = terms.param("response_format")
        raise APIError(400, f"Invalid JSON schema in {param}: {exc}", param=param) from None
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
        param = terms.param(constraint.param)
        raise APIError(400, f"The {param} schema cannot be enforced: {why}", param=param, code="invalid_schema")


async def check_generation(
    kind: JobKind,
    requests: list[Request],
    *,
    settings: Settings,
    model_info: ModelInfo,
    terms: Terms = OPENAI_TERMS,
) -> None:
    """Refuse what the request models cannot see (module doc), worded in the asking dialect's `terms`; the model is
    read only when needed."""
    first = requests[0]  # the prompts of one completions body share every other field
    if first.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n")
    stop = terms.param("stop")
    _at_most(len(first.stop or []), settings.max_stop, f"stop sequences in `{stop}`", stop)
    if kind == "completion":
        _at_most(len(requests), settings.max_prompts, "prompts", "prompt")
    else:
        _check_chat(first, settings, terms)
    ids = [r.prompt for r in requests if isinstance(r.prompt, list)]
    for tokens in ids:
        if (low := min(tokens, default=0)) < 0:
            raise APIError(
                400, f"Prompt token ids must not be negative; got {low}.", param="prompt", code="invalid_token_id"
            )
    if not (first.top_k or ids):
        return
    info = await model_info.get(first.model)  # the resolved model (api.pipeline.prepare)
    vocab = (info or {}).get("vocab_size")
    if not isinstance(vocab, int):  # no worker has published yet: the worker checks these itself
        return
    if first.top_k and first.top_k > vocab:
        raise APIError(400, f"top_k must be at most the vocabulary size, {vocab}; got {first.top_k}.", param="top_k")
    if (high := max((max(tokens) for tokens in ids), default=-1)) >= vocab:
        raise APIError(
            400, f"Prompt token ids must be in [0, {vocab}); got {high}.", param="prompt", code="invalid_token_id"
        )
