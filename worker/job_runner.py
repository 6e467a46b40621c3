"""The job runner the Celery task delegates to: like a web view, it moves data (claim the job row, hand the
request to the engine, relay its events, persist the outcome) and the logic lives elsewhere."""

from __future__ import annotations

import logging
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.exc import DBAPIError

from mlxq import events
from mlxq.contract import CANCELLED, JobError, job_error
from mlxq.keys import cache_partition, prefix_hashes, request_key
from mlxq.repos import cache_entries, jobs
from mlxq.request import Request
from mlxq.sql import Job
from mlxq.states import FinishReason, JobStatus
from worker.prefix_saves import PrefixSaves
from worker.state import WorkerState

log = logging.getLogger(__name__)

# A job's first events (`started`, then the first token) go out together when the token follows within this: one
# publication and one read by the api, not two. Each is a commit and a wake-up (SQLite: 1.5-4 ms on this CPU), and
# the first one ran beside the prefill it announced: on the tiny test model, time to first token through the service
# went from 28-34 ms to 23-25 ms (scripts/bench_arch.py's family, one request at a time). A long prompt's `started`
# goes out this much later, alone.
FIRST_LINGER_S = 0.03

# How long a finished job's outcome is retried while the database is unreachable.
DB_RETRY_S = 600.0


class JobRunner:
    def __init__(self, state: WorkerState, prefix_saves: PrefixSaves) -> None:
        self._state = state
        self._prefix_saves = prefix_saves

    def run_job(self, job_id: str) -> None:
        """Claim the job and run it (one Celery thread); a low-priority job's end makes room for the next."""
        if self._state.stopping.is_set():
            with self._state.sessions.begin() as session:  # sent again by whoever starts next
                jobs.release_job(session=session, job_id=job_id)
            return
        with self._state.sessions.begin() as session:
            job = jobs.start_job(
                session=session, job_id=job_id, worker=self._state.name, model=self._state.settings.model_name
            )
        if job is None:
            log.info("job %s is not queued (finished, cancelled or taken); skipping", job_id)
            return
        try:
            self._run(job)
        finally:
            if job.priority == "low" and not self._state.stopping.is_set():
                try:
                    self._state.delivery.send_waiting()
                except Exception:
                    log.exception("could not send the next low-priority jobs")

    def _run(self, job: Job) -> None:
        """Hand the job to the batch, relay its events, persist the outcome."""
        job_id, kind, priority, stream = job.id, job.kind, job.priority, job.stream
        if job.attempts > 1:
            # A client already streaming it has had part of the answer: it must know the rest starts over.
            self._publish(job_id, [events.restarted(job.attempts)])
        if self._state.engine is None:
            self._fail(job_id, job_error(503, f"model not loaded: {self._state.load_error}", code="model_not_loaded"))
            return
        try:
            request = Request.read(job.request)  # what the api wrote: Request.wire()
            if kind == "count":  # the tokenizer alone, on this thread: nothing for the batch to do
                tokens = len(self._state.engine.chat_tokens(request))
                answer: dict[str, Any] = {
                    "input_tokens": tokens,
                    "finish_reason": FinishReason.STOP,
                    "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "cached_tokens": 0},
                }
            else:
                # Fair shares of the batch go by API key, or with keys off by session (worker.batcher).
                owner = job.owner or job.session or ""
                # Its prefix-cache partition: no other key's (or salt's) prompt shortens its prefill, nor its another's.
                partition = cache_partition(job.namespace, request.cache_salt)
                # A stream's decoding pauses only briefly for others' prefill; an answer read whole waits on throughput.
                seq = self._state.engine.submit(
                    kind, request, priority=priority, owner=owner, partition=partition, watched=stream
                )
                answer = self._relay(job_id, seq, stream)
                # What the api routes this conversation's later turns by (mlxq.delivery), in the same partition.
                hashes = prefix_hashes(kind, request.wire(), partition=partition)
                if getattr(self._state.engine, "checkpoints", False):  # only the boundaries its entries hold
                    self._state.prefix_index.record_checkpoints(hashes, seq.prefix_entry, seq.checkpoint_entries)
                else:
                    self._state.prefix_index.record(hashes, seq.prefix_entry)
        except Exception as exc:
            error = getattr(exc, "error", None)
            if error is None:
                log.error("job %s failed: %s", job_id, traceback.format_exc())
                error = job_error(500, f"generation failed: {type(exc).__name__}: {exc}")
            self._fail(job_id, error)
            return
        if answer.get("finish_reason") == FinishReason.CANCELLED:
            if self._state.stopping.is_set():
                if stream:
                    # Its clients have had part of the answer and the next run starts over; the next run's own
                    # `restarted` goes out only for an attempt counted (a stop is not one), and this one must be in
                    # the channel before that run's text can be.
                    self._publish(job_id, [events.restarted(job.attempts)])
                with self._state.sessions.begin() as session:
                    jobs.requeue_job(session=session, job_id=job_id)
                return
            self._fail(job_id, dict(CANCELLED), status=JobStatus.CANCELLED)
            return
        self._succeed(job, request, answer)

    def _relay(self, job_id: str, seq: Any, stream: bool) -> dict[str, Any]:
        """Relay a sequence's events to the channel until it ends; its answer."""
        with self._state.cancels.watch(job_id, seq.cancelled):
            for relayed in drain(seq.events, linger_s=FIRST_LINGER_S):
                if shown := coalesce(relayed, deltas=stream):
                    self._publish(job_id, shown)
        if seq.error is not None:
            raise seq.error
        return dict(seq.result or {})

    def _succeed(self, job: Job, request: Request, answer: dict[str, Any]) -> None:
        """Persist the answer (job row, response cache), then tell the waiting clients."""
        job_id, kind, store, ttl_s, model = job.id, job.kind, job.store, job.ttl_s, job.model
        # The key names the weights that made the answer, which are this worker's (with its adapter).
        key = request_key(kind, request.wire(), weights=self._state.engine.key.weights, namespace=job.namespace)

        def persist() -> bool:
            with self._state.sessions.begin() as session:
                finished = jobs.finish_job(session=session, job_id=job_id, status=JobStatus.SUCCEEDED, result=answer)
                if store:
                    cache_entries.put_entry(
                        session=session,
                        key=key,
                        kind=kind,
                        model=model,
                        result=answer,
                        ttl_s=ttl_s or self._state.settings.cache_ttl_s,
                        namespace=job.namespace,
                    )
                return finished

        if not self._write(job_id, persist):
            log.info("job %s had ended before its answer was ready (cancelled or given up)", job_id)
        # The answer travels with the event, so the waiting client needs no further read.
        self._publish(job_id, [events.done(answer)])
        if store:
            with self._state.sessions.begin() as session:
                cache_entries.purge_expired(session=session)
                cache_entries.evict_lru(session=session, max_entries=self._state.settings.cache_max_entries)
        self._prefix_saves.save()

    def _fail(self, job_id: str, error: JobError | dict[str, Any], status: JobStatus = JobStatus.FAILED) -> None:
        def persist() -> bool:
            with self._state.sessions.begin() as session:
                return jobs.finish_job(session=session, job_id=job_id, status=status, error=error)

        self._write(job_id, persist)
        self._publish(job_id, [events.error(error)])

    def _publish(self, job_id: str, items: list[events.Event]) -> None:
        """Events are a courtesy to waiting clients; the job row is the record. A broker that is down (a Redis
        restart) loses some events, never the job: the api answers from the row, and fills in a stream's
        missing text from the result."""
        try:
            self._state.channel.publish_many(job_id, items)
        except Exception as exc:
            log.warning("could not publish events of job %s (%s); its clients read the job row", job_id, exc)

    def _write(self, job_id: str, persist: Callable[[], bool]) -> bool:
        """A job's outcome must land: while the database is unreachable (a restart), retry for DB_RETRY_S,
        rather than leave the row running behind a live worker that nothing would reap."""
        delay, deadline = 0.5, time.monotonic() + DB_RETRY_S
        while True:
            try:
                return persist()
            except DBAPIError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("could not record job %s (%s); retrying in %.1f s", job_id, exc.orig, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)


def drain(source: queue.SimpleQueue[events.Event | None], *, linger_s: float = 0.0) -> Iterator[list[events.Event]]:
    """Everything queued at each wake-up, as one list, until the end marker (None). The first wake-up waits up to
    `linger_s` for what follows its first event (FIRST_LINGER_S)."""
    first = True
    while True:
        batch: list[events.Event] = []
        item = source.get()
        if first and linger_s and item is not None:
            first = False
            batch.append(item)
            try:
                item = source.get(timeout=linger_s)
            except queue.Empty:
                yield batch
                continue
        while item is not None:
            batch.append(item)
            try:
                item = source.get_nowait()
            except queue.Empty:
                break
        else:  # the end marker
            if batch:
                yield batch
            return
        yield batch


def coalesce(items: list[events.Event], *, deltas: bool = True) -> list[events.Event]:
    """Adjacent deltas joined into one: a busy batch writes one event per wake-up, not one per token.

    Without `deltas` (nobody streams the job) deltas and prefill progress are dropped: the result
    carries the text, and a streaming client that joins such a job is sent it whole at the end.
    """
    out: list[events.Event] = []
    for event in items:
        if not deltas and event["type"] in ("delta", "progress"):
            continue
        last = out[-1] if out else None
        if last is not None and last["type"] == event["type"] == "delta":
            logprobs = (last.get("logprobs") or []) + (event.get("logprobs") or [])
            out[-1] = events.delta(last["content"] + event["content"], logprobs or None)
        else:
            out.append(event)
    return out
