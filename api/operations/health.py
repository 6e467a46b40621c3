"""The service's state as /health, /metrics and `mlxq cache stats` report it.

With API keys on, /health without a valid key answers only `public(snapshot)`: whether the service is up, nothing
about what anyone asked or how much (MLXQ_HEALTH_DETAILS=true shows everyone the details). A key's cache statistics
are its own namespace's (`namespace_cache`)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api.operations.stats import StatsRecorder, is_namespaced, namespaced
from mlxq.repos import cache_entries, counters, jobs, workers
from mlxq.settings import Settings
from mlxq.sql import Worker
from mlxq.states import JOB_ACTIVE, JOB_FINAL, JobStatus


class Health:
    """Made once per api process; `snapshot` is what /health answers and /metrics exposes."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], stats: StatsRecorder) -> None:
        self._settings = settings
        self._sessions = sessions
        self._stats = stats
        self._broker_ping: Any = None

    def broker_problem(self) -> str | None:
        """Why the Redis broker cannot be reached, or None (a ping, bounded to half a second)."""
        if not self._settings.uses_redis:
            return None
        if self._broker_ping is None:
            import redis

            self._broker_ping = redis.Redis.from_url(
                self._settings.broker_url, socket_connect_timeout=0.5, socket_timeout=0.5
            )
        try:
            self._broker_ping.ping()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def snapshot(self) -> dict[str, Any]:
        return health_snapshot(self._settings, self._sessions, self._stats, self.broker_problem())

    def namespace_cache(self, namespace: str) -> dict[str, Any]:
        """The response cache's figures of one namespace (an API key's): its own entries, hits, misses, bypasses."""
        self._stats.flush()
        with self._sessions() as session:
            counts = counters.counters(session=session)
            items, size = cache_entries.cache_items(session=session, namespace=namespace)
        return _cache_block({k: counts.get(namespaced(k, namespace), 0) for k in _CACHE_COUNTERS}, items, size)


# What /health says without a key when keys are on: whether the service is up and serves its models.
PUBLIC = ("status", "model", "model_loaded", "models", "time")
_CACHE_COUNTERS = ("cache_hits", "cache_misses", "cache_bypass")


def public(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The part of a /health snapshot anyone may read: up or not, and the models; no counts of requests, jobs,
    cache entries or hits, no worker's load or memory."""
    worker = snapshot["worker"]
    return {
        **{k: snapshot[k] for k in PUBLIC},
        "broker": {"ok": snapshot["broker"]["ok"]},
        "worker": {"alive": worker["alive"], "count": worker["count"], "error": worker["error"]},
    }


def _cache_block(counts: dict[str, int], items: int, size: int) -> dict[str, Any]:
    hits, misses, bypass = (counts.get(k, 0) for k in _CACHE_COUNTERS)
    return {
        "hits": hits,
        "misses": misses,
        "bypass": bypass,
        "total_requests": hits + misses + bypass,
        "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
        "cached_items": items,
        "bytes": size,
    }


def health_snapshot(
    settings: Settings, sessions: sessionmaker[Session], stats: StatsRecorder, broker: str | None
) -> dict[str, Any]:
    stats.flush()
    with sessions() as session:
        live = workers.live_workers(session=session, within_s=settings.worker_lost_after_s)
        by_status = jobs.job_counts(session=session)
        routed = jobs.route_counts(session=session)
        depth = by_status.get(JobStatus.QUEUED, 0)
        # Each key's own cache counters stay out of the service's (a key reads its own: `namespace_cache`).
        counts = {k: v for k, v in counters.counters(session=session).items() if not is_namespaced(k)}
        items, size = cache_entries.cache_items(session=session)
    loaded = any(w.model_loaded for w in live)
    errors = [w.error for w in live if w.error]
    prefix = {k: 0 for k in ("hits", "misses", "tokens_saved", "skips", "taken", "entries", "bytes")}
    batch = {k: 0 for k in ("active", "waiting", "tokens", "preempted")}
    for w in live:
        for block, totals in (("prefix_cache", prefix), ("batch", batch)):
            for k, v in ((w.stats or {}).get(block) or {}).items():
                totals[k] = totals.get(k, 0) + int(v)
    return {
        "status": "ok" if loaded and broker is None else "degraded",
        # The embedded broker is the database (checked by the queries above); Redis is pinged.
        "broker": {"ok": broker is None, "error": broker},
        "model": settings.model_name,
        "model_loaded": loaded,
        # Every configured model and every model a live worker serves (each worker serves one).
        "models": sorted(set(settings.served_models) | {w.model for w in live}),
        "workers": [_worker(w, routed.get(w.name, (0, 0))) for w in sorted(live, key=lambda w: w.name)],
        "worker": {
            "alive": bool(live),
            "count": len(live),
            "error": errors[0] if errors else None,
            # Times `mlxq serve` restarted a worker that died.
            "restarts": counts.get("worker_restarts", 0),
        },
        "queue_depth": depth,
        "jobs": {str(status): by_status.get(status, 0) for status in (*JOB_ACTIVE, *JOB_FINAL)},
        "cache": _cache_block(counts, items, size),
        "prefix_cache": prefix,
        "counters": counts,
        # Sequences decoding together in the workers' engines, waiting for room, and their KV token budget.
        "batch": batch,
        "time": time.time(),
    }


def _worker(w: Worker, routed: tuple[int, int]) -> dict[str, Any]:
    """One live worker: its identity, model, load and prefix cache, and what routing sent it."""
    stats = w.stats or {}
    batch, prefix = stats.get("batch") or {}, stats.get("prefix_cache") or {}
    return {
        "id": w.name,
        "model": w.model,
        "alive": True,
        "model_loaded": w.model_loaded,
        "error": w.error,
        "load": {
            "active": batch.get("active", 0),
            "waiting": batch.get("waiting", 0),
            "kv_tokens": batch.get("tokens", 0),
        },
        "prefix_entries": prefix.get("entries", 0),
        # Speculative decoding (worker.speculative): draft tokens verified and accepted.
        "speculative": {"drafted": batch.get("drafted", 0), "accepted": batch.get("accepted", 0)},
        # Bytes: the budget (MLXQ_MEMORY_GB) and its shares, what each part holds now, MLX's active, cache and
        # peak memory, and the process's RSS, which stays within budget + allowance.
        "memory": stats.get("memory") or {},
        "prefix_index": len(stats.get("prefix_index") or ()),
        # Of the jobs kept (MLXQ_JOB_RETENTION_S): how many were routed here, how many to a prefix it held.
        "routed": routed[0],
        "routed_to_cache": routed[1],
    }
