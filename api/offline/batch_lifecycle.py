"""A batch's life: created with its lines and their jobs in one transaction, moved on by the api's
house-keeping as its jobs finish, finalized once into output and error files.

A batch becomes one low-priority job per valid line, admitted by the one admission decision
(api.pipeline.admission) inside the batch's transaction: a cached answer succeeds at once, identical lines share
one job, a line identical to a job in flight joins it. mlxq.delivery sends the jobs a window at a time, so
interactive requests go first and the lines decode together. The jobs are the progress record: a worker
that dies mid-batch leaves its jobs to run again, and the output is composed once, from the jobs, when
none is active. Reading a batch never changes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from typing import Any

from sqlalchemy.orm import Session

from api.dialects import registry
from api.errors import openai_error_body
from api.offline.batch_lines import Line
from api.services import Services
from mlxq.repos import batches, files
from mlxq.sql import BatchLine, Job
from mlxq.states import BatchStatus, FilePurpose, JobStatus

log = logging.getLogger(__name__)

# Line problems listed in the batch's `errors` (all of them are in the error file).
ERRORS_SHOWN = 100


@dataclasses.dataclass(frozen=True)
class NewBatch:
    endpoint: str
    input_file_id: str
    completion_window: str  # "<hours>h"
    metadata: dict[str, str] | None
    owner: str | None

    @property
    def window_s(self) -> float:
        return int(self.completion_window[:-1]) * 3600.0


def create(services: Services, new: NewBatch, lines: list[Line]) -> str:
    """The batch row, its lines and their jobs, in one transaction: all or nothing. Then the first window of
    its jobs is sent."""
    with services.sessions.begin() as session:
        batch = batches.create_batch(
            session=session,
            endpoint=new.endpoint,
            input_file_id=new.input_file_id,
            completion_window=new.completion_window,
            window_s=new.window_s,
            metadata=new.metadata,
            owner=new.owner,
        )
        by_key: dict[str, str | None] = {}  # identical lines share one job
        rows: list[dict[str, Any]] = []
        for line in lines:
            job_id = None
            if line.spec is not None:
                if line.spec.key not in by_key:
                    spec = dataclasses.replace(line.spec, batch_id=batch.id)
                    by_key[spec.key] = services.admission.decide(session, spec).job_id  # keep_row: always a job
                job_id = by_key[line.spec.key]
            rows.append({"line": line.line, "custom_id": line.custom_id, "job_id": job_id, "error": line.error})
        batches.add_lines(session=session, batch_id=batch.id, lines=rows)
        batch.errors = [line.error for line in lines if line.error][:ERRORS_SHOWN] or None
        batch.status, batch.in_progress_at = BatchStatus.IN_PROGRESS, time.time()
        batch_id = batch.id
    services.batches_open.set()
    services.delivery.send_waiting()
    return batch_id


def advance(services: Services, batch_id: str) -> None:
    """Move an open batch on: expire it past its window; finish it when none of its jobs is active (or
    at once when cancelling). Safe from any process at any time: each move is one conditional update."""
    with services.sessions.begin() as session:
        batch = batches.get_batch(session=session, batch_id=batch_id)
        if batch is None or batch.status not in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            return
        final = BatchStatus.CANCELLED if batch.status == BatchStatus.CANCELLING else BatchStatus.COMPLETED
        if batch.status == BatchStatus.IN_PROGRESS and time.time() > batch.expires_at:
            final = BatchStatus.EXPIRED
            batches.cancel_jobs(session=session, batch_id=batch_id)
        elif final == BatchStatus.COMPLETED and batches.line_counts(session=session, batch_id=batch_id)["active"]:
            return
        # One transaction from the claim to the final state: a failure leaves the batch as it was, for the
        # next round, never stuck half-way; a second process finds the claim taken.
        if not batches.move(
            session=session, batch_id=batch_id, to=BatchStatus.FINALIZING, frm=(BatchStatus(batch.status),)
        ):
            return
        output, errors = _compose(services, session, batch_id, batch.endpoint, final)
        ids = {}
        for name, composed in (("output_file_id", output), ("error_file_id", errors)):
            if composed:
                content = ("\n".join(json.dumps(line, ensure_ascii=False) for line in composed) + "\n").encode()
                ids[name] = files.create_file(
                    session=session,
                    purpose=FilePurpose.BATCH_OUTPUT,
                    filename=f"{batch_id}_{name.split('_')[0]}.jsonl",
                    content=content,
                    owner=batch.owner,
                ).id
        batches.move(session=session, batch_id=batch_id, to=final, frm=(BatchStatus.FINALIZING,), **ids)
    log.info("batch %s %s: %d answered, %d errors", batch_id, final, len(output), len(errors))


def advance_open(services: Services) -> int:
    """The house-keeping round: move every open batch on. Returns how many were open."""
    with services.sessions() as session:
        ids = [b.id for b in batches.open_batches(session=session)]
    for batch_id in ids:
        try:
            advance(services, batch_id)
        except Exception:
            log.exception("could not advance batch %s", batch_id)
    return len(ids)


def _compose(
    services: Services, session: Session, batch_id: str, endpoint: str, final: BatchStatus
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(output lines, error lines), each line of the input once, in order."""
    output: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for line, job in batches.results(session=session, batch_id=batch_id):
        entry = _entry(services, endpoint, line, job, final)
        (output if entry["error"] is None and entry["response"]["status_code"] == 200 else errors).append(entry)
    return output, errors


def _body(services: Services, endpoint: str, job: Job) -> dict[str, Any] | None:
    """A line's answer as its endpoint renders it (api.dialects.registry: a Responses line as a `response`)."""
    route = registry.route(endpoint)
    return route.render_job(job) if route is not None else None


def _entry(services: Services, endpoint: str, line: BatchLine, job: Job | None, final: BatchStatus) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": None,
        "error": None,
    }
    if job is None:
        entry["error"] = line.error or {"code": "invalid_request", "message": "refused"}
    elif job.status == JobStatus.SUCCEEDED:
        entry["response"] = {
            "status_code": 200,
            "request_id": job.id,
            "body": _body(services, endpoint, job),
        }
    elif job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        error = job.error or {}
        entry["response"] = {
            "status_code": int(error.get("status", 500)),
            "request_id": job.id,
            "body": openai_error_body(
                error.get("message", ""),
                type=error.get("type", "server_error"),
                code=error.get("code"),
                param=error.get("param"),
            ),
        }
    else:  # still queued or running: the batch was cancelled or expired first
        entry["error"] = {"code": f"batch_{final}", "message": f"The batch was {final} before this request ran."}
    return entry
