"""Faults caused for real on `mlxq serve` and on api + worker processes: kill -9 and SIGTERM, a request
that kills its worker, clients that leave, a lost task message, a zero cache lifetime."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mlxq.procs import ROOT, free_port
from tests.conftest import MODEL_NAME, service_env

LONG = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 200}


def ask(content: str) -> dict:
    return {**LONG, "messages": [{"role": "user", "content": content}]}


class Serve:
    """`mlxq serve` as a user runs it: one process that starts and supervises its worker."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.db = Path(env["MLXQ_DATA_DIR"]) / "mlxq.sqlite"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--port", str(self.port)],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=5).json()

    def wait(self, ok, timeout: float = 120) -> dict:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if ok(last := self.health()):
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"{last}\n{self.log.read_text()[-3000:]}")

    def worker_pid(self) -> int:
        # Any of serve's threads may have started it (the supervisor's does).
        children = [
            c for task in Path(f"/proc/{self.proc.pid}/task").iterdir() for c in (task / "children").read_text().split()
        ]
        assert len(children) == 1, children
        return int(children[0])

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", timeout=180, max_retries=0)

    def jobs(self) -> list[tuple[str, int]]:
        with sqlite3.connect(self.db) as db:
            return db.execute("SELECT status, attempts FROM jobs ORDER BY created_at").fetchall()

    def wait_jobs(self, ok, timeout: float = 60) -> list[tuple[str, int]]:
        deadline = time.time() + timeout
        while not ok(jobs := self.jobs()):
            assert time.time() < deadline, jobs
            time.sleep(0.05)
        return jobs


@pytest.fixture
def serve(tmp_path: Path, smollm2: Path) -> Iterator[Serve]:
    env = service_env(tmp_path, smollm2, MLXQ_RESEND_AFTER_S="2")
    svc = Serve(env, tmp_path / "serve.log")
    svc.wait(lambda h: h["model_loaded"])
    yield svc
    _kill(svc, tmp_path)


@pytest.fixture
def serve_tiny(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., Serve]]:
    """`mlxq serve` on the tiny model with these settings, started and ready; killed with whatever it left after."""
    started: list[Serve] = []

    def start(**settings: str) -> Serve:
        svc = Serve(service_env(tmp_path, tiny_model, **settings), tmp_path / f"serve{len(started)}.log")
        started.append(svc)
        svc.wait(lambda h: h["model_loaded"])
        return svc

    yield start
    for svc in started:
        _kill(svc, tmp_path)


def _kill(svc: Serve, tmp_path: Path) -> None:
    if svc.proc.poll() is None:
        svc.proc.kill()
        svc.proc.wait()
    for pid in _pids_of(tmp_path):
        os.kill(pid, signal.SIGKILL)


def _pids_of(tmp_path: Path) -> list[int]:
    """Processes whose environment names this test's data dir (a worker left behind would show here)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(tmp_path / "data").encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def streamed_text(client: openai.OpenAI, request: dict) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client.chat.completions.create(**request, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_serve_restarts_a_killed_worker_and_its_jobs_run_again_for_sync_and_streamed_clients(serve: Serve):
    client = serve.client()
    sync_req, stream_req = ask("Write a long story about a lighthouse."), ask("Write a long poem about the sea.")
    sync, sync_out = in_thread(lambda: client.chat.completions.create(**sync_req))
    stream, stream_out = in_thread(lambda: streamed_text(client, stream_req))
    serve.wait_jobs(lambda jobs: [s for s, _ in jobs] == ["running", "running"])
    time.sleep(1.0)  # some text streamed already
    os.kill(serve.worker_pid(), signal.SIGKILL)

    sync.join(240)
    stream.join(240)
    answer, (text, finish) = sync_out[0], stream_out[0]
    assert answer.choices[0].finish_reason == finish == "length"
    assert serve.jobs() == [("succeeded", 2), ("succeeded", 2)]
    health = serve.health()
    assert health["worker"]["restarts"] == 1 and health["model_loaded"]
    # Both answers are whole: what a fresh ask (now a cache hit) gives, the streamed text not doubled.
    hit = client.chat.completions.with_raw_response.create(**stream_req)
    assert hit.headers["x-cache"] == "HIT" and hit.parse().choices[0].message.content == text
    assert client.chat.completions.create(**sync_req).choices[0].message.content == answer.choices[0].message.content


def test_a_sampled_jobs_events_after_its_worker_is_killed_say_restarted_and_give_the_new_run_whole(serve: Serve):
    """A submitted job that samples runs again from the start when its worker dies, with other text: its public
    events pass `restarted` on and then the new run's text whole, so a reader's text after the last `restarted`
    is the job's answer (skipping as much of the new text as it had spliced two different answers together)."""
    body = {**ask("Write a long story about a lighthouse."), "temperature": 1.0}
    job = httpx.post(f"{serve.base}/v1/jobs", json=body, timeout=30).json()
    seen: list[dict] = []

    def follow() -> None:
        with httpx.stream("GET", f"{serve.base}/v1/jobs/{job['id']}/events", timeout=240) as r:
            seen.extend(json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:"))

    reader, _ = in_thread(follow)
    serve.wait_jobs(lambda jobs: [s for s, _ in jobs] == ["running"])
    time.sleep(1.5)  # some text sent already
    os.kill(serve.worker_pid(), signal.SIGKILL)
    reader.join(240)
    assert seen and seen[-1]["type"] == "done", seen[-3:]
    types = [e["type"] for e in seen]
    assert "restarted" in types, types
    last = len(types) - 1 - types[::-1].index("restarted")
    text = "".join(e.get("content") or "" for e in seen[last:] if e["type"] == "delta")
    assert text == seen[-1]["result"]["text"]


def test_a_stream_whose_worker_is_stopped_with_sigterm_goes_on_without_a_repeat(serve: Serve):
    """A stopped worker (kill -TERM, as systemd or Kubernetes stops it) hands its jobs back uncounted and serve
    starts another: a deterministic stream goes on where it was, its text not doubled; a sampled one, whose new
    text would not continue the old, is told to retry (worker_lost), as after a kill -9."""
    greedy_req = ask("Write a long poem about the sea.")
    sampled_req = {**ask("Write a long story about a fox."), "temperature": 1.0}
    chunks: dict[str, list[dict]] = {"greedy": [], "sampled": []}

    def stream(name: str, body: dict) -> None:
        with httpx.stream("POST", f"{serve.base}/v1/chat/completions", json={**body, "stream": True}, timeout=240) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks[name].append(json.loads(line[len("data: ") :]))

    def text(name: str) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[name] if c.get("choices"))

    threads = [
        in_thread(lambda n=n, b=b: stream(n, b))[0] for n, b in (("greedy", greedy_req), ("sampled", sampled_req))
    ]
    deadline = time.monotonic() + 120
    while not (text("greedy") and text("sampled")):  # both have had part of their answer
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(serve.worker_pid(), signal.SIGTERM)
    for thread in threads:
        thread.join(240)

    hit = serve.client().chat.completions.with_raw_response.create(**greedy_req)
    assert hit.headers["x-cache"] == "HIT" and hit.parse().choices[0].message.content == text("greedy")
    assert chunks["sampled"][-1].get("error", {}).get("code") == "worker_lost", chunks["sampled"][-2:]
    assert serve.health()["worker"]["restarts"] == 1
    # The sampled job, whose client was told to retry, is given up: it does not run again for nobody.
    serve.wait_jobs(lambda jobs: sorted(s for s, _ in jobs) == ["cancelled", "succeeded"], timeout=10)


def test_a_hung_worker_is_killed_and_restarted_and_its_job_runs_again(serve_tiny: Callable[..., Serve]):
    """A worker stopped with SIGSTOP (as a hang: its process lives, nothing beats) is killed once its heartbeat has
    been silent MLXQ_WORKER_HUNG_S, and restarted; the job it held is answered by the next one."""
    serve = serve_tiny(MLXQ_WORKER_HUNG_S="6", MLXQ_HEARTBEAT_S="0.5")
    client = serve.client()
    request = {**ask("Write a long story about a lighthouse."), "max_tokens": 2000}
    waiter, out = in_thread(lambda: client.chat.completions.create(**request))
    serve.wait_jobs(lambda jobs: [s for s, _ in jobs] == ["running"])
    hung = serve.worker_pid()
    os.kill(hung, signal.SIGSTOP)
    waiter.join(120)
    assert out and not isinstance(out[0], Exception), out
    assert out[0].choices[0].finish_reason == "length" and serve.jobs() == [("succeeded", 2)]
    assert not Path(f"/proc/{hung}").exists() and serve.health()["worker"]["restarts"] == 1
    assert "has not beaten for" in serve.log.read_text()


def test_the_watchdog_judges_a_worker_by_its_own_beats_not_its_predecessors():
    """A worker that has not beaten yet (loading a large model: it beats once loaded) is not killed for the silence
    its predecessor of the same name left, however long; one that beat and went quiet is."""
    from mlxq.supervisor import Supervisor

    def run(silence) -> tuple[int | None, float]:
        supervisor = Supervisor(["sleep", "30"], silence=silence, hung_s=1.0)
        proc = subprocess.Popen(["sleep", "4"])
        tic = time.monotonic()
        return supervisor._wait(proc), time.monotonic() - tic

    spawned = time.monotonic()
    loading = lambda: 0.1 + time.monotonic() - spawned  # noqa: E731  (the predecessor beat 0.1 s before)
    code, took = run(loading)
    assert code == 0 and took > 3.5  # it ran its course
    spawned = time.monotonic()
    hung = lambda: max(time.monotonic() - spawned - 0.3, 0.0)  # noqa: E731  (it beat at 0.3 s, then nothing)
    code, took = run(hung)
    assert code == -signal.SIGKILL and took < 3.5


def test_a_request_that_kills_the_worker_twice_fails_cleanly_and_the_worker_stays_up(serve: Serve):
    client = serve.client()
    waiter, out = in_thread(lambda: client.chat.completions.create(**ask("Write a long story about a dragon.")))
    for attempt in (1, 2):  # max_attempts is 2
        serve.wait_jobs(lambda jobs, a=attempt: jobs == [("running", a)], timeout=120)
        os.kill(serve.worker_pid(), signal.SIGKILL)
    waiter.join(120)
    error = out[0]
    assert isinstance(error, openai.InternalServerError) and error.code == "worker_crashed", error
    assert "2 times" in error.message
    assert serve.jobs() == [("failed", 2)]
    health = serve.wait(lambda h: h["model_loaded"])
    assert health["worker"]["restarts"] == 2
    # The worker is up and serves the next request.
    short = client.chat.completions.create(**{**ask("Say hi."), "max_tokens": 4})
    assert short.choices[0].message.content


def test_sigterm_stops_serve_and_its_worker_within_15s_saving_the_prefix_cache(serve: Serve, tmp_path: Path):
    client = serve.client()
    client.chat.completions.create(**{**ask("Name a fruit."), "max_tokens": 4})  # an entry to save
    submitted = httpx.post(f"{serve.base}/v1/jobs", json=ask("Write a long essay about rivers."), timeout=30).json()
    waiter, out = in_thread(lambda: client.chat.completions.create(**ask("Write a long story about a dragon.")))
    streamed: list[str] = []  # the data lines of a stream cut by the stop

    def stream() -> None:
        body = {**ask("Write a long poem about the sea."), "stream": True}
        with httpx.stream("POST", f"{serve.base}/v1/chat/completions", json=body, timeout=60) as r:
            streamed.extend(line for line in r.iter_lines() if line.startswith("data:"))

    streamer, _ = in_thread(stream)
    serve.wait_jobs(lambda jobs: [s for s, _ in jobs[-3:]] == ["running"] * 3)
    while not any('"content"' in line for line in streamed):
        time.sleep(0.05)
    worker = serve.worker_pid()

    started = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    serve.proc.wait(15)
    while _pids_of(tmp_path) and time.monotonic() - started < 15:
        time.sleep(0.1)
    assert not _pids_of(tmp_path), f"left running: {_pids_of(tmp_path)}"
    assert not Path(f"/proc/{worker}").exists()

    waiter.join(5)
    error = out[0]  # the waiting client was told at once, in its dialect
    assert isinstance(error, openai.APIStatusError) and error.status_code == 503 and error.code == "shutting_down"
    assert error.response.headers.get("retry-after") == "5"  # as every other retryable 503 says when to retry
    # The stream was told too, in its last event: not cut after an ordinary delta (sse-starlette's own drain raced it).
    streamer.join(5)
    assert '"shutting_down"' in streamed[-2] and streamed[-1].endswith("[DONE]"), streamed[-3:]
    assert list((tmp_path / "data" / "prefix_cache").rglob("*.safetensors"))  # per model, per worker
    # The submitted job went back to the queue without using up an attempt: the next start runs it. The two whose
    # clients were told to retry are given up: they would run again after the restart for nobody.
    assert submitted["status"] == "queued"
    assert [s for s, _ in serve.jobs()[-3:]] == ["queued", "cancelled", "cancelled"], serve.jobs()
    assert serve.jobs()[-3] == ("queued", 0)


def test_a_stream_that_waits_for_its_turn_is_told_of_a_stop_not_cut_short(serve_tiny: Callable[..., Serve]):
    """A stream whose job waits (a batch of one, taken) when the server stops gets the `shutting_down` error event and
    its dialect's end. sse-starlette's own drain cut every stream on the signal, racing the 503: with no event to
    relay, the api checks for the stop each second, and the stream ended on a keepalive, the client unable to tell
    its answer was cut short."""
    svc = serve_tiny(MLXQ_BATCH_SIZE="1")
    client = svc.client()
    busy, _ = in_thread(lambda: client.chat.completions.create(**{**ask("Write a long story."), "max_tokens": 4000}))
    svc.wait_jobs(lambda jobs: jobs == [("running", 1)])
    lines: list[str] = []

    def stream() -> None:
        body = {**ask("Write a poem."), "stream": True}
        with httpx.stream("POST", f"{svc.base}/v1/chat/completions", json=body, timeout=60) as r:
            lines.extend(line for line in r.iter_lines() if line)

    streamer, _ = in_thread(stream)
    deadline = time.time() + 30
    while not lines:  # the stream has begun (a keepalive while it waits)
        assert time.time() < deadline and streamer.is_alive()
        time.sleep(0.05)
    svc.proc.send_signal(signal.SIGTERM)
    streamer.join(15)
    data = [line for line in lines if line.startswith("data:")]
    assert len(data) >= 2 and '"shutting_down"' in data[-2] and data[-1].endswith("[DONE]"), lines[-4:]
    busy.join(15)


def test_a_prefix_cache_save_put_off_while_the_engine_was_busy_is_made_once_it_is_idle(
    tmp_path: Path, serve_tiny: Callable[..., Serve]
):
    """A job that ends while another runs puts the save off (it waits for an idle engine); the save is made once the
    engine is idle, with no further job to prompt it, so a worker killed then keeps what it had cached. Before, the
    put-off save restarted the interval, and the last job's end came within it: nothing was saved until some later
    job ended, and a kill -9 lost every prefix cached since."""
    svc = serve_tiny(MLXQ_PREFIX_CACHE_SAVE_S="3")
    time.sleep(3.5)  # a save is due from the start
    client = svc.client()
    long, out = in_thread(lambda: client.chat.completions.create(**{**ask("Write a long story."), "max_tokens": 400}))
    svc.wait_jobs(lambda jobs: jobs == [("running", 1)])
    client.chat.completions.create(**{**ask("Say hi."), "max_tokens": 2})  # ends while the long one runs
    assert svc.jobs()[0][0] == "running", "the short job ended while the long one ran"
    long.join(120)
    assert out and not isinstance(out[0], Exception), out
    manifests = tmp_path / "data" / "prefix_cache"
    deadline = time.time() + 15
    while not list(manifests.rglob("manifest.json")):
        assert time.time() < deadline, svc.log.read_text()[-3000:]
        time.sleep(0.2)
    (manifest,) = manifests.rglob("manifest.json")
    assert len(json.loads(manifest.read_text())["entries"]) >= 2  # both prompts


def test_a_stream_joined_by_another_client_lives_on_when_the_first_goes_away(
    tmp_path: Path, tiny_model: Path, service_factory
):
    svc = service_factory(service_env(tmp_path, tiny_model)).start()
    request = {**LONG, "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{svc.base}/v1/chat/completions", json=request) as first,
    ):
        lines = first.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # the first client is streaming
        joiner = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", timeout=60)
        thread, out = in_thread(lambda: streamed_text(joiner, {k: v for k, v in request.items() if k != "stream"}))
        time.sleep(0.5)
    # The first client has gone; the joiner still gets the whole answer.
    thread.join(60)
    text, finish = out[0]
    assert finish == "length" and text


def test_a_queued_job_whose_message_was_lost_is_sent_again(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_RESEND_AFTER_S="1")).start()
    client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", timeout=120, max_retries=0)
    request = {**LONG, "max_tokens": 8, "messages": [{"role": "user", "content": "lost"}]}
    worker = svc.procs[1]
    worker.send_signal(signal.SIGSTOP)  # stopped, it takes nothing from its queue: the message waits there
    try:
        thread, out = in_thread(lambda: client.chat.completions.create(**request))
        broker = tmp_path / "data" / "broker.sqlite"
        deadline = time.time() + 10
        while time.time() < deadline:
            with sqlite3.connect(broker) as db:
                if db.execute("SELECT count(*) FROM kombu_message").fetchone()[0]:
                    db.execute("DELETE FROM kombu_message")  # the message is lost (a broker without persistence)
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the task message never reached the broker")
    finally:
        worker.send_signal(signal.SIGCONT)
    thread.join(120)
    assert isinstance(out[0], openai.types.chat.ChatCompletion), out[0]


def test_a_zero_cache_lifetime_stores_nothing(tmp_path: Path, tiny_model: Path, service_factory):
    svc = service_factory(service_env(tmp_path, tiny_model)).start()
    client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", timeout=60)
    request = {**LONG, "max_tokens": 4, "messages": [{"role": "user", "content": "fresh"}]}
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(**request, extra_headers={"Cache-Control": "max-age=0"})
        assert raw.headers["x-cache"] != "HIT"
    assert client.chat.completions.with_raw_response.create(**request).headers["x-cache"] == "MISS"


def test_with_no_worker_alive_a_request_is_a_503_not_a_hang(tmp_path: Path, tiny_model: Path, service_factory):
    """Every worker of the model killed (scaled out, nothing restarts it): a request already waiting is told so once
    the wait for a worker (MLXQ_WORKER_WAIT_S) is over, and its job is cancelled rather than run later for nobody;
    after that a new one is a 503 at once with nothing enqueued, in its client's dialect, streamed or not. A cached
    answer is still served, and a submitted job still waits for a worker, which runs it once one is back."""
    import anthropic

    wait_s = 30.0  # past the 10 s a worker counts as alive after its last beat, as a stopped one is set back
    svc = service_factory(service_env(tmp_path, tiny_model, MLXQ_WORKER_WAIT_S=str(wait_s))).start()
    client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="none", timeout=120, max_retries=0)
    small = {**LONG, "max_tokens": 4}
    cached = client.chat.completions.create(**small, messages=[{"role": "user", "content": "kept"}])
    db = tmp_path / "data" / "mlxq.sqlite"

    def jobs() -> list[tuple[str, str]]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT id, status FROM jobs ORDER BY created_at").fetchall()

    worker = svc.procs.pop(1)
    worker.kill()
    worker.wait()
    killed = time.monotonic()
    # Waiting: the worker may be restarting. Past the wait, no worker came: a 503, and the job is given up.
    with pytest.raises(openai.APIStatusError) as waited:
        client.chat.completions.create(**small, messages=[{"role": "user", "content": "waits, then hears"}])
    took = time.monotonic() - killed
    assert waited.value.status_code == 503 and waited.value.code == "worker_unavailable", waited.value
    assert wait_s - 3 < took < wait_s + 15, took
    time.sleep(1.5)  # the job is left in the background
    assert jobs()[-1][1] == "cancelled", jobs()

    before = jobs()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as at_once:
        client.chat.completions.create(**small, messages=[{"role": "user", "content": "at once"}])
    assert at_once.value.status_code == 503 and at_once.value.response.headers["retry-after"]
    with pytest.raises(openai.APIStatusError) as streamed:
        client.chat.completions.create(**small, stream=True, messages=[{"role": "user", "content": "streamed"}])
    assert streamed.value.status_code == 503
    claude = anthropic.Anthropic(base_url=svc.base, api_key="none", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as messages:
        claude.messages.create(model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert messages.value.status_code == 503 and messages.value.body["error"]["type"] == "overloaded_error"
    assert time.monotonic() - started < 10
    assert jobs() == before, "nothing is enqueued for a request refused"
    refusing = httpx.get(f"{svc.base}/health", timeout=10)  # a balancer reading the code stops sending here
    assert refusing.status_code == 503 and refusing.json()["status"] == "degraded", refusing.text
    hit = client.chat.completions.with_raw_response.create(**small, messages=[{"role": "user", "content": "kept"}])
    assert (
        hit.headers["x-cache"] == "HIT" and hit.parse().choices[0].message.content == cached.choices[0].message.content
    )
    job = httpx.post(f"{svc.base}/v1/jobs", json={**small, "messages": [{"role": "user", "content": "later"}]}).json()
    assert job["status"] == "queued", job

    svc.add_worker("back")
    svc.wait_health(lambda h: h["model_loaded"])
    assert httpx.get(f"{svc.base}/health", timeout=10).status_code == 200
    deadline = time.time() + 60
    while httpx.get(f"{svc.base}/v1/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.time() < deadline, httpx.get(f"{svc.base}/v1/jobs/{job['id']}").json()
        time.sleep(0.2)
    assert client.chat.completions.create(**small, messages=[{"role": "user", "content": "at once"}]).choices
    # A worker stopped cleanly (a restart: SIGTERM) counts as restarting as a killed one does: a request waits for
    # its successor rather than being refused at once.
    stopped = svc.procs.pop()
    stopped.terminate()
    stopped.wait(30)
    waiter, out = in_thread(
        lambda: client.chat.completions.create(**small, messages=[{"role": "user", "content": "waits for the next"}])
    )
    time.sleep(2)
    svc.add_worker("next")
    waiter.join(60)
    assert isinstance(out[0], openai.types.chat.ChatCompletion), out


def test_after_serve_is_killed_its_clients_jobs_are_given_up_and_submitted_ones_run(
    tmp_path: Path, serve_tiny: Callable[..., Serve]
):
    """kill -9 of `mlxq serve` takes its clients' connections with it, and nobody is left to tell: on the next start
    the jobs only they waited for are cancelled (they ran again, to the end of the context, for nobody), while a
    submitted job, which is polled, runs."""
    svc = serve_tiny(MLXQ_BATCH_SIZE="1")
    client = svc.client()
    in_thread(lambda: client.chat.completions.create(**{**ask("Write a long story."), "max_tokens": 4000}))
    svc.wait_jobs(lambda jobs: jobs == [("running", 1)])
    in_thread(lambda: client.chat.completions.create(**{**ask("Write a poem."), "max_tokens": 4000}))
    svc.wait_jobs(lambda jobs: len(jobs) == 2)
    submitted = httpx.post(f"{svc.base}/v1/jobs", json={**ask("Name a fruit."), "max_tokens": 8}, timeout=30).json()
    svc.wait_jobs(lambda jobs: len(jobs) == 3)
    waited = [status in ("queued", "running") for status, _ in svc.jobs()[:2]]  # a client waits for each
    assert any(waited)
    svc.proc.kill()
    svc.proc.wait()
    deadline = time.time() + 30
    while _pids_of(tmp_path):  # its worker stops by itself
        assert time.time() < deadline, _pids_of(tmp_path)
        time.sleep(0.1)

    again = serve_tiny(MLXQ_BATCH_SIZE="1")
    deadline = time.time() + 60
    while (job := httpx.get(f"{again.base}/v1/jobs/{submitted['id']}").json())["status"] != "succeeded":
        assert time.time() < deadline, job
        time.sleep(0.2)
    expected = ["cancelled" if active else "succeeded" for active in waited] + ["succeeded"]
    assert [status for status, _ in again.jobs()] == expected, again.jobs()
