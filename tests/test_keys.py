"""Canonicalization: what may not change the key does not; everything that changes the output does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from mlxq.keys import OUTPUT_FIELDS, canonical_chat, is_deterministic, request_key

DEFAULTS = {"default_temperature": 1.0, "default_max_tokens": 512}
BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
WEIGHTS = "0123456789abcdef"


def key(body: dict) -> str:
    return request_key("chat", canonical_chat(body, **DEFAULTS), weights=WEIGHTS)


texts = st.text(min_size=1, max_size=20)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": texts}),
    min_size=1,
    max_size=4,
)


@given(msgs=messages, stream=st.booleans(), user=st.none() | texts)
def test_key_ignores_order_whitespace_and_irrelevant_fields(msgs, stream, user):
    body = {"model": "m", "messages": msgs, "temperature": 0, "max_tokens": 20}
    shuffled = dict(reversed(list(body.items())))
    noisy = json.loads(
        json.dumps(
            {
                **shuffled,
                "stream": stream,
                "user": user,
                "stream_options": {"include_usage": True},
                "metadata": {"a": 1},
            },
            indent=3,
        )
    )
    assert key(noisy) == key(body)


CHANGES = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "response_format": {"type": "json_object"},
    "max_tokens": 7,
    "temperature": 0.5,
    "top_p": 0.5,
    "top_k": 5,
    "min_p": 0.1,
    "seed": 3,
    "stop": ["x"],
    "logprobs": True,
    "top_logprobs": 2,
    "n": 2,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "cache_salt": "client-1",  # not the answer, but the cache: another salt is not a hit (README)
    "prediction": "the expected answer",  # not the text, but the usage (accepted prediction tokens)
    "truncation": "auto",  # a conversation over the context is answered with its oldest turns left out
}


def test_every_output_field_is_covered():
    assert set(CHANGES) == set(OUTPUT_FIELDS)


@settings(max_examples=60)
@given(field=st.sampled_from(sorted(CHANGES)), msg=texts, model=texts)
def test_every_output_changing_field_changes_the_key(field, msg, model):
    body = {"model": model, "messages": [{"role": "user", "content": msg}], "temperature": 0}
    if field == "tool_choice":  # meaningful only with tools offered
        body["tools"] = CHANGES["tools"]
    assert key({**body, field: CHANGES[field]}) != key(body)
    assert key({**body, "messages": [{"role": "user", "content": msg + "!"}]}) != key(body)
    assert key({**body, "model": model + "x"}) != key(body)


def test_aliases_and_defaults_are_resolved():
    assert key({**BASE, "max_completion_tokens": 9}) == key({**BASE, "max_tokens": 9})
    assert key({**BASE, "max_tokens": 512}) == key(BASE)
    assert key({**BASE, "stop": "x"}) == key({**BASE, "stop": ["x"]})
    assert key({**BASE, "n": 1, "top_p": 1.0, "logprobs": False, "truncation": "disabled"}) == key(BASE)
    assert key({**BASE, "tools": [], "tool_choice": "auto"}) == key(BASE)
    parts = {
        **BASE,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
    }
    assert key(parts) == key(BASE)
    assert key({"model": "m", "messages": BASE["messages"]}) == key({**BASE, "temperature": 1.0})


def test_billing_header_is_not_part_of_the_key():
    def body(header: str) -> dict:
        return {
            **BASE,
            "messages": [
                {"role": "system", "content": f"{header}You are Claude Code."},
                {"role": "user", "content": "hi"},
            ],
        }

    a = body("x-anthropic-billing-header: cc_version=1.0.1; cch=abc;\n")
    b = body("x-anthropic-billing-header: cc_version=1.0.1; cch=def;\n")
    assert key(a) == key(b) == key(body(""))


def test_key_is_stable_across_processes_and_releases():
    # A literal: a change to canonicalization must bump KEY_VERSION and update this on purpose.
    expected = "3da441db85bbbe5b333cbb3fd9146463f488b1b6947c99ecae5a2dd9dc4d4d20"
    assert key(BASE) == expected
    code = (
        "from mlxq.keys import canonical_chat, request_key; print(request_key('chat', canonical_chat("
        f"{BASE!r}, default_temperature=1.0, default_max_tokens=512), weights={WEIGHTS!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


def test_deterministic_only_at_temperature_zero_or_with_seed():
    assert is_deterministic(canonical_chat(BASE, **DEFAULTS))
    assert is_deterministic(canonical_chat({**BASE, "temperature": 0.7, "seed": 1}, **DEFAULTS))
    assert not is_deterministic(canonical_chat({**BASE, "temperature": 0.7}, **DEFAULTS))
    assert not is_deterministic(canonical_chat({"model": "m", "messages": BASE["messages"]}, **DEFAULTS))


def test_new_weights_under_an_old_name_never_share_a_key():
    canonical = canonical_chat(BASE, **DEFAULTS)
    assert request_key("chat", canonical, weights="a" * 16) != request_key("chat", canonical, weights="b" * 16)


def test_weights_fingerprint_follows_content_not_path(tmp_path):
    from mlxq.weights import fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"vocab_size": 10}')
        (d / "model.safetensors").write_bytes(b"\x00" * 3_000_000)
    assert fingerprint(a) == fingerprint(b)
    with (b / "model.safetensors").open("r+b") as f:  # a change in the tail of the weights
        f.seek(2_999_000)
        f.write(b"\x01")
    assert fingerprint(a) != fingerprint(b)
