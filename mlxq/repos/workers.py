"""Worker heartbeats: who is alive (by the database's clock), and what each publishes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mlxq.sql import Worker, db_now


def heartbeat(
    *,
    session: Session,
    name: str,
    model: str,
    model_loaded: bool,
    error: str | None,
    started_at: float,
    stats: dict[str, Any] | None = None,
) -> None:
    worker = session.get(Worker, name)
    if worker is None:
        worker = Worker(name=name, started_at=started_at)
        session.add(worker)
    worker.model, worker.model_loaded, worker.error, worker.stats = model, model_loaded, error, stats
    # The database's clock, which live_workers reads too: a worker's and an api's clocks never meet.
    worker.started_at, worker.last_seen = started_at, db_now()


def live_workers(*, session: Session, within_s: float) -> list[Worker]:
    return list(session.scalars(select(Worker).where(Worker.last_seen >= db_now() - within_s)))


def silence(*, session: Session, name: str) -> float | None:
    """Seconds since the worker's last heartbeat, by the database's clock; None when it has none."""
    value = session.scalar(select(db_now() - Worker.last_seen).where(Worker.name == name))
    return None if value is None else float(value)


def retire_worker(*, session: Session, name: str, gone_after_s: float) -> None:
    """A worker that stops cleanly: no longer alive for routing and failover (as if silent for longer than
    `gone_after_s`) at once, yet still a recent worker of its model, as a killed one is for a while, so requests wait
    for its successor (a restart) rather than being refused (api.pipeline.model_info). Its row is kept, not deleted."""
    session.execute(update(Worker).where(Worker.name == name).values(last_seen=db_now() - gone_after_s - 1.0))
