"""Every sampling parameter reaches the worker's sampler from every dialect: one table, one row per dialect.

A parameter added to mlxq.request.Sampling fails `test_every_dialect_names_every_sampling_parameter` until each
dialect's row says how its clients send it (or why that dialect has no place for it), and then the reach test
checks it arrives: through the dialect's own request model and adapter, the canonical request the job row stores
(and the worker reads back), to the values the worker's sampler is built from (worker.sequence_builder).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from api.dialects.anthropic import adapter as anthropic
from api.dialects.anthropic.protocol import MessagesRequest
from api.dialects.openai import adapter as openai
from api.dialects.openai.protocol import ChatCompletionRequest, CompletionRequest
from api.dialects.responses import adapter as responses
from api.dialects.responses.protocol import ResponsesRequest
from api.pipeline.incoming import Incoming
from mlxq.keys import canonical_request
from mlxq.request import SAMPLING, Request
from worker.sequence_builder import sampling_settings

VOCAB = 49152  # the built-in tokenizer's

# A value for each parameter, other than what the worker uses when it is not sent.
VALUES: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.5,
    "top_k": 5,
    "min_p": 0.1,
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "repetition_penalty": 1.1,
    "logprobs": True,
    "top_logprobs": 2,
}


def _same_name(field: str) -> dict[str, Any]:
    body = {field: VALUES[field]}
    if field == "top_logprobs":  # only with logprobs asked for
        body["logprobs"] = True
    return body


def _responses_body(field: str) -> dict[str, Any]:
    if field == "logprobs":  # the output text's logprobs are an `include` in the Responses API
        return {"include": ["message.output_text.logprobs"]}
    return {field: VALUES[field]}


Adapter = Callable[[dict[str, Any]], Incoming]

# dialect: (base body, how a body with the parameter is written, adapter, parameters it has no place for)
DIALECTS: dict[str, tuple[dict[str, Any], Callable[[str], dict[str, Any]], Adapter, dict[str, str]]] = {
    "chat": (
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        _same_name,
        lambda body: openai.chat(ChatCompletionRequest.model_validate(body)),
        {},
    ),
    "completions": (
        {"model": "m", "prompt": "hi"},
        _same_name,
        lambda body: openai.completion(CompletionRequest.model_validate(body)),
        # A completion's `logprobs` is a count of alternatives, refused (api.dialects.openai.adapter).
        {"logprobs": "legacy logprobs refused", "top_logprobs": "legacy logprobs refused"},
    ),
    "messages": (
        {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        _same_name,
        lambda body: anthropic.incoming(MessagesRequest.model_validate(body)),
        # An Anthropic message has no place to return logprobs in.
        {"logprobs": "no logprobs in a message", "top_logprobs": "no logprobs in a message"},
    ),
    "responses": (
        {"model": "m", "input": "hi"},
        _responses_body,
        lambda body: responses.incoming(ResponsesRequest.model_validate(body)),
        {},
    ),
}


def _canonical(adapt: Adapter, body: dict[str, Any]) -> Request:
    incoming = adapt(body)
    return canonical_request(incoming.kind, incoming.requests[0].wire(), default_temperature=1.0, default_max_tokens=16)


def test_every_dialect_names_every_sampling_parameter():
    assert set(VALUES) == set(SAMPLING), "give a new sampling parameter a value here"
    for name, (_, _, _, absent) in DIALECTS.items():
        assert set(absent) <= set(SAMPLING), name


CASES = [
    (dialect, field) for dialect, (_, _, _, absent) in DIALECTS.items() for field in SAMPLING if field not in absent
]


@pytest.mark.parametrize(("dialect", "field"), CASES)
def test_every_sampling_parameter_reaches_the_sampler(dialect: str, field: str):
    base, write, adapt, _ = DIALECTS[dialect]
    plain = _canonical(adapt, base)
    asked = _canonical(adapt, {**base, **write(field)})
    # In the canonical request: in the key, on the job row, and what the worker reads back.
    stored = Request.read(asked.wire())
    assert getattr(stored, field) == VALUES[field]
    # And in what the worker builds the sampler, the seeded sampler and the penalty processors from.
    before, after = sampling_settings(Request.read(plain.wire()), VOCAB), sampling_settings(stored, VOCAB)
    assert getattr(after, field) == VALUES[field]
    assert getattr(after, field) != getattr(before, field)
