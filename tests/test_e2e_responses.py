"""The Responses API through the official `openai` client, and Codex itself, on real processes and the real
SmolLM2."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pydantic
import pytest

from mlxq.procs import Service, codex_home, install_codex, run_codex
from tests.conftest import MODEL_CACHE, MODEL_NAME, service_env, unavailable

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Service:
    tmp_path = tmp_path_factory.mktemp("responses")
    (tmp_path / "logs").mkdir()
    # Codex sends no temperature: greedy by default here, so its answers are reproducible.
    service = Service(service_env(tmp_path, smollm2, MLXQ_DEFAULT_TEMPERATURE="0"), tmp_path / "logs").start()
    yield service
    service.stop()


def client(svc: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text: str = QUESTION, **extra) -> dict:
    return {"model": MODEL_NAME, "input": text, "temperature": 0, "max_output_tokens": 24, **extra}


def jobs_total(svc: Service) -> int:
    return sum(svc.health()["jobs"].values())


def test_paris_sync_and_streamed_with_the_same_text(svc: Service):
    oa = client(svc)
    answer = oa.responses.create(**ask())
    assert answer.object == "response" and answer.status == "completed" and answer.id.startswith("resp_")
    assert "Paris" in answer.output_text
    assert answer.usage.input_tokens > 0 and answer.usage.output_tokens > 0
    with oa.responses.stream(**ask(), extra_headers={"Cache-Control": "no-cache"}) as stream:
        kinds, deltas = [], []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == answer.output_text == final.output_text
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for expected in ("response.output_item.added", "response.content_part.added", "response.output_text.done"):
        assert expected in kinds
    assert kinds.index("response.content_part.done") < kinds.index("response.output_item.done")


def test_the_job_listing_names_the_responses_endpoint(svc: Service):
    raw = client(svc).responses.with_raw_response.create(
        **ask("Hi", max_output_tokens=2, store=False), extra_headers={"Cache-Control": "no-cache"}
    )
    job = httpx.get(f"{svc.base}/v1/jobs/{raw.headers['x-job-id']}", timeout=30).json()
    assert (job["endpoint"], job["status"]) == ("/v1/responses", "succeeded")
    # Its result as the endpoint answered it: a `response`, the same however often it is read.
    assert httpx.get(f"{svc.base}/v1/jobs/{job['id']}", timeout=30).json()["result"] == job["result"]
    result = openai.types.responses.Response.model_validate(job["result"])
    assert (job["result"]["object"], result.model, result.status) == ("response", MODEL_NAME, raw.parse().status)
    assert result.output_text == raw.parse().output_text and result.output[0].type == "message"


def test_a_submitted_responses_job_is_answered_as_a_response(svc: Service):
    body = {**ask("Hi", max_output_tokens=2), "store": False}
    submitted = httpx.post(f"{svc.base}/v1/jobs", json={"endpoint": "/v1/responses", "body": body}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{svc.base}/v1/jobs/{job_id}", timeout=30).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert (job["endpoint"], job["status"]) == ("/v1/responses", "succeeded")
    result = openai.types.responses.Response.model_validate(job["result"])
    assert job["result"]["object"] == "response" and result.output[0].type == "message"
    # A stored conversation to continue is refused there: a job has none.
    continued = {"endpoint": "/v1/responses", "body": {**body, "previous_response_id": "resp_x"}}
    refused = httpx.post(f"{svc.base}/v1/jobs", json=continued, timeout=30)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "previous_response_id")


def test_a_prompt_over_the_context_names_the_input(svc: Service):
    # Short enough for the api's bound to let through: the worker's exact count refuses it.
    with pytest.raises(openai.BadRequestError) as exc:
        client(svc).responses.create(**ask("hello " * 9000, store=False))
    assert (exc.value.code, exc.value.param) == ("context_length_exceeded", "input")


def test_a_function_tool_round_trip(svc: Service):
    oa = client(svc)
    first = oa.responses.create(
        **ask("What's the weather in Paris? Use the tool.", max_output_tokens=60),
        tools=[WEATHER, {"type": "web_search"}],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict) and call.call_id
    assert first.model_extra["mlxq"]["dropped_tools"] == ["web_search"]
    second = oa.responses.create(
        model=MODEL_NAME,
        temperature=0,
        max_output_tokens=40,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "What's the weather in Paris? Use the tool."},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 °C"},
        ],
    )
    assert second.status in ("completed", "incomplete") and second.output_text


def test_previous_response_id_continues_a_stored_conversation_from_the_prefix_cache(svc: Service):
    oa = client(svc)
    # Instructions are not carried over from the previous response (as OpenAI documents): a client sends them again.
    brief = "Answer in one sentence."
    first = oa.responses.create(**ask("Name the capital of Italy.", instructions=brief))
    second = oa.responses.create(**ask("And the capital of Spain?", instructions=brief, previous_response_id=first.id))
    assert second.status == "completed" and second.previous_response_id == first.id
    # The whole first turn (instructions, question, answer) is the prefix of the second's prompt.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert oa.responses.retrieve(second.id).output_text == second.output_text
    items = oa.responses.input_items.list(second.id)
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "And the capital of Spain?"
    strictly = pydantic.TypeAdapter(openai.types.responses.ResponseItem)
    for item in items.data:  # strictly as the SDK types them (the client itself parses leniently)
        strictly.validate_python(item.model_dump(exclude_unset=True))
    # Stored items can be referenced by id (an earlier input item and an output item); an unknown id is a 400.
    question = oa.responses.input_items.list(first.id).data[-1]
    answer_item = next(item for item in first.output if item.type == "message")
    referenced = oa.responses.create(
        **ask(
            input=[
                {"type": "item_reference", "id": question.id},
                {"type": "item_reference", "id": answer_item.id},
                {"role": "user", "content": "And the capital of Spain?"},
            ],
            instructions=brief,
        ),
        store=False,
    )
    assert referenced.output_text == second.output_text  # the same conversation, said by reference
    with pytest.raises(openai.BadRequestError) as unknown:
        oa.responses.create(**ask(input=[{"type": "item_reference", "id": "msg_nowhere"}]))
    assert unknown.value.body["param"] == "input.0.id"
    oa.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(second.id)
    # store: false keeps nothing to retrieve or continue.
    unstored = oa.responses.create(**ask("Name the capital of Greece."), store=False)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as missing:
        oa.responses.create(**ask("And of Egypt?", previous_response_id=unstored.id))
    assert missing.value.body["param"] == "previous_response_id"


def wait_for(oa: openai.OpenAI, response_id: str, statuses: tuple[str, ...], timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = oa.responses.retrieve(response_id)
        if got.status in statuses:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{response_id} stayed {got.status}")


def test_a_background_response_polled_streamed_late_and_cancelled(svc: Service):
    oa = client(svc)
    queued = oa.responses.create(**ask("Name the capital of Portugal."), background=True)
    assert queued.status == "queued" and queued.background
    done = wait_for(oa, queued.id, ("completed", "incomplete"))
    assert done.output_text
    # A background stream read live, then again from any event after the job has ended: the same events,
    # numbered as the live stream numbered them.
    with oa.responses.create(**ask("Name the capital of Norway."), background=True, stream=True) as live_stream:
        live = list(live_stream)
    assert [e.sequence_number for e in live] == list(range(len(live)))
    assert live[-1].type in ("response.completed", "response.incomplete")
    resumed_id = live[0].response.id
    for after in (2, len(live) - 3):
        late = list(oa.responses.retrieve(resumed_id, stream=True, starting_after=after))
        assert [e.model_dump() for e in late] == [e.model_dump() for e in live[after + 1 :]]
    assert late[-1].response.output_text == oa.responses.retrieve(resumed_id).output_text
    with pytest.raises(openai.BadRequestError):
        oa.responses.create(**ask("Name the capital of Chile."), background=True, store=False)

    long = oa.responses.create(
        **ask("Write a very long story about a lighthouse.", max_output_tokens=400), background=True
    )
    wait_for(oa, long.id, ("in_progress",))
    cancelled = oa.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert oa.responses.retrieve(long.id).status == "cancelled"


def test_a_streamed_background_response_outlives_an_identical_request_whose_client_leaves(svc: Service):
    # A background response's stream left, then an identical sync request joined its job and its client left: the
    # last waiter gone, the background response was cancelled, though it runs to its end whoever leaves.
    oa = client(svc)
    story = ask(f"Write a very long story about a lighthouse. {time.time()}", max_output_tokens=300)
    with oa.responses.create(**story, background=True, stream=True) as live:
        response_id = next(iter(live)).response.id  # response.created
        next(e for e in live if e.type == "response.output_text.delta")  # then the client leaves
    assert oa.responses.retrieve(response_id).status == "in_progress"
    with pytest.raises(httpx.ReadTimeout):  # joins the running job, then gives up and closes its connection
        httpx.post(f"{svc.base}/v1/responses", json={**story, "store": False}, timeout=httpx.Timeout(60, read=2))
    time.sleep(2)
    assert oa.responses.retrieve(response_id).status == "in_progress"
    assert oa.responses.cancel(response_id).status == "cancelled"  # its own cancel still stops it


def test_a_background_response_survives_its_worker_being_killed(tmp_path: Path, smollm2: Path, service_factory):
    service = service_factory(service_env(tmp_path, smollm2)).start()
    oa = client(service)
    queued = oa.responses.create(
        **ask("Write a very long story about a lighthouse.", max_output_tokens=300), background=True
    )
    wait_for(oa, queued.id, ("in_progress",))
    service.procs[1].kill()  # the worker, with no chance to clean up
    service.procs[1] = service._spawn("worker", "--log-level", "INFO")
    done = wait_for(oa, queued.id, ("completed", "incomplete", "failed"))
    assert done.status == "incomplete" and done.usage.output_tokens == 300


def test_one_conversation_through_chat_completions_and_responses_is_one_cache_entry(svc: Service):
    oa = client(svc)
    chat = oa.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        temperature=0,
        max_tokens=24,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
    )
    items = svc.health()["cache"]["cached_items"]
    again = oa.responses.with_raw_response.create(**ask("Name a prime number."), instructions="Be brief.", store=False)
    assert (chat.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert again.parse().output_text == chat.parse().choices[0].message.content
    assert svc.health()["cache"]["cached_items"] == items


def test_bad_input_is_a_400_naming_the_field_and_nothing_is_enqueued(svc: Service):
    before = jobs_total(svc)
    url = f"{svc.base}/v1/responses"
    unknown = httpx.post(url, json={"model": MODEL_NAME, "input": [{"type": "telepathy", "thought": "hi"}]})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"].startswith("input.0") and "telepathy" in unknown.json()["error"]["message"]
    orphan = [
        {"role": "user", "content": "Hi"},
        {"type": "function_call_output", "call_id": "call_nowhere", "output": "42"},
    ]
    unmatched = httpx.post(url, json={"model": MODEL_NAME, "input": orphan})
    assert unmatched.status_code == 400 and unmatched.json()["error"]["param"] == "input.1.call_id"
    with pytest.raises(openai.BadRequestError):
        client(svc).responses.create(model=MODEL_NAME, input=[{"role": "narrator", "content": "Once"}])
    assert jobs_total(svc) == before


def test_the_input_tokens_are_counted_by_the_worker(svc: Service):
    counted = client(svc).responses.input_tokens.count(model=MODEL_NAME, input=QUESTION)
    answer = client(svc).responses.create(**ask())
    assert counted.input_tokens == answer.usage.input_tokens
    # `model` is optional here (the SDK's own parameters say so): the served model counts.
    assert client(svc).responses.input_tokens.count(input=QUESTION).input_tokens == counted.input_tokens


def test_a_batch_of_responses_lines(svc: Service):
    oa = client(svc)
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/responses", "body": ask(f"Name the capital of {c}.")}
        for i, c in enumerate(("France", "Japan"))
    ]
    upload = oa.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
    batch = oa.batches.create(input_file_id=upload.id, endpoint="/v1/responses", completion_window="24h")
    deadline = time.time() + 180
    while batch.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
        time.sleep(0.5)
        batch = oa.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 2
    out = [json.loads(line) for line in oa.files.content(batch.output_file_id).text.splitlines()]
    bodies = {o["custom_id"]: openai.types.responses.Response.model_validate(o["response"]["body"]) for o in out}
    assert "Paris" in bodies["q0"].output_text


# -- Codex ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def codex() -> Path:
    """Codex CLI from npm (kept beside the test models, so a second run installs nothing)."""
    if shutil.which("npm") is None:
        unavailable("npm (to install @openai/codex)")
    return install_codex(MODEL_CACHE)


def test_codex_exec_gets_an_answer_and_a_prompt_over_the_context_is_an_error_it_shows(
    svc: Service, codex: Path, tmp_path: Path
):
    work = tmp_path / "work"
    work.mkdir()
    small = codex_home(tmp_path / "small", base_url=f"{svc.base}/v1", model=MODEL_NAME, small=True)
    done = run_codex(codex, small, QUESTION, work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris" in done.stdout
    started = time.monotonic()
    # Codex's whole default prompt (about 10k tokens) is over the built-in model's 8k context.
    full = codex_home(tmp_path / "full", base_url=f"{svc.base}/v1", model=MODEL_NAME, small=False)
    refused = run_codex(codex, full, QUESTION, work)
    assert refused.returncode != 0 and time.monotonic() - started < 120
    assert "context window" in refused.stdout + refused.stderr


def test_codex_shaped_turns_send_the_whole_history_and_the_prefix_cache_serves_it(svc: Service):
    """What Codex 0.171 sends, as captured (stream, store false, developer instructions, prompt_cache_key,
    reasoning, include, client_metadata, function and hosted tools), replayed turn after turn."""
    oa = client(svc)
    history = [
        {
            "type": "message",
            "id": "msg_a",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Be brief."}],
        },
        {"type": "message", "id": "msg_b", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    codex_body = {
        "model": MODEL_NAME,
        "tools": [WEATHER, {"type": "web_search", "external_web_access": False}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
        "extra_body": {"client_metadata": {"thread_id": "t1"}},
    }
    usage = []
    for turn in (None, "And of Germany?", "And of Italy?"):
        if turn:
            history.append({"type": "message", "role": "user", "content": [{"type": "input_text", "text": turn}]})
        with oa.responses.stream(input=history, **codex_body) as stream:
            final = stream.get_final_response()
        assert final.status in ("completed", "incomplete") and final.output_text
        usage.append(final.usage)
        history += [item.model_dump(exclude_none=True) for item in final.output if item.type == "message"]
    # Every later turn's prompt is the previous turn's prompt and answer plus a question: all of that is cached.
    for earlier, later in zip(usage, usage[1:], strict=False):
        assert later.input_tokens_details.cached_tokens >= earlier.input_tokens


def test_truncation_auto_leaves_out_the_oldest_turns_and_disabled_refuses(
    service_factory, tmp_path: Path, tiny_model: Path
):
    """`truncation: "auto"` answers a conversation over the context (the tiny model's 2,048 tokens) with its oldest
    turns left out, a tool call and its output together; without it the same input is a 400 naming `input`."""
    svc = service_factory(service_env(tmp_path, tiny_model)).start()
    long = "the quick brown fox jumps over the lazy dog " * 80  # about 800 tokens
    conversation = [
        {"role": "user", "content": "First: " + long},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": long},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Second: " + long},
        {"role": "assistant", "content": "Noted too."},
        {"role": "user", "content": "What did I say last?"},
    ]
    body = {"model": MODEL_NAME, "input": conversation, "tools": [WEATHER], "temperature": 0, "max_output_tokens": 8}
    with pytest.raises(openai.BadRequestError) as exc:
        client(svc).responses.create(**body, store=False)
    assert (exc.value.code, exc.value.param) == ("context_length_exceeded", "input")

    answer = client(svc).responses.create(**body, truncation="auto", store=False)
    assert answer.status in ("completed", "incomplete") and answer.truncation == "auto"
    # The first user turn and the tool call with its output are left out; the second turn stays.
    assert 800 < answer.usage.input_tokens < 1200
    # The last turn alone over the context: refused all the same.
    alone = {**body, "input": [{"role": "user", "content": long * 3}], "truncation": "auto"}
    with pytest.raises(openai.BadRequestError) as exc:
        client(svc).responses.create(**alone, store=False)
    assert exc.value.code == "context_length_exceeded"
