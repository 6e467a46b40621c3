"""What one answered request leaves behind: its latency in /metrics, the shared request and token counters,
and a request-log row (what scripts/analyze_traces.py reads)."""

from __future__ import annotations

import time
from typing import Any

from api.admission import Outcome
from api.metrics import GENERATED_TOKENS, Endpoint, request_counter
from api.services import Services
from mlxq.jobspec import JobSpec
from mlxq.keys import tool_names
from mlxq.states import CacheOutcome


def record(
    services: Services, *, endpoint: Endpoint, spec: JobSpec, outcome: Outcome, started: float, stream: bool
) -> None:
    """`started` is the request's `time.perf_counter()` on arrival."""
    elapsed = time.perf_counter() - started
    services.metrics.observe(endpoint, outcome.cache, elapsed)
    usage: dict[str, Any] = outcome.result.get("usage") or {}
    # Shared counters (the database's), so every api process and replica reports the same totals.
    services.stats.count(request_counter(endpoint, 200, outcome.cache))
    if outcome.cache != CacheOutcome.HIT and usage.get("completion_tokens"):
        services.stats.count(GENERATED_TOKENS, by=int(usage["completion_tokens"]))
    services.stats.log(
        key=outcome.key,
        endpoint=endpoint,
        cache=outcome.cache,
        stream=stream,
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=usage.get("cached_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        tools=tool_names(spec.canonical.get("tools")) or None,
        latency_ms=round(elapsed * 1000, 2),
    )
