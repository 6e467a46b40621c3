"""`mlxq serve`'s worker supervisor: the worker is restarted when it dies and stopped when serve stops.

Written here rather than taken from a process manager (supervisord, systemd) because the embedded default
must be one command on a laptop with nothing installed; in production, run `mlxq api` and `mlxq worker`
under the platform's own supervisor (compose `restart:`, systemd) instead.

Promises:
- A worker that exits while serve runs is started again, after a back-off that doubles from `backoff_s`
  to `max_backoff_s` while it keeps dying young (a run longer than `stable_s` resets it); every restart is
  logged and reported to `on_restart`.
- A worker whose heartbeat stops for `hung_s` after it has beaten (`silence`: seconds since its last beat) is
  killed, and so restarted: hung or stopped (SIGSTOP), its process would never exit by itself.
- `stop()` sends SIGTERM (the worker then hands its running jobs back to the queue and saves its prefix
  cache) and SIGKILLs it after `stop_timeout_s`; it returns when the worker is gone.
- The worker runs in its own session, so a terminal's Ctrl-C reaches serve alone, which stops it in
  order; if serve itself is killed, the worker notices its parent is gone and stops (`supervisor_pid`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        on_restart: Callable[[int], None] | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        stop_timeout_s: float = 12.0,
        silence: Callable[[], float | None] | None = None,
        hung_s: float = 60.0,
    ) -> None:
        self.argv = argv
        self.env = {**(env if env is not None else os.environ), "MLXQ_SUPERVISOR_PID": str(os.getpid())}
        self.on_restart = on_restart
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.stop_timeout_s = stop_timeout_s
        self.silence, self.hung_s = silence, hung_s
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mlxq-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
            return self.proc

    def _run(self) -> None:
        failures = 0
        while (proc := self._spawn()) is not None:
            started = time.monotonic()
            code = self._wait(proc)
            if self._stopping.is_set():
                return
            failures = 1 if time.monotonic() - started > self.stable_s else failures + 1
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("the worker (pid %d) died with %s; restarting it in %.0f s", proc.pid, how, delay)
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            if self.on_restart is not None:
                try:
                    self.on_restart(self.restarts)
                except Exception:
                    log.exception("could not record the worker restart")

    def _wait(self, proc: subprocess.Popen) -> int:
        """Its exit code, once it exits; killed first if its heartbeat stops for `hung_s` after this run's first."""
        # Whether this run has beaten: until then the silence is its predecessor's (the same name), and a model that
        # takes minutes to load (it beats once loaded) must not be judged by it.
        beaten, spawned = False, time.monotonic()
        while True:
            try:
                return proc.wait(timeout=min(self.hung_s / 4, 5.0) if self.silence is not None else None)
            except subprocess.TimeoutExpired:
                pass
            try:
                quiet = self.silence() if self.silence is not None else None
            except Exception:  # the database is away: no judgement now
                log.exception("could not read the worker's heartbeat")
                continue
            if quiet is None or self._stopping.is_set():
                continue
            beaten = beaten or quiet < time.monotonic() - spawned  # a beat since it was spawned
            if beaten and quiet > self.hung_s:
                log.warning("the worker (pid %d) has not beaten for %.0f s; killing it", proc.pid, quiet)
                proc.kill()

    def terminate(self) -> None:
        """Begin the stop: no more restarts, SIGTERM to the worker (several supervisors stop together so)."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """Stop the worker (SIGTERM, then SIGKILL after `stop_timeout_s`); returns its exit code."""
        self.terminate()
        with self._lock:
            proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not stop within %.0f s; killing it", self.stop_timeout_s)
                proc.kill()
                proc.wait()
        return proc.returncode
