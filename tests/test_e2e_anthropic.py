"""The Anthropic Messages API through the official `anthropic` client on real processes and the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from anthropic.lib.tools import beta_tool

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Service:
    tmp_path = tmp_path_factory.mktemp("anthropic")
    (tmp_path / "logs").mkdir()
    service = Service(service_env(tmp_path, smollm2), tmp_path / "logs").start()
    yield service
    service.stop()


def claude(svc: Service) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=svc.base, api_key="unused", max_retries=0, timeout=120)


def ask(text: str, **extra) -> dict:
    # The SDK (2.x) no longer takes `temperature`: greedy decoding goes in the body by hand.
    return {
        "model": MODEL_NAME,
        "max_tokens": 24,
        "extra_body": {"temperature": 0},
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def test_a_text_answer_and_the_same_streamed(svc: Service):
    client = claude(svc)
    answer = client.messages.create(**ask("What is the capital of France?"))
    assert answer.type == "message" and answer.role == "assistant" and answer.model == MODEL_NAME
    assert "Paris" in answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.usage.output_tokens > 0
    with client.messages.stream(**ask("What is the capital of France?")) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == answer.content[0].text == final.content[0].text
    assert final.stop_reason == answer.stop_reason


def test_every_answer_carries_a_request_id_the_sdk_reads(svc: Service):
    client = claude(svc)
    answer = client.messages.create(**ask("Hi", max_tokens=2))
    assert answer._request_id and answer._request_id.startswith("req_")
    with client.messages.stream(**ask("Hi", max_tokens=2, extra_headers={"Cache-Control": "no-cache"})) as stream:
        stream.until_done()
        streamed = stream.request_id
    assert streamed and streamed.startswith("req_") and streamed != answer._request_id


def test_the_job_listing_names_the_endpoint_each_job_was_asked_at(svc: Service):
    nothing_cached = {"Cache-Control": "no-cache"}
    raw = claude(svc).messages.with_raw_response.create(**ask("Hi", max_tokens=2, extra_headers=nothing_cached))
    openai_client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=120)
    chat = openai_client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_headers=nothing_cached
    )
    listed = {j["id"]: j for j in httpx.get(f"{svc.base}/v1/jobs?limit=100", timeout=30).json()["data"]}
    asked, chatted = listed[raw.headers["x-job-id"]], listed[chat.headers["x-job-id"]]
    assert (asked["endpoint"], chatted["endpoint"]) == ("/v1/messages", "/v1/chat/completions")
    # Each result as the endpoint it was asked at answered it, the same however it is read.
    read = httpx.get(f"{svc.base}/v1/jobs/{asked['id']}", timeout=30).json()
    assert read["result"] == asked["result"] and asked["status"] == "succeeded"
    result = anthropic.types.Message.model_validate(asked["result"])
    assert (asked["result"]["type"], result.role, result.model) == ("message", "assistant", MODEL_NAME)
    assert [block.model_dump() for block in result.content] == [block.model_dump() for block in raw.parse().content]
    assert result.stop_reason == raw.parse().stop_reason and result.id.startswith("msg_")
    assert chatted["result"]["object"] == "chat.completion"
    assert chatted["result"]["choices"][0]["message"]["content"] == chat.parse().choices[0].message.content


def test_stop_sequences_end_with_stop_sequence(svc: Service):
    answer = claude(svc).messages.create(
        **ask("Count from 1 to 10, separated by commas.", max_tokens=40, stop_sequences=["5"])
    )
    assert answer.stop_reason == "stop_sequence" and answer.stop_sequence == "5"
    assert "5" not in answer.content[0].text and "4" in answer.content[0].text


def test_a_tool_use_round_trip(svc: Service):
    client = claude(svc)
    first = client.messages.create(
        **ask(
            "What's the weather in Paris? Use the tool.",
            max_tokens=80,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_weather"},
        )
    )
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input, dict) and call.id.startswith("toolu_")
    followup = client.messages.create(
        **{
            **ask("", max_tokens=40, tools=[WEATHER]),
            "messages": [
                {"role": "user", "content": "What's the weather in Paris? Use the tool."},
                {"role": "assistant", "content": [block.model_dump() for block in first.content]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 °C"}],
                },
            ],
        }
    )
    assert followup.content and followup.usage.input_tokens + followup.usage.cache_read_input_tokens > 0


def test_a_final_assistant_message_is_continued_not_answered_anew(svc: Service, smollm2: Path):
    """Anthropic's prefill: the answer goes on from the final assistant message's text (its leading space its own),
    as mlx-lm greedy decoding goes on from that prompt; streamed the same; count_tokens counts that prompt."""
    from mlx_lm import load, stream_generate

    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    client = claude(svc)
    answer = client.messages.create(**{**ask(""), "max_tokens": 6, "messages": messages})
    model, tokenizer = load(str(smollm2))[:2]
    prompt = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert prompt.endswith("The capital of France is")  # no end of turn, no new turn
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    tokens = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=6)]
    # Decoded whole: mlx-lm's streaming detokenizer would drop the leading space, right only for a new turn.
    assert answer.content[0].text == tokenizer.decode([t for t in tokens if t not in tokenizer.eos_token_ids])
    assert answer.content[0].text.startswith(" Paris")
    with client.messages.stream(**{**ask(""), "max_tokens": 6, "messages": messages}) as stream:
        assert "".join(stream.text_stream) == answer.content[0].text
    counted = client.messages.count_tokens(model=MODEL_NAME, messages=messages)
    read = answer.usage.cache_read_input_tokens or 0  # Anthropic's input_tokens leave out what the cache read
    assert counted.input_tokens == len(ids) == answer.usage.input_tokens + read


def test_a_model_is_retrieved_by_either_client(svc: Service):
    """GET /v1/models/{model}: the served model by its name, and by any other (the default alias names it)."""
    assert claude(svc).models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert claude(svc).models.retrieve("claude-sonnet-4-5").display_name == MODEL_NAME
    oa = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0)
    assert oa.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_count_tokens_matches_the_tokenizer(svc: Service, smollm2: Path):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = claude(svc).messages.count_tokens(model=MODEL_NAME, system="Be brief.", messages=messages)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages], add_generation_prompt=True, tokenize=False
    )
    assert counted.input_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_a_system_turn_is_taken_under_claude_codes_beta_and_refused_without(svc: Service):
    """Claude Code sends its agent list as a `system` turn with the mid-conversation-system beta; without the beta
    Anthropic refuses such a turn, and so do we. Answered and counted as the `<system-reminder>` user turn Claude Code
    writes the same text as without the beta."""
    turns = [{"role": "system", "content": "Agents: none."}, {"role": "user", "content": "Hi"}]
    beta = {"anthropic-beta": "claude-code-20250219,mid-conversation-system-2026-04-07"}
    with pytest.raises(anthropic.BadRequestError):
        claude(svc).messages.create(**{**ask("Hi"), "messages": turns, "max_tokens": 4})
    answer = claude(svc).messages.create(**{**ask("Hi"), "messages": turns, "max_tokens": 4}, extra_headers=beta)
    reminder = [{"role": "user", "content": "<system-reminder>\nAgents: none.\n</system-reminder>"}, turns[1]]
    same = claude(svc).messages.with_raw_response.create(**{**ask("Hi"), "messages": reminder, "max_tokens": 4})
    assert same.headers["x-cache"] == "HIT" and same.parse().content == answer.content
    counted = claude(svc).messages.count_tokens(model=MODEL_NAME, messages=turns, extra_headers=beta)
    assert counted.input_tokens == claude(svc).messages.count_tokens(model=MODEL_NAME, messages=reminder).input_tokens


def test_a_threaded_request_is_refused_as_the_sdk_reads_it_and_its_tool_runner_goes_on_unthreaded(svc: Service):
    """`thread` (server-held conversation state) is not kept here. Ignored, a `continue` was answered without the
    conversation before it; refused with the error code the SDK reads, its tool runner (threaded by default) sends the
    whole conversation instead, and the loop completes."""
    body = ask("What is my name?", thread={"type": "continue", "previous_message_id": "msg_unknown"})
    r = httpx.post(f"{svc.base}/v1/messages", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["details"]["error_code"] == "thread_unsupported_request", r.text

    calls: list[str] = []

    @beta_tool
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: the city's name
        """
        calls.append(city)
        return "Sunny, 21 C"

    runner = claude(svc).beta.messages.tool_runner(
        model=MODEL_NAME,
        max_tokens=40,
        tools=[get_weather],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_iterations=2,
    )
    replies = list(runner)
    assert calls and len(replies) == 2, (calls, replies)
    assert all(reply.content for reply in replies)


def test_errors_are_anthropic_shaped_and_raised_as_the_right_classes(svc: Service):
    client = claude(svc)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(
            model=MODEL_NAME,
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
                    ],
                }
            ],
        )
    assert "text-only" in bad.value.message
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": "x" * 40000}])
    raw = httpx.post(f"{svc.base}/v1/messages", json={"model": MODEL_NAME, "messages": []}, timeout=30)
    assert raw.status_code == 400 and raw.json()["type"] == "error"


def test_openai_and_anthropic_forms_of_one_conversation_share_one_cache_entry(svc: Service):
    question = "Name one primary color."
    via_openai = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused").chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        max_tokens=16,
        temperature=0,
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}],
    )
    via_claude = claude(svc).messages.with_raw_response.create(
        model=MODEL_NAME,
        max_tokens=16,
        extra_body={"temperature": 0},
        system="Answer in one word.",
        messages=[{"role": "user", "content": question}],
    )
    assert via_claude.headers["x-request-key"] == via_openai.headers["x-request-key"]
    assert via_claude.headers["x-cache"] == "HIT"
    assert via_claude.parse().content[0].text == via_openai.parse().choices[0].message.content


def test_a_claude_code_shaped_request_is_answered_and_its_billing_line_shares_the_prefix_cache(svc: Service):
    def request(billing: str, **overrides) -> dict:
        return {
            "model": "claude-sonnet-4-5",
            "max_tokens": 32000,
            "stream": False,
            "system": [
                {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0.{billing}; cch={billing};"},
                {
                    "type": "text",
                    "text": "You are Claude Code, a coding agent. " * 20,
                    "cache_control": {"type": "ephemeral"},
                },
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi in two words."}]}],
            "metadata": {"user_id": "u"},
            "thinking": {"type": "disabled"},
            **overrides,
        }

    headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused", "anthropic-beta": "claude-code-20250219"}

    def post(body: dict) -> dict:
        response = httpx.post(f"{svc.base}/v1/messages?beta=true", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == MODEL_NAME and answer["content"][0]["type"] == "text"
        assert answer["stop_reason"] in ("end_turn", "max_tokens")
        return answer

    # As Claude Code sends it (no temperature: sampled, so never response-cached), max_tokens past the
    # context clamped; short here only to bound the test's time.
    post(request("1", max_tokens=8))
    second = post(request("2", max_tokens=8))
    # Only the billing line differs: the second prompt comes from the first's prefix cache.
    assert second["usage"]["cache_read_input_tokens"] >= 100
    # max_tokens 32000, more than the whole context: clamped to what fits after the prompt.
    assert post(request("3", temperature=0))["usage"]["output_tokens"] > 0


def test_metrics_count_streamed_and_sync_messages_under_one_endpoint(svc: Service):
    from prometheus_client.parser import text_string_to_metric_families

    def messages_requests() -> float:
        svc.health()  # flushes the api's pending counters
        text = httpx.get(f"{svc.base}/metrics", timeout=5).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "mlxq_requests_total" and s.labels["endpoint"] == "messages" and s.labels["status"] == "200"
        )

    client, before = claude(svc), messages_requests()
    body = ask("Name a colour.", extra_headers={"Cache-Control": "no-cache"})
    client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        stream.get_final_message()
    assert messages_requests() == before + 2
