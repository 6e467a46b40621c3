"""What a request becomes before it is admitted: one typed job spec, whoever asked (a sync or streamed
route, `/v1/jobs`, a batch line).

The admission path (api.pipeline.admission) reads only this: the differences between callers (a submitted job
keeps a row even for a cached answer, a batch line waits for room and is not counted against the queue
ceiling) are fields here, not second copies of the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxq.contract import JobKind, Priority
from mlxq.request import Request
from mlxq.states import RouteReason


@dataclass(frozen=True)
class CachePolicy:
    """What the client allowed: look up (no `no-cache`), store (no `no-store`), entry lifetime."""

    lookup: bool = True
    store: bool = True
    ttl_s: float | None = None

    @classmethod
    def parse(cls, header: str | None, body: dict[str, Any] | None) -> CachePolicy:
        """From a `Cache-Control` header and a LiteLLM-style `"cache": {...}` body field."""
        lookup, store, ttl = True, True, None
        for part in (header or "").lower().split(","):
            name, _, value = part.strip().partition("=")
            if name == "no-cache":
                lookup = False
            elif name == "no-store":
                store = False
            elif name in ("max-age", "s-maxage") and value.strip().isdigit():
                ttl = float(value)
        body = body or {}
        if body.get("no-cache"):
            lookup = False
        if body.get("no-store"):
            store = False
        for name in ("ttl", "s-maxage", "max-age"):
            if isinstance(body.get(name), (int, float)) and not isinstance(body[name], bool):
                ttl = float(body[name])
        if ttl is not None and ttl <= 0:
            # A lifetime of zero: nothing cached is fresh enough, and nothing is worth storing.
            return cls(lookup=False, store=False)
        return cls(lookup=lookup, store=store, ttl_s=ttl)

    def effective(self, cacheable: bool) -> CachePolicy:
        """What the cache may do for a request: nothing for one whose answer is not reproducible."""
        return self if cacheable else CachePolicy(lookup=False, store=False, ttl_s=self.ttl_s)


@dataclass(frozen=True)
class Route:
    """Where mlxq.delivery sent a job, and why (kept on the job: `/v1/jobs/{id}` and Flower show it)."""

    worker: str | None  # the worker whose own queue has the job; None: not routed yet (no live worker of its model)
    reason: RouteReason
    matched: int = 0  # message boundaries of the request that worker's prefix cache holds


@dataclass(frozen=True)
class JobSpec:
    """One request as the admission path takes it.

    `cache` is already effective (api.pipeline.admission.spec_for: a sampled request neither looks up nor stores).
    """

    key: str  # mlxq.keys.request_key: the response-cache key and the single-flight key
    kind: JobKind
    request: Request  # the canonical request (mlxq.keys); the job row stores its wire form, which the worker reads
    cache: CachePolicy
    priority: Priority
    stream: bool  # a client streams it: the worker publishes its deltas
    owner: str | None = None  # the API key's id (None with keys off)
    namespace: str = ""  # the response-cache namespace (per key with MLXQ_CACHE_SCOPE=key)
    idempotency_key: str | None = None  # already scoped to the owner
    keep_row: bool = False  # a job row even for a cached answer (a submitted job, a batch line: it is polled)
    detached: bool = False  # runs to its end even when its streaming client leaves (a background response)
    batch_id: str | None = None
    windowed: bool = False  # sent when there is room among low-priority work (mlxq.delivery), not at once
    counted: bool = True  # counted against MLXQ_MAX_QUEUE_DEPTH (a batch is bounded by its own line limit)
    # What keeps a session on one worker before its prefix is cached anywhere: OpenAI's `prompt_cache_key`,
    # Anthropic's `metadata.user_id`, else the conversation's opening (mlxq.delivery).
    session: str | None = None
    route: Route | None = None  # set by mlxq.delivery when the job is sent
    endpoint: str | None = None  # the path the client called (a chat job may come from any dialect's)

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def attached(self) -> bool:
        """Only a client connected to the api waits for it (sync or streamed): not polled, nor run regardless."""
        return not (self.keep_row or self.detached)
