"""Admission: the one decision every request goes through (sync and streamed routes, `/v1/jobs`, batch
lines): answer from the response cache, join an identical job in flight, or make a new job.

request body -> api.pipeline.prepare (canonical) -> `spec_for` (key, cache policy: a JobSpec) -> `decide` (one
transaction) -> mlxq.delivery (the task message) -> api.pipeline.follow (the job's events) -> the dialect's renderer.

Everything that touches SQL or the broker runs in a thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.errors import APIError
from api.operations.stats import StatsRecorder
from api.pipeline.model_info import ModelInfo, worker_unavailable
from mlxq.contract import JobKind
from mlxq.delivery import BrokerUnavailable, Delivery
from mlxq.jobspec import CachePolicy, JobSpec
from mlxq.keys import request_key
from mlxq.repos import cache_entries, idempotency_keys, jobs
from mlxq.request import Request
from mlxq.settings import Settings
from mlxq.states import CacheOutcome, JobStatus
from mlxq.weights import local_fingerprint


@dataclass
class Outcome:
    """What admission decided for one request."""

    result: dict[str, Any]  # the cached answer; filled in later for a job (api.pipeline.follow)
    cache: CacheOutcome
    key: str
    job_id: str | None = None  # None: answered from the cache with no job row
    joined: bool = False  # an identical job (or an earlier submit with the same idempotency key) already existed
    waiting_for_room: bool = False  # it joined a low-priority job still waiting for room (mlxq.delivery)
    unanswered: bool = False  # its client was told to send it again (api.pipeline.follow.told_to_retry)

    @property
    def new(self) -> bool:
        return self.job_id is not None and not self.joined and self.cache != CacheOutcome.HIT


T = TypeVar("T")


class Admission:
    """Made once per api process (api.services) and injected."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        delivery: Delivery,
        stats: StatsRecorder,
        model_info: ModelInfo,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._delivery = delivery
        self._stats = stats
        self._model_info = model_info

    # -- request -> spec -------------------------------------------------------------------

    def namespace(self, owner: str | None) -> str:
        """The response-cache namespace of `owner`: its own, unless MLXQ_CACHE_SCOPE=global."""
        return owner if owner and self._settings.cache_scope == "key" else ""

    async def weights(self, model: str) -> str:
        """`model`'s weights fingerprint: as a live worker publishes it, else of the model directory here."""
        published = (await self._model_info.get(model) or {}).get("fingerprint")
        path = self._settings.served_models.get(model, model)
        return published or local_fingerprint(path) or f"unknown:{path}"

    async def spec_for(
        self,
        kind: JobKind,
        request: Request,
        *,
        owner: str | None,
        policy: CachePolicy = CachePolicy(),
        stream: bool = False,
        endpoint: str | None = None,
    ) -> JobSpec:
        """The job spec of one canonical request to `endpoint` (the path called) as `owner` (the API key's id; None
        with keys off). Callers that differ (a submitted job, a batch line) `dataclasses.replace` the fields that
        say how."""
        namespace = self.namespace(owner)
        key = request_key(kind, request, weights=await self.weights(request.model), namespace=namespace)
        cacheable = request.deterministic or self._settings.cache_sampled
        return JobSpec(
            key=key,
            kind=kind,
            request=request,
            cache=policy.effective(cacheable),
            priority=request.priority,
            stream=stream,
            owner=owner,
            namespace=namespace,
            session=request.session,
            endpoint=endpoint,
        )

    def with_idempotency_key(self, spec: JobSpec, key: str | None) -> JobSpec:
        """A submitted job's spec: kept as a row even when cached, retried safely under `key` (one API key's
        retries never find another key's jobs)."""
        if key and spec.owner:
            key = f"{spec.owner}:{key}"
        return dataclasses.replace(spec, keep_row=True, idempotency_key=key or None)

    # -- the decision ----------------------------------------------------------------------

    def decide(self, session: Session, spec: JobSpec, *, lost: bool = False) -> Outcome:
        """Inside the caller's transaction: the cached answer, an identical job in flight, or a new job.
        Raises IntegrityError when an identical job was created at the same moment: run the caller's transaction
        through `retry_on_conflict`, whose next try joins that job."""
        missed = CacheOutcome.MISS if spec.cache.lookup else CacheOutcome.BYPASS
        if spec.idempotency_key and (
            known := idempotency_keys.job_for_idempotency_key(session=session, key=spec.idempotency_key)
        ):
            if known.key != spec.key:  # another request under a used key: refused (IETF draft, Stripe), not joined
                raise APIError(
                    422,
                    "This Idempotency-Key was already used with a different request body; use a new key for a new "
                    "request (a retry must send the same body).",
                    code="idempotency_key_reused",
                    param="Idempotency-Key",
                )
            hit = known.status == JobStatus.SUCCEEDED
            return Outcome(known.result or {}, CacheOutcome.HIT if hit else missed, spec.key, known.id, joined=True)
        outcome = self._decide(session, spec, missed, lost=lost)
        if spec.idempotency_key and outcome.job_id:
            idempotency_keys.remember_idempotency_key(session=session, key=spec.idempotency_key, job_id=outcome.job_id)
        return outcome

    def _decide(self, session: Session, spec: JobSpec, missed: CacheOutcome, *, lost: bool = False) -> Outcome:
        if spec.cache.lookup and (cached := cache_entries.lookup_result(session=session, key=spec.key)) is not None:
            if not spec.keep_row:
                return Outcome(cached, CacheOutcome.HIT, spec.key)
            job = jobs.create_job(session=session, spec=spec, sent=False, result=cached)
            return Outcome(cached, CacheOutcome.HIT, spec.key, job.id)
        if lost:  # a cached answer is still served; anything that needs the model would wait for nothing
            raise worker_unavailable(spec.model, self._model_info.wait_s)
        running = jobs.find_inflight(session=session, key=spec.key) if spec.cache.store else None
        if running is not None:
            waiting = jobs.join_job(session=session, job_id=running.id, priority=spec.priority, attached=spec.attached)
            return Outcome({}, missed, spec.key, running.id, joined=True, waiting_for_room=waiting)
        ceiling = self._settings.max_queue_depth
        if spec.counted and ceiling and jobs.queue_depth(session=session) >= ceiling:
            raise APIError(
                429,
                f"{ceiling} requests are already waiting; retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        job = jobs.create_job(session=session, spec=spec, sent=self._delivery.sends_at_once(spec))
        return Outcome({}, missed, spec.key, job.id)

    def retry_on_conflict(self, transaction: Callable[[], T]) -> T:
        """Run `transaction` (one transaction that admits through `decide`: a request's, or a whole batch's
        with its lines), again from the start when it met an identical job (or idempotency key) created at
        the same moment: the next try finds that one in flight and joins it. The one conflict handling of
        every admission; 503 after three tries."""
        for _attempt in range(3):
            try:
                return transaction()
            except IntegrityError:  # rolled back: nothing of this try is left
                continue
        raise APIError(503, "Could not enqueue the request; try again.", code="enqueue_conflict")

    def _admit(self, spec: JobSpec, lost: bool) -> Outcome:
        """One thread hop and one transaction for the whole decision, then the delivery of its job (routed
        first, so a new job's row names its worker)."""
        spec = self._delivery.route(spec)

        def decided() -> Outcome:
            with self._sessions.begin() as session:
                return self.decide(session, spec, lost=lost)

        outcome = self.retry_on_conflict(decided)
        if outcome.job_id is not None and (outcome.new or outcome.waiting_for_room):
            try:  # after the commit, so the worker always finds the row
                self._delivery.admitted(
                    outcome.job_id, spec, new=outcome.new, waiting_for_room=outcome.waiting_for_room
                )
            except BrokerUnavailable as exc:
                raise APIError(503, f"The job queue is unavailable: {exc}", code="broker_unavailable") from exc
        return outcome

    async def submit(self, spec: JobSpec) -> Outcome:
        """Admit one request (module doc) and count its cache outcome. A request someone waits for is refused
        (503) when no worker of its model has been alive for longer than it would wait (`ModelInfo.lost`), unless
        the cache answers it; submitted and detached work waits for a worker regardless."""
        lost = spec.attached and await self._model_info.lost(spec.model)
        outcome = await asyncio.to_thread(self._admit, spec, lost)
        if outcome.cache == CacheOutcome.HIT:
            self._stats.hit(spec.key, spec.namespace)
        else:
            name = "cache_misses" if outcome.cache == CacheOutcome.MISS else "cache_bypass"
            self._stats.count(name, namespace=spec.namespace)
        return outcome
