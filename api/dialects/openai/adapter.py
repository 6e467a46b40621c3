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


def _check_tool_results(body: ChatCompletionRequest) -> None:
    """A `tool` message answers a call an earlier assistant message made (by its `tool_call_id`), as OpenAI
    requires; a call sent without an id (some clients leave it out) can be answered by any."""
    calls: set[str] = set()
    anonymous = False
    for i, message in enumerate(body.messages):
        if isinstance(message, AssistantMessage):
            for call in message.tool_calls or []:
                if call.id is None:
                    anonymous = True
                else:
                    calls.add(call.id)
        elif isinstance(message, ToolMessage) and message.tool_call_id not in calls and not anonymous:
            raise APIError(
                400,
                f"Invalid parameter: the tool message's tool_call_id '{message.tool_call_id}' answers no tool call "
                "of an earlier assistant message: a message with role 'tool' must answer a preceding message's "
                "'tool_calls'.",
                param=f"messages.{i}.tool_call_id",
            )


def chat(body: ChatCompletionRequest) -> Incoming:
    _refuse_common(body)
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
