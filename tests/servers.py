"""Private Redis and PostgreSQL servers a test owns: on their own ports, stopped and restarted at will.

The shared servers on 6379 and 5432 belong to every test; a test that kills its broker or database
needs its own. Each server here keeps its port and data directory across a restart, so clients see the
same server go away and come back, as in a production restart.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from mlxq.procs import free_port

PG_USER = "postgres"


class ServerMissing(RuntimeError):
    """The server's binaries (or the account to run them) are not on this machine."""


def _wait_port(port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class RedisServer:
    """A `redis-server` on a free port with its own directory.

    Persistence is on (append-only file, fsync on every write), like a production Redis that must
    not lose queued messages: the Celery task messages waiting in a list survive a restart. Without
    it a restart would empty the queue, and recovering from that is a different test (the api's
    reaper re-sending lost messages).
    """

    def __init__(self, root: Path, *, persist: bool = True) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerMissing("redis-server is not on PATH")
        self.binary = binary
        self.dir = root / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        if not _wait_port(self.port, 15):
            self.stop(kill=True)
            raise RuntimeError(f"redis-server did not start on {self.port}:\n{self.logs()}")
        return self

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM: Redis flushes its append-only file and exits. `kill`: SIGKILL, a crash."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def close(self) -> None:
        self.stop(kill=True)


def _pg_bin() -> Path:
    """The newest PostgreSQL server's bin directory (Debian keeps them out of PATH), else PATH's."""

    def major(pg_ctl: Path) -> int:
        version = pg_ctl.parent.parent.name
        return int(version) if version.isdigit() else 0

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=major)
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    raise ServerMissing("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH")


class PostgresServer:
    """A PostgreSQL cluster of its own: `initdb` into a temporary directory, `pg_ctl` on a free port.

    PostgreSQL refuses to run as root, so as root its commands run as the `postgres` account, in a
    directory that account owns (pytest's own tmp dirs are private to root).
    """

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.as_user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                raise ServerMissing(f"running as root and there is no `{PG_USER}` account to run PostgreSQL") from None
            self.as_user = PG_USER
        self.root = Path(tempfile.mkdtemp(prefix="mlxq-pg-"))
        if self.as_user:
            shutil.chown(self.root, user=self.as_user)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{self.logs()}")
        return done

    def url(self, database: str = "postgres", *, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """`fast`: disconnect every client and shut down cleanly. `immediate`: a crash, recovered on start."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> PostgresServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        """Create `name` and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.url(driver="postgresql"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def logs(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.running:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
