"""The worker's long-lived state and the job runner the Celery task delegates to.

A task is like a web view: load the job, call the engine, persist, publish.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from mlxq import repos
from mlxq.channel import Channel
from mlxq.contract import CANCELLED, job_error
from mlxq.settings import Settings

log = logging.getLogger(__name__)

# A cancelled job (client gone, DELETE) stops within this long, well under a second.
CANCEL_POLL_S = 0.25


class Runtime:
    """Model, DB sessions and stream channel, made once per worker process."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], channel: Channel) -> None:
        self.settings = settings
        self.sessions = sessions
        self.channel = channel
        self.name = f"{socket.gethostname()}:{settings.queue}"
        self.started_at = time.time()
        self.engine: Any = None
        self.load_error: str | None = None
        self._stop = threading.Event()
        self._saved_at = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------

    def load_model(self) -> None:
        from worker.engine import Engine

        try:
            self.engine = Engine.load(self.settings.model)
            log.info("model %s loaded", self.settings.model)
            self._enable_prefix_cache()
            self.engine.warm_up()
        except Exception as exc:  # the worker stays up and reports why, never answers with a fake
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.settings.model, self.load_error)
        with self.sessions.begin() as session:
            failed = repos.fail_running_jobs(session=session, worker=self.name,
                                             message="the worker restarted while this job was running")
        if failed:
            log.warning("failed %d jobs left running by a previous worker process", failed)
        self.beat()

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
        log.info("prefix cache on: %d entries, %d MB; %d entries loaded from disk",
                 self.settings.prefix_cache_size, max_bytes >> 20, loaded)
        self._saved_at = time.monotonic()

    def save_prefix_cache(self, *, force: bool = False) -> None:
        """Persist the prefix cache; between jobs every prefix_cache_save_s, and at shutdown."""
        prefix = self.engine.prefix if self.engine is not None else None
        if prefix is None or (not force and time.monotonic() - self._saved_at < self.settings.prefix_cache_save_s):
            return
        disk = (self.settings.prefix_cache_disk_mb << 20) or prefix.max_bytes
        try:
            written = prefix.save(self.prefix_dir, disk)
            log.info("prefix cache saved: %d entries", written)
        except Exception:
            log.exception("could not save the prefix cache")
        self._saved_at = time.monotonic()

    def beat(self) -> None:
        prefix = self.engine.prefix if self.engine is not None else None
        with self.sessions.begin() as session:
            repos.heartbeat(session=session, name=self.name, model=self.settings.model_name,
                            model_loaded=self.engine is not None, error=self.load_error,
                            started_at=self.started_at,
                            stats={"prefix_cache": prefix.snapshot()} if prefix is not None else None)

    def start_heartbeat(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.settings.heartbeat_s):
                try:
                    self.beat()
                except Exception:
                    log.exception("heartbeat failed")

        threading.Thread(target=loop, name="mlxq-heartbeat", daemon=True).start()

    def shutdown(self) -> None:
        self._stop.set()
        self.save_prefix_cache(force=True)
        try:
            with self.sessions.begin() as session:
                repos.remove_worker(session=session, name=self.name)
        except Exception:
            log.exception("could not deregister worker")

    # -- jobs ------------------------------------------------------------------------------

    def run_job(self, job_id: str) -> None:
        with self.sessions.begin() as session:
            job = repos.start_job(session=session, job_id=job_id, worker=self.name)
            if job is None:
                log.info("job %s already finished or unknown; skipping", job_id)
                return
            kind, request, key, store, ttl_s, model = job.kind, job.request, job.key, job.store, job.ttl_s, job.model
        if self.engine is None:
            self._fail(job_id, job_error(503, f"model not loaded: {self.load_error}", code="model_not_loaded"))
            return
        try:
            result = self.engine.generate(kind, request, emit=lambda event: self.channel.publish(job_id, event),
                                          should_stop=self._cancel_check(job_id))
        except Exception as exc:
            error = getattr(exc, "error", None)
            if error is None:
                log.error("job %s failed: %s", job_id, traceback.format_exc())
                error = job_error(500, f"generation failed: {type(exc).__name__}: {exc}")
            self._fail(job_id, error)
            return
        if result["finish_reason"] == "cancelled":
            self._fail(job_id, dict(CANCELLED), status="cancelled")
            return
        answer = dict(result)
        with self.sessions.begin() as session:
            repos.finish_job(session=session, job_id=job_id, status="succeeded", result=answer)
            if store:
                repos.put_entry(session=session, key=key, kind=kind, model=model, result=answer,
                                ttl_s=ttl_s or self.settings.cache_ttl_s)
        # The answer travels with the event, so the waiting client needs no further read.
        self.channel.publish(job_id, {"type": "done", "result": answer})
        if store:
            with self.sessions.begin() as session:
                repos.purge_expired(session=session)
                repos.evict_lru(session=session, max_entries=self.settings.cache_max_entries)
        self.save_prefix_cache()

    def _fail(self, job_id: str, error: dict[str, Any], status: str = "failed") -> None:
        with self.sessions.begin() as session:
            repos.finish_job(session=session, job_id=job_id, status=status, error=error)
        self.channel.publish(job_id, {"type": "error", "error": error})

    def _cancel_check(self, job_id: str) -> Callable[[], bool]:
        """A cheap should_stop: looks at the job row at most every CANCEL_POLL_S seconds."""
        last = [time.monotonic()]

        def cancelled() -> bool:
            now = time.monotonic()
            if now - last[0] < CANCEL_POLL_S:
                return False
            last[0] = now
            with self.sessions() as session:
                return repos.job_status(session=session, job_id=job_id) == "cancelled"

        return cancelled
