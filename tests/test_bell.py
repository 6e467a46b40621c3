"""The local bell: real Unix datagram sockets between real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxq.bell import Bell, bell_dir, sql_bell_name
from tests.conftest import ROOT

# A listener in another process: says "ready", then prints each payload it hears with its receipt time.
LISTENER = textwrap.dedent(
    """
    import sys, time
    from mlxq.bell import Bell
    with Bell(sys.argv[1]).listen() as listener:
        print("ready", flush=True)
        while True:
            for payload in listener.wait(30):
                print(time.monotonic(), payload.decode(), flush=True)
                if payload == b"stop":
                    sys.exit(0)
    """
)


@pytest.fixture
def name() -> Iterator[str]:
    name = f"test:{uuid.uuid4().hex}"
    yield name
    shutil.rmtree(bell_dir(name), ignore_errors=True)


def spawn_listener(name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LISTENER, name], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def sockets(name: str) -> list[str]:
    return sorted(os.listdir(bell_dir(name)))


def test_ring_reaches_a_listener_in_another_process_at_once(name: str):
    proc = spawn_listener(name)
    try:
        bell = Bell(name)
        lags = []
        for i in range(5):
            sent = time.monotonic()  # system-wide clock, comparable across processes
            bell.ring(f"job-{i}".encode())
            stamp, payload = proc.stdout.readline().split()
            assert payload == f"job-{i}"
            lags.append(float(stamp) - sent)
        bell.ring(b"stop")
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    # Typically tens of microseconds; the bound only has to tell a ring from a poll.
    assert min(lags) < 0.05, lags
    assert sockets(name) == []  # a listener that closes removes its socket


def test_a_dead_listeners_socket_is_removed_by_the_next_ring(name: str):
    proc = spawn_listener(name)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(sockets(name)) == 1  # killed: it could not clean up
    with Bell(name).listen() as alive:
        Bell(name).ring(b"x")
        assert sockets(name) == [alive.path.name]
        assert alive.drain() == [b"x"]


def test_ring_with_no_listener_is_a_no_op(name: str):
    bell = Bell(name)
    bell.ring(b"nobody")  # no directory yet
    assert not bell_dir(name).exists()
    with bell.listen():
        pass
    bell.ring(b"nobody")  # a directory, no sockets
    assert sockets(name) == []


def test_rings_wait_in_the_socket_until_read(name: str):
    bell = Bell(name)
    with bell.listen() as listener:
        assert listener.wait(0.01) == []
        bell.ring(b"a")
        bell.ring()
        assert listener.wait(5) == [b"a", b""]
        assert listener.drain() == []


def test_a_burst_that_may_overflow_the_buffer_wakes_everyone(name: str):
    bell = Bell(name)
    with bell.listen() as listener:
        for i in range(50):  # Linux queues 10 datagrams by default; the rest are dropped
            bell.ring(str(i).encode())
        got = listener.drain()
    assert got[0] == b"0" and got[-1] == b""


def test_ring_is_thread_safe_and_every_ring_is_heard(name: str):
    bell = Bell(name)
    heard: list[bytes] = []
    with bell.listen() as listener:

        def ring(i: int) -> None:
            for j in range(5):
                bell.ring(f"{i}-{j}".encode())
                time.sleep(0.002)

        threads = [threading.Thread(target=ring, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len({p for p in heard if p}) < 20 and time.monotonic() < deadline:
            heard += listener.wait(0.5)
        for t in threads:
            t.join()
    assert {f"{i}-{j}".encode() for i in range(4) for j in range(5)} <= set(heard)


def test_long_data_dir_and_long_tmpdir_still_fit_a_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    long_dir = tmp_path / ("d" * 120) / ("e" * 120)
    long_dir.mkdir(parents=True)
    name = sql_bell_name("stream", f"sqlite:///{long_dir / 'mlxq.sqlite'}")
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    try:
        directory = bell_dir(name)
        with Bell(name).listen() as listener:
            assert len(os.fsencode(listener.path)) < 104
            Bell(name).ring(b"far")
            assert listener.wait(5) == [b"far"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_sqlite_names_follow_the_file_not_the_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    absolute = sql_bell_name("broker", f"sqlite:///{tmp_path / 'b.sqlite'}")
    assert sql_bell_name("broker", "sqlite:///b.sqlite") == absolute
    assert sql_bell_name("stream", "sqlite:///b.sqlite") != absolute
    assert sql_bell_name("broker", "postgresql+psycopg://h/db") == "broker:postgresql+psycopg://h/db"
