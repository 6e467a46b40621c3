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

Two tiers make more sessions fit (`PrefixCache.bits`, `PrefixCache.disk`; measured figures in the comments at
`DISK_MIN_TOKENS` and in mlxq.settings). Idle entries get cheaper before any goes: when the cache is over its byte
bound, the least recently used entries' KV layers are quantized (8 or 4 bits, mlx-lm's QuantizedKVCache) before an
entry is evicted, and a hit dequantizes them back to a KVCache for the batch (which cannot merge quantized layers).
An entry in use stays exact until pressure reaches it. Entries evicted from memory go to the disk tier (the
directory the saves use, within its own byte bound; their files written off the engine thread), indexed in memory by
their tokens; a lookup that finds a longer prefix there than in memory loads it back into memory and serves it. The
tier's entries are the saved entries: one manifest (format 4) lists both, and a restart loads what fits in memory and
indexes the rest.

Every entry belongs to one partition (mlxq.keys.cache_partition: the request's cache namespace, per API key unless
MLXQ_CACHE_SCOPE=global, with its `cache_salt`): the LRU's model key is (model key, partition), the disk tier indexes
each partition apart and its files and manifest name it, and entry ids include it. A prompt is served only from its
own partition's entries and its cache goes only into them, so no key's prompt shortens another key's prefill or shows
in its `cached_tokens`. The bounds (entries, bytes) and the LRU order are shared by all partitions. "" is the one
partition of a single user (no namespace, no salt).
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
import threading
import time
from array import array
from bisect import bisect_left, insort
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import __version__ as mlx_lm_version
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    LRUPromptCache,
    PromptTrie,
    PromptTrieResult,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

log = logging.getLogger(__name__)

# Bump when the files on disk change shape; older files are then skipped (and removed by the next save).
FORMAT_VERSION = 4  # 3: each entry's cache type in the manifest (checkpoints); 4: each entry's partition
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
# The idle form: a KV layer is quantized with the first of these group sizes that divides both its key and value
# head dims (64 and 32 are mx.quantize's affine groups that fit every head dim in use); a layer neither divides
# stays as it is, as do sliding windows (RotatingKVCache) and recurrent state (ArraysCache).
QUANT_GROUPS = (64, 32)
QUANT_BITS = (0, 2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode takes; 0: entries stay as they are
# An entry evicted from memory goes to the disk tier when it holds at least this many tokens. Measured on SmolLM2-135M
# (float32 KV, CPU, 2 cores), a hit against prefilling the same prefix again:
#   tokens  prefill   memory hit: exact / 8-bit / 4-bit   disk hit (read + dequantize, page cache warm / cold):
#                                                          exact          8-bit          4-bit
#   64      0.32 s    ~0 / 8 / 21 ms                       4 / 7 ms       26 / 29 ms     25 / 35 ms
#   512     2.9 s     ~0 / 19 / 27 ms                      6 / 24 ms      32 / 62 ms     32 / 43 ms
#   2,000   18.9 s    ~0 / 48 / 89 ms                      15 / 60 ms     79 / 130 ms    96 / 104 ms
# (the whole lookup of a 2,000-token prefix from disk, with the spill of the entry its load evicts: 87 ms exact, 122 ms
# 8-bit: 150x faster than the prefill). Writing an evicted entry costs the engine thread 10 to 40 ms (plus 4 to 75 ms
# to quantize it), paid on every eviction and repaid only by a later hit, and a load has a fixed cost of ~5-25 ms (file,
# 30-180 arrays, dequantize): under 128 tokens a fast accelerator's prefill costs about that, so shorter entries are
# not kept.
DISK_MIN_TOKENS = 128
# An evicted entry's file is written by a thread of its own (`PrefixCache._spill`): the write costs about 2.7 ms a MB
# here (a 3,000-token SmolLM2 entry at 8 bits is 39 MB: 100 ms), and an agent's 30,000-token context on an 8B model
# is gigabytes, which every stream in the batch waited for. At most this many are being written at once, each held in
# memory until it is: beyond them the engine thread waits for the oldest, so what they hold stays bounded.
SPILLS_IN_FLIGHT = 2
# What an entry's file holds beyond its arrays, at most: safetensors' JSON header (each array's name, dtype, shape and
# offsets) and mlx-lm's metadata (each layer's class and state). A spilled entry counts this until its file is written.
HEADER_BYTES = 4096
HEADER_BYTES_PER_ARRAY = 512


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    skips: int = 0  # failures of the cache path, served uncached
    taken: int = 0  # hits that moved their entry out of the trie instead of copying it
    checkpoints: int = 0  # checkpoints stored during prefill (a model whose cache cannot be trimmed)
    memory_hits: int = 0  # hits served by an entry held in memory (exact or quantized)
    disk_hits: int = 0  # hits served by an entry loaded back from the disk tier
    quantized: int = 0  # entries made cheaper (quantized) to stay in memory rather than be evicted
    spills: int = 0  # entries evicted from memory and kept by the disk tier


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
    # Idle entries' KV layers are quantized to this many bits under byte pressure (module doc); 0: never.
    bits: int = 0
    lru: TieredLRU = field(init=False)
    stats: PrefixStats = field(default_factory=PrefixStats)
    # The disk tier (`attach_disk`): entries evicted from memory, served back on a hit. None: evictions are dropped.
    disk: DiskTier | None = field(default=None, init=False)
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
    # Writes the disk tier's files off the engine thread (`_spill`); made with the first.
    _writer: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"prefix cache bits must be one of {QUANT_BITS}, not {self.bits}")
        self.lru = self._new_lru()

    def _new_lru(self) -> TieredLRU:
        entries = self.max_entries * (CHECKPOINT_ENTRIES if self.checkpoints else 1)
        return TieredLRU(max_size=entries, max_bytes=self.max_bytes, cheapen=self._cheapen, spill=self._spill)

    def attach_disk(self, directory: Path, max_bytes: int) -> DiskTier:
        """Serve hits from `directory` too (the saves' directory), within `max_bytes`: call before `load`."""
        self.disk = DiskTier(directory, max_bytes)
        return self.disk

    def clear(self) -> None:
        """Drop every entry (an operator's `DELETE /v1/cache/prefix`), the disk tier's too; the next save empties the
        disk."""
        self.lru = self._new_lru()
        self._taken.clear()
        if self.disk is not None:
            self.disk.clear()

    # -- the request path -------------------------------------------------------------------

    def _model(self, partition: str) -> tuple[Any, str]:
        """The LRU's model key of a partition's entries."""
        return (self.key, partition)

    def fetch(self, tokens: list[int], *, others: Iterable[list[int]] = (), partition: str = "") -> Fetched:
        """The nearest cached prefix of `tokens` in `partition` (module doc); on any failure, a fresh cache and the
        whole prompt. `others` are prompts of the same partition.

        An entry that `tokens` extends (or equals) is taken out of the trie, not copied: the request
        inserts the extended cache when it finishes, which would drop that entry anyway. It is copied
        only when one of `others` (prompts still waiting) extends it too, so they can share it. A model
        that checkpoints is served by `_fetch_untrimmed`. A longer prefix in the disk tier than in memory is
        loaded into memory first; a quantized entry comes back dequantized.
        """
        if self.checkpoints:
            return self._fetch_untrimmed(tokens, others, partition)
        taken = None
        from_disk = 0
        try:
            if self.disk is not None and len(self.disk):
                have = self._held_trimmable(tokens, partition)
                from_disk = self._from_disk(tokens, have, trimmable=True, partition=partition)
            cache, rest = self._take(tokens, others, partition)
            if cache is not None:
                taken = entry_id(tokens[: len(tokens) - len(rest)], partition)
                self._taken.add(taken)
            if cache is None:
                cache, rest = self.lru.fetch_nearest_cache(self._model(partition), tokens)
            if cache is not None:
                cache = thawed(cache)  # taken or copied: this request's own
            if cache is not None and not rest:
                # The whole prompt is cached: give the decoder its last token again.
                if not can_trim_prompt_cache(cache):
                    raise ValueError("exact hit on a cache that cannot be trimmed")
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
        except Exception:
            log.warning("prefix cache lookup failed; serving uncached", exc_info=True)
            self.stats.skips += 1
            if taken is not None:
                self._taken.discard(taken)
            cache, rest, taken = None, tokens, None
        return self._fetched(tokens, cache, rest, taken, from_disk)

    def _fetched(
        self, tokens: list[int], cache: list[Any] | None, rest: list[int], taken: int | None, from_disk: int
    ) -> Fetched:
        if from_disk:
            self.lru.trim_to(n_sequences=self.lru.max_size, n_bytes=self.lru.max_bytes)  # it is taken or copied by now
        if cache is None:
            self.stats.misses += 1
            return Fetched(make_prompt_cache(self.model), list(tokens), 0)
        cached = len(tokens) - len(rest)
        self.stats.hits += 1
        if from_disk and cached >= from_disk:
            self.stats.disk_hits += 1
        else:
            self.stats.memory_hits += 1
        self.stats.tokens_saved += cached
        return Fetched(cache, list(rest), cached, taken)

    def _held_trimmable(self, tokens: list[int], partition: str) -> int:
        """How many tokens of `tokens` the memory tier would serve (a trimmable model's lookup)."""
        found = self.lru._trie.search(self._model(partition), tokens)
        if found.exact is not None:
            return len(tokens) - 1
        have = len(found.shorter) if found.shorter else 0
        if found.longer is not None:
            have = max(have, min(len(tokens) - 1, found.common_prefix))
        return have

    def _from_disk(self, tokens: list[int], have: int, *, trimmable: bool, partition: str) -> int:
        """When the disk tier serves more of `tokens` than the memory's `have`, load its entry into memory (where the
        lookup that follows finds it): how many tokens it serves, 0 when it was not loaded. A trimmable model's entry
        may be longer than `tokens` (trimmed back when served); otherwise it is a prefix of them. Never raises: an
        entry that cannot be read is dropped from the tier, logged, and the lookup goes on without it."""
        disk = self.disk
        if disk is None or not len(disk):
            return 0
        found = disk.nearest(tokens, prefix_only=not trimmable, partition=partition)
        if found is None:
            return 0
        entry, serves = found
        if trimmable:
            serves = min(serves, len(tokens) - 1)
        if serves <= have:
            return 0
        try:
            cache = disk.read(entry)
        except Exception as exc:
            log.warning("prefix cache disk entry %s unreadable, dropped: %s", entry.file, exc)
            disk.remove(entry, unlink=True)
            self._complete.pop(disk.directory / entry.file, None)
            return 0
        # Bounded only once the lookup has it (`_fetched`): the bound evicts the kinds of entries in turn, and one read
        # back alone of its kind (an answer or a prompt's end, memory holding only system prompts) went first.
        self.lru.insert_cache(
            self._model(entry.partition), list(entry.tokens), cache, cache_type=entry.cache_type, fit=False
        )
        return serves

    def _take(
        self, tokens: list[int], others: Iterable[list[int]], partition: str
    ) -> tuple[list[Any] | None, list[int]]:
        """Remove and return the entry `tokens` extends, when it is trimmable, the best match and unshared."""
        # LRUPromptCache has no "take": its trie, LRU order and byte counts are updated here as its own
        # pop does, following the same choice of entry as fetch_nearest_cache.
        model = self._model(partition)
        found = self.lru._trie.search(model, tokens)
        prefix = found.exact if found.exact is not None else found.shorter
        if not prefix or (found.longer is not None and found.common_prefix > len(prefix)):
            return None, tokens
        entry = self.lru._trie.get(model, prefix)
        if not can_trim_prompt_cache(entry.prompt_cache):
            return None, tokens
        if any(other[: len(prefix)] == prefix for other in others):
            return None, tokens
        self._pop(model, prefix, entry)
        return entry.prompt_cache, tokens[len(prefix) :]

    def _pop(self, model: tuple[Any, str], prefix: list[int], entry: Any) -> None:
        """Take an entry out of the trie, its LRU place and byte counts (as LRUPromptCache's own pop does)."""
        self.lru._trie.pop(model, prefix)
        self.lru._lru.remove(model, prefix)
        self.lru._n_bytes -= entry.nbytes
        self.lru._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        self.lru.settle()
        self.stats.taken += 1

    def _fetch_untrimmed(self, tokens: list[int], others: Iterable[list[int]], partition: str) -> Fetched:
        """`fetch` for a model that checkpoints: the longest stored prefix of the prompt less its last token, taken
        when it is the tip of a conversation (an "assistant" entry) and no waiting prompt extends it, else copied
        (its LRU place refreshed); a longer entry only when it can be trimmed back (a window not yet filled)."""
        taken = None
        from_disk = 0
        model = self._model(partition)
        try:
            cache, rest = None, tokens
            query = tokens[:-1]  # never the whole prompt: the decoder needs a token, and nothing gets trimmed
            found = self.lru._trie.search(model, query) if query else None
            if found is not None and self.disk is not None and len(self.disk):
                have = len(found.exact if found.exact is not None else found.shorter or [])
                from_disk = self._from_disk(query, have, trimmable=False, partition=partition)
                if from_disk:
                    found = self.lru._trie.search(model, query)
            if found is not None:
                prefix = found.exact if found.exact is not None else found.shorter
                have = len(prefix) if prefix else 0
                longer = None
                if found.longer is not None and found.common_prefix > have:
                    candidate = self.lru._trie.get(model, found.longer)
                    longer = candidate if can_trim_prompt_cache(candidate.prompt_cache) else None
                if longer is not None:
                    assert found.longer is not None
                    cache = thawed(longer.prompt_cache, copy_rest=True)
                    keep = min(len(query), found.common_prefix)
                    if trim_prompt_cache(cache, len(found.longer) - keep) != len(found.longer) - keep:
                        raise ValueError("a trimmable entry did not trim")
                    rest = tokens[keep:]
                elif prefix:
                    entry = self.lru._trie.get(model, prefix)
                    shared = any(other[: len(prefix)] == prefix for other in others)
                    if not shared and entry.cache_type == "assistant":
                        self._pop(model, prefix, entry)
                        cache = thawed(entry.prompt_cache)
                        taken = entry_id(prefix, partition)
                        self._taken.add(taken)
                    else:
                        cache = thawed(entry.prompt_cache, copy_rest=True)
                        self.lru._lru.remove(model, prefix)
                        self.lru._lru.push(model, prefix, entry.cache_type)
                    rest = tokens[len(prefix) :]
        except Exception:
            log.warning("prefix cache lookup failed; serving uncached", exc_info=True)
            self.stats.skips += 1
            if taken is not None:
                self._taken.discard(taken)
            cache, rest, taken = None, tokens, None
        return self._fetched(tokens, cache, rest, taken, from_disk)

    def insert(self, tokens: list[int], cache: list[Any], *, partition: str = "") -> int | None:
        """Store the cache after a generation in `partition`; `tokens` are what it was fed (prompt + generated).
        Returns the new entry's id (`entry_id`), or None when nothing was stored."""
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
                self.lru.insert_cache(self._model(partition), list(tokens), cache)
                return entry_id(tokens, partition)
        except Exception:
            log.warning("prefix cache insert failed; entry dropped", exc_info=True)
            self.stats.skips += 1
        return None

    def insert_checkpoint(
        self, tokens: list[int], cache: list[Any], cache_type: str, *, partition: str = ""
    ) -> int | None:
        """Store a checkpoint taken during prefill in `partition`: `cache` holds exactly `tokens`. Its entry id, or
        None."""
        try:
            if cache_type not in CACHE_TYPES:
                raise ValueError(f"unknown cache type {cache_type!r}")
            if not tokens or cache_length(cache, len(tokens)) != len(tokens):
                raise ValueError(f"checkpoint holds {cache_length(cache, len(tokens))} tokens, not {len(tokens)}")
            window_only(cache)
            materialize(cache)
            self.lru.insert_cache(self._model(partition), list(tokens), cache, cache_type=cache_type)
            self.stats.checkpoints += 1
            return entry_id(tokens, partition)
        except Exception:
            log.warning("prefix cache checkpoint failed; dropped", exc_info=True)
            self.stats.skips += 1
        return None

    def release(self, taken: int | None) -> None:
        """The request that took an entry has ended (and inserted what it extended it to)."""
        if taken is not None:
            self._taken.discard(taken)

    # -- the tiers (called by TieredLRU) -----------------------------------------------------

    def _cheapen(self, cache: list[Any]) -> list[Any] | None:
        """An idle entry's cheaper form (its KV layers quantized to `bits`), or None when it has none."""
        if not self.bits or cache_bits(cache):
            return None
        cheaper = quantized(cache, self.bits)
        if cheaper is not None:
            self.stats.quantized += 1
        return cheaper

    def _spill(self, model: Any, tokens: list[int], entry: Any) -> None:
        """An entry evicted from memory: into the disk tier (quantized first), when one is attached and the entry is
        long enough to be worth reading back (`DISK_MIN_TOKENS`). The tier lists it at once, counted at its file's
        largest size; the file is written by the writer thread (`SPILLS_IN_FLIGHT`), and a hit on it before that waits
        for it. Never raises."""
        disk = self.disk
        if disk is None or not isinstance(model, tuple) or model[0] != self.key or len(tokens) < DISK_MIN_TOKENS:
            return
        partition = model[1]
        try:
            self._settle()
            cache = self._cheapen(entry.prompt_cache) or entry.prompt_cache
            bound = _file_bound(cache)
            if bound > disk.max_bytes:
                return
            while len(disk.pending) >= SPILLS_IN_FLIGHT:
                wait([next(iter(disk.pending.values()))[0]])
                self._settle()
            disk.directory.mkdir(parents=True, exist_ok=True)
            with _locked(disk.directory):
                if can_trim_prompt_cache(cache):  # a trimmable entry serves every prefix of it: those only take space
                    for shorter in disk.prefixes_of(tokens, partition=partition):
                        disk.remove(shorter, unlink=True)
                        self._complete.pop(disk.directory / shorter.file, None)
                bits = cache_bits(cache)
                path = disk.directory / self._file_name(tokens, bits, partition)
                spilled = DiskEntry(path.name, list(tokens), bound, entry.cache_type, bits, partition)
                if (size := self._complete.get(path)) is not None and size == _size(path):
                    spilled.nbytes = size  # written whole before, by this process
                elif (writing := disk.pending.get(path.name)) is not None:
                    disk.pending[path.name] = (writing[0], spilled)  # being written already
                else:
                    if self._writer is None:
                        self._writer = ThreadPoolExecutor(1, thread_name_prefix="prefix-disk")
                    disk.pending[path.name] = (self._writer.submit(_write_entry, path, _compacted(cache)), spilled)
                disk.add(spilled)
                for gone in disk.evict_to(disk.max_bytes):
                    self._complete.pop(disk.directory / gone.file, None)
            self.stats.spills += 1
        except Exception:
            log.warning("prefix cache entry not kept on disk", exc_info=True)

    def _settle(self, *, block: bool = False) -> None:
        """Account for the disk tier's files written since (all of them, waiting for those still being written, with
        `block`): each entry counts its file's size; one whose write failed leaves the tier."""
        disk = self.disk
        if disk is None or not disk.pending:
            return
        with _locked(disk.directory):
            for name, (job, entry) in list(disk.pending.items()):
                if not (block or job.done()):
                    continue
                del disk.pending[name]
                path = disk.directory / name
                try:
                    size = job.result()
                except Exception as exc:
                    log.warning("prefix cache entry %s not written to disk: %s", name, exc)
                    disk.remove(entry, unlink=True)
                    self._complete.pop(path, None)
                    continue
                self._complete[path] = size
                disk.resize(entry, size or 0)

    def flush(self) -> None:
        """Wait until every file the disk tier lists is written."""
        self._settle(block=True)

    @property
    def spilling(self) -> int:
        """Bytes of evicted entries still held in memory for their files (at most SPILLS_IN_FLIGHT entries, at their
        files' largest sizes), apart from the entries the memory tier holds (/health's `prefix_spilling`). Read by
        other threads: from a copy of the pending writes, and a finished write's entry is gone whether or not the
        engine thread has accounted for it yet."""
        disk = self.disk
        if disk is None:
            return 0
        return sum(entry.nbytes for job, entry in list(disk.pending.values()) if not job.done())

    def _usable(self, bits: int) -> bool:
        """Whether an entry stored at `bits` may be served: an exact one always, a quantized one when quantizing is
        on and it is at least as precise (so MLXQ_PREFIX_CACHE_BITS=0 keeps every answer exact)."""
        return bits == 0 or (self.bits != 0 and bits >= self.bits)

    # -- what it holds ----------------------------------------------------------------------

    def entry_ids(self) -> set[int]:
        """The ids of the entries held now, those in the trie, those taken by requests in flight and those in the
        disk tier (served from there). Safe from any thread: each LRU deque, the taken set and the tier's index are
        copied whole under the GIL."""
        known, fresh = self._ids, {}
        for lru in list(self.lru._lru._lrus.values()):
            for model, tokens in list(lru):
                seen = known.get(id(tokens))
                if seen is None or seen[0] is not tokens:
                    seen = (tokens, entry_id(tokens, model[1]))
                fresh[id(tokens)] = seen
        self._ids = fresh
        disk = self.disk.ids() if self.disk is not None else set()
        return {h for _, h in fresh.values()} | set(self._taken) | disk

    def snapshot(self) -> dict[str, int]:
        disk = self.disk
        return {
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "tokens_saved": self.stats.tokens_saved,
            "skips": self.stats.skips,
            "taken": self.stats.taken,
            "checkpoints": self.stats.checkpoints,
            "entries": len(self.lru),
            "bytes": int(self.lru.nbytes),
            "memory_hits": self.stats.memory_hits,
            "disk_hits": self.stats.disk_hits,
            "quantized": self.stats.quantized,
            "spills": self.stats.spills,
            "disk_entries": len(disk) if disk is not None else 0,
            "disk_bytes": disk.nbytes if disk is not None else 0,
        }

    # -- persistence ------------------------------------------------------------------------

    def entries(self) -> list[tuple[list[int], list[Any]]]:
        """(tokens, cache) of every entry, least recently used first (within each cache type)."""
        return [(tokens, cache) for tokens, cache, _ in self.typed_entries()]

    def typed_entries(self) -> list[tuple[list[int], list[Any], str]]:
        """(tokens, cache, cache type) of every entry, least recently used first within each type, the types in
        LRUPromptCache's eviction order (so a load in this order keeps each type's order)."""
        return [(tokens, cache, cache_type) for _, tokens, cache, cache_type in self.partitioned_entries()]

    def partitioned_entries(self) -> list[tuple[str, list[int], list[Any], str]]:
        """(partition, tokens, cache, cache type) of every entry, in `typed_entries`' order."""
        # LRUPromptCache has no public iterator; its LRU deques and trie are the source of truth.
        out = []
        for cache_type, lru in self.lru._lru._lrus.items():
            for model_key, tokens in lru:
                if isinstance(model_key, tuple) and model_key[0] == self.key:
                    entry = self.lru._trie.get(model_key, tokens)
                    out.append((model_key[1], list(tokens), entry.prompt_cache, cache_type))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self.key).encode()).hexdigest()[:16]

    def _file_name(self, tokens: list[int], bits: int = 0, partition: str = "") -> str:
        # Named by everything that decides the bytes (and by its partition, so two partitions' copies of one prompt
        # are two files), so a file, once complete, never needs rewriting.
        ident = f"{FORMAT_VERSION}:{mlx_lm_version}:{self.fingerprint()}:{partition}:{tokens}"
        ident += f":q{bits}" if bits else ""
        return hashlib.sha256(ident.encode()).hexdigest()[:32] + ENTRY_SUFFIX

    def _unvouched(self, path: Path) -> bool:
        """Whether this process cannot vouch that `path` is whole: never written or loaded here, or its size changed."""
        return path not in self._complete or self._complete[path] != _size(path)

    def _write(
        self, directory: Path, tokens: list[int], cache: list[Any], cache_type: str, partition: str
    ) -> DiskEntry:
        """An entry's file in `directory`, written unless this process already vouches for it."""
        bits = cache_bits(cache)
        path = directory / self._file_name(tokens, bits, partition)
        if self._unvouched(path):
            _write_atomic(path, functools.partial(_save_entry, cache=cache))
            self._complete[path] = _size(path)
        return DiskEntry(path.name, list(tokens), self._complete[path] or 0, cache_type, bits, partition)

    def save(self, directory: Path, max_bytes: int) -> int:
        """Write entries (most recent first, within `max_bytes`); how many the manifest now lists.

        The entries in memory come first; what the bound leaves is kept for the disk tier's own entries (those
        evicted from memory), most recent first, when the tier is this directory's. Crash-safe: each entry file is
        written whole under a temporary name and renamed into place, and the manifest, which alone makes entries
        visible, is replaced last. A save that dies midway leaves the previous save loadable; what it left behind
        is removed by the next save or load, as are the files of entries the new manifest no longer lists.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self.flush()  # the manifest lists only files that are whole
        with _locked(directory):
            disk = self.disk if self.disk is not None and self.disk.directory == directory else None
            in_memory = self.partitioned_entries()
            chosen = self._chosen(in_memory, max_bytes)
            total = sum(cache_bytes(cache) for _, _, cache, _ in chosen)
            kept: list[DiskEntry] = []  # the tier's entries besides memory's, most recent first
            if disk is not None:
                held = {_entry_key(partition, tokens) for partition, tokens, _, _ in in_memory}
                for entry in reversed(disk.entries()):
                    if entry.key in held or total + entry.nbytes > max_bytes:
                        continue
                    total += entry.nbytes
                    kept.append(entry)
            # the manifest lists them least recently used first: the tier's, then memory's in load order
            written = [
                self._write(directory, tokens, cache, cache_type, partition)
                for partition, tokens, cache, cache_type in reversed(chosen)
            ]
            order = [*reversed(kept), *written]
            if disk is not None:
                disk.reset(order)
                for gone in disk.evict_to(max_bytes):  # a file's header beyond what its arrays counted
                    self._complete.pop(directory / gone.file, None)
                order = disk.entries()
            listed = [e.listing() for e in order]
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

    def write_next(self, directory: Path, max_bytes: int) -> bool:
        """Write one entry file that `save(directory, max_bytes)` would list and the directory does not hold whole yet;
        False when none is left. A save then only writes its manifest: the engine thread is held for one entry's file
        at a time (worker.engine.Engine.save_prefix_cache), and a request that arrives meanwhile waits for that file
        alone, not for the whole save (hundreds of MB on a hybrid model: a later agent turn waited a second behind it).
        """
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            for partition, tokens, cache, cache_type in reversed(self._chosen(self.partitioned_entries(), max_bytes)):
                path = directory / self._file_name(tokens, cache_bits(cache), partition)
                if self._unvouched(path):
                    self._write(directory, tokens, cache, cache_type, partition)
                    return True
        return False

    @staticmethod
    def _chosen(
        in_memory: list[tuple[str, list[int], list[Any], str]], max_bytes: int
    ) -> list[tuple[str, list[int], list[Any], str]]:
        """The entries in memory a save lists: most recent first, within `max_bytes`."""
        chosen = []
        total = 0
        for partition, tokens, cache, cache_type in reversed(in_memory):
            size = cache_bytes(cache)
            if total + size > max_bytes:
                continue
            total += size
            chosen.append((partition, tokens, cache, cache_type))
        return chosen

    def load(self, directory: Path) -> int:
        """Insert the saved entries that match this model and format; skip anything else with a log line. With the
        disk tier in `directory` (`attach_disk`), every valid entry goes into the tier and only the most recent that
        fit the memory bounds are read into memory; the rest are read when a request needs them.

        Never raises for what it finds on disk: a missing, foreign or unreadable manifest loads
        nothing, and a missing, truncated or corrupt entry file is skipped.
        """
        if not directory.is_dir():
            return 0
        with _locked(directory):
            entries = self._read_manifest(directory)
            if entries is None:
                return 0
            disk = self.disk if self.disk is not None and self.disk.directory == directory else None
            listed = []
            found: list[DiskEntry] = []
            for entry in entries:
                try:
                    found.append(self._check_entry(directory, entry))
                except Exception as exc:
                    log.warning("skipping unreadable prefix cache entry %s: %s", _describe(entry), exc)
            if disk is not None:
                disk.reset(found)
                for gone in disk.evict_to(disk.max_bytes):
                    self._complete.pop(directory / gone.file, None)
                found = self._fitting(disk.entries())
            for item in found:
                try:
                    self._load_entry(directory, item)
                except Exception as exc:
                    log.warning("skipping unreadable prefix cache entry %s: %s", item.file, exc)
                    if disk is not None:
                        disk.remove(item, unlink=False)
                    continue
                if disk is None:
                    listed.append(item.listing())
            if disk is not None:
                listed = [e.listing() for e in disk.entries()]
            if len(listed) == len(entries):  # else the next save rewrites the manifest without the bad ones
                self._listed[directory] = listed
            self._remove_unlisted(
                directory, {e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)}
            )
        return len(listed)

    def _fitting(self, entries: list[DiskEntry]) -> list[DiskEntry]:
        """The most recent of `entries` (least recently used first) that fit the memory bounds, in the same order."""
        room, count = self.lru.max_bytes, self.lru.max_size
        fit: list[DiskEntry] = []
        for entry in reversed(entries):
            if len(fit) >= count:
                break
            if entry.nbytes <= room:
                room -= entry.nbytes
                fit.append(entry)
        return fit[::-1]

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

    def _check_entry(self, directory: Path, entry: Any) -> DiskEntry:
        """A manifest entry whose file is there at its listed size (vouched complete from now on)."""
        name, size, tokens = entry["file"], entry["bytes"], [int(t) for t in entry["tokens"]]
        cache_type, bits = entry.get("type", "assistant"), int(entry.get("bits", 0))
        partition = entry.get("partition", "")
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(ENTRY_SUFFIX):
            raise ValueError(f"bad file name {name!r}")
        if not isinstance(partition, str):
            raise ValueError(f"bad partition {partition!r}")
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"unknown cache type {cache_type!r}")
        if not tokens:
            raise ValueError("no tokens")
        if not self._usable(bits):
            raise ValueError(f"quantized to {bits} bits, and MLXQ_PREFIX_CACHE_BITS is {self.bits}")
        path = directory / name
        if _size(path) != size:  # caught here, before MLX maps the file
            raise ValueError(f"file holds {_size(path)} bytes, manifest lists {size}")
        self._complete[path] = size
        return DiskEntry(name, tokens, int(size), cache_type, bits, partition)

    def _load_entry(self, directory: Path, entry: DiskEntry) -> None:
        try:
            cache = read_entry(directory / entry.file, len(entry.tokens))
        except Exception:
            self._complete.pop(directory / entry.file, None)
            raise
        self.lru.insert_cache(self._model(entry.partition), list(entry.tokens), cache, cache_type=entry.cache_type)

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


class _EvictionTrie(PromptTrie):
    """mlx-lm's trie, noting what its LRU evicts while `evicted` is a list (those entries go to the disk tier), and
    dropping a partition's root once its last entry is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.evicted: list[tuple[Any, list[int], Any]] | None = None
        self._held: dict[Any, list[list[int]]] = {}  # each model's entries' tokens (`search`)

    def search(self, model: Any, tokens: list[int]) -> PromptTrieResult:
        """mlx-lm's search (0.32), with the same result but for which of equally short longer entries it names, in
        time linear in the entries' count. Its search for the shortest entry below where `tokens` leave the trie
        descends every entry's tail there, copying the path at each node (`extra + [tok]`), the square of its length:
        with 16 entries of 1,000 tokens past SmolLM2's template, a new prompt's lookup took 10-70 ms on this CPU (two
        or three a request, on the engine thread, before its prefill), and agents' prompts run to tens of thousands of
        tokens. Here the entries' token lists are compared instead (`_held`)."""
        if model not in self._trie:
            return PromptTrieResult(model, None, None, None, 0)
        current = self._trie[model]
        if not tokens and "__value__" in current:
            return PromptTrieResult(model, [], None, None, 0)
        last_index, index = -1, 0
        while index < len(tokens) and tokens[index] in current:
            current = current[tokens[index]]
            if "__value__" in current:
                last_index = index
            index += 1
        if last_index == len(tokens) - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        shorter = tokens[: last_index + 1] if last_index > 0 else None
        longer = None
        if index > 0:
            head = tokens[:index]
            longer = min(
                (e for e in self._held.get(model, ()) if len(e) >= index and e[:index] == head), key=len, default=None
            )
        return PromptTrieResult(model, None, shorter, longer, index)

    def add(self, model: Any, tokens: list[int], value: Any) -> Any:
        prev = super().add(model, tokens, value)
        if prev is None:
            self._held.setdefault(model, []).append(list(tokens))
        return prev

    def pop_prefixes(self, model: Any, tokens: list[int]) -> list[tuple[int, Any]]:
        values = super().pop_prefixes(model, tokens)
        for length, _value in values:
            self._forget(model, tokens[:length])
        return values

    def _forget(self, model: Any, tokens: list[int]) -> None:
        held = self._held.get(model, [])
        for i, entry in enumerate(held):
            if entry == tokens:
                del held[i]
                break
        if not held:
            self._held.pop(model, None)

    def pop(self, model: Any, tokens: list[int]) -> Any:
        value = super().pop(model, tokens)
        self._forget(model, tokens)
        if not self._trie[model]:  # a partition's last entry gone: so one salt per request leaves nothing behind
            del self._trie[model]
        if self.evicted is not None:
            self.evicted.append((model, list(tokens), value))
        return value


class TieredLRU(LRUPromptCache):
    """LRUPromptCache whose byte bound makes idle entries cheaper before it evicts any, and hands what it evicts to
    `spill`: least recently used first, `cheapen` gives an entry's cheaper form (None: it has none), and only
    when every entry is as cheap as it gets does the least recently used go. The entry bound evicts as before."""

    def __init__(
        self,
        *,
        max_size: int,
        max_bytes: int,
        cheapen: Callable[[list[Any]], list[Any] | None],
        spill: Callable[[Any, list[int], Any], None],
    ) -> None:
        super().__init__(max_size=max_size, max_bytes=max_bytes)
        # The bytes held between operations, for other threads (the heartbeat's memory parts): in the middle of an
        # insert the count passes the bound until the insert applies it, and a read then caught it over its share.
        self.held = 0
        self._trie: _EvictionTrie = _EvictionTrie()
        self._cheapen = cheapen
        self._spill = spill

    def insert_cache(
        self, model: Any, tokens: list[int], prompt_cache: list[Any], *, cache_type: str = "assistant", fit: bool = True
    ) -> None:
        """With `fit` False the bounds wait for the caller's `trim_to`."""
        bound, self.max_bytes = self.max_bytes, 1 << 63  # the byte bound is applied below, cheaper forms first
        size = self.max_size
        if not fit:
            self.max_size = 1 << 63
        try:
            with self._evicting():
                super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
        finally:
            self.max_bytes, self.max_size = bound, size
        if fit:
            self._fit(bound)
            self.settle()

    def trim_to(self, *, n_sequences: int | None = None, n_bytes: int | None = None) -> None:
        if n_sequences is not None:
            with self._evicting():
                super().trim_to(n_sequences=n_sequences)
        if n_bytes is not None:
            self._fit(max(0, n_bytes))
        self.settle()

    def settle(self) -> None:
        """The bytes held are whole again (an insert, a trim or a take has ended): what `held` reports."""
        self.held = self._n_bytes

    def _fit(self, n_bytes: int) -> None:
        if self._n_bytes > n_bytes:
            for cache_type, lru in list(self._lru._lrus.items()):  # LRUPromptCache's eviction order
                for model, tokens in list(lru):
                    if self._n_bytes <= n_bytes:
                        break
                    entry = self._trie.get(model, tokens)
                    cheaper = self._cheapen(entry.prompt_cache)
                    if cheaper is not None:
                        size = cache_bytes(cheaper)
                        self._n_bytes += size - entry.nbytes
                        self._n_bytes_by_type[cache_type] += size - entry.nbytes
                        entry.prompt_cache, entry.nbytes = cheaper, size
        if self._n_bytes > n_bytes:
            with self._evicting():
                super().trim_to(n_bytes=n_bytes)

    @contextmanager
    def _evicting(self) -> Iterator[None]:
        evicted: list[tuple[Any, list[int], Any]] = []
        self._trie.evicted = evicted
        try:
            yield
        finally:
            self._trie.evicted = None
        for model, tokens, entry in evicted:
            self._spill(model, tokens, entry)


def _entry_key(partition: str, tokens: Iterable[int]) -> tuple[str, bytes]:
    """An entry's key in the disk tier's index: its partition and its tokens as int64 bytes."""
    return (partition, array("q", tokens).tobytes())


@dataclass
class DiskEntry:
    """One entry file of the disk tier, as its manifest lists it."""

    file: str
    tokens: list[int]
    nbytes: int
    cache_type: str
    bits: int  # 0: exact; else its KV layers are quantized to this many bits
    partition: str = ""  # mlxq.keys.cache_partition: only prompts of this partition are served from it
    key: tuple[str, bytes] = field(init=False, repr=False)  # the index's key (`_entry_key`)
    id: int = field(init=False, repr=False)  # entry_id(tokens, partition), kept: the heartbeat asks for it often

    def __post_init__(self) -> None:
        self.key = _entry_key(self.partition, self.tokens)
        self.id = entry_id(self.tokens, self.partition)

    def listing(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "bytes": self.nbytes,
            "tokens": self.tokens,
            "type": self.cache_type,
            "bits": self.bits,
            "partition": self.partition,
        }


class DiskTier:
    """The entries on disk in one directory, least recently used first, within `max_bytes`, indexed per partition by
    their tokens: a sorted list of the token arrays (the entry sharing the longest prefix with a prompt is one of the
    two beside it) and a map of their bytes (a prefix entry found by its length). A lookup sees its own partition's
    entries only. It owns the index; the files are written and the manifest kept by PrefixCache (the caller holds the
    directory lock)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, bytes], DiskEntry] = OrderedDict()  # least recently used first
        self._sorted: dict[str, list[array[int]]] = {}  # per partition
        self._lengths: dict[str, Counter[int]] = {}
        self.nbytes = 0
        # Files still being written (PrefixCache._spill), by name: the write's future (the file's size) and its entry.
        self.pending: dict[str, tuple[Future[int | None], DiskEntry]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[DiskEntry]:
        return list(self._entries.values())

    def ids(self) -> set[int]:
        return {e.id for e in list(self._entries.values())}

    def clear(self) -> None:
        self.reset([])

    def reset(self, entries: list[DiskEntry]) -> None:
        """Hold exactly `entries` (least recently used first)."""
        self._entries.clear()
        self._sorted.clear()
        self._lengths.clear()
        self.nbytes = 0
        for entry in entries:
            self.add(entry)

    def add(self, entry: DiskEntry) -> None:
        """Hold `entry` as the most recently used (in place of one with its tokens; its file is removed when it
        was another one)."""
        old = self._entries.get(entry.key)
        if old is not None:
            self.remove(old, unlink=old.file != entry.file)
        self._entries[entry.key] = entry
        insort(self._sorted.setdefault(entry.partition, []), array("q", entry.tokens))
        self._lengths.setdefault(entry.partition, Counter())[len(entry.tokens)] += 1
        self.nbytes += entry.nbytes

    def remove(self, entry: DiskEntry, *, unlink: bool) -> None:
        if self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        tokens = array("q", entry.tokens)
        ordered, lengths = self._sorted[entry.partition], self._lengths[entry.partition]
        i = bisect_left(ordered, tokens)
        if i < len(ordered) and ordered[i] == tokens:
            del ordered[i]
        lengths[len(entry.tokens)] -= 1
        if not lengths[len(entry.tokens)]:
            del lengths[len(entry.tokens)]
        if not ordered:
            del self._sorted[entry.partition], self._lengths[entry.partition]
        self.nbytes -= entry.nbytes
        if unlink:
            if (writing := self.pending.pop(entry.file, None)) is not None and not writing[0].cancel():
                wait([writing[0]])  # being written: else its rename would bring the file back
            (self.directory / entry.file).unlink(missing_ok=True)

    def resize(self, entry: DiskEntry, nbytes: int) -> None:
        """`entry`'s file turned out `nbytes` long."""
        if self._entries.get(entry.key) is entry:
            self.nbytes += nbytes - entry.nbytes
        entry.nbytes = nbytes

    def evict_to(self, n_bytes: int) -> list[DiskEntry]:
        """Remove the least recently used entries (and their files) until the tier holds at most `n_bytes`."""
        gone = []
        while self.nbytes > n_bytes and self._entries:
            entry = next(iter(self._entries.values()))
            self.remove(entry, unlink=True)
            gone.append(entry)
        return gone

    def nearest(self, tokens: list[int], *, prefix_only: bool, partition: str = "") -> tuple[DiskEntry, int] | None:
        """The entry of `partition` that serves most of `tokens` and how many it serves: the one sharing the longest
        prefix with them (it may be longer: a trimmable entry is trimmed back), or with `prefix_only` the longest that
        is a prefix of them. None when none shares a token."""
        ordered = self._sorted.get(partition)
        if not ordered:
            return None
        query = array("q", tokens)
        i = bisect_left(ordered, query)
        best, shared = None, 0
        for j in (i - 1, i):  # in sorted order, the longest common prefix is beside the query
            if 0 <= j < len(ordered) and (n := _common(ordered[j], query)) > shared:
                best, shared = ordered[j], n
        if best is None:
            return None
        if not prefix_only:
            return self._entries[(partition, best.tobytes())], shared
        for length in sorted((n for n in self._lengths[partition] if n <= shared), reverse=True):
            entry = self._entries.get((partition, query[:length].tobytes()))
            if entry is not None:
                return entry, length
        return None

    def prefixes_of(self, tokens: list[int], *, partition: str = "") -> list[DiskEntry]:
        """The entries of `partition` whose tokens are a proper prefix of `tokens`."""
        query = array("q", tokens)
        lengths = self._lengths.get(partition, Counter())
        found = (self._entries.get((partition, query[:n].tobytes())) for n in lengths if n < len(tokens))
        return [e for e in found if e is not None]

    def read(self, entry: DiskEntry) -> list[Any]:
        """Load an entry's cache (a hit): it becomes the most recently used. One still being written is waited for."""
        if (writing := self.pending.get(entry.file)) is not None:
            writing[0].result()  # a failed write raises: the caller drops the entry
        cache = read_entry(self.directory / entry.file, len(entry.tokens))
        self._entries.move_to_end(entry.key)
        return cache


def _common(a: array[int], b: array[int]) -> int:
    """The length of the common prefix of two token arrays (a binary search on slices: each compare is a memcmp)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def read_entry(path: Path, length: int) -> list[Any]:
    """An entry file's cache, read into memory now (not lazily on the first request that uses it), holding `length`
    tokens."""
    cache = load_prompt_cache(str(path))
    materialize(cache)
    if cache_length(cache, length) != length:
        raise ValueError(f"cache holds {cache_length(cache, length)} tokens, manifest lists {length}")
    return cache


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _describe(entry: Any) -> str:
    return str(entry.get("file")) if isinstance(entry, dict) else repr(entry)[:60]


def _file_bound(cache: list[Any]) -> int:
    """The most bytes an entry's file takes: its arrays and what a header may add (`HEADER_BYTES`)."""
    arrays = sum(len(c.state) if isinstance(c.state, (list, tuple)) else 1 for c in layers(cache))
    return cache_bytes(cache) + HEADER_BYTES + HEADER_BYTES_PER_ARRAY * arrays


def _compacted(cache: list[Any]) -> list[Any]:
    """The cache as its file holds it, made here (the engine thread): each layer's state as mlx-lm saves it (a KV
    layer's cut to the tokens it holds), contiguous and evaluated, on copies of the layers, so that writing it elsewhere
    computes no array (mlx-lm's save_prompt_cache would slice a KV layer's buffer) and only reads bytes."""
    out = [_compacted_layer(c) for c in cache]
    mx.eval([c.state for c in layers(out)])
    return out


def _compacted_layer(layer: Any) -> Any:
    if isinstance(layer, CacheList):
        return CacheList(*[_compacted_layer(c) for c in layer.caches])
    state = layer.state
    if not isinstance(state, (list, tuple)) or any(a is None for a in state):
        return layer
    frozen = copy.copy(layer)
    frozen.state = tree_map(lambda a: mx.contiguous(a) if isinstance(a, mx.array) else a, tuple(state))
    return frozen


def _write_entry(path: Path, cache: list[Any]) -> int | None:
    """An entry's file, written whole (on the writer thread, from `_compacted`); its size."""
    _write_atomic(path, functools.partial(_save_entry, cache=cache))
    return _size(path)


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


# Per directory, the thread of this process holding its lock and how deep: a load or save that evicts an entry to
# the disk tier takes the lock again (an flock taken twice by one process through two files would wait forever).
_LOCKS: dict[Path, threading.RLock] = {}
_DEPTH: dict[Path, int] = {}


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One saver or loader per directory at a time, across processes and threads: cleanup must not race a save. The
    thread holding it may take it again.

    Where no lock can be had (a read-only directory, a file system without locks) it goes on
    unlocked: a load still works there, and a save fails on its own first write.
    """
    with _LOCKS.setdefault(directory, threading.RLock()):
        depth = _DEPTH.get(directory, 0)
        _DEPTH[directory] = depth + 1
        try:
            if depth:
                yield
            else:
                with _flocked(directory):
                    yield
        finally:
            _DEPTH[directory] = depth


@contextmanager
def _flocked(directory: Path) -> Iterator[None]:
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


def entry_id(tokens: list[int], partition: str = "") -> int:
    """An entry's id: the hash of its partition and tokens (an int tuple's hash is the same in every process, so an
    index saved with the entries still names them after a restart; a str's is not, so the partition goes in as a
    number)."""
    if not partition:
        return hash(tuple(tokens))
    return hash((_partition_number(partition), tuple(tokens)))


@functools.lru_cache(maxsize=4096)
def _partition_number(partition: str) -> int:
    return int.from_bytes(hashlib.sha256(partition.encode()).digest()[:8], "big")


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


def window_only(cache: list[Any]) -> None:
    """Cut each sliding window of a checkpoint taken during prefill down to the window. mlx-lm leaves a window that a
    chunk of n tokens went into holding its size + n - 1 tokens, so that each of them sees a whole window; what comes
    after needs only the last `max_size` (a chunk keeps `max_size - 1` of them, a token overwrites the oldest, and
    the batch merges the last `max_size`). Kept whole, a Gemma 3 checkpoint held up to 1.5x its window in every
    sliding layer (a 512-token chunk beside a 1,024-token window), and a tiny one with a 32-token window 17x."""
    for layer in layers(cache):
        if isinstance(layer, RotatingKVCache) and layer.keys is not None and layer.keys.shape[2] > layer.max_size:
            keep, recent = layer.keep, layer.max_size - layer.keep
            keys, values = layer._temporal_order(layer.keys), layer._temporal_order(layer.values)
            layer.keys = mx.concatenate([keys[..., :keep, :], keys[..., -recent:, :]], axis=2)
            layer.values = mx.concatenate([values[..., :keep, :], values[..., -recent:, :]], axis=2)
            layer._idx = layer.max_size


def cache_bytes(cache: list[Any]) -> int:
    return sum(c.nbytes for c in cache)


def cache_bits(cache: list[Any]) -> int:
    """The bits of an entry's quantized KV layers (the idle form), 0 when it holds none."""
    return max((c.bits for c in layers(cache) if isinstance(c, QuantizedKVCache)), default=0)


def quantized(cache: list[Any], bits: int) -> list[Any] | None:
    """The cache with its KV layers quantized (mlx-lm's QuantizedKVCache, as `KVCache.to_quantized` makes it, from
    the tokens it holds only), evaluated; None when no layer can be (no KV layer, or head dims no group divides)."""
    out = [_quantized(c, bits) for c in cache]
    if all(a is b for a, b in zip(out, cache, strict=True)):
        return None
    mx.eval([c.state for c in layers(out) if isinstance(c, QuantizedKVCache)])
    return out


def _quantized(layer: Any, bits: int) -> Any:
    if isinstance(layer, CacheList):
        parts = [_quantized(c, bits) for c in layer.caches]
        return CacheList(*parts) if any(a is not b for a, b in zip(parts, layer.caches, strict=True)) else layer
    if type(layer) is not KVCache or layer.keys is None or not layer.offset:
        return layer
    group = next((g for g in QUANT_GROUPS if not layer.keys.shape[-1] % g and not layer.values.shape[-1] % g), None)
    if group is None:
        return layer
    n = layer.offset
    out = QuantizedKVCache(group_size=group, bits=bits)
    out.state = (
        mx.quantize(layer.keys[..., :n, :], group_size=group, bits=bits),
        mx.quantize(layer.values[..., :n, :], group_size=group, bits=bits),
        n,
        group,
        bits,
    )
    return out


def thawed(cache: list[Any], *, copy_rest: bool = False) -> list[Any]:
    """The cache as the batch takes it: each quantized KV layer dequantized back to a KVCache (new arrays,
    evaluated); the other layers as they are, or copies with `copy_rest` (the entry stays in the trie)."""
    out = [_thawed(c, copy_rest) for c in cache]
    fresh = [a.state for a, b in zip(layers(out), layers(cache), strict=True) if isinstance(b, QuantizedKVCache)]
    if fresh:
        mx.eval(fresh)
    return out


def _thawed(layer: Any, copy_rest: bool) -> Any:
    if isinstance(layer, CacheList):
        return CacheList(*(_thawed(c, copy_rest) for c in layer.caches))
    if not isinstance(layer, QuantizedKVCache):
        return copy.deepcopy(layer) if copy_rest else layer
    n = layer.offset
    out = KVCache()
    if layer.keys is not None:
        keys, values = ([a[..., :n, :] for a in part] for part in (layer.keys, layer.values))
        out.keys = mx.dequantize(*keys, group_size=layer.group_size, bits=layer.bits)
        out.values = mx.dequantize(*values, group_size=layer.group_size, bits=layer.bits)
    out.offset = n
    return out


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
