"""The worker's long-lived state and the job runner the Celery task delegates to.

A task is like a web view: load the job, call the engine, persist, publish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from mlxq import delivery, events, repos
from mlxq.channel import Channel
from mlxq.contract import CANCELLED, PREFIX_CACHE_CLEARS, JobError, job_error
from mlxq.keys import request_key
from mlxq.settings import Settings
from mlxq.sql import Job

log = logging.getLogger(__name__)

# A cancelled job (client gone, DELETE) stops within this long, well under a second.
CANCEL_POLL_S = 0.25
# How long a finished job's outcome is retried while the database is unreachable.
DB_RETRY_S = 600.0


class Runtime:
    """Model, DB sessions and stream channel, made once per worker process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], channel: Channel, celery: Celery) -> None:
        self.settings = settings
        self.sessions = sessions
        self.channel = channel
        self.celery = celery
        self.name = f"{socket.gethostname()}:{settings.queue}"
        self.started_at = time.time()
        self.engine: Any = None
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._saved_at = time.monotonic()
        self.cancels = CancelWatch(sessions)
        self._saving = threading.Lock()
        # Set when the worker begins to stop: running jobs are interrupted and go back to the queue.
        self.stopping = threading.Event()
        self._prefix_clears: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def load_model(self) -> None:
        from worker.engine import BatchLimits, Engine

        limits = BatchLimits(
            size=self.settings.batch_size, tokens=self.settings.batch_tokens, prefill=self.settings.prefill_batch_size
        )
        try:
            self.engine = Engine.load(self.settings.model, limits)
            log.info("model %s loaded", self.settings.model)
            self._enable_prefix_cache()
            self.engine.warm_up()
        except Exception as exc:  # the worker stays up and reports why, never answers with a fake
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.settings.model, self.load_error)
        # This worker's name outlives its process: jobs it was running when it died run again (or fail
        # after max_attempts), and their messages, which died with it, are sent again.
        with self.sessions.begin() as session:
            requeued, failed = repos.requeue_running(
                session=session, worker=self.name, max_attempts=self.settings.max_attempts
            )
        if requeued or failed:
            log.warning(
                "a previous worker process died running jobs: %d requeued, %d failed after %d attempts",
                requeued,
                failed,
                self.settings.max_attempts,
            )
        self.beat()
        delivery.resend(self.sessions, self.celery, self.settings, lost_after_s=None)

    # -- prefix cache ----------------------------------------------------------------------

    @property
    def prefix_dir(self) -> Path:
        return self.settings.data_dir / "prefix_cache" / self.engine.prefix.fingerprint()

    def _enable_prefix_cache(self) -> None:
        if not self.settings.prefix_cache:
            return
        from worker.prefix_cache import default_bytes

        max_bytes = self.settings.prefix_cache_mb << 20 or default_bytes()
        prefix = self.engine.enable_prefix_cache(max_entries=self.settings.prefix_cache_size, max_bytes=max_bytes)
        loaded = prefix.load(self.prefix_dir)
        log.info(
            "prefix cache on: %d entries, %d MB; %d entries loaded from disk",
            self.settings.prefix_cache_size,
            max_bytes >> 20,
            loaded,
        )
        self._saved_at = time.monotonic()

    def save_prefix_cache(self, *, force: bool = False) -> None:
        """Persist the prefix cache: when the engine is idle, at most every prefix_cache_save_s, and at shutdown.

        The save runs on the engine thread (the trie is its alone), so it waits for an idle engine rather
        than stall a running batch.
        """
        prefix = self.engine.prefix if self.engine is not None else None
        if prefix is None or (not force and time.monotonic() - self._saved_at < self.settings.prefix_cache_save_s):
            return
        if not self._saving.acquire(blocking=force):
            return
        try:
            batch = self.engine.batcher.stats()
            if not force and (batch["active"] or batch["waiting"]):
                return
            disk = (self.settings.prefix_cache_disk_mb << 20) or prefix.max_bytes
            written = self.engine.save_prefix_cache(self.prefix_dir, disk)
            log.info("prefix cache saved: %d entries", written)
        except Exception:
            log.exception("could not save the prefix cache")
        finally:
            self._saved_at = time.monotonic()
            self._saving.release()

    def beat(self) -> None:
        self._maybe_clear_prefix_cache()
        stats: dict[str, Any] = {}
        if self.engine is not None:
            # What the api checks requests against before it enqueues them, and names the weights by.
            stats["model"] = {
                "vocab_size": self.engine.vocab_size,
                "context_length": self.engine.context_length,
                "fingerprint": self.engine.key.revision,
            }
            stats["batch"] = self.engine.batcher.stats()
            if self.engine.prefix is not None:
                stats["prefix_cache"] = self.engine.prefix.snapshot()
        with self.sessions.begin() as session:
            repos.heartbeat(
                session=session,
                name=self.name,
                model=self.settings.model_name,
                model_loaded=self.engine is not None,
                error=self.load_error,
                started_at=self.started_at,
                stats=stats or None,
            )

    def _maybe_clear_prefix_cache(self) -> None:
        """Drop the prefix cache when an operator asked (the `prefix_cache_clears` counter moved since the
        last beat), on the engine thread that owns it, and save the empty state."""
        with self.sessions() as session:
            clears = repos.counters(session=session).get(PREFIX_CACHE_CLEARS, 0)
        seen, self._prefix_clears = self._prefix_clears, clears
        if seen is None or clears == seen or self.engine is None or self.engine.prefix is None:
            return
        prefix = self.engine.prefix
        self.engine.batcher.call(prefix.clear)
        log.info("prefix cache cleared on request")
        self.save_prefix_cache(force=True)

    def start_heartbeat(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.settings.heartbeat_s):
                if self.settings.supervisor_pid and os.getppid() != self.settings.supervisor_pid:
                    # `mlxq serve` died without stopping us (kill -9): stop as if it had, not live on
                    # as an orphan holding the model's memory.
                    log.warning("the supervising process %d is gone; stopping", self.settings.supervisor_pid)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                try:
                    self.beat()
                except Exception:
                    log.exception("heartbeat failed")

        threading.Thread(target=loop, name="mlxq-heartbeat", daemon=True).start()

    def begin_shutdown(self) -> None:
        """Interrupt running jobs at once (they go back to the queue) so a stop takes seconds, not as long
        as the longest generation."""
        self.stopping.set()
        self.cancels.cancel_all()

    def shutdown(self) -> None:
        self._stop.set()
        self.save_prefix_cache(force=True)
        if self.engine is not None:
            self.engine.close()
        try:
            with self.sessions.begin() as session:
                repos.remove_worker(session=session, name=self.name)
        except Exception:
            log.exception("could not deregister worker")

    # -- jobs ------------------------------------------------------------------------------

    def run_job(self, job_id: str) -> None:
        """Claim the job and run it (one Celery thread); a low-priority job's end makes room for the next."""
        if self.stopping.is_set():
            with self.sessions.begin() as session:  # sent again by whoever starts next
                repos.release_job(session=session, job_id=job_id)
            return
        with self.sessions.begin() as session:
            job = repos.start_job(session=session, job_id=job_id, worker=self.name)
        if job is None:
            log.info("job %s is not queued (finished, cancelled or taken); skipping", job_id)
            return
        try:
            self._run(job)
        finally:
            if job.priority == "low" and not self.stopping.is_set():
                try:
                    delivery.resend(self.sessions, self.celery, self.settings, lost_after_s=None)
                except Exception:
                    log.exception("could not send the next low-priority jobs")

    def _run(self, job: Job) -> None:
        """Hand the job to the batch, relay its events, persist the outcome."""
        job_id, kind, request, priority, stream = job.id, job.kind, job.request, job.priority, job.stream
        if job.attempts > 1:
            # A client already streaming it has had part of the answer: it must know the rest starts over.
            self._publish(job_id, [events.restarted(job.attempts)])
        if self.engine is None:
            self._fail(job_id, job_error(503, f"model not loaded: {self.load_error}", code="model_not_loaded"))
            return
        try:
            if kind == "count":  # the tokenizer alone, on this thread: nothing for the batch to do
                tokens = len(self.engine.chat_tokens(request))
                answer: dict[str, Any] = {
                    "input_tokens": tokens,
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "cached_tokens": 0},
                }
            else:
                answer = self._relay(job_id, self.engine.submit(kind, request, priority=priority), stream)
        except Exception as exc:
            error = getattr(exc, "error", None)
            if error is None:
                log.error("job %s failed: %s", job_id, traceback.format_exc())
                error = job_error(500, f"generation failed: {type(exc).__name__}: {exc}")
            self._fail(job_id, error)
            return
        if answer.get("finish_reason") == "cancelled":
            if self.stopping.is_set():
                with self.sessions.begin() as session:
                    repos.requeue_job(session=session, job_id=job_id)
                return
            self._fail(job_id, dict(CANCELLED), status="cancelled")
            return
        self._succeed(job, answer)

    def _relay(self, job_id: str, seq: Any, stream: bool) -> dict[str, Any]:
        """Relay a sequence's events to the channel until it ends; its answer."""
        with self.cancels.watch(job_id, seq.cancelled):
            for relayed in drain(seq.events):
                if shown := coalesce(relayed, deltas=stream):
                    self._publish(job_id, shown)
        if seq.error is not None:
            raise seq.error
        return dict(seq.result or {})

    def _succeed(self, job: Job, answer: dict[str, Any]) -> None:
        """Persist the answer (job row, response cache), then tell the waiting clients."""
        job_id, kind, request, store, ttl_s, model = job.id, job.kind, job.request, job.store, job.ttl_s, job.model
        # The key names the weights that made the answer, which are this worker's.
        key = request_key(kind, request, weights=self.engine.key.revision, namespace=job.namespace)

        def persist() -> bool:
            with self.sessions.begin() as session:
                finished = repos.finish_job(session=session, job_id=job_id, status="succeeded", result=answer)
                if store:
                    repos.put_entry(
                        session=session,
                        key=key,
                        kind=kind,
                        model=model,
                        result=answer,
                        ttl_s=ttl_s or self.settings.cache_ttl_s,
                        namespace=job.namespace,
                    )
                return finished

        if not self._write(job_id, persist):
            log.info("job %s had ended before its answer was ready (cancelled or given up)", job_id)
        # The answer travels with the event, so the waiting client needs no further read.
        self._publish(job_id, [events.done(answer)])
        if store:
            with self.sessions.begin() as session:
                repos.purge_expired(session=session)
                repos.evict_lru(session=session, max_entries=self.settings.cache_max_entries)
        self.save_prefix_cache()

    def _fail(self, job_id: str, error: JobError | dict[str, Any], status: str = "failed") -> None:
        def persist() -> bool:
            with self.sessions.begin() as session:
                return repos.finish_job(session=session, job_id=job_id, status=status, error=error)

        self._write(job_id, persist)
        self._publish(job_id, [events.error(error)])

    def _publish(self, job_id: str, items: list[events.Event]) -> None:
        """Events are a courtesy to waiting clients; the job row is the record. A broker that is down (a Redis
        restart) loses some events, never the job: the api answers from the row, and fills in a stream's
        missing text from the result."""
        try:
            self.channel.publish_many(job_id, items)
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


def drain(source: queue.SimpleQueue[events.Event | None]) -> Iterator[list[events.Event]]:
    """Everything queued at each wake-up, as one list, until the end marker (None)."""
    while True:
        batch: list[events.Event] = []
        item = source.get()
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


class CancelWatch:
    """One poll of the job rows (every CANCEL_POLL_S, only while jobs run) for every running job."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Condition()
        threading.Thread(target=self._loop, name="mlxq-cancel-watch", daemon=True).start()

    @contextlib.contextmanager
    def watch(self, job_id: str, flag: threading.Event) -> Iterator[None]:
        with self._lock:
            self._flags[job_id] = flag
            self._lock.notify()
        try:
            yield
        finally:
            with self._lock:
                self._flags.pop(job_id, None)

    def cancel_all(self) -> None:
        with self._lock:
            for flag in self._flags.values():
                flag.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._flags:
                    self._lock.wait()
                ids = list(self._flags)
            try:
                with self._sessions() as session:
                    cancelled = repos.cancelled_among(session=session, job_ids=ids)
            except Exception:
                log.exception("cancel poll failed")
                cancelled = []
            with self._lock:
                for job_id in cancelled:
                    if (flag := self._flags.get(job_id)) is not None:
                        flag.set()
            time.sleep(CANCEL_POLL_S)
