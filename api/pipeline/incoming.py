"""What a dialect's adapter hands to the one admission path: its neutral requests and how they are delivered.

Each dialect (api.dialects.*) parses its own body, refuses what only it can name, and builds an `Incoming`;
from here on nothing knows which dialect asked (api.pipeline.prepare checks and canonicalizes, api.pipeline.admission admits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.errors import invalid_body
from api.pipeline.terms import OPENAI_TERMS, Terms
from mlxq.request import JobKind, Priority, Request


@dataclass(frozen=True)
class Incoming:
    kind: JobKind
    requests: list[Request]  # neutral, not canonical yet; one per prompt (a chat has one)
    raw: dict[str, Any]  # the dialect's body as parsed: checked for values no JSON encoder takes
    stream: bool = False
    cache: dict[str, Any] | None = None  # LiteLLM-style cache controls from the body ({"no-store": true, ...})
    echo: list[str] = field(default_factory=list)  # per prompt: what `echo` puts before a completion
    terms: Terms = OPENAI_TERMS  # how the dialect's errors name the fields (api.pipeline.terms)

    @classmethod
    def of(
        cls,
        kind: JobKind,
        bodies: list[dict[str, Any]],
        raw: dict[str, Any],
        *,
        priority: Priority = "interactive",
        stream: bool | None = False,
        cache: dict[str, Any] | None = None,
        echo: list[str] | None = None,
        terms: Terms = OPENAI_TERMS,
    ) -> Incoming:
        """From neutral bodies (the neutral chat form, or one completion body per prompt)."""
        try:
            requests = [Request.from_body(body, priority=priority) for body in bodies]
        except ValidationError as exc:
            raise invalid_body(exc, bodies[0]) from None
        return cls(kind, requests, raw, bool(stream), cache, echo or [""] * len(requests), terms)
