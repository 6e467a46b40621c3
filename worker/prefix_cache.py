"""The prefix-trie KV cache: agent turns reuse the prompt they share with earlier turns.

A thin adapter over mlx-lm's `LRUPromptCache` (the trie and LRU are mlx-lm's): it keys entries
by a hashable, stable model key (path + revision, never the model object), trims one token on an
exact hit so the decoder has input, takes an entry out of the trie instead of deep-copying it when
the request extends it and no waiting request shares it (a copy of an agent's context per turn is
~120 MB), enforces the entry and byte bounds, counts what it saves,
never fails a request (any error falls back to the uncached path and is counted), and persists
entries to disk with their token ids beside them so a restarted worker starts warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

# Bump when the files on disk change shape; older files are then skipped.
FORMAT_VERSION = 1


def default_bytes() -> int:
    """An eighth of the machine's memory, at most 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return min(total // 8, 4 << 30)


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


@dataclass
class PrefixCache:
    model: Any
    key: Any  # hashable and stable: the engine's ModelKey
    max_entries: int
    max_bytes: int
    lru: LRUPromptCache = field(init=False)
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        self.lru = LRUPromptCache(max_size=self.max_entries, max_bytes=self.max_bytes)

    # -- the request path -------------------------------------------------------------------

    def fetch(self, tokens: list[int], *, others: Iterable[list[int]] = ()) -> Fetched:
        """The nearest cached prefix of `tokens`; on any failure, a fresh cache and the whole prompt.

        An entry that `tokens` extends (or equals) is taken out of the trie, not copied: the request
        inserts the extended cache when it finishes, which would drop that entry anyway. It is copied
        only when one of `others` (prompts still waiting) extends it too, so they can share it.
        """
        try:
            cache, rest = self._take(tokens, others)
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
        return Fetched(cache, list(rest), cached)

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

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        """Store the cache after a generation; `tokens` are what it was fed (prompt + generated)."""
        try:
            offset = cache_offset(cache)
            if offset is None:
                raise ValueError("cache has no offset")
            if offset > len(tokens):
                trim_prompt_cache(cache, offset - len(tokens))
            tokens = tokens[:offset]
            if tokens:
                self.lru.insert_cache(self.key, list(tokens), cache)
        except Exception:
            log.warning("prefix cache insert failed; entry dropped", exc_info=True)
            self.stats.skips += 1

    def snapshot(self) -> dict[str, int]:
        return {"hits": self.stats.hits, "misses": self.stats.misses, "tokens_saved": self.stats.tokens_saved,
                "skips": self.stats.skips, "taken": self.stats.taken, "entries": len(self.lru), "bytes": int(self.lru.nbytes)}

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

    def save(self, directory: Path, max_bytes: int) -> int:
        """Write entries (most recent first, within `max_bytes`) and drop files of evicted ones."""
        directory.mkdir(parents=True, exist_ok=True)
        keep: set[str] = set()
        total = 0
        for tokens, cache in reversed(self.entries()):
            size = sum(c.nbytes for c in cache)
            if total + size > max_bytes:
                continue
            name = hashlib.sha256(f"{self.fingerprint()}:{tokens}".encode()).hexdigest()[:32]
            keep.add(name)
            total += size
            target = directory / f"{name}.safetensors"
            if target.exists() and (directory / f"{name}.json").exists():
                continue
            tmp = directory / f"{name}.tmp.safetensors"
            save_prompt_cache(str(tmp), cache, metadata={"format": str(FORMAT_VERSION)})
            os.replace(tmp, target)
            (directory / f"{name}.json").write_text(json.dumps({
                "format": FORMAT_VERSION, "model": self.fingerprint(), "mlx_lm": mlx_lm_version,
                "tokens": tokens, "saved_at": time.time()}))
        for path in directory.glob("*.json"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)
                (directory / f"{path.stem}.safetensors").unlink(missing_ok=True)
        return len(keep)

    def load(self, directory: Path) -> int:
        """Insert the saved entries that match this model and format; skip anything else with a log line."""
        loaded = 0
        sidecars = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime) if directory.exists() else []
        for sidecar in sidecars:
            try:
                meta = json.loads(sidecar.read_text())
                if meta.get("format") != FORMAT_VERSION or meta.get("model") != self.fingerprint():
                    log.info("skipping prefix cache %s: other model or format", sidecar.name)
                    continue
                if meta.get("mlx_lm") != mlx_lm_version:
                    log.info("skipping prefix cache %s: saved by mlx-lm %s", sidecar.name, meta.get("mlx_lm"))
                    continue
                cache = load_prompt_cache(str(sidecar.with_suffix(".safetensors")))
                # Read it into memory now, not lazily on the first request that hits it.
                mx.eval([c.state for c in cache])
                tokens = [int(t) for t in meta["tokens"]]
                if cache_offset(cache) != len(tokens):
                    raise ValueError(f"cache holds {cache_offset(cache)} tokens, sidecar lists {len(tokens)}")
                self.lru.insert_cache(self.key, tokens, cache)
                loaded += 1
            except Exception as exc:
                log.warning("skipping unreadable prefix cache %s: %s", sidecar.name, exc)
        return loaded


def cache_offset(cache: list[Any]) -> int | None:
    """How many tokens every layer of `cache` holds; None when the layers disagree or keep no offset."""
    offsets = {getattr(c, "offset", None) for c in cache}
    if len(offsets) != 1:
        return None
    value = offsets.pop()
    return int(value) if value is not None else None
