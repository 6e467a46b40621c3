"""The OpenAI surface through the real api and worker with the official `openai` client and SmolLM2."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
FORCED = {"type": "function", "function": {"name": "get_weather"}}
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


@pytest.fixture(scope="module")
def svc(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openai-e2e")
    (root / "logs").mkdir()
    service = Service(service_env(root, smollm2), root / "logs").start()
    service.db = f"sqlite:///{root / 'data' / 'mlxq.sqlite'}"
    yield service
    service.stop()


@pytest.fixture(scope="module")
def oa(svc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=120)


def job_status(svc, job_id: str) -> str:
    engine = create_engine(svc.db)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT status FROM jobs WHERE id = :i"), {"i": job_id}).scalar()
    finally:
        engine.dispose()


def test_stream_joins_to_the_same_text_with_usage_and_replays_from_cache(oa):
    plain = oa.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0).choices[0].message.content
    raw = oa.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=QUESTION,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"Cache-Control": "no-cache"},
    )
    assert raw.headers["x-cache"] == "BYPASS"
    chunks = list(raw.parse())
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain and "Paris" in content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])

    key = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"Name a colour. {uuid.uuid4()}"}],
        "temperature": 0,
        "max_tokens": 12,
        "stream": True,
    }
    first = oa.chat.completions.with_raw_response.create(**key)
    first_chunks = [c for c in first.parse() if c.choices]
    first_text = "".join(c.choices[0].delta.content or "" for c in first_chunks)
    again = oa.chat.completions.with_raw_response.create(**key)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    replayed = list(again.parse())
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == first_text
    assert replayed[-1].choices[0].finish_reason == first_chunks[-1].choices[0].finish_reason


def test_every_answer_carries_a_request_id_the_sdk_reads(oa):
    answer = oa.chat.completions.create(model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=2)
    assert answer._request_id and answer._request_id.startswith("req_")
    stream = oa.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=2, stream=True, extra_headers=NO_CACHE
    )
    streamed = stream.response.headers["x-request-id"]
    assert [c for c in stream]
    # One id per request, in both dialects' headers.
    assert streamed.startswith("req_") and streamed != answer._request_id
    assert stream.response.headers["request-id"] == streamed


def test_forced_tool_call_reaches_the_client_and_the_follow_up_runs(oa):
    r = oa.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice=FORCED,
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)

    stream = oa.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice=FORCED,
        temperature=0,
        max_tokens=60,
        stream=True,
        extra_headers={"Cache-Control": "no-cache"},
    )
    deltas = [c.choices[0] for c in stream if c.choices]
    parts = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert parts[0].id and parts[0].type == "function" and parts[0].function.name == "get_weather"
    assert all(p.id is None and p.function.name is None for p in parts[1:])
    assert json.loads("".join(p.function.arguments or "" for p in parts)) == json.loads(call.function.arguments)
    assert deltas[-1].finish_reason == "tool_calls"
    assert not any("<tool_call>" in (d.delta.content or "") for d in deltas)

    follow = [
        {"role": "user", "content": "Weather in Paris?"},
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "sunny"})},
    ]
    answer = oa.chat.completions.create(model=MODEL_NAME, messages=follow, tools=TOOLS, temperature=0, max_tokens=20)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens


def raw_chunks(svc, body: dict) -> list[dict]:
    """A stream's chunks as sent (the SDK reads a null and a missing field alike)."""
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{svc.base}/v1/chat/completions", json=body, headers=NO_CACHE) as r:
            data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_a_streamed_forced_call_opens_with_null_content_and_a_text_answer_with_empty(svc):
    asked = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Weather in Paris?"}], "stream": True}
    for choice in (FORCED, "required"):
        chunks = raw_chunks(svc, {**asked, "tools": TOOLS, "tool_choice": choice, "temperature": 0, "max_tokens": 60})
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    chunks = raw_chunks(svc, {**asked, "temperature": 0, "max_tokens": 2})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_the_answer_says_which_service_tier_served_it(oa):
    asked = {"model": MODEL_NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 2}
    # "auto", or no tier, is served by the default tier, and says so; a tier asked for is the one that served it.
    for requested, served in ((None, "default"), ("auto", "default"), ("flex", "flex"), ("priority", "priority")):
        tier = {} if requested is None else {"service_tier": requested}
        assert oa.chat.completions.create(**asked, **tier).service_tier == served
        stream = oa.chat.completions.create(
            **asked, **tier, stream=True, stream_options={"include_usage": True}, extra_headers=NO_CACHE
        )
        assert {c.service_tier for c in stream} == {served}


def test_disconnect_mid_stream_cancels_the_job_and_frees_the_worker(svc):
    body = {
        "model": MODEL_NAME,
        "temperature": 0,
        "max_tokens": 2000,
        "stream": True,
        "messages": [{"role": "user", "content": f"Write a very long story. {uuid.uuid4()}"}],
    }
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{svc.base}/v1/chat/completions", json=body) as r:
            job_id = r.headers["x-job-id"]
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data:")
                if lines >= 5:
                    break
    closed = time.monotonic()
    while job_status(svc, job_id) != "cancelled" and time.monotonic() - closed < 5:
        time.sleep(0.05)
    assert job_status(svc, job_id) == "cancelled"
    started = time.monotonic()
    quick = httpx.post(
        f"{svc.base}/v1/chat/completions",
        timeout=60,
        headers={"Cache-Control": "no-store"},
        json={"model": MODEL_NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 2},
    )
    assert quick.status_code == 200
    assert time.monotonic() - started < 10  # not stuck behind a 2000-token generation


def test_prompt_over_the_context_is_a_400_with_both_counts(oa):
    long = [{"role": "user", "content": "hello " * 9000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            result = oa.chat.completions.create(model=MODEL_NAME, messages=long, temperature=0, stream=stream)
            list(result) if stream else None
        assert exc.value.code == "context_length_exceeded"
        assert "8192" in exc.value.message and "9" in exc.value.message


def test_legacy_completions(oa):
    r = oa.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.prompt_tokens > 0
    both = oa.completions.create(
        model=MODEL_NAME, prompt=["The capital of France is", "One, two,"], max_tokens=4, temperature=0
    )
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == r.choices[0].text[
        : len(both.choices[0].text)
    ]
    streamed = oa.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    echo = oa.completions.create(model=MODEL_NAME, prompt="One, two,", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("One, two,")
    # A completion continues its prompt: the first token's leading space is the answer's (" Paris"), so the prompt
    # and the answer join as the model wrote them (mlx-lm's detokenizer drops it, right only for a new turn).
    assert r.choices[0].text.startswith(" Paris")
    assert (
        echo.choices[0].text
        == "One, two,"
        + oa.completions.create(model=MODEL_NAME, prompt="One, two,", max_tokens=3, temperature=0).choices[0].text
    )
    assert echo.choices[0].text.startswith("One, two, ")


def test_sampling_options_and_logprobs(oa):
    a = oa.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        temperature=0.9,
        seed=11,
        max_tokens=12,
        top_p=0.9,
        extra_body={"top_k": 20, "min_p": 0.05},
        presence_penalty=0.5,
    )
    b = oa.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        temperature=0.9,
        seed=11,
        max_tokens=12,
        top_p=0.9,
        extra_body={"top_k": 20, "min_p": 0.05},
        presence_penalty=0.5,
        extra_headers={"Cache-Control": "no-cache"},
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    lp = oa.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    tokens = lp.choices[0].logprobs.content
    assert len(tokens) == 4 and all(len(t.top_logprobs) == 3 for t in tokens)
    assert "".join(t.token for t in tokens) == lp.choices[0].message.content
    assert tokens[0].logprob == max(t.logprob for t in tokens[0].top_logprobs)
    with pytest.raises(openai.BadRequestError) as exc:
        oa.chat.completions.create(model=MODEL_NAME, messages=QUESTION, n=2)
    assert exc.value.param == "n"


def test_identical_requests_in_flight_run_once(svc):
    import concurrent.futures

    body = {
        "model": MODEL_NAME,
        "temperature": 0,
        "max_tokens": 40,
        "messages": [{"role": "user", "content": f"Describe the sea. {uuid.uuid4()}"}],
    }

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{svc.base}/v1/chat/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    assert all(r.status_code == 200 for r in answers)
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1
    keys = {r.headers["x-request-key"] for r in answers}
    assert len(keys) == 1
    engine = create_engine(svc.db)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(text("SELECT count(*) FROM jobs WHERE key = :k"), {"k": keys.pop()}).scalar()
    finally:
        engine.dispose()
    assert jobs == 1


def job_by_text(svc, marker: str) -> tuple[str, str] | None:
    """(id, status) of the job whose stored request holds `marker`."""
    engine = create_engine(svc.db)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, status FROM jobs WHERE request LIKE :m ORDER BY created_at DESC"), {"m": f"%{marker}%"}
            ).first()
            return (row[0], row[1]) if row else None
    finally:
        engine.dispose()


def _story(marker: str, max_tokens: int) -> dict:
    return {
        "model": MODEL_NAME,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"Write a very long story about a lighthouse. {marker}"}],
    }


def test_a_sync_client_that_disconnects_cancels_its_job(svc):
    marker = uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{svc.base}/v1/chat/completions", json=_story(marker, 2000), timeout=httpx.Timeout(60, read=3))
    gave_up = time.monotonic()
    while (job := job_by_text(svc, marker)) and job[1] != "cancelled" and time.monotonic() - gave_up < 5:
        time.sleep(0.05)
    assert job is not None and job[1] == "cancelled", job
    assert time.monotonic() - gave_up < 2.5  # within a second or so of the client leaving


def test_a_single_flight_joiner_keeps_an_abandoned_sync_job_alive(svc):
    import threading

    marker = uuid.uuid4().hex
    body = _story(marker, 400)
    answers: list[httpx.Response] = []
    joiner = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{svc.base}/v1/chat/completions", json=body, timeout=300))
    )
    with pytest.raises(httpx.ReadTimeout):
        threading.Timer(0.5, joiner.start).start()  # joins the first request's job while it runs
        httpx.post(f"{svc.base}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=2))
    time.sleep(1.5)
    job = job_by_text(svc, marker)
    assert job is not None and job[1] in ("queued", "running", "succeeded"), job
    joiner.join(300)
    assert answers and answers[0].status_code == 200 and answers[0].headers["x-cache"] == "MISS"
    assert answers[0].json()["choices"][0]["message"]["content"]


def test_a_prediction_is_drafted_from_and_counted_in_the_usage(oa):
    """OpenAI's Predicted Outputs through the official client: the answer is the one without a prediction, and
    `completion_tokens_details` counts the predicted tokens accepted (drafting is on by default)."""
    question = [{"role": "user", "content": "Write one sentence about the sea."}]
    asked = dict(model=MODEL_NAME, messages=question, temperature=0, max_tokens=30, extra_headers=NO_CACHE)
    plain = oa.chat.completions.create(**asked)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    predicted = oa.chat.completions.create(
        **asked, prediction={"type": "content", "content": [{"type": "text", "text": text}]}
    )
    assert predicted.choices[0].message.content == text
    assert predicted.usage.completion_tokens_details.accepted_prediction_tokens >= plain.usage.completion_tokens // 2
    with pytest.raises(openai.BadRequestError) as err:
        oa.chat.completions.create(**asked, prediction={"type": "file", "content": text})
    assert err.value.body["param"].startswith("prediction")
