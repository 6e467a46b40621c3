"""A batch line and an identical interactive request admitted at the same instant: the later one meets the
first's job at its insert and joins it (api.pipeline.admission.retry_on_conflict), a batch line as a single request.

The instant is forced, not hoped for: the api runs in this process (the worker is a real process), and the
batch's look for a job in flight lets the interactive request in and waits until its job is committed, then
answers what it saw, nothing. So the batch's insert meets that job. On PostgreSQL: on SQLite the batch holds
the write lock from its first statement, so the interactive request waits for it and meets the conflict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from sqlalchemy import create_engine, text

from api.app import create_app
from mlxq.procs import Service
from mlxq.repos import jobs
from mlxq.settings import Settings
from tests.conftest import service_env
from tests.test_jobs_batches import batch_line, jsonl, upload, wait_batch


@pytest.fixture
def inproc(
    tmp_path: Path, tiny_model: Path, pg_url: str, service_factory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Service]:
    """The api in this process (so a test may hook it) on PostgreSQL, with a real worker process."""
    env = service_env(tmp_path, tiny_model, MLXQ_DATABASE_URL=pg_url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    svc: Service = service_factory(env)
    server = uvicorn.Server(
        uvicorn.Config(create_app(Settings()), host="127.0.0.1", port=svc.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the api did not start"
            time.sleep(0.05)
        svc.procs = [svc._spawn("worker", "--log-level", "INFO")]
        svc.wait_health(lambda h: h["model_loaded"])
        yield svc
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_batch_line_meeting_an_identical_request_created_at_the_same_instant_joins_it(
    inproc: Service, pg_url: str, monkeypatch: pytest.MonkeyPatch
):
    # A long answer keeps the interactive job in flight while the batch's line retries: with 8 tokens it could finish
    # first (CI once), and then there is nothing left to join.
    line = batch_line("same", "asked twice at once", max_tokens=256)
    asked: dict[str, httpx.Response] = {}
    ask = threading.Thread(
        target=lambda: asked.update(
            answer=httpx.post(f"{inproc.base}/v1/chat/completions", json=line["body"], timeout=120)
        )
    )
    interactive_id: list[str] = []
    raced = threading.Event()
    seen = create_engine(pg_url)
    find_inflight = jobs.find_inflight

    def racing(*, session, key):
        found = find_inflight(session=session, key=key)
        if not raced.is_set():  # the batch's line, the first to look
            raced.set()
            ask.start()
            deadline = time.time() + 60
            while not interactive_id:  # until the interactive request's job is committed
                assert time.time() < deadline, "the interactive request made no job"
                with seen.connect() as conn:
                    interactive_id.extend(conn.scalars(text("SELECT id FROM jobs WHERE key = :k"), {"k": key}))
                time.sleep(0.02)
        return found  # what the batch saw before: nothing in flight

    monkeypatch.setattr(jobs, "find_inflight", racing)
    client = openai.OpenAI(base_url=f"{inproc.base}/v1", api_key="none", timeout=60, max_retries=0)
    file_id = upload(client, [line])
    created = httpx.post(
        f"{inproc.base}/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        timeout=60,
    )
    assert interactive_id, "the race was not forced"
    assert created.status_code == 200, created.text  # not a 503 database_unavailable
    assert created.json()["status"] == "in_progress"

    ask.join(timeout=120)
    answer = asked["answer"]
    assert answer.status_code == 200, answer.text
    batch = wait_batch(client, created.json()["id"])
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch
    [output] = jsonl(client, batch.output_file_id)
    # The line joined the interactive request's job: one job, one answer for both.
    assert output["custom_id"] == "same" and output["response"]["request_id"] == interactive_id[0]
    message = output["response"]["body"]["choices"][0]["message"]
    assert message["content"] == answer.json()["choices"][0]["message"]["content"]
    with seen.connect() as conn:
        rows = conn.execute(text("SELECT id, batch_id FROM jobs")).all()
    seen.dispose()
    assert [(r.id, r.batch_id) for r in rows] == [(interactive_id[0], None)]
