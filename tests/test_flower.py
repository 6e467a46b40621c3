"""Flower on the real stack: api + worker on the test Redis, `mlxq flower` beside them, read back over HTTP
and in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from mlxq.flower import NEEDS_REDIS, credentials, flower_argv, run
from mlxq.procs import ROOT, Service, free_port
from mlxq.settings import Settings
from tests.conftest import MODEL_NAME, service_env, unavailable

pytestmark = pytest.mark.e2e

USER, PASSWORD = "ops", "flower-test-password"
# Prompts Flower must never show: a task's arguments are the job id, its kind and its size.
SECRET = "zebra-quartz-prompt"
LABEL = re.compile(r"job ([0-9a-f]{8}) (chat|completion) (\d+) chars → (\S+) \((\w+), (\d+) cached\)")


def test_refused_where_it_cannot_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    def refusal(**fields: Any) -> str:
        with pytest.raises(SystemExit) as exit_:
            run(Settings(_env_file=None, data_dir=tmp_path, **fields))
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert NEEDS_REDIS in refusal()  # the embedded default
    redis = "redis://127.0.0.1:6379/0"
    assert "MLXQ_FLOWER_PASSWORD is required" in refusal(broker_url=redis, flower_host="0.0.0.0")
    assert "must not contain ','" in refusal(broker_url=redis, flower_password="a,b")
    assert "MLXQ_FLOWER_USER" in refusal(broker_url=redis, flower_user="a:b", flower_password="pw")


def test_credentials():
    settings = Settings(_env_file=None, flower_user="ops", flower_password="s3cret:with-colon")
    assert credentials(settings) == ("ops:s3cret:with-colon", False)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        made, was_made = credentials(
            settings.model_copy(update={"flower_host": host, "flower_password": SecretStr("")})
        )
        assert was_made and made.startswith("ops:") and len(made) > 20 and "," not in made
    assert "--basic-auth=ops:pw" in flower_argv(settings, "ops:pw")


@dataclass
class Flower:
    base: str
    worker: str  # the hostname of this test's worker, as Flower names it
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, *, auth: tuple[str, str] | None = (USER, PASSWORD), **params: Any) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", params=params, auth=auth, timeout=10)

    def wait(self, what: str, ok: Callable[[], Any], timeout: float = 30) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if found := ok():
                    return found
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower: {what} not seen in {timeout} s\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def stack(
    tmp_path: Path, tiny_model: Path, redis_url: tuple[str, str], service_factory: Callable[[dict[str, str]], Service]
) -> Iterator[tuple[Service, Flower]]:
    """api + worker on this test's Redis db and queue (SQLite jobs), and `mlxq flower` watching them."""
    broker, prefix = redis_url
    env = service_env(tmp_path, tiny_model, MLXQ_BROKER_URL=broker, MLXQ_QUEUE=prefix, MLXQ_REDIS_PREFIX=prefix)
    port = free_port()
    log = tmp_path / "flower.log"
    flower_env = {
        **os.environ,
        **env,
        "MLXQ_FLOWER_PORT": str(port),
        "MLXQ_FLOWER_USER": USER,
        "MLXQ_FLOWER_PASSWORD": PASSWORD,
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "flower"], env=flower_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        svc = service_factory(env).start()
        flower = Flower(f"http://127.0.0.1:{port}", "", proc, log)
        # The worker's heartbeat event reaching Flower proves its event receiver is live before any task runs.
        flower.worker = flower.wait(
            "this test's worker",
            lambda: next(
                (
                    name
                    for name, alive in flower.get("/api/workers", status=1).json().items()
                    if name.startswith(f"mlxq-{prefix}.") and alive  # mlxq-<queue>.<worker name>@<host>
                ),
                None,
            ),
        )
        yield svc, flower
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_requests(svc: Service) -> list[dict[str, Any]]:
    """Two chat requests and one completion through the official client; the jobs they made, newest first."""
    oa = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="unused", max_retries=0, timeout=120)
    for i in range(2):
        oa.chat.completions.create(
            model=MODEL_NAME, temperature=0, max_tokens=4, messages=[{"role": "user", "content": f"{SECRET} {i}"}]
        )
    oa.completions.create(model=MODEL_NAME, prompt=f"{SECRET} as a completion", temperature=0, max_tokens=4)
    jobs = httpx.get(f"{svc.base}/v1/jobs", timeout=10).json()["data"]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    return jobs


def test_flower_lists_tasks_and_workers(stack: tuple[Service, Flower]):
    svc, flower = stack
    jobs = run_requests(svc)

    def tasks_done() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks", workername=flower.worker).json()
        return tasks if all(tasks.get(j["id"], {}).get("state") == "SUCCESS" for j in jobs) else None

    tasks = flower.wait("the tasks succeeded", tasks_done)
    for job in jobs:
        task = tasks[job["id"]]
        assert task["name"] == "mlxq.generate"
        assert task["worker"] == flower.worker
        assert 0 < task["runtime"] < 60
        label = LABEL.fullmatch(task["args"])
        assert label, f"arguments are not a short label: {task['args']!r}"
        kind = "chat" if job["endpoint"] == "/v1/chat/completions" else "completion"
        assert (label[1], label[2]) == (job["id"][:8], kind)
        assert (label[4], label[5]) == (job["route"]["worker"], job["route"]["reason"])  # where it went, and why
        assert task["kwargs"] in ("{}", "")
    assert SECRET not in json.dumps(tasks)

    # Asked live (a broadcast to the workers), the worker says what it runs and what it consumes.
    workers = flower.get("/api/workers", refresh=1).json()
    assert "mlxq.generate" in workers[flower.worker]["registered"]
    # Its own queue (mlxq.delivery routes each job to one worker).
    (queue,) = [q["name"] for q in workers[flower.worker]["active_queues"]]
    assert queue.startswith(svc.env["MLXQ_QUEUE"] + ".w.")

    for auth in (None, (USER, "wrong")):
        assert flower.get("/api/tasks", auth=auth).status_code == 401
        assert flower.get("/tasks", auth=auth).status_code == 401


def test_flower_tasks_page_in_chromium(stack: tuple[Service, Flower], tmp_path: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("Debian's chromium is not installed (apt-get install -y chromium)")
    svc, flower = stack
    jobs = run_requests(svc)
    flower.wait(
        "the tasks",
        lambda: all(
            t.get("state") == "SUCCESS" for t in (flower.get("/api/tasks").json().get(j["id"], {}) for j in jobs)
        ),
    )

    # The page fills its table from /tasks/datatable after it loads: give its scripts virtual time to run.
    url = flower.base.replace("://", f"://{USER}:{PASSWORD}@") + "/tasks"
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "mlxq.generate" in dom, dom[-2000:]
    for job in jobs:
        assert job["id"] in dom
        assert f"job {job['id'][:8]} " in dom
    assert SECRET not in dom
