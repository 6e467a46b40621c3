"""Continuous batching through real processes: official openai client -> api -> broker -> worker threads -> engine."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def client(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=180)


def messages(i: int, tag: str = "") -> list[dict]:
    return [{"role": "user", "content": f"Request {i} {tag}: tell me about the number {i * 7}."}]


def alone(oa: openai.OpenAI, msgs: list[dict], max_tokens: int) -> str:
    r = oa.chat.completions.create(
        model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=max_tokens, extra_headers=NO_CACHE
    )
    return r.choices[0].message.content or ""


def streamed_together(
    oa: openai.OpenAI, requests: list[list[dict]], max_tokens: int, **kw
) -> tuple[list[str], list[int]]:
    """Stream every request at once; their texts and the order in which their chunks arrived."""
    texts = [""] * len(requests)
    arrivals: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        stream = oa.chat.completions.create(
            model=MODEL_NAME,
            messages=requests[i],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            extra_headers=NO_CACHE,
            **kw,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    texts[i] += chunk.choices[0].delta.content
                    arrivals.append(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return texts, arrivals


@pytest.fixture(params=["sqlite", "redis+postgresql"])
def tiny_env(request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    env = service_env(tmp_path, tiny_model)
    if request.param != "sqlite":
        redis_url, prefix = request.getfixturevalue("redis_url")
        env.update(
            MLXQ_DATABASE_URL=request.getfixturevalue("pg_url"),
            MLXQ_BROKER_URL=redis_url,
            MLXQ_QUEUE=prefix,
            MLXQ_REDIS_PREFIX=prefix,
        )
    return env


def test_concurrent_requests_get_their_own_text_and_streams_interleave(tiny_env, service_factory):
    svc = service_factory(tiny_env).start()
    oa = client(svc)
    requests = [messages(i) for i in range(8)]
    expected = [alone(oa, m, 40) for m in requests]
    texts, arrivals = streamed_together(oa, requests, 40)
    assert texts == expected
    switches = sum(1 for a, b in zip(arrivals, arrivals[1:], strict=False) if a != b)
    assert switches >= 8, f"streams did not interleave: {arrivals}"


def test_smollm2_batch_gives_the_answers_it_gives_alone(tmp_path: Path, smollm2: Path, service_factory):
    svc = service_factory(service_env(tmp_path, smollm2)).start()
    oa = client(svc)
    questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
        "What is the largest planet?",
        "Name a fruit.",
        "What colour is the sky?",
        "How many legs does a spider have?",
    ]
    requests = [[{"role": "user", "content": q}] for q in questions]
    expected = [alone(oa, m, 24) for m in requests]
    texts, _ = streamed_together(oa, requests, 24)
    assert texts == expected
    assert "Paris" in texts[0]


def test_cancelling_one_stream_leaves_the_others_untouched(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model)).start()
    oa = client(svc)
    requests = [messages(i, "cancel") for i in range(4)]
    expected = [alone(oa, m, 60) for m in requests]
    texts: list[str] = [""] * 4
    job_ids: list[str] = [""] * 4

    def one(i: int) -> None:
        body = {"model": MODEL_NAME, "messages": requests[i], "temperature": 0, "max_tokens": 60, "stream": True}
        with (
            httpx.Client(timeout=120) as http,
            http.stream("POST", f"{svc.base}/v1/chat/completions", json=body, headers=NO_CACHE) as r,
        ):
            job_ids[i] = r.headers["x-job-id"]
            for n, line in enumerate(r.iter_lines()):
                if i == 1 and n >= 4:
                    return  # this client goes away mid-stream
                texts[i] += line + "\n"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    status = job_states(svc, job_ids)
    deadline = time.monotonic() + 5
    while status[job_ids[1]] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.1)
        status = job_states(svc, job_ids)
    assert status[job_ids[1]] == "cancelled"
    assert [status[job_ids[i]] for i in (0, 2, 3)] == ["succeeded"] * 3
    for i in (0, 2, 3):
        assert "data: [DONE]" in texts[i]
        assert sse_text(texts[i]) == expected[i]


def sse_text(raw: str) -> str:
    import json

    out = ""
    for line in raw.splitlines():
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"]
            out += (choice[0]["delta"].get("content") or "") if choice else ""
    return out


def job_states(svc, job_ids: list[str]) -> dict[str, str]:
    engine = create_engine(f"sqlite:///{Path(svc.env['MLXQ_DATA_DIR']) / 'mlxq.sqlite'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status FROM jobs")).all()
        return {r[0]: r[1] for r in rows if r[0] in job_ids}
    finally:
        engine.dispose()


def test_a_cached_prefix_counts_inside_a_batch(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model)).start()
    oa = client(svc)
    system = {"role": "system", "content": "You are a meticulous coding agent. " * 40}
    first = oa.chat.completions.create(
        model=MODEL_NAME, messages=[system, {"role": "user", "content": "one"}], temperature=0, max_tokens=8
    )
    follow = [
        system,
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "two"},
    ]
    usage: dict[int, openai.types.CompletionUsage] = {}

    def one(i: int) -> None:
        msgs = follow if i == 0 else messages(i, "beside")
        r = oa.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=30)
        usage[i] = r.usage

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert usage[0].prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_interactive_request_starts_before_32_low_priority_requests_finish(
    tmp_path: Path, tiny_model: Path, service_factory
):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_BATCH_SIZE="4")).start()
    oa = client(svc)
    done: list[float] = []

    def low(i: int) -> None:
        oa.chat.completions.create(
            model=MODEL_NAME,
            messages=messages(i, f"background {uuid.uuid4()}"),
            temperature=0,
            max_tokens=48,
            service_tier="flex",
        )
        done.append(time.monotonic())

    threads = [threading.Thread(target=low, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    svc.wait_health(lambda h: h["batch"]["active"] >= 4, timeout=60)
    r = oa.chat.completions.create(
        model=MODEL_NAME, messages=messages(99, "a person waits"), temperature=0, max_tokens=8, extra_headers=NO_CACHE
    )
    answered = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    assert r.usage.completion_tokens == 8
    assert len(done) == 32
    assert sum(1 for d in done if d > answered) >= 16, "the interactive request waited for the low-priority work"


def test_a_request_over_the_batch_budget_waits_and_completes(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_BATCH_TOKENS="300")).start()
    oa = client(svc)
    results: dict[int, openai.types.chat.ChatCompletion] = {}

    def one(i: int) -> None:
        big = i == 0
        msgs = [{"role": "user", "content": ("a long question " * 30) if big else f"small {i}"}]
        results[i] = oa.chat.completions.create(
            model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=200 if big else 60, extra_headers=NO_CACHE
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0].usage.completion_tokens == 200 and results[0].choices[0].finish_reason == "length"
    assert all(results[i].usage.completion_tokens == 60 for i in (1, 2, 3))


def test_a_stream_that_joins_a_non_streamed_job_still_gets_the_whole_text(
    tmp_path: Path, tiny_model: Path, service_factory
):
    # A non-streamed job publishes no per-token deltas; an identical streamed request joining it is sent
    # the text at the end instead.
    # The first job must still run when the second arrives: drafting off, or the tiny model's loops (drafted
    # nearly whole) end it within the 0.3 s.
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_SPECULATIVE="off")).start()
    oa = client(svc)
    msgs = messages(5, "joined")
    sync: dict[str, str] = {}

    def ask() -> None:
        r = oa.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=200)
        sync["text"] = r.choices[0].message.content or ""

    first = threading.Thread(target=ask)
    first.start()
    time.sleep(0.3)
    raw = oa.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=msgs, temperature=0, max_tokens=200, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    first.join(timeout=120)
    assert raw.headers["x-cache"] == "MISS" and streamed == sync["text"] and streamed
    assert len(job_states(svc, [raw.headers["x-job-id"]])) == 1
    assert list(job_states(svc, [raw.headers["x-job-id"]]).values()) == ["succeeded"]
    engine = create_engine(f"sqlite:///{Path(svc.env['MLXQ_DATA_DIR']) / 'mlxq.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), min(stream) FROM jobs")).one() == (1, 0)  # it joined
    engine.dispose()
