"""The request path shared by every endpoint: canonical key -> response cache -> job -> result.

Everything that touches SQL or the broker runs in a thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError
from api.services import Services
from mlxq import delivery, events, repos
from mlxq.contract import Priority, job_error
from mlxq.events import Event
from mlxq.keys import is_deterministic, request_key
from mlxq.weights import local_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachePolicy:
    """What the client allowed: look up (no `no-cache`), store (no `no-store`), entry lifetime."""

    lookup: bool = True
    store: bool = True
    ttl_s: float | None = None

    @classmethod
    def parse(cls, header: str | None, body: dict[str, Any] | None) -> CachePolicy:
        lookup, store, ttl = True, True, None
        for part in (header or "").lower().split(","):
            name, _, value = part.strip().partition("=")
            if name == "no-cache":
                lookup = False
            elif name == "no-store":
                store = False
            elif name in ("max-age", "s-maxage") and value.strip().isdigit():
                ttl = float(value)
        body = body or {}
        if body.get("no-cache"):
            lookup = False
        if body.get("no-store"):
            store = False
        for name in ("ttl", "s-maxage", "max-age"):
            if isinstance(body.get(name), (int, float)) and not isinstance(body[name], bool):
                ttl = float(body[name])
        if ttl is not None and ttl <= 0:
            # A lifetime of zero: nothing cached is fresh enough, and nothing is worth storing.
            return cls(lookup=False, store=False)
        return cls(lookup=lookup, store=store, ttl_s=ttl)


@dataclass
class Outcome:
    result: dict[str, Any]
    cache: str  # HIT | MISS | BYPASS
    key: str
    job_id: str | None = None
    joined: bool = False  # an identical job was already in flight
    needs_send: bool = False  # it was a low-priority job waiting for room, which this client cannot wait for


class Pipeline:
    def __init__(self, services: Services) -> None:
        self.s = services

    # -- SQL steps (run in threads) --------------------------------------------------------

    def _resolve(
        self,
        *,
        key: str,
        kind: str,
        canonical: dict[str, Any],
        lookup: bool,
        store: bool,
        ttl_s: float | None,
        priority: Priority,
        stream: bool,
        as_job: bool = False,
        idempotency_key: str | None = None,
        owner: str | None = None,
        namespace: str = "",
    ) -> Outcome:
        """One thread hop and one transaction for the whole decision: cached answer, an identical job in
        flight, or a new job. `as_job` (a submitted job) makes a job row even for a cached answer;
        `idempotency_key` returns the job an earlier submit with that key got."""
        outcome = "MISS" if lookup else "BYPASS"
        for _attempt in range(3):
            try:
                with self.s.sessions.begin() as session:
                    if (
                        idempotency_key
                        and (known := repos.job_for_idempotency_key(session=session, key=idempotency_key)) is not None
                    ):
                        return Outcome(
                            known.result or {},
                            "HIT" if known.status == "succeeded" else outcome,
                            key,
                            known.id,
                            joined=True,
                        )
                    found = self._decide(
                        session,
                        key=key,
                        kind=kind,
                        canonical=canonical,
                        lookup=lookup,
                        store=store,
                        ttl_s=ttl_s,
                        priority=priority,
                        stream=stream,
                        as_job=as_job,
                        owner=owner,
                        namespace=namespace,
                    )
                    if idempotency_key and found.job_id:
                        repos.remember_idempotency_key(session=session, key=idempotency_key, job_id=found.job_id)
            except IntegrityError:  # an identical job (or key) was created at the same moment: join it
                continue
            if found.cache != "HIT" and not found.joined:
                assert found.job_id is not None  # a new job: _decide made its row
                # After the commit, so the worker always finds the row.
                self._send(found.job_id, kind=kind, chars=len(json.dumps(canonical)))
            elif found.needs_send:  # joined a low-priority job still waiting for room: it goes now
                delivery.resend(self.s.sessions, self.s.celery, self.s.settings, lost_after_s=None)
            return found
        raise APIError(503, "Could not enqueue the request; try again.", code="enqueue_conflict")

    def _decide(
        self,
        session: Session,
        *,
        key: str,
        kind: str,
        canonical: dict[str, Any],
        lookup: bool,
        store: bool,
        ttl_s: float | None,
        priority: Priority,
        stream: bool,
        as_job: bool,
        owner: str | None,
        namespace: str,
    ) -> Outcome:
        outcome = "MISS" if lookup else "BYPASS"
        job_fields = {
            "key": key,
            "kind": kind,
            "model": canonical["model"],
            "request": canonical,
            "ttl_s": ttl_s,
            "priority": priority,
            "stream": stream,
            "owner": owner,
            "namespace": namespace,
        }
        if lookup and (cached := repos.lookup_result(session=session, key=key)) is not None:
            if not as_job:
                return Outcome(cached, "HIT", key)
            job = repos.create_job(session=session, store=False, result=cached, **job_fields)
            return Outcome(cached, "HIT", key, job.id)
        running = repos.find_inflight(session=session, key=key) if store else None
        if running is not None:
            needs_send = repos.join_job(session=session, job_id=running.id, priority=priority)
            return Outcome({}, outcome, key, running.id, joined=True, needs_send=needs_send)
        ceiling = self.s.settings.max_queue_depth
        if ceiling and repos.queue_depth(session=session) >= ceiling:
            raise APIError(
                429,
                f"{ceiling} requests are already waiting; retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        # The client asking waits for it (a submitted job's submitter never leaves).
        job = repos.create_job(session=session, store=store, **job_fields)
        return Outcome({}, outcome, key, job.id)

    def _send(self, job_id: str, *, kind: str, chars: int) -> None:
        try:
            delivery.send(self.s.celery, self.s.settings.queue, job_id, kind=kind, chars=chars)
        except Exception as exc:
            with self.s.sessions.begin() as session:
                repos.finish_job(
                    session=session,
                    job_id=job_id,
                    status="failed",
                    error=dict(job_error(503, f"could not enqueue the job: {exc}", code="broker_unavailable")),
                )
            raise APIError(503, f"The job queue is unavailable: {exc}", code="broker_unavailable") from exc

    def _job_state(self, job_id: str) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
        with self.s.sessions() as session:
            job = repos.get_job(session=session, job_id=job_id)
            if job is None:
                raise APIError(404, f"No job {job_id}.", code="job_not_found")
            return job.status, job.result, job.error

    def namespace(self, owner: str | None) -> str:
        """The response-cache namespace of `owner`: its own, unless MLXQ_CACHE_SCOPE=global."""
        return owner if owner and self.s.settings.cache_scope == "key" else ""

    async def weights(self) -> str:
        """The served weights' fingerprint: as a live worker publishes it, else of the model directory here."""
        published = (await self.s.model_info.get() or {}).get("fingerprint")
        return published or local_fingerprint(self.s.settings.model) or f"unknown:{self.s.settings.model}"

    # -- the path --------------------------------------------------------------------------

    async def submit(
        self,
        *,
        kind: str,
        canonical: dict[str, Any],
        policy: CachePolicy,
        priority: Priority = "interactive",
        stream: bool = True,
        as_job: bool = False,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> Outcome:
        """Answer from the cache, or enqueue a job (joining an identical one in flight), as `owner` (the API
        key's id; None with keys off)."""
        namespace = self.namespace(owner)
        key = request_key(kind, canonical, weights=await self.weights(), namespace=namespace)
        if idempotency_key and owner:
            idempotency_key = f"{owner}:{idempotency_key}"  # one key's retries, never another's jobs
        cacheable = is_deterministic(canonical) or self.s.settings.cache_sampled
        outcome = await asyncio.to_thread(
            self._resolve,
            key=key,
            kind=kind,
            canonical=canonical,
            lookup=cacheable and policy.lookup,
            store=cacheable and policy.store,
            ttl_s=policy.ttl_s,
            priority=priority,
            stream=stream,
            as_job=as_job,
            idempotency_key=idempotency_key,
            owner=owner,
            namespace=namespace,
        )
        if outcome.cache == "HIT":
            self.s.stats.hit(key)
        else:
            self.s.stats.count("cache_misses" if outcome.cache == "MISS" else "cache_bypass")
        return outcome

    async def run(
        self,
        *,
        kind: str,
        canonical: dict[str, Any],
        policy: CachePolicy,
        priority: Priority = "interactive",
        owner: str | None = None,
    ) -> Outcome:
        """The synchronous path: the client waits for the answer."""
        outcome = await self.submit(
            kind=kind, canonical=canonical, policy=policy, priority=priority, stream=False, owner=owner
        )
        if outcome.job_id is not None:
            try:
                outcome.result = await self.wait(outcome.job_id)
            finally:
                self.leave_soon(outcome.job_id, abandon=False)
        return outcome

    async def events(self, job_id: str, *, replayable: bool = True) -> AsyncGenerator[Event, None]:
        """A job's events from the stream channel, ending with `done` or `error`.

        The job row is re-checked after each quiet second, so a lost event cannot hang a client;
        past `request_timeout_s` the iterator raises a 504, and when the server begins to stop, a 503.
        When the job restarts (its worker died), the text already relayed is not relayed twice: a
        `replayable` (deterministic) job produces it again, so that much of the new text is skipped;
        any other job's new text would not continue the old, so the client gets a 503 to retry.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue()

        async def pump() -> None:
            async for event in self.s.channel.listen(job_id):
                await queue.put(event)

        pumper = asyncio.get_running_loop().create_task(pump())
        deadline = time.monotonic() + self.s.settings.request_timeout_s
        ended_quietly = False
        relayed = skip = 0  # characters of text relayed; of the restarted job's text still to skip
        try:
            while True:
                if self.s.closing.is_set():
                    raise APIError(503, "The server is shutting down; retry the request.", code="shutting_down")
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    try:
                        status, result, error = await asyncio.to_thread(self._job_state, job_id)
                    except DBAPIError:  # the database is restarting: keep waiting, within the deadline
                        status, result, error = "unknown", None, None
                    if status in repos.TERMINAL and not ended_quietly:
                        # The row can be ahead of the channel: give the events in flight one more quiet
                        # period to arrive before answering from the row (which has no deltas).
                        ended_quietly = True
                        continue
                    if status == "succeeded":
                        event = events.done(result or {})
                    elif status in repos.TERMINAL:
                        event = events.error(error or job_error(500, f"job {status}"))
                    elif time.monotonic() > deadline:
                        raise APIError(
                            504, f"Job {job_id} did not finish in time; poll /v1/jobs/{job_id}.", code="timeout"
                        ) from None
                    else:
                        yield events.waiting(status)
                        continue
                if event["type"] == "restarted":
                    if relayed and not replayable:
                        raise APIError(
                            503,
                            "The worker stopped in the middle of this answer; retry the request.",
                            code="worker_lost",
                        )
                    skip, relayed = relayed, 0
                    continue
                if event["type"] == "delta":
                    text = event.get("content") or ""
                    if skip:
                        cut = min(skip, len(text))
                        skip -= cut
                        if cut == len(text):
                            continue
                        event = {**event, "content": text[cut:], "logprobs": None}
                    relayed += len(event.get("content") or "")
                yield event
                if events.is_final(event):
                    return
        finally:
            pumper.cancel()

    async def wait(self, job_id: str) -> dict[str, Any]:
        """Wait for a job's result; its error becomes an APIError."""
        async for event in self.events(job_id):
            if event["type"] == "done":
                return event.get("result") or {}
            if event["type"] == "error":
                raise APIError.from_job(event.get("error") or {})
        raise APIError(500, f"job {job_id} ended without a result")

    def leave_soon(self, job_id: str, *, abandon: bool) -> None:
        """A client stops waiting for a job (from anywhere, even a cancelled task: the executor runs it
        regardless). A client that went away early (`abandon`) cancels the job if nobody else waits."""

        def leave() -> None:
            with self.s.sessions.begin() as session:
                repos.leave_job(session=session, job_id=job_id, abandon=abandon)

        asyncio.get_running_loop().run_in_executor(None, leave)
