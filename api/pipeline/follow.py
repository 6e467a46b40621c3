"""Following a job: its events from the stream channel until it ends, as the api relays them to a waiting
client (sync, streamed, or `GET /v1/jobs/{id}/events`), and leaving it.

The job row is the record: a quiet channel is checked against the row, so a lost event never hangs a
client, and a restarted job's repeated text is never relayed twice.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from api.errors import APIError
from api.pipeline.model_info import WORKER_UNAVAILABLE, ModelInfo, worker_unavailable
from mlxq import events
from mlxq.channel import Channel
from mlxq.contract import job_error
from mlxq.delivery import Delivery
from mlxq.events import Event
from mlxq.repos import jobs
from mlxq.settings import Settings
from mlxq.states import JOB_FINAL, JobStatus

# The errors that tell a waiting client to send its request again: the job it waited for is its no longer (a
# retry makes or joins another), so it is given up as a client that left gives it up (api.pipeline.respond).
RETRY_CODES = frozenset({"shutting_down", "worker_lost", WORKER_UNAVAILABLE})


def told_to_retry(exc: APIError) -> bool:
    return exc.code in RETRY_CODES


class JobFollower:
    """Made once per api process (api.services) and injected."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        channel: Channel,
        delivery: Delivery,
        closing: threading.Event,
        model_info: ModelInfo,
    ) -> None:
        self._settings = settings
        self._model_info = model_info
        self._sessions = sessions
        self._channel = channel
        self._delivery = delivery
        # Set when the server begins to stop: waiting requests answer 503 at once.
        self._closing = closing

    def _job_state(self, job_id: str) -> tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]:
        with self._sessions() as session:
            job = jobs.get_job(session=session, job_id=job_id)
            if job is None:
                raise APIError(404, f"No job {job_id}.", code="job_not_found")
            return job.status, job.model, job.result, job.error

    async def events(
        self,
        job_id: str,
        *,
        replayable: bool = True,
        timeout: bool = True,
        last_run: bool = False,
        restarts: bool = False,
    ) -> AsyncGenerator[Event, None]:
        """A job's events from the stream channel, ending with `done` or `error`.

        The job row is re-checked after each quiet second, so a lost event cannot hang a client;
        past `request_timeout_s` the iterator raises a 504, when the server begins to stop a 503, and (with `timeout`)
        a 503 `worker_unavailable` while the job is queued and no worker of its model has been alive for the wait.
        When the job restarts (its worker died), the text already relayed is not relayed twice: a
        `replayable` (deterministic) job produces it again, so that much of the new text is skipped;
        any other job's new text would not continue the old, so the client gets a 503 to retry. With `last_run`
        (a reader of a finished job's kept events, who has been sent nothing yet) only the last run's events. With
        `restarts` (a reader of the public events, who knows the contract) such a job's `restarted` is passed on and
        the new run's text sent whole, as the job goes on.
        """

        queue: asyncio.Queue[Event] = asyncio.Queue()

        async def pump() -> None:
            async for event in self._channel.listen(job_id):
                await queue.put(event)

        pumper = asyncio.get_running_loop().create_task(pump())
        # Without `timeout` (a reader of a detached job, which runs however long it takes) only keepalives.
        deadline = time.monotonic() + self._settings.request_timeout_s if timeout else float("inf")
        ended_quietly = False
        # Characters of the answer's text the client has, and of this run's text come so far: a restarted job's
        # text (deterministic: the same) is relayed from where the client's ends, however often it restarts.
        shown = seen = 0
        held: list[Event] = []  # with `last_run`: this run's events, sent once the job's end is read
        try:
            while True:
                if self._closing.is_set():
                    # Retry-After as every other retryable 503 here has (worker_unavailable, database_unavailable): a
                    # client that honours it waits for the restart instead of retrying into a refused connection.
                    raise APIError(
                        503,
                        "The server is shutting down; retry the request.",
                        code="shutting_down",
                        headers={"Retry-After": "5"},
                    )
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    try:
                        status, model, result, error = await asyncio.to_thread(self._job_state, job_id)
                    except DBAPIError:  # the database is restarting: keep waiting, within the deadline
                        status, model, result, error = "unknown", "", None, None
                    if status in JOB_FINAL and not ended_quietly:
                        # The row can be ahead of the channel: give the events in flight one more quiet
                        # period to arrive before answering from the row (which has no deltas).
                        ended_quietly = True
                        continue
                    if status == JobStatus.SUCCEEDED:
                        event = events.done(result or {})
                    elif status in JOB_FINAL:
                        event = events.error(error or job_error(500, f"job {status}"))
                    elif time.monotonic() > deadline:
                        raise APIError(
                            504, f"Job {job_id} did not finish in time; poll /v1/jobs/{job_id}.", code="timeout"
                        ) from None
                    elif timeout and status == JobStatus.QUEUED and await self._model_info.lost(model):
                        # Its worker died and none came back (or it was queued for one that never came).
                        raise worker_unavailable(model, self._model_info.wait_s) from None
                    else:
                        yield events.waiting(status)
                        continue
                if event["type"] == "restarted" and last_run:
                    held = []
                    continue
                if last_run and not events.is_final(event):
                    held.append(event)
                    continue
                for kept in held:
                    yield kept
                held = []
                if event["type"] == "restarted":
                    if shown and not replayable and restarts:
                        # The reader is told the text starts over: the old text does not lead into the new.
                        shown = seen = 0
                        yield event
                        continue
                    if shown and not replayable:
                        raise APIError(
                            503,
                            "The worker stopped in the middle of this answer; retry the request.",
                            code="worker_lost",
                        )
                    seen = 0
                    continue
                if event["type"] == "delta":
                    text = event.get("content") or ""
                    cut = min(max(shown - seen, 0), len(text))
                    seen += len(text)
                    shown = max(shown, seen)
                    if cut == len(text) and text:
                        continue
                    if cut:
                        event = {**event, "content": text[cut:], "logprobs": None}
                if events.is_final(event):
                    self._delivery.ended(job_id)
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
            with self._sessions.begin() as session:
                jobs.leave_job(session=session, job_id=job_id, abandon=abandon)

        asyncio.get_running_loop().run_in_executor(None, leave)
