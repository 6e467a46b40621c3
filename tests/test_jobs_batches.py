"""Jobs and OpenAI-style batches through the official `openai` client on real processes."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env


def batch_line(custom_id: str, content: str, max_tokens: int = 8) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL_NAME,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        },
    }


def upload(client: openai.OpenAI, lines: list[dict], extra: str = "") -> str:
    data = "\n".join(json.dumps(line) for line in lines) + "\n" + extra
    return client.files.create(file=("in.jsonl", io.BytesIO(data.encode())), purpose="batch").id


def wait_batch(
    client: openai.OpenAI, batch_id: str, timeout: float = 180, until=("completed", "failed", "cancelled", "expired")
):
    deadline = time.time() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in until:
        assert time.time() < deadline, batch
        time.sleep(0.5)
    return batch


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def job_rows(svc: Service, tmp_path: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(tmp_path / "data" / "mlxq.sqlite") as db:
        return db.execute("SELECT status, batch_id FROM jobs").fetchall()


@pytest.fixture
def svc(tmp_path: Path, tiny_model: Path, service_factory) -> Service:
    # Strict model names, so a line naming another model is refused.
    return service_factory(service_env(tmp_path, tiny_model, MLXQ_RESEND_AFTER_S="2", MLXQ_MODEL_ALIASES="{}")).start()


def client_for(svc: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", timeout=60, max_retries=0)


def test_a_batch_answers_every_valid_line_once_serves_duplicates_from_the_cache_and_reports_the_invalid(
    svc: Service, tmp_path: Path
):
    client = client_for(svc)
    cached = batch_line("x", "asked before the batch")
    client.chat.completions.create(**cached["body"])  # now in the response cache
    lines = [batch_line(f"q{i}", f"question {i % 6}") for i in range(18)] + [{**cached, "custom_id": "cached"}]
    bad_model = batch_line("bad-model", "hello")
    bad_model["body"]["model"] = "no-such-model"
    file_id = upload(client, [*lines, bad_model], extra="{not json\n")
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "test"}
    )
    assert batch.status == "in_progress" and batch.metadata == {"run": "test"}
    assert {(e.line, e.code) for e in batch.errors.data} == {(20, "model_not_found"), (21, "invalid_json")}

    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (21, 19, 2)
    output, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
    by_id = {o["custom_id"]: o["response"] for o in output}
    # Identical lines ran once: one job, one answer.
    assert by_id["q0"]["request_id"] == by_id["q6"]["request_id"] == by_id["q12"]["request_id"]
    assert by_id["q0"]["body"]["choices"][0]["message"] == by_id["q6"]["body"]["choices"][0]["message"]
    assert len({r["request_id"] for r in by_id.values()}) == 7  # 6 distinct questions + the cached one
    # The batch's usage in OpenAI's shape: every line's, as its output reports it (one job's answer to three lines is
    # three lines' usage).
    jobs_usage = [r["body"]["usage"] for r in by_id.values()]
    assert batch.usage is not None
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in jobs_usage) > 0
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in jobs_usage) > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert batch.usage.input_tokens_details.cached_tokens == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in jobs_usage
    )
    assert [(e["custom_id"], e["error"]["code"] if e["error"] else None) for e in errors] == [
        ("bad-model", "model_not_found"),
        (None, "invalid_json"),
    ]
    # Every job of the batch ran at low priority and none is left.
    assert {status for status, batch_id in job_rows(svc, tmp_path) if batch_id == batch.id} == {"succeeded"}
    listed = client.batches.list()
    assert listed.data[0].id == batch.id
    assert {f.id for f in client.files.list().data} >= {file_id, batch.output_file_id}
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)


def test_a_batch_survives_its_worker_being_killed_with_every_line_exactly_once(svc: Service, tmp_path: Path):
    client = client_for(svc)
    lines = [batch_line(f"k{i}", f"long answer {i}", max_tokens=200) for i in range(24)]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 3:
        assert time.time() < deadline
        time.sleep(0.1)
    svc.procs[1].kill()  # mid-batch, no chance to clean up
    svc.procs[1] = svc._spawn("worker", "--log-level", "INFO")
    batch = wait_batch(client, batch.id, timeout=300)
    assert batch.status == "completed" and batch.request_counts.completed == 24
    output = jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(f"k{i}" for i in range(24))
    assert batch.error_file_id is None


def test_cancelling_a_running_batch_stops_its_lines_and_keeps_what_finished(svc: Service, tmp_path: Path):
    client = client_for(svc)
    lines = [batch_line(f"c{i}", f"cancel me {i}", max_tokens=400) for i in range(40)]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.time() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 1:
        assert time.time() < deadline
        time.sleep(0.1)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    batch = wait_batch(client, batch.id, timeout=30)
    assert batch.status == "cancelled"
    output, errors = jsonl(client, batch.output_file_id), jsonl(client, batch.error_file_id)
    assert len(output) == batch.request_counts.completed >= 1
    assert len(output) + len(errors) == 40 and len({o["custom_id"] for o in output + errors}) == 40
    time.sleep(1.5)  # the worker drops cancelled lines within a second
    statuses = {status for status, batch_id in job_rows(svc, tmp_path) if batch_id == batch.id}
    assert statuses <= {"succeeded", "cancelled"}
    assert svc.health()["batch"]["active"] == 0


def test_jobs_submit_poll_join_late_cancel_idempotent_and_gone_after_retention(
    tmp_path: Path, tiny_model: Path, service_factory
):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_JOB_RETENTION_S="3", MLXQ_HOUSEKEEPING_S="1")).start()
    http = httpx.Client(base_url=svc.base, timeout=60)
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 64, "messages": [{"role": "user", "content": "j"}]}
    first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and first.json()["status"] in ("queued", "running")
    job_id = first.json()["id"]
    assert http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}).json()["id"] == job_id

    deadline = time.time() + 60
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] != "succeeded":
        assert time.time() < deadline, job
        time.sleep(0.1)
    assert job["attempts"] == 1 and job["result"]["object"] == "chat.completion"
    again = http.get(f"/v1/jobs/{job_id}").json()["result"]  # one answer: one id and one time, read after read
    assert (
        (again["id"], again["created"])
        == (job["result"]["id"], job["result"]["created"])
        == (
            f"chatcmpl-{job_id.replace('-', '')}",
            job["finished_at"],
        )
    )
    text = job["result"]["choices"][0]["message"]["content"]
    # Late join: the events from the first, then the end.
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        kinds, streamed = [], ""
        for line in events.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                kinds.append(event["type"])
                streamed += event.get("content", "") if event["type"] == "delta" else ""
    assert kinds[0] == "started" and kinds[-1] == "done" and streamed == text

    # The same body again is a cache hit: a job that succeeded at once.
    hit = http.post("/v1/jobs", json=body)
    assert hit.json()["status"] == "succeeded" and hit.headers["x-cache"] == "HIT"

    long = http.post(
        "/v1/jobs", json={**body, "max_tokens": 2000, "messages": [{"role": "user", "content": "l"}], "priority": "low"}
    ).json()
    assert long["priority"] == "low"
    time.sleep(0.5)
    cancelled = http.delete(f"/v1/jobs/{long['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    listed = http.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in listed["data"]] == [long["id"]] and not listed["has_more"]
    assert http.get("/v1/jobs", params={"limit": 1}).json()["has_more"]

    deadline = time.time() + 30  # retention: finished jobs are gone after 3 s (pruned every second)
    while http.get(f"/v1/jobs/{job_id}").status_code != 404:
        assert time.time() < deadline
        time.sleep(0.5)
    assert http.get(f"/v1/jobs/{job_id}").json()["error"]["code"] == "job_not_found"
    assert http.post("/v1/jobs", json={**body, "stream": True}).status_code == 400
    assert http.post("/v1/jobs", json={"endpoint": "/v1/nope", "body": body}).status_code == 400
    # Anthropic's endpoint takes no job (it has no job adapter in the registry): named, it is refused as unknown.
    anthropic = {"endpoint": "/v1/messages", "body": {"model": MODEL_NAME, "max_tokens": 2, "messages": []}}
    refused = http.post("/v1/jobs", json=anthropic)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "endpoint"


def test_the_batch_cli_submits_waits_writes_results_and_lists_jobs(svc: Service, tmp_path: Path):
    import subprocess
    import sys

    def mlxq(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args, "--url", svc.base],
            capture_output=True,
            text=True,
            timeout=120,
            env={**svc.env, "COLUMNS": "200"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(batch_line(f"cli{i}", f"cli {i}")) for i in range(5)) + "\n")
    out = mlxq("batch", "submit", str(source), "--wait")
    batch_id = next(word for word in out.split() if word.startswith("batch-"))
    assert "completed: 5 completed, 0 failed of 5" in out
    assert "completed" in mlxq("batch", "status", batch_id)
    mlxq("batch", "results", batch_id, "-o", str(tmp_path / "out.jsonl"))
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answers) == [f"cli{i}" for i in range(5)]
    assert "cancelled" not in mlxq("batch", "cancel", batch_id)  # a finished batch stays as it was
    assert mlxq("jobs", "list").count("succeeded") == 5


def test_a_jobs_event_stream_waits_past_the_request_timeout_for_a_queued_job(
    tmp_path: Path, tiny_model: Path, service_factory
):
    """A submitted job waits for a worker however long it takes (MLXQ_REQUEST_TIMEOUT_S bounds a client waiting
    for its answer, not a job): its event stream must not end with an `error` (a 504) while the job is still queued,
    since a reader takes that for the job's outcome; it ends with the job's `done` once a worker runs it."""
    import signal

    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_REQUEST_TIMEOUT_S="2")).start()
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "later"}]}
    worker = svc.procs[1]
    worker.send_signal(signal.SIGSTOP)  # the job stays queued past the request timeout
    try:
        job = httpx.post(f"{svc.base}/v1/jobs", json=body, timeout=30).json()
        types: list[str] = []
        resumed = False
        started = time.monotonic()
        with httpx.stream("GET", f"{svc.base}/v1/jobs/{job['id']}/events", timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event:"):
                    types.append(line.split(":", 1)[1].strip())
                if not resumed and time.monotonic() - started > 5:  # past the timeout, twice over: let it run
                    worker.send_signal(signal.SIGCONT)
                    resumed = True
    finally:
        worker.send_signal(signal.SIGCONT)
    assert "error" not in types and types[-1] == "done", types
