"""From a request body to what admission takes: checked, then canonical (one per prompt).

The one place a generation request is accepted or refused, whoever sends it: the chat and completions
routes, a job submitted to `/v1/jobs`, a line of a batch. So a body a route would refuse is refused
everywhere with the same 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from api.dialects.responses.protocol import ResponsesRequest, to_openai
from api.errors import APIError, invalid_body
from api.model_info import resolve_model
from api.services import Services
from api.validation import check_generation, check_grammar, check_json_values, prompt_list
from mlxq.contract import JobKind, Priority
from mlxq.delivery import client_session
from mlxq.jobspec import CachePolicy, JobSpec
from mlxq.keys import canonical_chat, canonical_completion
from mlxq.settings import Settings

# The endpoints a job or a batch line may name, and what each takes: a Responses body is read as its chat
# twin (api.dialects.responses.protocol.to_openai), so it is one chat job like the others.
ENDPOINTS: dict[str, tuple[JobKind, type[GenerationRequest]]] = {
    "/v1/chat/completions": ("chat", ChatCompletionRequest),
    "/v1/completions": ("completion", CompletionRequest),
    "/v1/responses": ("chat", ChatCompletionRequest),
}


KIND_ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "count": "/v1/messages/count_tokens"}


@dataclass(frozen=True)
class Prepared:
    kind: JobKind
    canonicals: list[dict[str, Any]]  # one per prompt; a chat has one
    priority: Priority
    echo: list[str]  # per prompt: what `echo` puts before the completion
    body: GenerationRequest


def parse(endpoint: str, raw: Any) -> GenerationRequest:
    """Validate a raw body for `endpoint` as its route would."""
    if endpoint not in ENDPOINTS:
        raise APIError(400, f"Unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}.", param="endpoint")
    if endpoint == "/v1/responses":
        raw = _chat_twin(raw)
    try:
        return ENDPOINTS[endpoint][1].model_validate(raw)
    except ValidationError as exc:
        raise invalid_body(exc, raw) from None


def _chat_twin(raw: Any) -> dict[str, Any]:
    """A Responses body (of a job or a batch line: nothing stored to continue) as its chat twin."""
    try:
        body = ResponsesRequest.model_validate(raw)
    except ValidationError as exc:
        raise invalid_body(exc, raw) from None
    if body.previous_response_id is not None:
        raise APIError(
            400, "previous_response_id is not supported here; send the whole input.", param="previous_response_id"
        )
    return to_openai(body)


async def prepare(services: Services, body: GenerationRequest) -> Prepared:
    """What every generation endpoint refuses up front, before anything is enqueued (a body that cannot be
    encoded, another model, n > 1, what api.validation refuses), then the canonical requests."""
    settings = services.settings
    check_json_values(body.model_dump())  # first: the 404 below echoes `model`, which must be encodable
    # Canonical under the served name: the answer and its cache entry do not depend on the alias used.
    body = body.model_copy(update={"model": await resolve_model(settings, services.model_info, body.model)})
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", param="n")
    await check_generation(body, settings=settings, model_info=services.model_info)
    raw = body.model_dump(exclude_none=True)
    if isinstance(body, ChatCompletionRequest):
        canonical = canonical_chat(
            raw, default_temperature=settings.default_temperature, default_max_tokens=settings.default_max_tokens
        )
        await check_grammar(canonical)
        return Prepared("chat", _clamped([canonical], settings), body.priority, [""], body)
    assert isinstance(body, CompletionRequest)
    if body.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix")
    if body.logprobs:
        raise APIError(400, "logprobs is not supported on /v1/completions; use /v1/chat/completions.", param="logprobs")
    prompts = prompt_list(body.prompt)
    if not prompts or any(p == "" or p == [] for p in prompts):
        raise APIError(400, "prompt must not be empty.", param="prompt")
    if body.stream and len(prompts) > 1:
        raise APIError(400, "Streaming supports a single prompt.", param="prompt")
    raw.pop("logprobs", None)
    # OpenAI's legacy completions default to 16 tokens.
    canonicals = [
        canonical_completion(raw, p, default_temperature=settings.default_temperature, default_max_tokens=16)
        for p in prompts
    ]
    await check_grammar(canonicals[0])  # one response_format for every prompt
    echo = [p if body.echo and isinstance(p, str) else "" for p in prompts]
    return Prepared("completion", _clamped(canonicals, settings), body.priority, echo, body)


async def prepare_specs(
    services: Services, body: GenerationRequest, *, owner: str | None, cache_control: str | None
) -> tuple[Prepared, list[JobSpec]]:
    """What a route runs: the body prepared, and one job spec per prompt, as `owner`, under the client's
    cache policy (`Cache-Control`, or the body's `cache`)."""
    prepared = await prepare(services, body)
    policy = CachePolicy.parse(cache_control, body.cache)
    specs = [
        await services.admission.spec_for(
            prepared.kind,
            canonical,
            owner=owner,
            policy=policy,
            priority=prepared.priority,
            stream=bool(body.stream),
            session=session_id(body),
        )
        for canonical in prepared.canonicals
    ]
    return prepared, specs


def session_id(body: GenerationRequest) -> str | None:
    """The client's own session id, which keeps its requests on one worker (mlxq.delivery): OpenAI's
    `prompt_cache_key` (Codex sends its session there), Anthropic's `metadata.user_id` (Claude Code's session)."""
    key = getattr(body, "prompt_cache_key", None)
    metadata = getattr(body, "metadata", None)
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    given = key if isinstance(key, str) and key else user if isinstance(user, str) and user else None
    return client_session(given) if given else None


def _clamped(canonicals: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """max_tokens within MLXQ_MAX_TOKENS_CEILING: clamped as the context clamps it (the answer ends with
    finish_reason length), not refused."""
    if settings.max_tokens_ceiling:
        for canonical in canonicals:
            canonical["max_tokens"] = min(canonical["max_tokens"], settings.max_tokens_ceiling)
    return canonicals
