"""The prefix-trie KV cache: agent turns reuse the prompt they share with earlier turns.

A thin adapter over mlx-lm's `LRUPromptCache` (the trie and LRU are mlx-lm's): it keys entries
by a hashable, stable model key (path + revision, never the model object), trims one token on an
exact hit so the decoder has input, takes an entry out of the trie instead of deep-copying it when
the request extends it and no waiting request shares it (a copy of an agent's context per turn is
~120 MB), enforces the entry and byte bounds, counts what it saves,
never fails a request (any error falls back to the uncached path and is counted), and persists
entries to disk (crash-safe, their token ids in a manifest) so a restarted worker starts warm.

A model whose cache cannot be trimmed back (recurrent state, a sliding window that has moved on:
`needs_checkpoints`) is served from checkpoints: copies of a prompt's cache taken during prefill at
message boundaries and at the end of the prompt (worker.boundaries), kept beside the entries stored
after generation and typed as mlx_lm.server types them ("system", "user"; "assistant" after
generation: LRUPromptCache evicts assistant entries first, system ones last). Such a cache is never
trimmed: a lookup asks for the prompt less its last token (the decoder's input) and extends the
longest stored prefix of that. A "system" or "user" checkpoint is a branch point (a shared system
prompt, a client that edits an earlier turn): it is always copied, never taken. Models whose caches
can be trimmed are served exactly as before.
"""

from __future__ import annotations

import copy
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
    ArraysCache,
    CacheList,
    LRUPromptCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

log = logging.getLogger(__name__)

# Bump when the files on disk change shape; older files are then skipped (and removed by the next save).
FORMAT_VERSION = 3  # 3: each entry's cache type in the manifest (checkpoints)
# A directory holds the manifest (format, model, mlx-lm version, and each entry's file, size and token
# ids), one mlx-lm `save_prompt_cache` file per entry (the KV arrays only), and the lock file.
MANIFEST = "manifest.json"
LOCK = ".lock"
# Files others keep beside the entries, which a save or load must not remove: worker.prefix_index's routing index.
BESIDE = frozenset({"index.json"})
ENTRY_SUFFIX = ".safetensors"
CACHE_TYPES = ("assistant", "user", "system")  # LRUPromptCache's, evicted in this order
# A model that checkpoints keeps a few entries per turn (worker.boundaries: the end of the prompt, a boundary or
# two, the entry after generation): its entry bound is this many times the configured one; bytes stay the bound.
CHECKPOINT_ENTRIES = 4


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    skips: int = 0  # failures of the cache path, served uncached
    taken: int = 0  # hits that moved their entry out of the trie instead of copying it
    checkpoints: int = 0  # checkpoints stored during prefill (a model whose cache cannot be trimmed)


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
    # The model's cache cannot always be trimmed (`needs_checkpoints`): served from checkpoints (module doc).
    checkpoints: bool = False
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
        self.lru = self._new_lru()

    def _new_lru(self) -> LRUPromptCache:
        entries = self.max_entries * (CHECKPOINT_ENTRIES if self.checkpoints else 1)
        return LRUPromptCache(max_size=entries, max_bytes=self.max_bytes)

    def clear(self) -> None:
        """Drop every entry (an operator's `DELETE /v1/cache/prefix`); the next save empties the disk too."""
        self.lru = self._new_lru()
        self._taken.clear()

    # -- the request path -------------------------------------------------------------------

    def fetch(self, tokens: list[int], *, others: Iterable[list[int]] = ()) -> Fetched:
        """The nearest cached prefix of `tokens`; on any failure, a fresh cache and the whole prompt.

        An entry that `tokens` extends (or equals) is taken out of the trie, not copied: the request
        inserts the extended cache when it finishes, which would drop that entry anyway. It is copied
        only when one of `others` (prompts still waiting) extends it too, so they can share it. A model
        that checkpoints is served by `_fetch_untrimmed`.
        """
        if self.checkpoints:
            return self._fetch_untrimmed(tokens, others)
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
        self._pop(prefix, entry)
        return entry.prompt_cache, tokens[len(prefix) :]

    def _pop(self, prefix: list[int], entry: Any) -> None:
        """Take an entry out of the trie, its LRU place and byte counts (as LRUPromptCache's own pop does)."""
        self.lru._trie.pop(self.key, prefix)
        self.lru._lru.remove(self.key, prefix)
        self.lru._n_bytes -= entry.nbytes
        self.lru._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        self.stats.taken += 1

    def _fetch_untrimmed(self, tokens: list[int], others: Iterable[list[int]]) -> Fetched:
        """`fetch` for a model that checkpoints: the longest stored prefix of the prompt less its last token, taken
        when it is the tip of a conversation (an "assistant" entry) and no waiting prompt extends it, else copied
        (its LRU place refreshed); a longer entry only when it can be trimmed back (a window not yet filled)."""
        taken = None
        try:
            cache, rest = None, tokens
            query = tokens[:-1]  # never the whole prompt: the decoder needs a token, and nothing gets trimmed
            found = self.lru._trie.search(self.key, query) if query else None
            if found is not None:
                prefix = found.exact if found.exact is not None else found.shorter
                have = len(prefix) if prefix else 0
                longer = None
                if found.longer is not None and found.common_prefix > have:
                    candidate = self.lru._trie.get(self.key, found.longer)
                    longer = candidate if can_trim_prompt_cache(candidate.prompt_cache) else None
                if longer is not None:
                    assert found.longer is not None
                    cache = copy.deepcopy(longer.prompt_cache)
                    keep = min(len(query), found.common_prefix)
                    if trim_prompt_cache(cache, len(found.longer) - keep) != len(found.longer) - keep:
                        raise ValueError("a trimmable entry did not trim")
                    rest = tokens[keep:]
                elif prefix:
                    entry = self.lru._trie.get(self.key, prefix)
                    shared = any(other[: len(prefix)] == prefix for other in others)
                    if not shared and entry.cache_type == "assistant":
                        self._pop(prefix, entry)
                        cache = entry.prompt_cache
                        taken = entry_id(prefix)
                        self._taken.add(taken)
                    else:
                        cache = copy.deepcopy(entry.prompt_cache)
                        self.lru._lru.remove(self.key, prefix)
                        self.lru._lru.push(self.key, prefix, entry.cache_type)
                    rest = tokens[len(prefix) :]
        except Exception:
            log.warning("prefix cache lookup failed; serving uncached", exc_info=True)
            self.stats.skips += 1
            if taken is not None:
                self._taken.discard(taken)
            cache, rest, taken = None, tokens, None
        if cache is None:
            self.stats.misses += 1
            return Fetched(make_prompt_cache(self.model), list(tokens), 0)
        cached = len(tokens) - len(rest)
        self.stats.hits += 1
        self.stats.tokens_saved += cached
        return Fetched(cache, list(rest), cached, taken)

    def insert(self, tokens: list[int], cache: list[Any]) -> int | None:
        """Store the cache after a generation; `tokens` are what it was fed (prompt + generated). Returns the
        new entry's id (`entry_id`), or None when nothing was stored."""
        try:
            length = cache_length(cache, len(tokens))
            if length is None:
                raise ValueError("the cache's layers hold different numbers of tokens")
            if length > len(tokens):
                if trim_prompt_cache(cache, length - len(tokens)) != length - len(tokens):
                    raise ValueError("the cache holds more than its tokens and cannot be trimmed")
                length = len(tokens)
            tokens = tokens[:length]
            if tokens:
                materialize(cache)
                self.lru.insert_cache(self.key, list(tokens), cache)
                return entry_id(tokens)
        except Exception:
            log.warning("prefix cache insert failed; entry dropped", exc_info=True)
            self.stats.skips += 1
        return None

    def insert_checkpoint(self, tokens: list[int], cache: list[Any], cache_type: str) -> int | None:
        """Store a checkpoint taken during prefill: `cache` holds exactly `tokens`. Its entry id, or None."""
        try:
            if cache_type not in CACHE_TYPES:
                raise ValueError(f"unknown cache type {cache_type!r}")
            if not tokens or cache_length(cache, len(tokens)) != len(tokens):
                raise ValueError(f"checkpoint holds {cache_length(cache, len(tokens))} tokens, not {len(tokens)}")
            materialize(cache)
            self.lru.insert_cache(self.key, list(tokens), cache, cache_type=cache_type)
            self.stats.checkpoints += 1
            return entry_id(tokens)
        except Exception:
            log.warning("prefix cache checkpoint failed; dropped", exc_info=True)
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
            "checkpoints": self.stats.checkpoints,
            "entries": len(self.lru),
            "bytes": int(self.lru.nbytes),
        }

    # -- persistence ------------------------------------------------------------------------

    def entries(self) -> list[tuple[list[int], list[Any]]]:
        """(tokens, cache) of every entry, least recently used first (within each cache type)."""
        return [(tokens, cache) for tokens, cache, _ in self.typed_entries()]

    def typed_entries(self) -> list[tuple[list[int], list[Any], str]]:
        """(tokens, cache, cache type) of every entry, least recently used first within each type, the types in
        LRUPromptCache's eviction order (so a load in this order keeps each type's order)."""
        # LRUPromptCache has no public iterator; its LRU deques and trie are the source of truth.
        out = []
        for cache_type, lru in self.lru._lru._lrus.items():
            for model_key, tokens in lru:
                if model_key == self.key:
                    out.append((list(tokens), self.lru._trie.get(model_key, tokens).prompt_cache, cache_type))
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
            chosen: list[tuple[list[int], list[Any], str]] = []
            total = 0
            for tokens, cache, cache_type in reversed(self.typed_entries()):
                size = sum(c.nbytes for c in cache)
                if total + size > max_bytes:
                    continue
                total += size
                chosen.append((tokens, cache, cache_type))
            listed = []
            for tokens, cache, cache_type in reversed(chosen):  # the manifest lists them least recently used first
                path = directory / self._file_name(tokens)
                if path not in self._complete or self._complete[path] != _size(path):
                    _write_atomic(path, functools.partial(_save_entry, cache=cache))
                    self._complete[path] = _size(path)
                listed.append({"file": path.name, "bytes": self._complete[path], "tokens": tokens, "type": cache_type})
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
                    path, tokens, cache_type = self._load_entry(directory, entry)
                except Exception as exc:
                    log.warning("skipping unreadable prefix cache entry %s: %s", _describe(entry), exc)
                    continue
                listed.append({"file": path.name, "bytes": self._complete[path], "tokens": tokens, "type": cache_type})
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

    def _load_entry(self, directory: Path, entry: Any) -> tuple[Path, list[int], str]:
        name, size, tokens = entry["file"], entry["bytes"], [int(t) for t in entry["tokens"]]
        cache_type = entry.get("type", "assistant")
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(ENTRY_SUFFIX):
            raise ValueError(f"bad file name {name!r}")
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"unknown cache type {cache_type!r}")
        path = directory / name
        if _size(path) != size:  # caught here, before MLX maps the file
            raise ValueError(f"file holds {_size(path)} bytes, manifest lists {size}")
        cache = load_prompt_cache(str(path))
        materialize(cache)  # read into memory now, not lazily on the first request that hits it
        if not tokens or cache_length(cache, len(tokens)) != len(tokens):
            raise ValueError(f"cache holds {cache_length(cache, len(tokens))} tokens, manifest lists {len(tokens)}")
        self.lru.insert_cache(self.key, tokens, cache, cache_type=cache_type)
        self._complete[path] = size
        return path, tokens, cache_type

    def _remove_unlisted(self, directory: Path, listed: set[str]) -> None:
        """Delete files of entries no longer listed, earlier formats' files and temporaries of a crashed save."""
        try:
            stale = [
                p
                for p in directory.iterdir()
                if p.name not in listed and p.name not in (MANIFEST, LOCK) and p.name not in BESIDE and p.is_file()
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
    sequence, at that step's size) for as long as it is kept, memory that no byte count sees. Its KV layers come
    back as copies; a recurrent layer (`ArraysCache.extract`) as a view of the batch's state, even once evaluated:
    those are copied here."""
    for layer in layers(cache):
        if isinstance(layer, ArraysCache):
            # mx.array copies always; mx.contiguous returns a small view as it is (still pinning the batch's buffer).
            layer.cache = [None if a is None else mx.array(a) for a in layer.cache]
    mx.eval([c.state for c in cache])


def layers(cache: list[Any]) -> list[Any]:
    """Every layer cache of `cache`, a CacheList's parts in its place."""
    out = []
    for c in cache:
        out.extend(layers(list(c.caches)) if isinstance(c, CacheList) else [c])
    return out


def needs_checkpoints(model: Any) -> bool:
    """Whether the model's cache has a layer that cannot always be trimmed back (recurrent or convolution state,
    a sliding window once it has moved on): such a model is served from checkpoints (module doc). Decided by the
    layers' classes: a window that has not yet filled reports itself trimmable."""
    return any(isinstance(c, (ArraysCache, RotatingKVCache)) for c in layers(make_prompt_cache(model)))


def cache_length(cache: list[Any], default: int | None = None) -> int | None:
    """How many tokens the cache holds, read from the layers that count them (attention; a recurrent layer keeps
    no count): None when they disagree, `default` when none counts (a model of recurrent layers alone)."""
    offsets = {int(o) for c in layers(cache) if (o := getattr(c, "offset", None)) is not None}
    if not offsets:
        return default
    return offsets.pop() if len(offsets) == 1 else None


def cache_offset(cache: list[Any]) -> int | None:
    """How many tokens every layer of `cache` holds; None when the layers disagree or keep no offset."""
    return cache_length(cache)
