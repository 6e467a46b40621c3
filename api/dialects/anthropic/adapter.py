"""Anthropic's bodies as the neutral request (mlxq.request), through `to_chat` (api.dialects.anthropic.protocol)."""

from __future__ import annotations

from api.dialects.anthropic.protocol import CountTokensRequest, MessagesRequest, to_chat
from api.pipeline.incoming import Incoming
from api.pipeline.terms import Terms

# The neutral fields to_chat fills from fields Anthropic names otherwise, and its tool choices.
TERMS = Terms(
    renamed={"stop": "stop_sequences", "response_format": "output_config.format"},
    tool="tool",
    any_tool='tool_choice {"type": "any"}',
)


def incoming(body: MessagesRequest) -> Incoming:
    raw = body.model_dump(exclude_none=True)
    return Incoming.of("chat", [to_chat(body)], raw, stream=body.stream, cache=body.cache, terms=TERMS)


def counted(body: CountTokensRequest) -> Incoming:
    """The conversation whose prompt `count_tokens` counts: nothing of an answer (one greedy token, never run)."""
    raw = body.model_dump(exclude_none=True)
    return Incoming.of("chat", [{**to_chat(body), "max_tokens": 1, "temperature": 0}], raw, terms=TERMS)
