"""The process harness of the tests and the benchmarks: the api and worker as separate processes, started
through the CLI as `mlxq api` and `mlxq worker` start them. Here, in the shared package, so that both may
import it; it imports neither api nor worker, and the service never uses it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """The real api and worker as separate processes, as `mlxq api` / `mlxq worker` run them."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = {**os.environ, **env}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.starts = 0

    def _spawn(self, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{args[0]}-{self.starts}.log", "w")
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    def start(self, *, worker: bool = True, wait_model: bool = True) -> Service:
        self.starts += 1
        self.procs = [self._spawn("api", "--port", str(self.port), "--log-level", "warning")]
        if worker:
            self.procs.append(self._spawn("worker", "--log-level", "INFO"))
        self.wait_health(lambda h: (h["model_loaded"] if wait_model else h["worker"]["alive"]) if worker else True)
        return self

    def health(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=5).json()

    def wait_health(self, ok, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        last: object = None
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"process exited {p.returncode}; logs in {self.log_dir}:\n{self.logs()}")
            try:
                last = self.health()
                if ok(last):
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"service not ready: {last}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def restart(self) -> Service:
        self.stop()
        return self.start()
