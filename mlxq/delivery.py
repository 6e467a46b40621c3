"""At-least-once delivery of jobs: which job's task message is sent, when, and to which worker.

Every caller asks this module; none sends a task on its own. The admission path tells it about a job it
admitted, the worker tells it when it starts and when a low-priority job ends, the api's house-keeping asks
it to find lost messages and the jobs of workers that are gone. It decides:
- when: an interactive job's message goes right after its row is committed; windowed work (batch lines) goes
  only while fewer than `Settings.low_window` low-priority jobs are in flight, so the broker and the workers'
  consumer threads never fill with it and an interactive request is always taken at once;
- which: besides new jobs, those whose message may be lost. A message is lost when a worker dies holding it
  or before taking it from its queue, when the broker restarts without persistence, or when a send fails
  after the job's row was committed. The job row, not the broker, is the record: a queued job with `sent_at`
  NULL needs its message, and one sent long ago while its worker's queue is empty lost it. A duplicate
  message is harmless: only a queued job can be claimed (`repos.jobs.start_job`);
- where (`route`, the one routing decision): each worker consumes its own queue (`worker_queue`), and a job
  goes to one live worker of its model: the one whose prefix cache holds the longest prefix of the request
  (by the message-boundary hashes of mlxq.keys.prefix_hashes that each worker publishes in its heartbeat, and
  those of the requests just routed to it, which it holds once they are done),
  unless that worker's load exceeds the least loaded one's by more than `Settings.route_load_margin` (then the
  least loaded); ties by a consistent (rendezvous) hash of the job's session, so a session stays on one worker
  before anything of it is cached, and a worker that joins takes only the sessions it wins. Batch lines
  spread by load (no margin). With no live worker of its model a job waits unsent; a starting worker asks
  for the waiting jobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from mlxq.contract import GENERATE_TASK, job_error
from mlxq.jobspec import JobSpec, Route
from mlxq.keys import cache_partition, prefix_hashes
from mlxq.repos import jobs, workers
from mlxq.settings import Settings
from mlxq.states import JobStatus, RouteReason

log = logging.getLogger(__name__)

# How long a read of the live workers serves routing decisions (heartbeats come every `heartbeat_s`).
VIEW_TTL_S = 0.25
# How long a worker is taken to hold the prefix of a request routed to it before its heartbeat says so: longer
# than a job queues and runs, so a conversation's next turn, sent the moment the answer comes and before the
# worker's next heartbeat is read, finds the worker that has just cached it. At most EXPECTED_MAX a worker, the
# latest (each request routed scans them).
EXPECTED_S = 600.0
EXPECTED_MAX = 1024


class BrokerUnavailable(Exception):
    """A new job's message could not be sent; the job has been failed (`broker_unavailable`)."""


def task_label(job_id: str, kind: str, chars: int, route: Route | None = None) -> str:
    """A task's `argsrepr`: what Flower and the worker's log show for it. Short, and never the prompt."""
    label = f"job {job_id[:8]} {kind} {chars} chars"
    if route is not None and route.worker:
        label += f" → {route.worker} ({route.reason}, {route.matched} cached)"
    return label


def worker_queue(base: str, worker: str) -> str:
    """The queue only `worker` consumes."""
    return f"{base}.w.{re.sub(r'[^A-Za-z0-9_.-]', '_', worker)}"


@dataclass(frozen=True)
class WorkerView:
    """What routing knows of one live worker, from its last heartbeat."""

    name: str
    model: str
    load: int  # sequences it decodes and holds waiting, plus the jobs routed to it since that heartbeat
    prefixes: frozenset[str]  # the message-boundary hashes its prefix cache holds
    # The last boundary hashes of the requests routed to it that its heartbeat has not published yet.
    expected: frozenset[str] = frozenset()


def _score(session: str, worker: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{session}\x1f{worker}".encode()).digest()[:8], "big")


def matched(view: WorkerView, hashes: list[str]) -> int:
    """How many leading message boundaries of a request `view`'s prefix cache holds."""
    for k in range(len(hashes), 0, -1):
        if hashes[k - 1] in view.prefixes or hashes[k - 1] in view.expected:
            return k
    return 0


def choose(views: list[WorkerView], hashes: list[str], session: str, margin: int) -> Route:
    """The routing decision (module doc), pure: among `views` (the live workers of the request's model)."""
    if not views:
        return Route(None, RouteReason.UNROUTED)
    held = {v.name: matched(v, hashes) for v in views}
    best = max(held.values())
    pick = max((v for v in views if held[v.name] == best), key=lambda v: _score(session, v.name))
    least = min(views, key=lambda v: (v.load, -_score(session, v.name)))
    if pick.load > least.load + margin:
        return Route(least.name, RouteReason.BALANCE, held[least.name])
    return Route(pick.name, RouteReason.PREFIX if best else RouteReason.SESSION, best)


def session_of(kind: str, canonical: dict[str, Any], given: str | None, partition: str = "") -> str:
    """What keeps a session on one worker: the client's own session id when it sent one, else the opening of
    the conversation (through its first user turn: a shared system prompt alone would put every session of
    an agent on one worker), in the request's prefix-cache partition."""
    if given:
        return given
    messages = canonical.get("messages") or []
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
    opening = {**canonical, "messages": messages[: first_user + 1]} if kind == "chat" else canonical
    hashes = prefix_hashes(kind, opening, partition=partition)
    return hashes[-1] if hashes else ""


class Delivery:
    """Made once per process (api or worker) and injected."""

    def __init__(self, sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> None:
        self._sessions = sessions
        self._celery = celery
        self._settings = settings
        self._lock = threading.Lock()
        self._views: list[WorkerView] = []
        self._read_at = float("-inf")
        # Each worker's last heartbeat seen, and the jobs routed to it since that have not been seen to end (a
        # session's turns sent back to back must not pile up as load until the next heartbeat).
        self._beats: dict[str, float] = {}
        self._routed: dict[str, set[str]] = {}
        # The last boundary hash of each request routed to a worker, and when: that worker will hold it once the
        # job is done. Kept until the worker's heartbeat publishes it (then the heartbeat is the record: an
        # eviction drops it) or EXPECTED_S passes (the worker did not cache it).
        self._expected: dict[str, dict[str, float]] = {}

    # -- the decisions ---------------------------------------------------------------------

    def sends_at_once(self, spec: JobSpec) -> bool:
        """Whether a new job's message goes right after its commit (`sent_at` stamped at creation), or waits:
        for room among low-priority work, or for a live worker of its model."""
        return not spec.windowed and spec.route is not None and spec.route.worker is not None

    def queue_for(self, worker: str) -> str:
        return worker_queue(self._settings.queue, worker)

    def route(self, spec: JobSpec) -> JobSpec:
        """`spec` with its route: the worker it goes to (module doc). A windowed job is routed when it is sent."""
        if spec.windowed:
            return spec
        route = self._route(spec.model, spec.kind, spec.request.wire(), spec.session, spec.namespace)
        return dataclasses.replace(spec, route=route)

    def _route(
        self,
        model: str,
        kind: str,
        canonical: dict[str, Any],
        session: str | None,
        namespace: str,
        *,
        spread: bool = False,
    ) -> Route:
        """`namespace`: the job's cache namespace, which with its `cache_salt` is the prefix-cache partition the
        worker published its hashes in (mlxq.keys.cache_partition). `spread`: a batch line, which goes to the least
        loaded worker unless another is as little loaded (so a batch spreads over every worker of its model, by
        load)."""
        views = [v for v in self.live_workers() if v.model == model]
        if self._settings.routing == "load":  # no prefix, no session: the least loaded, ties at random
            return choose(views, [], uuid.uuid4().hex, 0)
        margin = 0 if spread else self._settings.route_load_margin
        partition = cache_partition(namespace, canonical.get("cache_salt"))
        hashes = prefix_hashes(kind, canonical, partition=partition)
        route = choose(views, hashes, session_of(kind, canonical, session, partition), margin)
        if route.worker is not None and hashes and not spread:  # a batch line has no next turn
            with self._lock:
                expected = self._expected.setdefault(route.worker, {})
                expected.pop(hashes[-1], None)  # (re)inserted last: the oldest go first
                expected[hashes[-1]] = time.monotonic()
                while len(expected) > EXPECTED_MAX:
                    del expected[next(iter(expected))]
        return route

    def live_workers(self) -> list[WorkerView]:
        """The live workers done loading their model, as their heartbeats describe them (read at most every
        VIEW_TTL_S), each one's load counting the jobs routed to it since its last heartbeat."""
        with self._lock:
            if (now := time.monotonic()) - self._read_at >= VIEW_TTL_S:
                with self._sessions() as session:
                    rows = workers.live_workers(session=session, within_s=self._settings.worker_lost_after_s)
                    beats = [
                        (w.name, w.model, w.last_seen, w.model_loaded or bool(w.error), w.stats or {}) for w in rows
                    ]
                self._views = []
                for name, model, seen, ready, stats in beats:
                    if not ready:  # still loading its model (it asks for its jobs once loaded); one that failed
                        continue  # to load takes them, to answer each with why
                    if self._beats.get(name) != seen:  # a new heartbeat counts what was routed before it
                        self._beats[name], self._routed[name] = seen, set()
                    batch = stats.get("batch") or {}
                    load = int(batch.get("active", 0)) + int(batch.get("waiting", 0))
                    published = frozenset(stats.get("prefix_index") or ())
                    expected = self._expected.get(name, {})
                    for h in [h for h, at in expected.items() if h in published or now - at > EXPECTED_S]:
                        del expected[h]
                    self._views.append(WorkerView(name, model, load, published))
                live = {v.name for v in self._views}
                self._expected = {name: e for name, e in self._expected.items() if name in live}
                self._read_at = time.monotonic()
            return [
                dataclasses.replace(
                    v,
                    load=v.load + len(self._routed.get(v.name, ())),
                    expected=frozenset(self._expected.get(v.name, ())),
                )
                for v in self._views
            ]

    # -- what callers tell it --------------------------------------------------------------

    def ended(self, job_id: str) -> None:
        """A job this process follows has ended: it no longer counts in its worker's load before the next
        heartbeat."""
        with self._lock:
            for routed in self._routed.values():
                routed.discard(job_id)

    def admitted(self, job_id: str, spec: JobSpec, *, new: bool, waiting_for_room: bool) -> None:
        """After an admission's commit: a new routed job's message now, or the waiting jobs when there may be
        room (also when the request joined a low-priority job still waiting, which its client cannot wait for)."""
        if new and self.sends_at_once(spec):
            self._send_new(job_id, spec)
        elif new or waiting_for_room:
            self.send_waiting()

    def send_waiting(self, *, lost_after_s: float | None = None) -> int:
        """Route and send the queued jobs that need a message: requeued or unrouted ones, windowed ones while
        there is room, and with `lost_after_s`, those sent that long ago and still queued while their
        worker's queue is empty (so their message is gone). Returns how many were sent."""
        if lost_after_s is not None:
            self._find_lost(time.time() - lost_after_s)
        with self._sessions() as session:
            ids = jobs.jobs_to_send(session=session, low_window=self._settings.low_window)
            waiting = jobs.jobs_for_sending(session=session, job_ids=ids)
        sent: dict[str, Route] = {}
        for job in waiting:
            route = self._route(
                job.model, job.kind, job.request, job.session, job.namespace, spread=job.batch_id is not None
            )
            if route.worker is None:
                continue  # no live worker of its model: it waits for one (a starting worker asks again)
            self._send(job.id, kind=job.kind, chars=job.chars, route=route)
            sent[job.id] = route
        if sent:
            with self._sessions.begin() as session:
                jobs.mark_sent(session=session, routes=sent)
            log.info("sent %d queued jobs (requeued, lost, unrouted, or low-priority work with room now)", len(sent))
        return len(sent)

    def _find_lost(self, before: float) -> None:
        """Queued jobs whose message went to a worker that is gone, or long ago to a queue now empty: their
        messages are lost, so they are marked for sending (and routing) again."""
        live = {v.name for v in self.live_workers()}
        with self._sessions() as session:
            stale = jobs.sent_before(session=session, before=before)
        lost = [job_id for job_id, target in stale if target not in live]
        by_target: dict[str, list[str]] = {}
        for job_id, target in stale:
            if target in live:
                by_target.setdefault(target, []).append(job_id)
        for target, ids in by_target.items():
            if self.broker_depth(target) == 0:
                lost += ids
        with self._sessions.begin() as session:
            lost += jobs.sent_to_gone_workers(session=session, live=sorted(live))
            jobs.unsend(session=session, job_ids=sorted(set(lost)))

    def broker_depth(self, worker: str) -> int:
        """Messages waiting in `worker`'s queue (not those it holds)."""
        with self._celery.connection_for_write() as conn:
            # A plain (not passive) declare: Redis has no key for an empty queue, and a passive one would fail.
            declared = conn.default_channel.queue_declare(queue=self.queue_for(worker), durable=True, auto_delete=False)
            return declared.message_count

    # -- sending ---------------------------------------------------------------------------

    def _send_new(self, job_id: str, spec: JobSpec) -> None:
        assert spec.route is not None
        try:
            self._send(job_id, kind=spec.kind, chars=len(json.dumps(spec.request.wire())), route=spec.route)
        except Exception as exc:
            error = job_error(503, f"could not enqueue the job: {exc}", code="broker_unavailable")
            with self._sessions.begin() as session:
                jobs.finish_job(session=session, job_id=job_id, status=JobStatus.FAILED, error=dict(error))
            raise BrokerUnavailable(str(exc)) from exc

    def _send(self, job_id: str, *, kind: str, chars: int, route: Route) -> None:
        """The task carries only the job id; `chars` is the size of its canonical request as stored (JSON)."""
        assert route.worker is not None
        with self._lock:  # its load until its next heartbeat counts this job
            self._routed.setdefault(route.worker, set()).add(job_id)
        self._celery.send_task(
            GENERATE_TASK,
            args=[job_id],
            task_id=job_id,
            queue=self.queue_for(route.worker),
            argsrepr=task_label(job_id, kind, chars, route),
            kwargsrepr="{}",
        )
