"""The prefix-trie KV cache: agent turns reuse the prompt they share with earlier turns.

A thin adapter over mlx-lm's `LRUPromptCache` (the trie and LRU are mlx-lm's): it keys entries
by a hashable, stable model key (path + revision, never the model object), trims one token on an
exact hit so the decoder has input, takes an entry out of the trie instead of deep-copying it when
the request extends it and no waiting request shares it (a copy of an agent's context per turn is
~120 MB), enforces the entry and byte bounds, counts what it saves,
never fails a request (any error falls back to the uncached path and is counted), and persists
entries to disk (crash-safe, their token ids in a manifest) so a restarted worker starts warm.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
from mlx_lm import __version__ as mlx_lm_version
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

log = logging.getLogger(__name__)

# Bump when the files on disk change shape; older files are then skipped (and removed by the next save).
FORMAT_VERSION = 2
# A directory holds the manifest (format, model, mlx-lm version, and each entry's file, size and token
# ids), one mlx-lm `save_prompt_cache` file per entry (the KV arrays only), and the lock file.
MANIFEST = "manifest.json"
LOCK = ".lock"
ENTRY_SUFFIX = ".safetensors"


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    skips: int = 0  # failures of the cache path, served uncached
    taken: int = 0  # hits that moved their entry out of the trie instead of copying it


@dataclass
class Fetched:
    """What to run: the prompt cache to extend (fresh when nothing matched) and the tokens still to prefill."""

    cache: list[Any]
    rest: list[int]
    cached_tokens: int
    taken: int | None = None  # the entry taken out of the trie for this request (`PrefixCache.release` it)


@dataclass
class PrefixCache:
    model: Any
    key: Any  # hashable and stable: the engine's ModelKey
    max_entries: int
    max_bytes: int
    lru: LRUPromptCache = field(init=False)
    stats: PrefixStats = field(default_factory=PrefixStats)
    # Entry files known complete (written or loaded by this process) and their sizes; what each
    # directory's manifest lists. A save rewrites only what these do not vouch for. (A size is None only
    # if the file vanished right after it was written.)
    _complete: dict[Path, int | None] = field(default_factory=dict, init=False, repr=False)
    _listed: dict[Path, list[dict[str, Any]]] = field(default_factory=dict, init=False, repr=False)
    # Entries taken out of the trie by requests in flight: still this worker's (each comes back extended when
    # its request ends), so routing keeps sending their conversations here (worker.prefix_index).
    _taken: set[int] = field(default_factory=set, init=False, repr=False)
    # Each entry's id by the token list the LRU holds it under (kept with the list, so an id() is never reused):
    # the heartbeat asks for the ids often (after every finished request), and hashing every entry's tokens each
    # time would cost milliseconds per beat.
    _ids: dict[int, tuple[list[int], int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.lru = LRUPromptCache(max_size=self.max_entries, max_bytes=self.max_bytes)

    def clear(self) -> None:
        """Drop every entry (an operator's `DELETE /v1/cache/prefix`); the next save empties the disk too."""
        self.lru = LRUPromptCache(max_size=self.max_entries, max_bytes=self.max_bytes)
        self._taken.clear()

    # -- the request path -------------------------------------------------------------------

    def fetch(self, tokens: list[int], *, others: Iterable[list[int]] = ()) -> Fetched:
        """The nearest cached prefix of `tokens`; on any failure, a fresh cache and the whole prompt.

        An entry that `tokens` extends (or equals) is taken out of the trie, not copied: the request
        inserts the extended cache when it finishes, which would drop that entry anyway. It is copied
        only when one of `others` (prompts still waiting) extends it too, so they can share it.
        """
        taken = None
        try:
            cache, rest = self._take(tokens, others)
            if cache is not None:
                taken = entry_id(tokens[: len(tokens) - len(rest)])
                self._taken.add(taken)
            if cache is None:
                cache, rest = self.lru.fetch_nearest_cache(self.key, tokens)
            if cache is not None and not rest:
                # The whole prompt is cached: give the decoder its last token again.
                if not can_trim_prompt_cache(cache):
                    raise ValueError("exact hit on a cache that cannot be trimmed")
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
        except Exception:
            log.warning("prefix cache lookup failed; serving uncached", exc_info=True)
            self.stats.skips += 1
            cache, rest = None, tokens
        if cache is None:
            self.stats.misses += 1
            return Fetched(make_prompt_cache(self.model), list(tokens), 0)
        cached = len(tokens) - len(rest)
        self.stats.hits += 1
        self.stats.tokens_saved += cached
        return Fetched(cache, list(rest), cached, taken)

    def _take(self, tokens: list[int], others: Iterable[list[int]]) -> tuple[list[Any] | None, list[int]]:
        """Remove and return the entry `tokens` extends, when it is trimmable, the best match and unshared."""
        # LRUPromptCache has no "take": its trie, LRU order and byte counts are updated here as its own
        # pop does, following the same choice of entry as fetch_nearest_cache.
        found = self.lru._trie.search(self.key, tokens)
        prefix = found.exact if found.exact is not None else found.shorter
        if not prefix or (found.longer is not None and found.common_prefix > len(prefix)):
            return None, tokens
        entry = self.lru._trie.get(self.key, prefix)
        if not can_trim_prompt_cache(entry.prompt_cache):
            return None, tokens
        if any(other[: len(prefix)] == prefix for other in others):
            return None, tokens
        self.lru._trie.pop(self.key, prefix)
        self.lru._lru.remove(self.key, prefix)
        self.lru._n_bytes -= entry.nbytes
        self.lru._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        self.stats.taken += 1
        return entry.prompt_cache, tokens[len(prefix) :]

    def insert(self, tokens: list[int], cache: list[Any]) -> int | None:
        """Store the cache after a generation; `tokens` are what it was fed (prompt + generated). Returns the
        new entry's id (`entry_id`), or None when nothing was stored."""
        try:
            offset = cache_offset(cache)
            if offset is None:
                raise ValueError("cache has no offset")
            if offset > len(tokens):
                trim_prompt_cache(cache, offset - len(tokens))
            tokens = tokens[:offset]
            if tokens:
                materialize(cache)
                self.lru.insert_cache(self.key, list(tokens), cache)
                return entry_id(tokens)
        except Exception:
            log.warning("prefix cache insert failed; entry dropped", exc_info=True)
            self.stats.skips += 1
        return None

    def release(self, taken: int | None) -> None:
        """The request that took an entry has ended (and inserted what it extended it to)."""
        if taken is not None:
            self._taken.discard(taken)

    def entry_ids(self) -> set[int]:
        """The ids of the entries held now, those in the trie and those taken by requests in flight. Safe from any
        thread: each LRU deque and the taken set are copied whole under the GIL."""
        known, fresh = self._ids, {}
        for lru in list(self.lru._lru._lrus.values()):
            for _, tokens in list(lru):
                seen = known.get(id(tokens))
                fresh[id(tokens)] = seen if seen is not None and seen[0] is tokens else (tokens, entry_id(tokens))
        self._ids = fresh
        return {h for _, h in fresh.values()} | set(self._taken)

    def snapshot(self) -> dict[str, int]:
        return {
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "tokens_saved": self.stats.tokens_saved,
            "skips": self.stats.skips,
            "taken": self.stats.taken,
            "entries": len(self.lru),
            "bytes": int(self.lru.nbytes),
        }

    # -- persistence ------------------------------------------------------------------------

    def entries(self) -> list[tuple[list[int], list[Any]]]:
        """(tokens, cache) of every entry, least recently used first."""
        # LRUPromptCache has no public iterator; its LRU deques and trie are the source of truth.
        out = []
        for lru in self.lru._lru._lrus.values():
            for model_key, tokens in lru:
                if model_key == self.key:
                    out.append((list(tokens), self.lru._trie.get(model_key, tokens).prompt_cache))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self.key).encode()).hexdigest()[:16]

    def _file_name(self, tokens: list[int]) -> str:
        # Named by everything that decides the bytes, so a file, once complete, never needs rewriting.
        ident = f"{FORMAT_VERSION}:{mlx_lm_version}:{self.fingerprint()}:{tokens}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32] + ENTRY_SUFFIX

    def save(self, directory: Path, max_bytes: int) -> int:
        """Write entries (most recent first, within `max_bytes`); how many the manifest now lists.

        Crash-safe: each entry file is written whole under a temporary name and renamed into place,
        and the manifest, which alone makes entries visible, is replaced last. A save that dies
        midway leaves the previous save loadable; what it left behind is removed by the next save
        or load, as are the files of entries the new manifest no longer lists.
        """
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            chosen: list[tuple[list[int], list[Any]]] = []
            total = 0
            for tokens, cache in reversed(self.entries()):
                size = sum(c.nbytes for c in cache)
                if total + size > max_bytes:
                    continue
                total += size
                chosen.append((tokens, cache))
            listed = []
            for tokens, cache in reversed(chosen):  # the manifest lists them least recently used first
                path = directory / self._file_name(tokens)
                if path not in self._complete or self._complete[path] != _size(path):
                    _write_atomic(path, functools.partial(_save_entry, cache=cache))
                    self._complete[path] = _size(path)
                listed.append({"file": path.name, "bytes": self._complete[path], "tokens": tokens})
            manifest = directory / MANIFEST
            if self._listed.get(directory) != listed or not manifest.exists():
                _fsync_dir(directory)  # the entries' renames reach the disk before the manifest's
                body = {
                    "format": FORMAT_VERSION,
                    "model": self.fingerprint(),
                    "mlx_lm": mlx_lm_version,
                    "saved_at": time.time(),
                    "entries": listed,
                }
                _write_atomic(manifest, lambda f: f.write(json.dumps(body).encode()))
                _fsync_dir(directory)
                self._listed[directory] = listed
            self._remove_unlisted(directory, {e["file"] for e in listed})
        return len(listed)

    def load(self, directory: Path) -> int:
        """Insert the saved entries that match this model and format; skip anything else with a log line.

        Never raises for what it finds on disk: a missing, foreign or unreadable manifest loads
        nothing, and a missing, truncated or corrupt entry file is skipped.
        """
        if not directory.is_dir():
            return 0
        with _locked(directory):
            entries = self._read_manifest(directory)
            if entries is None:
                return 0
            listed = []
            for entry in entries:
                try:
                    path, tokens = self._load_entry(directory, entry)
                except Exception as exc:
                    log.warning("skipping unreadable prefix cache entry %s: %s", _describe(entry), exc)
                    continue
                listed.append({"file": path.name, "bytes": self._complete[path], "tokens": tokens})
            if len(listed) == len(entries):  # else the next save rewrites the manifest without the bad ones
                self._listed[directory] = listed
            self._remove_unlisted(
                directory, {e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)}
            )
        return len(listed)

    def _read_manifest(self, directory: Path) -> list[Any] | None:
        """The manifest's entries when it is this model's and format's; None (logged) otherwise."""
        manifest = directory / MANIFEST
        if not manifest.exists():
            log.info("no prefix cache manifest in %s", directory)
            return None
        try:
            meta = json.loads(manifest.read_bytes())
            entries = meta["entries"]
            if not isinstance(entries, list):
                raise ValueError("entries is not a list")
        except Exception as exc:
            log.warning("skipping unreadable prefix cache manifest %s: %s", manifest, exc)
            return None
        if meta.get("format") != FORMAT_VERSION or meta.get("model") != self.fingerprint():
            log.info("skipping prefix cache %s: other model or format", manifest)
            return None
        if meta.get("mlx_lm") != mlx_lm_version:
            log.info("skipping prefix cache %s: saved by mlx-lm %s", manifest, meta.get("mlx_lm"))
            return None
        return entries

    def _load_entry(self, directory: Path, entry: Any) -> tuple[Path, list[int]]:
        name, size, tokens = entry["file"], entry["bytes"], [int(t) for t in entry["tokens"]]
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(ENTRY_SUFFIX):
            raise ValueError(f"bad file name {name!r}")
        path = directory / name
        if _size(path) != size:  # caught here, before MLX maps the file
            raise ValueError(f"file holds {_size(path)} bytes, manifest lists {size}")
        cache = load_prompt_cache(str(path))
        materialize(cache)  # read into memory now, not lazily on the first request that hits it
        if cache_offset(cache) != len(tokens):
            raise ValueError(f"cache holds {cache_offset(cache)} tokens, manifest lists {len(tokens)}")
        self.lru.insert_cache(self.key, tokens, cache)
        self._complete[path] = size
        return path, tokens

    def _remove_unlisted(self, directory: Path, listed: set[str]) -> None:
        """Delete files of entries no longer listed, earlier formats' files and temporaries of a crashed save."""
        try:
            stale = [
                p
                for p in directory.iterdir()
                if p.name not in listed and p.name not in (MANIFEST, LOCK) and p.is_file()
            ]
        except OSError as exc:
            log.warning("could not list the prefix cache in %s: %s", directory, exc)
            return
        for path in stale:
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove stale prefix cache file %s: %s", path, exc)
            self._complete.pop(path, None)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _describe(entry: Any) -> str:
    return str(entry.get("file")) if isinstance(entry, dict) else repr(entry)[:60]


def _save_entry(f: BinaryIO, cache: list[Any]) -> None:
    """One entry's KV cache into an open file."""
    # save_prompt_cache hands the file object to mx.save_safetensors, which takes one; mlx-lm's hint says
    # it takes a file name.
    save_prompt_cache(f, cache, metadata={"format": str(FORMAT_VERSION)})  # type: ignore[arg-type]


def _write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`path` written whole or not at all: a temporary file beside it, flushed to disk, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One saver or loader per directory at a time, across processes: cleanup must not race a save.

    Where no lock can be had (a read-only directory, a file system without locks) it goes on
    unlocked: a load still works there, and a save fails on its own first write.
    """
    try:
        f = open(directory / LOCK, "a+b")
    except OSError as exc:
        log.warning("prefix cache in %s not locked: %s", directory, exc)
        yield
        return
    with f:  # closing the file releases the lock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as exc:
            log.warning("prefix cache in %s not locked: %s", directory, exc)
        yield


def entry_id(tokens: list[int]) -> int:
    """An entry's id: the hash of its tokens (an int tuple's hash is the same in every process, so an index
    saved with the entries still names them after a restart)."""
    return hash(tuple(tokens))


def materialize(cache: list[Any]) -> None:
    """Evaluate a KV cache kept beyond the step that made it, so it holds its own bytes. mlx-lm hands back a
    sequence's cache as a lazy slice of the whole batch's cache: left lazy, it would pin the batch's buffer (every
    sequence, at that step's size) for as long as it is kept, memory that no byte count sees."""
    mx.eval([c.state for c in cache])


def cache_offset(cache: list[Any]) -> int | None:
    """How many tokens every layer of `cache` holds; None when the layers disagree or keep no offset."""
    offsets = {getattr(c, "offset", None) for c in cache}
    if len(offsets) != 1:
        return None
    value = offsets.pop()
    return int(value) if value is not None else None
