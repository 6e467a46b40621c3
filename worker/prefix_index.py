"""What this worker's prefix cache holds, in terms the api can match a request against without a tokenizer:
the message-boundary hashes (mlxq.keys.prefix_hashes) of the requests whose KV went into the cache, each tied
to the cache entry it went into. The heartbeat publishes the hashes whose entry the cache still holds, so the
api routes a later turn of a conversation to the worker that really has it (mlxq.delivery); an entry evicted,
taken by a longer turn of the same conversation (whose own hashes then take its place) or cleared takes its
hashes with it. Saved beside the prefix cache, so a restarted worker's index matches what it loaded.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "index.json"


class PrefixIndex:
    def __init__(self) -> None:
        self._entries: dict[str, int] = {}  # boundary hash -> the prefix-cache entry (worker.prefix_cache) holding it
        self._lock = threading.Lock()
        # Set when a request's hashes are recorded: the heartbeat publishes them then, not up to a beat later,
        # so a session's next turn (often at once) already finds its worker.
        self.changed = threading.Event()

    def record(self, hashes: list[str], entry: int | None) -> None:
        """A finished request's KV went into `entry` (None: it went nowhere)."""
        if entry is None or not hashes:
            return
        with self._lock:
            for h in hashes:
                self._entries[h] = entry
        self.changed.set()

    def held(self, entries: set[int]) -> list[str]:
        """The hashes whose entry is among `entries` (what the cache holds now); the others are forgotten."""
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e in entries}
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def save(self, directory: Path) -> None:
        with self._lock:
            data = json.dumps(self._entries)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{FILE}.tmp"
        tmp.write_text(data)
        tmp.replace(directory / FILE)

    def load(self, directory: Path) -> None:
        try:
            data = json.loads((directory / FILE).read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("prefix index not loaded: %s", exc)
            return
        with self._lock:
            self._entries = {str(h): int(e) for h, e in data.items()} if isinstance(data, dict) else {}
