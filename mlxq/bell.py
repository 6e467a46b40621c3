"""Wake-ups between processes on one machine: Unix datagram sockets in a directory named after a shared name.

The embedded deployment keeps its durable record in SQL (broker messages, stream events) and rings a
bell beside each write, so a waiting reader wakes at once instead of polling the table.

What it promises:
- Every `Bell` with the same name, in any process of this user on this machine, reaches every
  `Listener` of that name alive at the time of the ring (the name is hashed into a directory under the
  temporary directory, so a long data dir cannot push a socket path past the 104/108-byte AF_UNIX limit).
- `ring()` never blocks and never raises: a ring is a hint, and any failure is logged at debug level.
  Sockets left by a listener that died are removed by the next ring that finds them.
- A ring sent after a listener exists waits in its socket until read, so "read, then wait" loses no ring
  that follows the read. Rings can still be lost (a full socket buffer, processes that disagree on the
  temporary directory, another machine): readers must keep a slow poll of the durable record as a
  safety net. When a listener's buffer may have overflowed, `drain()` adds an empty payload, which
  means "anything may have happened".
- Payloads are short bytes (a job id); the empty payload means "everyone".
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import select
import socket
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# sun_path is 104 bytes on macOS and 108 on Linux, NUL included; socket names are "<pid>-<8 hex>.sock".
_MAX_PATH = 100
_SOCKET_NAME_MAX = len("4194304-01234567.sock")
_MAX_PAYLOAD = 4096
# Linux queues at most net.unix.max_dgram_qlen (10 by default) datagrams per socket; a drain that finds
# about that many may have missed some, so it wakes everyone.
_MAY_HAVE_OVERFLOWED = 8
_FULL = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS}
_GONE = {errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK}


def bell_dir(name: str) -> Path:
    """The directory shared by every bell and listener of `name`."""
    leaf = f"mlxq-bell-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    base = Path(tempfile.gettempdir())
    if len(os.fsencode(base / leaf)) + 1 + _SOCKET_NAME_MAX > _MAX_PATH and Path("/tmp").is_dir():
        base = Path("/tmp")  # a very long TMPDIR: fall back to a short one every process agrees on
    return base / leaf


def sql_bell_name(purpose: str, url: str) -> str:
    """A bell name for a SQL database URL: SQLite files by their real path, other databases by URL."""
    scheme, sep, rest = url.partition(":///")
    if scheme.startswith("sqlite") and sep and rest and rest != ":memory:":
        return f"{purpose}:sqlite:{os.path.realpath(rest.split('?', 1)[0])}"
    return f"{purpose}:{url}"


class Bell:
    """Rings every listener of one name. Thread-safe; cheap enough to ring on every write."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = bell_dir(name)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def ring(self, payload: bytes = b"") -> None:
        """Send `payload` to every listener now; never blocks, never raises."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return  # no listener has ever been here
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                for entry in names:
                    if entry.endswith(".sock"):
                        self._send(str(self.dir / entry), payload)
            except OSError as exc:
                log.debug("bell %s: ring failed: %s", self.name, exc)

    def _send(self, path: str, payload: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(payload, path)
        except OSError as exc:
            if exc.errno in _GONE:
                # Its listener died without closing: nobody will read this socket again.
                try:
                    os.unlink(path)
                except OSError:
                    pass
            elif exc.errno not in _FULL:  # a full buffer: that listener is going to wake anyway
                log.debug("bell %s: ring to %s failed: %s", self.name, path, exc)

    def listen(self) -> Listener:
        """A listener bound in this bell's directory; raises OSError where Unix sockets cannot be used."""
        return Listener(self.dir)


class Listener:
    """One process's end of a bell: a bound datagram socket to wait on (or register with an event loop)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if hasattr(os, "getuid") and directory.stat().st_uid != os.getuid():
            # Someone else's directory in a shared /tmp: they could drop our rings; poll instead.
            raise PermissionError(f"{directory} belongs to another user")
        self.path = directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            try:  # macOS keeps only a few KB of datagrams by default
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            except OSError:
                pass
            self._sock.bind(str(self.path))
        except OSError:
            self._sock.close()
            raise
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self._sock.fileno()

    def wait(self, timeout: float | None) -> list[bytes]:
        """Wait up to `timeout` seconds (None: forever) for rings; every payload pending then, maybe none."""
        self._poll.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        return self.drain()

    def drain(self) -> list[bytes]:
        """Every payload pending now, without waiting; an extra b"" when some may have been dropped."""
        got: list[bytes] = []
        while True:
            try:
                got.append(self._sock.recv(_MAX_PAYLOAD))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # closed under us: report a wake-up, the caller re-reads anyway
                log.debug("bell listener %s: %s", self.path, exc)
                got.append(b"")
                break
        if len(got) >= _MAY_HAVE_OVERFLOWED:
            got.append(b"")
        return got

    def wake(self) -> None:
        """Ring this listener alone (from any thread of its process); never raises."""
        try:
            self._sock.sendto(b"", str(self.path))
        except OSError as exc:
            log.debug("bell listener %s: wake failed: %s", self.path, exc)

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_bells: dict[str, Bell] = {}
_bells_lock = threading.Lock()


def get_bell(name: str) -> Bell:
    """The process's one `Bell` for `name` (one sending socket however many callers ring it)."""
    with _bells_lock:
        found = _bells.get(name)
        if found is None:
            found = _bells[name] = Bell(name)
        return found
