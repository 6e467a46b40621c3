"""Retention: what the api's house-keeping deletes once it is older than its setting, table by table."""

from __future__ import annotations

from sqlalchemy.orm import Session

from mlxq.repos import batches, files, idempotency_keys, jobs, request_log, responses


def prune_requests(*, session: Session, jobs_before: float, log_before: float, events_before: float) -> dict[str, int]:
    """Finished jobs (with their idempotency keys and stored responses), request-log rows and stream events older than the given times."""
    return {
        "jobs": jobs.prune(session=session, before=jobs_before),
        "idempotency_keys": idempotency_keys.prune(session=session, before=jobs_before),
        "responses": responses.prune(session=session, before=jobs_before),
        "request_log": request_log.prune(session=session, before=log_before),
        "stream_events": jobs.prune_events(session=session, before=events_before),
    }


def prune_batches(*, session: Session, before: float) -> dict[str, int]:
    """Finished batches with their lines, and files, older than `before`."""
    return {**batches.prune(session=session, before=before), "files": files.prune(session=session, before=before)}
