"""What this worker's prefix cache holds, in terms the api can match a request against without a tokenizer:
the message-boundary hashes (mlxq.keys.prefix_hashes) of the requests whose KV went into the cache, each tied
to the cache entry it went into. The heartbeat publishes the hashes whose entry the cache still holds, so the
api routes a later turn of a conversation to the worker that really has it (mlxq.delivery); an entry evicted,
taken by a longer turn of the same conversation (whose own hashes then take its place) or cleared takes its
hashes with it. Saved beside the prefix cache, so a restarted worker's index matches what it loaded.

A model whose cache cannot be trimmed (worker.prefix_cache) holds a conversation's boundary k only in the
checkpoint taken there: each checkpoint entry claims its own boundary's hash, the entry after generation
the request's last one (the next turn extends it). A hash is held while any entry that claims it is.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "index.json"  # beside the prefix cache's entries (worker.prefix_cache.BESIDE: its cleanup keeps it)


class PrefixIndex:
    def __init__(self) -> None:
        # boundary hash -> the prefix-cache entries (worker.prefix_cache) holding it
        self._entries: dict[str, set[int]] = {}
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
                self._entries.setdefault(h, set()).add(entry)
        self.changed.set()

    def record_checkpoints(
        self, hashes: list[str], entry: int | None, checkpoints: list[tuple[int | None, int]]
    ) -> None:
        """A finished request of a model that checkpoints: each checkpoint `(k, entry)` holds boundary k (1-based;
        None: none of the request's), and the entry its KV went into after generation (None: nowhere) holds the
        last boundary."""
        claims = [(hashes[k - 1], e) for k, e in checkpoints if k is not None and 1 <= k <= len(hashes)]
        if entry is not None and hashes:
            claims.append((hashes[-1], entry))
        if not claims:
            return
        with self._lock:
            for h, e in claims:
                self._entries.setdefault(h, set()).add(e)
        self.changed.set()

    def held(self, entries: set[int]) -> list[str]:
        """The hashes one of whose entries is among `entries` (what the cache holds now); the others are forgotten."""
        with self._lock:
            kept = {h: es & entries for h, es in self._entries.items()}
            self._entries = {h: es for h, es in kept.items() if es}
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def save(self, directory: Path) -> None:
        with self._lock:
            data = json.dumps({h: sorted(es) for h, es in self._entries.items()})
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
        entries: dict[str, set[int]] = {}
        try:
            for h, e in data.items() if isinstance(data, dict) else ():
                # An index saved before checkpoints held one entry per hash.
                entries[str(h)] = {int(e)} if isinstance(e, int) else {int(x) for x in e}
        except (TypeError, ValueError) as exc:
            log.warning("prefix index not loaded: %s", exc)
            entries = {}
        with self._lock:
            self._entries = entries
