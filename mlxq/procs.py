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

    def _spawn(self, *args: str, name: str | None = None, **env: str) -> subprocess.Popen:
        """`mlxq <args>` with this service's environment (and `env`), logging to <name or command>-<start>.log
        (a respawn appends to the same log)."""
        log = open(self.log_dir / f"{name or args[0]}-{self.starts}.log", "a")
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def start(self, *, worker: bool = True, wait_model: bool = True) -> Service:
        self.starts += 1
        self.procs = [self._spawn("api", "--port", str(self.port), "--log-level", "warning")]
        if worker:
            self.procs.append(self._spawn("worker", "--log-level", "INFO"))
        self.wait_health(lambda h: (h["model_loaded"] if wait_model else h["worker"]["alive"]) if worker else True)
        return self

    def add_worker(self, name: str, **env: str) -> subprocess.Popen:
        """Another worker of this service, named `name` (MLXQ_WORKER_NAME), with its own MLXQ_* overrides (another
        model, say); stopped with the service."""
        proc = self._spawn("worker", "--log-level", "INFO", name=f"worker-{name}", **{"MLXQ_WORKER_NAME": name, **env})
        self.procs.append(proc)
        return proc

    def wait_workers(self, names: set[str], timeout: float = 120) -> dict:
        """Until exactly these workers are alive with their models loaded."""
        return self.wait_health(
            lambda h: {w["id"] for w in h.get("workers", []) if w["model_loaded"]} == names, timeout=timeout
        )

    def health(self) -> dict:
        """/health with its details: sent with the first of MLXQ_API_KEYS when keys are on."""
        key = next((k.strip() for k in self.env.get("MLXQ_API_KEYS", "").split(",") if k.strip()), None)
        headers = {"x-api-key": key} if key else {}
        return httpx.get(f"{self.base}/health", headers=headers, timeout=5).json()

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


# -- Codex, as the tests and scripts/bench_codex.py run it -------------------------------------------

CODEX_VERSION = "0.171.0"


def install_codex(cache: Path) -> Path:
    """Codex CLI from npm into `cache`/codex-<version> (once); its binary."""
    prefix = cache / f"codex-{CODEX_VERSION}"
    binary = prefix / "node_modules" / ".bin" / "codex"
    if not binary.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"@openai/codex@{CODEX_VERSION}"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return binary


def codex_home(home: Path, *, base_url: str, model: str, small: bool, shell: bool = False) -> Path:
    """A CODEX_HOME pointing Codex at mlxq through the README's provider block. `small`: Codex's own settings that
    shorten its prompt (about 10k tokens by default) to fit a small model's context; `shell`: keep its shell tools
    (exec_command, write_stdin) among them."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "instructions.md").write_text("You are a helpful assistant. Answer briefly.\n")
    top = [f'model = "{model}"', 'model_provider = "mlxq"', "check_for_update_on_startup = false"]
    features = ["plugins = false"]
    tables: list[str] = []
    if small:
        top += [
            f'model_instructions_file = "{home / "instructions.md"}"',
            'web_search = "disabled"',
            "include_permissions_instructions = false",
            "include_environment_context = false",
            "include_apps_instructions = false",
            'model_reasoning_summary = "none"',
        ]
        tables = ["[agents]", "enabled = false", "[skills]", "include_instructions = false"]
        tables += ["[tools.experimental_request_user_input]", "enabled = false"]
        features += ["goals = false", "view_image = false"]
        if not shell:
            features += ["shell_tool = false", "unified_exec = false"]
    provider = [
        "[model_providers.mlxq]",
        'name = "mlxq"',
        f'base_url = "{base_url}"',
        'wire_api = "responses"',
        # mlxq answers a refused request at once; Codex's retries would only repeat it.
        "request_max_retries = 0",
        "stream_max_retries = 0",
    ]
    lines = [*top, "[analytics]", "enabled = false", *tables, "[features]", *features, *provider]
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def run_codex(
    codex: Path, home: Path, prompt: str, cwd: Path, *, resume: bool = False
) -> subprocess.CompletedProcess[str]:
    """`codex exec` (or `codex exec resume --last`: the next turn of the last session) with no terminal."""
    args = [str(codex), "exec", *(["resume", "--last"] if resume else []), "--skip-git-repo-check", prompt]
    return subprocess.run(
        args,
        env={**os.environ, "CODEX_HOME": str(home)},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
