"""The response cache's entries: put, look up, touch, bound (LRU, TTL), clear."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from mlxq.sql import CacheEntry, rowcount

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite


def _upsert(session: Session) -> Callable[..., postgresql.Insert | sqlite.Insert]:
    """The dialect's INSERT, which has `on_conflict_do_update`."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(dialect)  # pragma: no cover - only SQLite and PostgreSQL are supported


def put_entry(
    *,
    session: Session,
    key: str,
    kind: str,
    model: str,
    result: dict[str, Any],
    ttl_s: float | None,
    namespace: str = "",
) -> None:
    """Insert or replace an entry in one statement (bounded afterwards by `evict_lru`)."""
    now = time.time()
    values = {
        "kind": kind,
        "model": model,
        "namespace": namespace,
        "result": result,
        "size_bytes": len(json.dumps(result)),
        "last_access_at": now,
        "expires_at": now + ttl_s if ttl_s else None,
    }
    stmt = _upsert(session)(CacheEntry).values(key=key, hits=0, created_at=now, **values)
    session.execute(stmt.on_conflict_do_update(index_elements=[CacheEntry.key], set_=values))


def evict_lru(*, session: Session, max_entries: int) -> int:
    """Delete least-recently-used entries beyond `max_entries`; returns how many."""
    excess = (session.scalar(select(func.count()).select_from(CacheEntry)) or 0) - max_entries
    if excess <= 0:
        return 0
    oldest = select(CacheEntry.key).order_by(CacheEntry.last_access_at).limit(excess)
    return rowcount(session.execute(delete(CacheEntry).where(CacheEntry.key.in_(oldest.scalar_subquery()))))


def lookup_result(*, session: Session, key: str, now: float | None = None) -> dict[str, Any] | None:
    """The hot path of a hit: one indexed read of the stored result, no ORM object."""
    row = session.execute(select(CacheEntry.result, CacheEntry.expires_at).where(CacheEntry.key == key)).first()
    if row is None or (row.expires_at is not None and row.expires_at <= (now or time.time())):
        return None
    return row.result


def touch_entry(*, session: Session, key: str, hits: int = 1, now: float | None = None) -> None:
    session.execute(
        update(CacheEntry)
        .where(CacheEntry.key == key)
        .values(last_access_at=now or time.time(), hits=CacheEntry.hits + hits)
    )


def purge_expired(*, session: Session) -> int:
    result = session.execute(delete(CacheEntry).where(CacheEntry.expires_at <= time.time()))
    return rowcount(result)


def clear_cache(*, session: Session, namespace: str | None = None, older_than_s: float | None = None) -> int:
    """Delete response-cache entries: all, or one namespace's, or those stored longer ago than `older_than_s`."""
    query = delete(CacheEntry)
    if namespace is not None:
        query = query.where(CacheEntry.namespace == namespace)
    if older_than_s is not None:
        query = query.where(CacheEntry.created_at < time.time() - older_than_s)
    return rowcount(session.execute(query))


def cache_items(*, session: Session, namespace: str | None = None) -> tuple[int, int]:
    """(entries, bytes of their results): all, or one namespace's."""
    query = select(func.count(), func.coalesce(func.sum(CacheEntry.size_bytes), 0))
    if namespace is not None:
        query = query.where(CacheEntry.namespace == namespace)
    count, size = session.execute(query).one()
    return int(count), int(size)
