"""The request log (one row per answered request): what scripts/analyze_traces.py reads."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from mlxq.sql import RequestLog, rowcount


def log_requests(*, session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(RequestLog), rows)


def request_log(*, session: Session, since: float = 0.0) -> list[RequestLog]:
    return list(session.scalars(select(RequestLog).where(RequestLog.at >= since).order_by(RequestLog.id)))


def prune(*, session: Session, before: float) -> int:
    """Retention: rows older than `before`."""
    return rowcount(session.execute(delete(RequestLog).where(RequestLog.at < before)))
