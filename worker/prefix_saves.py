"""The prefix cache on disk: loaded when the model is, saved when the engine is idle (at most every
`prefix_cache_save_s`), at shutdown, and after an operator cleared it, so a restarted worker starts warm. The same
directory is the cache's disk tier (entries evicted from memory, served back on a hit: worker.prefix_cache), within
`prefix_cache_disk_mb`."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

from worker.state import WorkerState

log = logging.getLogger(__name__)

# A save starts only once the engine has been idle this long since a job's end. An agent sends its next turn as soon
# as a tool has run (often well under a second), and that turn waited for the entry file being written (a real-size
# Gemma 3's were 100-700 MB, 0.3-2 s at this disk's 350 MB/s with fsync); a save is due every `prefix_cache_save_s` in
# any case, so waiting this long first loses nothing but this much of a killed worker's latest entries.
SAVE_IDLE_S = 2.0


class PrefixSaves:
    def __init__(self, state: WorkerState) -> None:
        self._state = state
        self._saved_at = time.monotonic()
        self._saving = threading.Lock()
        self._pending = False  # a job ended since the last save: the cache may hold what the disk does not
        self._ended_at = 0.0  # when the last job ended (SAVE_IDLE_S)

    @property
    def directory(self) -> Path:
        """Per model; and per worker when `mlxq serve` names it, so workers of one model on one host keep
        their own caches (a worker started alone has a name that changes with each process)."""
        settings = self._state.settings
        directory = settings.data_dir / "prefix_cache" / self._state.engine.prefix.fingerprint()
        return directory / re.sub(r"[^A-Za-z0-9_.-]", "_", settings.worker_name) if settings.worker_name else directory

    def enable(self) -> None:
        """Turn the engine's prefix cache on (unless MLXQ_PREFIX_CACHE=false), its idle form (MLXQ_PREFIX_CACHE_BITS)
        and its disk tier in this directory, and load what was saved."""
        settings, engine = self._state.settings, self._state.engine
        if not settings.prefix_cache:
            return
        prefix = engine.enable_prefix_cache(max_entries=settings.prefix_cache_size)
        prefix.bits = settings.prefix_cache_bits
        prefix.attach_disk(self.directory, self.disk_bytes(prefix.max_bytes))
        loaded = prefix.load(self.directory)
        self._state.prefix_index.load(self.directory)
        log.info(
            "prefix cache on: %d entries%s, %d MB, idle entries at %s; disk tier %d MB; %d entries on disk",
            prefix.lru.max_size,
            " (checkpoints)" if prefix.checkpoints else "",
            prefix.max_bytes >> 20,
            f"{prefix.bits} bits" if prefix.bits else "full precision",
            self.disk_bytes(prefix.max_bytes) >> 20,
            loaded,
        )
        self._saved_at = time.monotonic()

    def disk_bytes(self, memory_bytes: int) -> int:
        """The disk tier's bound: MLXQ_PREFIX_CACHE_DISK_MB, or the memory bound when 0."""
        return (self._state.settings.prefix_cache_disk_mb << 20) or memory_bytes

    def save(self, *, force: bool = False) -> None:
        """Persist the prefix cache (a job has ended: it may have changed): when the engine is idle, at most every
        prefix_cache_save_s, and at shutdown (`force`).

        The save runs on the engine thread (the trie is its alone), so it waits for an engine idle for SAVE_IDLE_S
        rather than stall a running batch or a conversation's next turn, and writes one entry's file at a time, giving
        way when a request arrives: put off, it stays due, and the heartbeat tries it again (`save_due`).
        """
        self._pending = True
        self._ended_at = time.monotonic()
        if force:  # otherwise not due for SAVE_IDLE_S: the heartbeat makes it (`save_due`)
            self._save(force=True)

    def save_due(self) -> None:
        """A save put off while the engine was busy, once it is idle: on a thread of its own, since a large cache
        takes seconds to write and the heartbeat that calls this must not stall. Without it, a job ending while
        others ran put the save off until some later job ended, and a worker killed meanwhile lost every prefix
        cached since."""
        if self._pending and self._due() and not self._saving.locked() and not self._busy():
            threading.Thread(target=self._save, name="mlxq-prefix-save", daemon=True).start()

    def _due(self) -> bool:
        now = time.monotonic()
        return now - self._saved_at >= self._state.settings.prefix_cache_save_s and now - self._ended_at >= SAVE_IDLE_S

    def _busy(self) -> bool:
        batch = self._state.engine.batcher.stats() if self._state.engine is not None else {}
        return bool(batch.get("active") or batch.get("waiting"))

    def _save(self, *, force: bool = False) -> None:
        engine = self._state.engine
        prefix = engine.prefix if engine is not None else None
        if prefix is None or not (force or self._due()):
            return
        if not self._saving.acquire(blocking=force):
            return
        try:
            if not force and self._busy():
                return  # still due
            self._pending = False  # before the write: a job that ends during it makes it due again
            put_off = None if force else self._busy
            written = engine.save_prefix_cache(self.directory, self.disk_bytes(prefix.max_bytes), put_off=put_off)
            if written is None:  # a request came: it goes first, and the heartbeat finishes the save once idle
                self._pending = True
                log.info("prefix cache save put off for a request")
                return
            self._state.prefix_index.save(self.directory)
            log.info("prefix cache saved: %d entries", written)
            self._saved_at = time.monotonic()
        except Exception:
            log.exception("could not save the prefix cache")
            self._saved_at = time.monotonic()  # tried again after the interval, not at every beat
        finally:
            self._saving.release()
