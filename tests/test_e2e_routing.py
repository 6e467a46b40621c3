"""Several workers behind one api, on real processes: each request goes to the worker that holds its prefix
(mlxq.delivery), sessions stick, load balances, a dead worker's clients and sessions move, a joining worker
takes its share, and two models are each served by their own worker."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from mlxq.delivery import WorkerView, choose
from mlxq.procs import Service
from mlxq.request import client_session
from tests.conftest import MODEL_NAME, service_env
from tests.test_jobs_batches import batch_line, upload, wait_batch

pytestmark = pytest.mark.e2e

# A system prompt long enough that its prefix is worth keeping (some 300 tokens).
FILLER = " ".join(f"Rule {i}: keep the code small, typed and tested." for i in range(30))


@pytest.fixture(params=["sqlite", "redis+postgresql"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    env = service_env(tmp_path, tiny_model)
    if request.param == "redis+postgresql":
        pg = request.getfixturevalue("pg_url")
        redis_url, prefix = request.getfixturevalue("redis_url")
        env.update(MLXQ_DATABASE_URL=pg, MLXQ_BROKER_URL=redis_url, MLXQ_QUEUE=prefix, MLXQ_REDIS_PREFIX=prefix)
    return env


def cluster(service_factory, env: dict[str, str], names: list[str], **worker_env: str) -> Service:
    svc = service_factory(env).start(worker=False)
    for name in names:
        svc.add_worker(name, **worker_env)
    svc.wait_workers(set(names))
    return svc


def client(svc: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(svc: Service, messages: list[dict], **extra) -> tuple[object, dict]:
    """One chat turn (greedy) and its job as `/v1/jobs/{id}` shows it (with its route)."""
    raw = client(svc).chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=messages, temperature=0, max_tokens=8, **extra
    )
    job = httpx.get(f"{svc.base}/v1/jobs/{raw.headers['x-job-id']}", timeout=10).json()
    return raw.parse(), job


def worker_of(session_key: str, names: list[str]) -> str:
    """Where a session with this key goes among idle workers holding nothing (the rendezvous hash)."""
    views = [WorkerView(n, MODEL_NAME, 0, frozenset()) for n in names]
    return str(choose(views, [], client_session(session_key), 4).worker)


def test_interleaved_sessions_stay_on_their_worker_and_hit_the_prefix_cache(deployment, service_factory):
    svc = cluster(service_factory, deployment, ["w1", "w2"])
    sessions = [[{"role": "system", "content": f"You are agent {i}. {FILLER}"}] for i in range(4)]
    seen: list[list[dict]] = [[] for _ in sessions]
    for turn in range(3):
        for i, messages in enumerate(sessions):
            messages.append({"role": "user", "content": f"Step {turn} of task {i}."})
            answer, job = ask(svc, messages)
            seen[i].append({"job": job, "usage": answer.usage})
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    for turns in seen:
        workers = {t["job"]["route"]["worker"] for t in turns}
        assert len(workers) == 1 and turns[0]["job"]["worker"] in workers, turns
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later["job"]["route"]["reason"] == "prefix", later["job"]
            # All of the earlier prompt is cached (but its last token, which the template joins to the answer).
            cached = later["usage"].prompt_tokens_details.cached_tokens
            assert cached >= earlier["usage"].prompt_tokens - 1, (earlier["usage"], later["usage"])
    assert {t[0]["job"]["route"]["worker"] for t in seen} == {"w1", "w2"}  # the sessions spread
    # Back to back, each turn sent the moment the last one is answered: still its worker's, by prefix (an entry a
    # turn has taken out of the cache to extend stays in the worker's index until the turn puts it back).
    messages, home = sessions[0], seen[0][0]["job"]["route"]["worker"]
    for n in range(3):
        messages.append({"role": "user", "content": f"Quick follow-up {n}."})
        answer, job = ask(svc, messages)
        assert (job["route"]["worker"], job["route"]["reason"]) == (home, "prefix"), job
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    health = svc.health()
    assert health["worker"]["count"] == 2 and [w["id"] for w in health["workers"]] == ["w1", "w2"]
    assert sum(w["routed"] for w in health["workers"]) == 15
    assert sum(w["routed_to_cache"] for w in health["workers"]) == 11  # every later turn
    assert all(w["prefix_entries"] > 0 and w["prefix_index"] > 0 for w in health["workers"])
    metrics = httpx.get(f"{svc.base}/metrics", timeout=10).text
    assert f'mlxq_worker_routed_to_cache_jobs{{model="{MODEL_NAME}",worker="w1"}}' in metrics


def test_a_session_with_a_prompt_cache_key_sticks_from_its_first_turn(
    tmp_path: Path, tiny_model: Path, service_factory
):
    svc = cluster(service_factory, service_env(tmp_path, tiny_model), ["w1", "w2"])
    for key in ("alpha", "beta"):
        expected = worker_of(key, ["w1", "w2"])
        # Unrelated first turns (nothing of them cached anywhere) all land on the session's worker.
        for n in range(3):
            _, job = ask(
                svc, [{"role": "user", "content": f"{key} question {n}"}], extra_body={"prompt_cache_key": key}
            )
            assert (job["route"]["worker"], job["route"]["reason"]) == (expected, "session")
    # Anthropic's metadata.user_id (Claude Code's session) is a session too.
    anthropic_body = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "metadata": {"user_id": "cc-session-1"}}
    workers = set()
    for n in range(3):
        body = {**anthropic_body, "messages": [{"role": "user", "content": f"claude {n}"}]}
        reply = httpx.post(f"{svc.base}/v1/messages", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        workers.add(httpx.get(f"{svc.base}/v1/jobs/{reply.headers['x-job-id']}").json()["route"]["worker"])
    assert len(workers) == 1


def test_an_overloaded_workers_new_sessions_go_to_the_other(tmp_path: Path, tiny_model: Path, service_factory):
    # The two long jobs must still run when health is read: drafting off, or the tiny model's loops (drafted nearly
    # whole) end them first.
    env = service_env(tmp_path, tiny_model, MLXQ_ROUTE_LOAD_MARGIN="1", MLXQ_SPECULATIVE="off")
    svc = cluster(service_factory, env, ["w1", "w2"])
    keys = [k for k in (f"s{i}" for i in range(50)) if worker_of(k, ["w1", "w2"]) == "w1"][:2]
    busy_key, new_key = keys
    long = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 3000, "extra_body": {"prompt_cache_key": busy_key}}

    def load(n: int) -> None:
        with contextlib.suppress(openai.APIStatusError):  # the service stops under it at the end: 503
            client(svc).chat.completions.create(
                messages=[{"role": "user", "content": f"Write at length, part {n}."}], **long
            )

    # Its worker's load goes to 2: past the other's 0 by more than the margin of 1.
    busy = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(2)]
    for thread in busy:
        thread.start()
    svc.wait_health(lambda h: sum(w["load"]["active"] for w in h["workers"] if w["id"] == "w1") >= 2, timeout=60)
    _, job = ask(svc, [{"role": "user", "content": "A new session."}], extra_body={"prompt_cache_key": new_key})
    assert (job["route"]["worker"], job["route"]["reason"]) == ("w2", "balance")


def test_a_killed_workers_clients_and_sessions_move_to_the_survivor(deployment, service_factory):
    svc = cluster(service_factory, deployment, ["w1", "w2"])
    procs = {"w1": svc.procs[1], "w2": svc.procs[2]}
    messages = [{"role": "system", "content": FILLER}, {"role": "user", "content": "Start the task."}]
    answer, first = ask(svc, messages, extra_body={"prompt_cache_key": "doomed"})
    doomed = first["route"]["worker"]
    survivor = ({"w1", "w2"} - {doomed}).pop()
    messages += [{"role": "assistant", "content": answer.choices[0].message.content}]
    messages += [{"role": "user", "content": "Now write at length."}]
    answers: list[object] = []
    waiting = client(svc).with_options(timeout=300)
    waiter = threading.Thread(
        target=lambda: answers.append(
            waiting.chat.completions.create(
                model=MODEL_NAME,
                messages=messages,
                temperature=0,
                max_tokens=1200,  # the next turn still fits the tiny model's 2k context
                extra_body={"prompt_cache_key": "doomed"},
            )
        ),
        daemon=True,
    )
    waiter.start()
    svc.wait_health(lambda h: any(w["load"]["active"] for w in h["workers"] if w["id"] == doomed), timeout=60)
    procs[doomed].kill()
    svc.procs.remove(procs[doomed])
    waiter.join(240)
    assert answers, f"the waiting client got no answer\n{svc.logs()}"
    jobs = httpx.get(f"{svc.base}/v1/jobs", params={"limit": 10}, timeout=10).json()["data"]
    moved = next(j for j in jobs if j["attempts"] == 2)
    assert (moved["status"], moved["worker"], moved["route"]["worker"]) == ("succeeded", survivor, survivor)
    # The session's next turn lands on the survivor too.
    messages += [{"role": "assistant", "content": answers[0].choices[0].message.content}]
    _, later = ask(svc, [*messages, {"role": "user", "content": "Go on."}], extra_body={"prompt_cache_key": "doomed"})
    assert later["route"]["worker"] == survivor
    assert {w["id"] for w in svc.health()["workers"]} == {survivor}


def test_a_third_worker_takes_new_sessions_and_leaves_cached_ones(tmp_path: Path, tiny_model: Path, service_factory):
    svc = cluster(service_factory, service_env(tmp_path, tiny_model), ["w1", "w2"])
    opened = {}
    for n in range(6):
        messages = [{"role": "user", "content": f"Open task {n}."}]
        answer, job = ask(svc, messages, extra_body={"prompt_cache_key": f"old{n}"})
        opened[n] = (messages + [{"role": "assistant", "content": answer.choices[0].message.content}], job)
    svc.add_worker("w3")
    svc.wait_workers({"w1", "w2", "w3"})
    time.sleep(1.5)  # heartbeats publish what each cache holds
    for n, (messages, job) in opened.items():  # a session with a cached prefix never moves
        _, later = ask(
            svc, [*messages, {"role": "user", "content": "Continue."}], extra_body={"prompt_cache_key": f"old{n}"}
        )
        assert (later["route"]["worker"], later["route"]["reason"]) == (job["route"]["worker"], "prefix")
    news = [f"new{n}" for n in range(12)]
    landed = {
        key: ask(svc, [{"role": "user", "content": key}], extra_body={"prompt_cache_key": key})[1] for key in news
    }
    assert {key: job["route"]["worker"] for key, job in landed.items()} == {
        key: worker_of(key, ["w1", "w2", "w3"]) for key in news
    }
    assert 0 < sum(job["route"]["worker"] == "w3" for job in landed.values()) < len(news)


def test_two_models_behind_one_api_each_answered_by_its_own_worker(
    tmp_path: Path, tiny_model: Path, smollm2: Path, service_factory
):
    env = service_env(tmp_path, tiny_model, MLXQ_MODELS=json.dumps({"smol": str(smollm2), "ghost": "/no/such/model"}))
    svc = service_factory(env).start(worker=False)
    svc.add_worker("w-main")
    svc.add_worker("w-smol", MLXQ_MODEL=str(smollm2), MLXQ_MODEL_NAME="smol")
    svc.wait_workers({"w-main", "w-smol"})
    oa = client(svc)
    assert [m.id for m in oa.models.list().data] == [MODEL_NAME, "smol", "ghost"]
    assert [oa.models.retrieve(m).id for m in ("smol", "ghost", "gpt-4o")] == ["smol", "ghost", MODEL_NAME]
    paris = oa.chat.completions.with_raw_response.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0
    )
    assert "Paris" in paris.parse().choices[0].message.content and paris.parse().model == "smol"
    job = httpx.get(f"{svc.base}/v1/jobs/{paris.headers['x-job-id']}").json()
    assert (job["model"], job["route"]["worker"], job["worker"]) == ("smol", "w-smol", "w-smol")
    _, main = ask(svc, [{"role": "user", "content": "What is the capital of France?"}])
    assert (main["model"], main["worker"]) == (MODEL_NAME, "w-main")  # same question, another model: its own
    # Any other name is the main model (MLXQ_MODEL_ALIASES' default); a configured model with no worker is a 503.
    assert oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2).model
    with pytest.raises(openai.APIStatusError) as exc:
        oa.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert exc.value.status_code == 503 and "ghost" in exc.value.message
    assert {(w["id"], w["model"]) for w in svc.health()["workers"]} == {("w-main", MODEL_NAME), ("w-smol", "smol")}


def test_batch_lines_spread_across_two_workers(tmp_path: Path, tiny_model: Path, service_factory):
    svc = cluster(service_factory, service_env(tmp_path, tiny_model), ["w1", "w2"])
    oa = client(svc)
    lines = [batch_line(f"q{i}", f"Line {i} of the batch.", max_tokens=32) for i in range(12)]
    batch = oa.batches.create(input_file_id=upload(oa, lines), endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_batch(oa, batch.id).status == "completed"
    jobs = httpx.get(f"{svc.base}/v1/jobs", params={"limit": 50}, timeout=10).json()["data"]
    per_worker = {name: sum(j["worker"] == name for j in jobs if j["batch_id"] == batch.id) for name in ("w1", "w2")}
    assert sum(per_worker.values()) == 12 and min(per_worker.values()) >= 3, per_worker
