"""OpenAI's bodies as the neutral request (mlxq.request): chat is already in the neutral form; a legacy completion
is one request per prompt. What only OpenAI's bodies can ask for and this server cannot honour is refused here."""

from __future__ import annotations

from typing import Any

from api.dialects.openai.protocol import AssistantMessage, ChatCompletionRequest, CompletionRequest, ToolMessage
from api.errors import APIError
from api.pipeline.incoming import Incoming


def _refuse_common(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported.", param="logit_bias")


# OpenAI's deprecated forms of `tools` and `tool_choice`: unknown fields are otherwise let through and ignored, which
# would answer in text where the client asked for a call, and it would read that as the model choosing not to call.
LEGACY_FUNCTIONS = ("functions", "function_call")


def _refuse_legacy_functions(body: ChatCompletionRequest) -> None:
    for field in LEGACY_FUNCTIONS:
        if (body.model_extra or {}).get(field) is not None:
            raise APIError(
                400, f"`{field}` (deprecated by OpenAI) is not supported; send `tools` and `tool_choice`.", param=field
            )


def _unanswered(waiting: dict[str, None], at: int) -> None:
    """Refuse the calls of an assistant message still `waiting` for their tool messages when message `at` (or the
    end of the conversation) is not one, in OpenAI's words."""
    if waiting:
        raise APIError(
            400,
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(waiting)}",
            param=f"messages.{at}.role",
        )


def _check_tool_results(body: ChatCompletionRequest) -> None:
    """The conversation's tool calls and results pair up as OpenAI requires: an assistant message's calls have
    distinct ids, and the tool messages right after it answer each; a `tool` message answers a call an earlier
    assistant message made (by its `tool_call_id`). A call sent without an id (some clients leave it out) can be
    answered by any, and waits for none."""
    calls: set[str] = set()
    anonymous = False
    waiting: dict[str, None] = {}  # the ids of the last assistant message's calls no tool message answered yet
    for i, message in enumerate(body.messages):
        if isinstance(message, ToolMessage):
            if message.tool_call_id not in calls and not anonymous:
                raise APIError(
                    400,
                    f"Invalid parameter: the tool message's tool_call_id '{message.tool_call_id}' answers no tool "
                    "call of an earlier assistant message: a message with role 'tool' must answer a preceding "
                    "message's 'tool_calls'.",
                    param=f"messages.{i}.tool_call_id",
                )
            waiting.pop(message.tool_call_id, None)
            continue
        _unanswered(waiting, i)
        if isinstance(message, AssistantMessage):
            for j, call in enumerate(message.tool_calls or []):
                if call.id is None:
                    anonymous = True
                elif call.id in waiting:
                    raise APIError(
                        400,
                        f"Duplicate tool_call id '{call.id}' in an assistant message's 'tool_calls': each call "
                        "needs its own id, which its tool message answers.",
                        param=f"messages.{i}.tool_calls.{j}.id",
                    )
                else:
                    waiting[call.id] = None
            calls.update(waiting)
    _unanswered(waiting, len(body.messages) - 1)


def chat(body: ChatCompletionRequest) -> Incoming:
    _refuse_common(body)
    _refuse_legacy_functions(body)
    _check_tool_results(body)
    if body.audio is not None or (body.modalities and "audio" in body.modalities):
        raise APIError(
            400,
            "This model is text-only: audio output is not supported.",
            param="audio" if body.audio is not None else "modalities",
        )
    raw = body.model_dump(exclude_none=True)
    neutral = {**raw, "prediction": body.prediction.text} if body.prediction else raw
    return Incoming.of("chat", [neutral], raw, priority=body.priority, stream=body.stream, cache=body.cache)


def prompt_list(prompt: str | list[Any]) -> list[str | list[int]]:
    """The prompts of a completions request: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def completion(body: CompletionRequest) -> Incoming:
    _refuse_common(body)
    if body.best_of not in (None, 1):
        raise APIError(400, "Only best_of=1 is supported.", param="best_of")
    if body.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix")
    if body.logprobs:
        raise APIError(400, "logprobs is not supported on /v1/completions; use /v1/chat/completions.", param="logprobs")
    prompts = prompt_list(body.prompt)
    if not prompts or any(p == "" or p == [] for p in prompts):
        raise APIError(400, "prompt must not be empty.", param="prompt")
    if body.stream and len(prompts) > 1:
        raise APIError(400, "Streaming supports a single prompt.", param="prompt")
    raw = body.model_dump(exclude_none=True)
    # A completion's logprobs (an int) is refused above; OpenAI's legacy completions default to 16 tokens.
    # `prediction` is chat's (Predicted Outputs); an unknown field here, as OpenAI's completions ignore it.
    unshared = ("prompt", "logprobs", "prediction")
    shared = {k: v for k, v in raw.items() if k not in unshared} | {"max_tokens": body.max_tokens or 16}
    echo = [p if body.echo and isinstance(p, str) else "" for p in prompts]
    bodies = [{**shared, "prompt": p} for p in prompts]
    return Incoming.of(
        "completion", bodies, raw, priority=body.priority, stream=body.stream, cache=body.cache, echo=echo
    )
