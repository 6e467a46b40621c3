"""The production surface on real processes: API keys and per-key isolation, cache administration,
/metrics, back-pressure, and two api processes over one Redis and PostgreSQL."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxq.procs import Service
from tests.conftest import MODEL_NAME, service_env

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
ASK = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def oa(svc: Service, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key=key or "none", max_retries=0, timeout=60)


@pytest.fixture
def keyed(tmp_path: Path, tiny_model: Path, service_factory) -> Service:
    return service_factory(service_env(tmp_path, tiny_model, MLXQ_API_KEYS=f"{KEY_A},{KEY_B}")).start()


def test_keys_are_required_and_each_key_sees_only_its_own(keyed: Service):
    assert httpx.get(f"{keyed.base}/health").status_code == 200  # open, for load balancers
    with pytest.raises(openai.AuthenticationError):
        oa(keyed, "wrong").chat.completions.create(**ASK)
    missing = httpx.post(f"{keyed.base}/v1/chat/completions", json=ASK)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=keyed.base, api_key="wrong", max_retries=0).messages.create(
            model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert denied.value.body["type"] == "error"
    assert httpx.get(f"{keyed.base}/metrics").status_code == 401
    assert httpx.get(f"{keyed.base}/metrics", headers={"x-api-key": KEY_A}).status_code == 200

    a, b = oa(keyed, KEY_A), oa(keyed, KEY_B)
    assert a.chat.completions.with_raw_response.create(**ASK).headers["x-cache"] == "MISS"
    # Per-key caches: B asking the same is a miss (a HIT would tell B what A asked); A again is a hit.
    assert b.chat.completions.with_raw_response.create(**ASK).headers["x-cache"] == "MISS"
    assert a.chat.completions.with_raw_response.create(**ASK).headers["x-cache"] == "HIT"
    metrics = httpx.get(f"{keyed.base}/metrics", headers={"x-api-key": KEY_A}).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert samples[("mlxq_requests_total", (("cache", "MISS"), ("endpoint", "chat"), ("status", "200")))] == 2
    assert samples[("mlxq_requests_total", (("cache", "HIT"), ("endpoint", "chat"), ("status", "200")))] == 1
    # The refused requests above: a 401 wrong key, a 401 missing key.
    assert samples[("mlxq_requests_total", (("cache", "none"), ("endpoint", "chat"), ("status", "401")))] == 2
    assert samples[("mlxq_generated_tokens_total", ())] >= 2

    http_a = httpx.Client(base_url=keyed.base, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    http_b = httpx.Client(base_url=keyed.base, headers={"x-api-key": KEY_B}, timeout=30)
    job = http_a.post("/v1/jobs", json=ASK).json()
    assert http_a.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert http_b.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert http_b.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in {j["id"] for j in http_b.get("/v1/jobs").json()["data"]}
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": ASK}
    file = a.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = a.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    assert batch.id not in {x.id for x in b.batches.list().data}
    assert file.id not in {f.id for f in b.files.list().data}

    # Cache administration, behind the key, within the key's own namespace.
    stats = http_a.get("/v1/cache/stats").json()  # A's own: its one answer (B's is not counted), no prefix cache
    assert stats["scope"] == "key" and stats["response_cache"]["cached_items"] == 1 and "prefix_cache" not in stats
    assert http_b.delete("/v1/cache").json()["deleted"] == 1  # B's one entry, not A's
    assert a.chat.completions.with_raw_response.create(**ASK).headers["x-cache"] == "HIT"
    # The workers' prefix caches hold every key's partitions: no key may empty another's.
    refused = http_a.delete("/v1/cache/prefix")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "prefix_cache_shared"
    assert keyed.wait_health(lambda h: h["prefix_cache"]["entries"] > 0, timeout=30)


def test_a_global_cache_scope_shares_answers_across_keys(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(
        service_env(tmp_path, tiny_model, MLXQ_API_KEYS=f"{KEY_A},{KEY_B}", MLXQ_CACHE_SCOPE="global")
    ).start()
    oa(svc, KEY_A).chat.completions.create(**ASK)
    assert oa(svc, KEY_B).chat.completions.with_raw_response.create(**ASK).headers["x-cache"] == "HIT"


def test_stored_keys_are_managed_with_the_cli_and_revocation_takes_effect(
    tmp_path: Path, tiny_model: Path, service_factory
):
    env = service_env(tmp_path, tiny_model)
    svc = service_factory(env).start()

    def mlxq(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "keys", *args],
            capture_output=True,
            text=True,
            env={**svc.env, "COLUMNS": "200"},
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    added = mlxq("add", "ci")
    key, key_id = added.split()[0], re.search(r"\(id (\w+);", added).group(1)
    assert key_id in mlxq("list")
    time.sleep(5.5)  # the api re-reads stored keys every 5 s
    assert oa(svc, key).chat.completions.create(**ASK).choices
    with pytest.raises(openai.AuthenticationError):
        oa(svc, None).chat.completions.create(**ASK)  # one stored key closes the service
    mlxq("revoke", key_id)
    time.sleep(5.5)
    with pytest.raises(openai.AuthenticationError):
        oa(svc, key).chat.completions.create(**ASK)


def test_metrics_parse_and_move_and_a_full_queue_is_a_429(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_MAX_QUEUE_DEPTH="1")).start(worker=False)

    def samples() -> dict[str, float]:
        text = httpx.get(f"{svc.base}/metrics").text
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = samples()
    client = oa(svc, None)

    def waiting() -> None:
        with contextlib.suppress(openai.APIError):  # it times out, or the service stops under it: either is fine
            client.with_options(timeout=5).chat.completions.create(**ASK)

    threading.Thread(target=waiting, daemon=True).start()
    deadline = time.time() + 10
    while svc.health()["queue_depth"] < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as full:
        client.chat.completions.create(**{**ASK, "messages": [{"role": "user", "content": "another"}]})
    assert full.value.response.headers["retry-after"] == "1"
    after = samples()
    assert after["mlxq_queue_depth[]"] == 1 and before["mlxq_queue_depth[]"] == 0
    assert "mlxq_batch_active[]" in after and "mlxq_jobs[('status', 'queued')]" in after


def test_two_api_processes_share_jobs_streams_and_the_cache(
    tmp_path: Path, tiny_model: Path, service_factory, pg_url: str, redis_url: tuple[str, str]
):
    url, prefix = redis_url
    env = service_env(
        tmp_path, tiny_model, MLXQ_DATABASE_URL=pg_url, MLXQ_BROKER_URL=url, MLXQ_REDIS_PREFIX=prefix, MLXQ_QUEUE=prefix
    )
    first = service_factory(env).start()
    second = service_factory(env).start(worker=False)
    job = httpx.post(f"{first.base}/v1/jobs", json={**ASK, "max_tokens": 32}).json()
    with httpx.stream("GET", f"{second.base}/v1/jobs/{job['id']}/events", timeout=60) as events:
        kinds = [json.loads(line[6:])["type"] for line in events.iter_lines() if line.startswith("data: ")]
    assert kinds[-1] == "done"
    assert httpx.get(f"{second.base}/v1/jobs/{job['id']}").json()["status"] == "succeeded"
    oa(first, None).chat.completions.create(**{**ASK, "messages": [{"role": "user", "content": "shared"}]})
    hit = oa(second, None).chat.completions.with_raw_response.create(
        **{**ASK, "messages": [{"role": "user", "content": "shared"}]}
    )
    assert hit.headers["x-cache"] == "HIT"
