"""From a dialect's neutral requests to what admission takes: checked, then canonical (one per prompt).

The one place a generation request is accepted or refused, whoever sends it: every dialect's routes, a job
submitted to `/v1/jobs`, a line of a batch. So a body a route would refuse is refused everywhere with the
same 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.dialects.registry import job_endpoints
from api.errors import APIError, invalid_body
from api.pipeline.context_bound import check_context_bound
from api.pipeline.incoming import Incoming
from api.pipeline.model_info import resolve_model
from api.pipeline.validation import check_generation, check_grammar, check_json_values
from api.services import Services
from mlxq.contract import JobKind
from mlxq.jobspec import CachePolicy, JobSpec
from mlxq.keys import canonical_request
from mlxq.request import Request

# The endpoints a job or a batch line may name: the body each takes and its adapter to the neutral request.
ENDPOINTS = job_endpoints()


KIND_ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "count": "/v1/messages/count_tokens"}


@dataclass(frozen=True)
class Prepared:
    kind: JobKind
    requests: list[Request]  # canonical; one per prompt (a chat has one)
    echo: list[str]  # per prompt: what `echo` puts before the completion
    incoming: Incoming


def parse(endpoint: str, raw: Any) -> Incoming:
    """Validate a raw body for `endpoint` as its route would, and adapt it to the neutral request."""
    if endpoint not in ENDPOINTS:
        raise APIError(400, f"Unsupported endpoint {endpoint!r}; use one of {', '.join(ENDPOINTS)}.", param="endpoint")
    model, adapt = ENDPOINTS[endpoint]
    try:
        body = model.model_validate(raw)
    except ValidationError as exc:
        raise invalid_body(exc, raw) from None
    incoming: Incoming = adapt(body)
    return incoming


async def prepare(services: Services, incoming: Incoming, *, kind: JobKind | None = None) -> Prepared:
    """What every generation endpoint refuses up front, before anything is enqueued (a body that cannot be
    encoded, another model, what api.pipeline.validation refuses), then the canonical requests (as `kind`: "count"
    counts a chat's prompt)."""
    settings = services.settings
    check_json_values(incoming.raw)  # first: the 404 below echoes `model`, which must be encodable
    # Canonical under the served name: the answer and its cache entry do not depend on the alias used.
    model = await resolve_model(settings, services.model_info, incoming.requests[0].model)
    requests = [r.model_copy(update={"model": model}) for r in incoming.requests]
    terms = incoming.terms
    await check_generation(incoming.kind, requests, settings=settings, model_info=services.model_info, terms=terms)
    # Before anything tokenizes it: text that cannot fit the context whatever its tokens is refused at once.
    await check_context_bound(incoming.kind, requests, settings=settings, model_info=services.model_info, terms=terms)
    default_max = settings.default_max_tokens
    canonicals = [
        canonical_request(
            incoming.kind,
            r.wire(),
            default_temperature=settings.default_temperature,
            default_max_tokens=default_max,
        ).model_copy(update={"priority": r.priority, "session": r.session})
        for r in requests
    ]
    await check_grammar(canonicals[0], terms)  # one response_format for every prompt
    if settings.max_tokens_ceiling:
        # Clamped as the context clamps it (the answer ends with finish_reason length), not refused.
        ceiling = settings.max_tokens_ceiling
        canonicals = [c.model_copy(update={"max_tokens": min(c.max_tokens or ceiling, ceiling)}) for c in canonicals]
    return Prepared(kind or incoming.kind, canonicals, incoming.echo, incoming)


async def prepare_specs(
    services: Services, incoming: Incoming, *, endpoint: str, owner: str | None, cache_control: str | None
) -> tuple[Prepared, list[JobSpec]]:
    """What the route at `endpoint` runs: the request prepared, and one job spec per prompt, as `owner`, under the
    client's cache policy (`Cache-Control`, or the body's `cache`)."""
    prepared = await prepare(services, incoming)
    policy = CachePolicy.parse(cache_control, incoming.cache)
    specs = [
        await services.admission.spec_for(
            prepared.kind, request, owner=owner, policy=policy, stream=incoming.stream, endpoint=endpoint
        )
        for request in prepared.requests
    ]
    return prepared, specs
