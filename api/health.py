"""The service's state as /health, /metrics and `mlxq cache stats` report it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mlxq import repos

if TYPE_CHECKING:
    from api.services import Services


def health_snapshot(services: Services) -> dict[str, Any]:
    settings = services.settings
    services.stats.flush()
    with services.sessions() as session:
        workers = repos.live_workers(session=session, within_s=max(10.0, 3 * settings.heartbeat_s))
        jobs = repos.job_counts(session=session)
        depth = jobs.get("queued", 0)
        counts = repos.counters(session=session)
        items, size = repos.cache_items(session=session)
    hits, misses = counts.get("cache_hits", 0), counts.get("cache_misses", 0)
    loaded = any(w.model_loaded for w in workers)
    broker = services.broker_problem()
    errors = [w.error for w in workers if w.error]
    prefix = {k: 0 for k in ("hits", "misses", "tokens_saved", "skips", "taken", "entries", "bytes")}
    batch = {k: 0 for k in ("active", "waiting", "tokens", "preempted")}
    for w in workers:
        for block, totals in (("prefix_cache", prefix), ("batch", batch)):
            for k, v in ((w.stats or {}).get(block) or {}).items():
                totals[k] = totals.get(k, 0) + int(v)
    return {
        "status": "ok" if loaded and broker is None else "degraded",
        # The embedded broker is the database (checked by the queries above); Redis is pinged.
        "broker": {"ok": broker is None, "error": broker},
        "model": settings.model_name,
        "model_loaded": loaded,
        "worker": {
            "alive": bool(workers),
            "count": len(workers),
            "error": errors[0] if errors else None,
            # Times `mlxq serve` restarted a worker that died.
            "restarts": counts.get("worker_restarts", 0),
        },
        "queue_depth": depth,
        "jobs": {status: jobs.get(status, 0) for status in (*repos.ACTIVE, *repos.TERMINAL)},
        "cache": {
            "hits": hits,
            "misses": misses,
            "bypass": counts.get("cache_bypass", 0),
            "total_requests": hits + misses + counts.get("cache_bypass", 0),
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "cached_items": items,
            "bytes": size,
        },
        "prefix_cache": prefix,
        "counters": counts,
        # Sequences decoding together in the workers' engines, waiting for room, and their KV token budget.
        "batch": batch,
        "time": time.time(),
    }
