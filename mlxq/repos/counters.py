"""Shared counters: the same totals from every api and worker process."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mlxq.sql import Counter, rowcount


def bump(*, session: Session, name: str, by: int = 1) -> None:
    done = session.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + by))
    if not rowcount(done):
        session.add(Counter(name=name, value=by))


def counters(*, session: Session) -> dict[str, int]:
    return {c.name: int(c.value) for c in session.scalars(select(Counter))}
