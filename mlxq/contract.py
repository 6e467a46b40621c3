"""The task contract between api and worker: task names and the shape of results and errors.

The api sends tasks by name (it never imports the worker); a task carries only the job id,
and the worker reads the canonical request from the job row.
"""

from __future__ import annotations

from typing import Any, Required, TypedDict

from mlxq.request import PRIORITIES, JobKind, Priority
from mlxq.states import FinishReason

__all__ = ["PRIORITIES", "JobKind", "Priority"]

GENERATE_TASK = "mlxq.generate"

# JobKind ("count": a chat request's prompt tokens through the model's template, Anthropic's count_tokens, no
# generation) and Priority live with the request they describe (mlxq.request).


class Usage(TypedDict, total=False):
    prompt_tokens: Required[int]
    completion_tokens: Required[int]
    cached_tokens: Required[int]
    # Speculative drafts taken from the client's `prediction` (OpenAI's Predicted Outputs) and accepted or not.
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class GenerationResult(TypedDict, total=False):
    """What the worker produces; the api renders it in the client's dialect."""

    text: str
    finish_reason: FinishReason
    stop_sequence: str  # the client's stop string that ended it, when one did
    usage: Usage
    tool_calls: list[dict[str, Any]]
    logprobs: list[dict[str, Any]]  # each generated token's, when the request asked for them


class JobError(TypedDict):
    status: int  # the HTTP status the api should answer with
    type: str  # invalid_request_error | server_error | ...
    message: str
    code: str | None
    param: str | None


def job_error(
    status: int, message: str, *, type: str = "server_error", code: str | None = None, param: str | None = None
) -> JobError:
    return JobError(status=status, type=type, message=message, code=code, param=param)


def context_exceeded(prompt_tokens: int, context: int, *, at_least: bool = False) -> str:
    """The message of a prompt over the context, worded for both kinds of client: OpenAI's ("maximum context length
    is N tokens"), and Anthropic's ("prompt is too long: N tokens > M maximum"), which Claude Code matches to offer
    to compact the conversation. `at_least`: the count is a lower bound (the api's, without a tokenizer)."""
    count = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
    return (
        f"This model's maximum context length is {context} tokens; the prompt has {count} tokens "
        f"(prompt is too long: {prompt_tokens} tokens > {context} maximum)."
    )


# The counter the api bumps to make every worker drop its prefix cache (DELETE /v1/cache/prefix); each
# worker compares it with the value it last saw, at every heartbeat.
PREFIX_CACHE_CLEARS = "prefix_cache_clears"

CANCELLED = job_error(499, "the job was cancelled", type="cancelled", code="cancelled")
