"""Responses bodies as the neutral request (mlxq.request), through `to_chat` (api.dialects.responses.protocol):
`previous` holds the items of the stored responses the body continues (`previous_response_id`)."""

from __future__ import annotations

from typing import Any

from api.dialects.responses.protocol import ResponsesRequest, to_chat
from api.pipeline.incoming import Incoming
from api.pipeline.terms import Terms

# The neutral fields to_chat fills from fields the Responses API names otherwise.
TERMS = Terms(renamed={"response_format": "text.format", "max_tokens": "max_output_tokens", "messages": "input"})


def incoming(body: ResponsesRequest, previous: list[dict[str, Any]] | None = None) -> Incoming:
    raw = body.model_dump(by_alias=True, exclude_none=True)
    chat = to_chat(body, previous=previous)
    return Incoming.of("chat", [chat], raw, priority=body.priority, stream=body.stream, cache=body.cache, terms=TERMS)


def counted(body: ResponsesRequest, previous: list[dict[str, Any]] | None = None) -> Incoming:
    """The input whose prompt `input_tokens` counts: nothing of an answer (one greedy token, never run)."""
    raw = body.model_dump(by_alias=True, exclude_none=True)
    return Incoming.of(
        "chat", [{**to_chat(body, previous=previous), "max_tokens": 1, "temperature": 0}], raw, terms=TERMS
    )
