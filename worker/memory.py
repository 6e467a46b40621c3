"""The worker's memory budget: one figure (MLXQ_MEMORY_GB) split between the parts that use memory, the limits
that hold each part to its share, and the measurements /health reports.

The parts, and what holds each:

- weights: every set the worker holds (the model, its adapter, a draft model), measured at load; weights that
  leave too little room fail to load, saying so.
- KV in flight: the batcher admits a request only while the batch's KV, counted in bytes as mlx-lm's batch cache
  lays it out (one rectangle: every sequence padded to the longest reservation), stays within its share. What a
  sequence's cache costs is measured per model (`KvShape`): bytes per token of the layers that grow (attention,
  quantized or not), each sliding window's true size, and the state a recurrent layer holds whatever the length.
- prefix cache: mlx-lm's LRUPromptCache bounded in bytes; the first thing shed when the worker finds itself over
  budget (never a request in flight).
- prefill: the transient buffers of a prefill step (attention scores, MLP activations) grow with the tokens
  prefilled together; the chunk and the number of sequences prefilled together are sized to fit the share.
- MLX's buffer cache: `mx.set_cache_limit` (Metal keeps freed buffers for reuse; unbounded by default), and
  `mx.set_wired_limit` on macOS. On Linux, glibc keeps freed heap pages; large buffers are mmapped instead, so a
  freed buffer goes back to the system.

The process itself (Python, the tokenizer, libraries) is the allowance: measured before the model loads, plus
slack; the worker's RSS stays within budget + allowance.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import resource
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import mlx.core as mx

log = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20
# The smallest room a model needs beyond its weights to serve anything (a few sequences, a prefill chunk).
MIN_WORKING = 256 * MIB
# What the allowance adds to the process measured before load: the tokenizer's and Python's growth while
# serving, and the heap's fragmentation.
ALLOWANCE_SLACK = 256 * MIB
# Shares of what the weights leave (the rest of the budget): KV in flight, prefix cache, prefill's transient
# buffers, MLX's buffer cache. They add up to 1.
KV_SHARE, PREFIX_SHARE, PREFILL_SHARE, BUFFER_SHARE = 0.5, 0.3, 0.15, 0.05
MAX_BUFFER_CACHE = 256 * MIB
# mlx-lm's KV caches grow in steps of this many tokens.
KV_STEP = 256


class ModelTooLarge(RuntimeError):
    """The model does not fit the budget at all."""


def machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * GIB


def default_budget() -> int:
    """On macOS, what Metal recommends a process keep resident (MLX's recommended working set); elsewhere the
    machine's memory less a quarter (at least 2 GiB) for the system and other processes."""
    if mx.metal.is_available():
        recommended = mx.device_info().get("max_recommended_working_set_size")
        if isinstance(recommended, int) and recommended > 0:
            return recommended
    total = machine_memory()
    return max(total - max(total // 4, 2 * GIB), GIB)


def rss() -> int:
    """The process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()  # macOS has no /proc: the peak is the best bound at hand without psutil


def peak_rss() -> int:
    """The process's peak resident memory: on Linux the kernel's VmHWM, since ru_maxrss keeps the peak of the
    process that spawned this one (exec carries it over: a worker started by a large parent reports its peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def parameters(model: Any) -> list[mx.array]:
    from mlx.utils import tree_flatten

    return [v for _, v in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))]


def weights_bytes(model: Any) -> int:
    return sum(v.nbytes for v in parameters(model))


@dataclass(frozen=True)
class Budget:
    """The budget and its split, in bytes; made once the weights are measured (`Budget.split`)."""

    total: int
    allowance: int
    weights: int  # every set together
    kv: int
    prefix: int
    prefill: int
    buffer_cache: int
    # Each set of weights by name (model, adapter, draft): reported beside the total as `weights_<name>`.
    weight_sets: tuple[tuple[str, int], ...] = ()

    @classmethod
    def split(
        cls, total: int, weights: Mapping[str, int], allowance: int, *, prefix: int = 0, model: str = ""
    ) -> Budget:
        """Shares of what the weights (every set the worker holds, by name) leave. `prefix` > 0 is an operator's
        fixed prefix-cache size (MLXQ_PREFIX_CACHE_MB), taken from the KV and prefix shares together."""
        held = sum(weights.values())
        free = total - held
        if free < MIN_WORKING:
            sets = f" ({', '.join(f'{n} {b / GIB:.2f} GB' for n, b in weights.items())})" if len(weights) > 1 else ""
            raise ModelTooLarge(
                f"model {model} needs {held / GIB:.2f} GB for its weights{sets} and at least "
                f"{MIN_WORKING / GIB:.2f} GB to serve, more than its memory budget of {total / GIB:.2f} GB: raise "
                f"MLXQ_MEMORY_GB or serve a smaller (quantized) model"
            )
        # A larger cache of freed buffers saves allocations but holds memory nothing uses: what its share has over
        # the cap goes to KV, so that the parts still add up to the budget.
        buffer_cache = min(int(free * BUFFER_SHARE), MAX_BUFFER_CACHE)
        kv_and_prefix = int(free * (KV_SHARE + PREFIX_SHARE)) + int(free * BUFFER_SHARE) - buffer_cache
        prefix = min(prefix, kv_and_prefix // 2) if prefix else int(free * PREFIX_SHARE)
        return cls(
            total=total,
            allowance=allowance,
            weights=held,
            kv=kv_and_prefix - prefix,
            prefix=prefix,
            prefill=int(free * PREFILL_SHARE),
            buffer_cache=buffer_cache,
            weight_sets=tuple(weights.items()),
        )

    def apply(self) -> None:
        """Hold MLX's buffer cache (and on macOS its wired memory) to the budget; on Linux return freed buffers."""
        mx.set_cache_limit(self.buffer_cache)
        if mx.metal.is_available():
            mx.set_wired_limit(min(self.total, default_budget()))
        _mmap_large_buffers()

    def limits(self) -> dict[str, int]:
        """The parts (`weights` the total), then each set of weights (/health, /metrics)."""
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weight_sets"}
        return {**parts, **{f"weights_{name}": size for name, size in self.weight_sets}}


def check_fits(path_bytes: int, total: int, model: str) -> None:
    """Before loading: a model whose files alone exceed the budget fails now, not after paging the machine out."""
    if path_bytes + MIN_WORKING > total:
        raise ModelTooLarge(
            f"model {model} has {path_bytes / GIB:.2f} GB of weights on disk, more than its memory budget of "
            f"{total / GIB:.2f} GB leaves room for: raise MLXQ_MEMORY_GB or serve a smaller (quantized) model"
        )


def prefill_sizes(budget: int, per_token: int, *, chunk: int, sequences: int, min_chunk: int = 64) -> tuple[int, int]:
    """(chunk, sequences prefilled together) whose transient buffers fit `budget`, given the bytes one prefilled
    token needs at the longest context; never below one sequence of `min_chunk` tokens."""
    tokens = max(budget // max(per_token, 1), min_chunk)
    chunk = max(min(chunk, tokens) // min_chunk * min_chunk, min_chunk)
    return chunk, max(1, min(sequences, tokens // chunk))


def prefill_bytes_per_token(args: Any, context: int, itemsize: int, on_cpu: bool) -> int:
    """Transient bytes one token costs while it is prefilled at `context` tokens of history: its MLP activations,
    and on the CPU (no fused attention kernel) its rows of attention scores, which MLX materializes."""
    hidden = int(getattr(args, "hidden_size", 0) or 4096)
    heads = int(getattr(args, "num_attention_heads", 0) or 32)
    inter = int(getattr(args, "intermediate_size", 0) or 4 * hidden)
    per_token = (3 * inter + 8 * hidden) * itemsize
    if on_cpu:
        per_token += 2 * heads * context * 4  # the scores and their softmax, in float32
    return per_token


@dataclass(frozen=True)
class KvShape:
    """What one sequence's cache costs, by the kind of each layer's cache (measured by `kv_shape`):

    - `per_token`: bytes per token of the layers whose cache grows with the sequence (KVCache, QuantizedKVCache),
      all of them together; mlx-lm allocates them in steps of KV_STEP tokens.
    - `windows`: (tokens, bytes per token) of each layer that keeps a bounded window (RotatingKVCache's sliding
      window, ChunkedKVCache): it grows like the others up to its size, and while a prompt is prefilled in chunks
      it briefly holds a chunk more (mlx-lm keeps size + chunk - 1 tokens so every token sees a full window).
    - `fixed`: bytes per sequence whatever its length (ArraysCache: a recurrent layer's state, a convolution's
      last inputs).
    """

    per_token: int = 0
    windows: tuple[tuple[int, int], ...] = ()
    fixed: int = 0

    def sequence_bytes(self, tokens: int, *, chunk: int = 0) -> int:
        """Bytes one sequence's cache holds after `tokens` tokens, grown from empty as mlx-lm grows it (whole steps;
        exact when each prefill chunk is a divisor or a multiple of KV_STEP), prefilled in chunks of `chunk`."""
        return self._bytes(-(-max(tokens, 0) // KV_STEP) * KV_STEP, chunk)

    def reservation(self, longest: int, sequences: int, *, chunk: int = 0) -> int:
        """Bytes of a batch cache holding `sequences`, each padded to `longest` tokens, as mlx-lm's batch caches
        lay out the batch (BatchKVCache, BatchRotatingKVCache: one rectangle; ArraysCache: a row each). A row
        may hold up to a step less one past its tokens: the batch is merged to exactly what its caches hold (a
        prefix-cache entry, a resumed one) and then grows by whole steps."""
        if sequences <= 0:
            return 0
        return sequences * self._bytes(longest + KV_STEP - 1 if longest > 0 else 0, chunk)

    def _bytes(self, slots: int, chunk: int) -> int:
        slack = max(chunk - 1, 0)
        windows = sum(min(slots, size + slack) * per_token for size, per_token in self.windows)
        return slots * self.per_token + windows + self.fixed

    def bounded(self, *, chunk: int = 0) -> int:
        """The most one sequence's layers that do not grow hold: its windows full, and its fixed state."""
        slack = max(chunk - 1, 0)
        return sum((size + slack) * per_token for size, per_token in self.windows) + self.fixed

    def limit(self, tokens: int, sequences: int, *, chunk: int = 0) -> int:
        """Bytes for `tokens` tokens of the growing layers shared by at most `sequences`, each with its bounded
        layers (MLXQ_BATCH_TOKENS: a limit in this model's tokens)."""
        return tokens * self.per_token + sequences * self.bounded(chunk=chunk)

    def longest(self, budget: int, *, cap: int, chunk: int = 0) -> int:
        """The most tokens, up to `cap`, one sequence may hold within `budget` bytes (0 when not even its fixed
        state fits); `cap` itself when it never outgrows the budget (a model with no growing layer)."""
        if self.sequence_bytes(cap, chunk=chunk) <= budget:
            return cap
        lo, hi = 0, cap  # sequence_bytes(hi) > budget; find the largest lo with sequence_bytes(lo) <= budget
        if self.sequence_bytes(0, chunk=chunk) > budget:
            return 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.sequence_bytes(mid, chunk=chunk) <= budget:
                lo = mid
            else:
                hi = mid
        return lo


def kv_shape(model: Any, cache: list[Any] | None = None) -> KvShape:
    """Measure the shape of `model`'s cache (`cache`, or mlx-lm's `make_prompt_cache(model)`): one token is
    forwarded through it, and each layer's cache (CacheList's parts each) is read by its kind. A cache kind not
    known here counts as growing when it holds keys, else what it holds after that token counts per sequence."""
    from mlx_lm.models.cache import (
        ArraysCache,
        CacheList,
        ChunkedKVCache,
        RotatingKVCache,
        make_prompt_cache,
    )

    if cache is None:
        cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    per_token, fixed = 0, 0
    windows: list[tuple[int, int]] = []

    def walk(layers: Iterable[Any]) -> None:
        nonlocal per_token, fixed
        for c in layers:
            if isinstance(c, CacheList):
                walk(c.caches)
                continue
            held, nbytes = _tokens_held(c), _nbytes(c)
            if isinstance(c, ArraysCache) or not held:
                fixed += nbytes
            elif isinstance(c, RotatingKVCache):
                windows.append((int(c.max_size), nbytes // held))
            elif isinstance(c, ChunkedKVCache):
                windows.append((int(c.chunk_size), nbytes // held))
            else:  # KVCache, QuantizedKVCache, ConcatenateKVCache, and any other that holds keys
                per_token += nbytes // held

    walk(cache)
    return KvShape(per_token=per_token, windows=tuple(windows), fixed=fixed)


def _nbytes(c: Any) -> int:
    try:
        return int(c.nbytes or 0)
    except (AttributeError, NotImplementedError):  # mlx-lm's base class raises for a cache that does not count
        return 0


def _tokens_held(c: Any) -> int:
    """Token slots a KV-like layer cache has allocated (keys are (batch, heads, tokens, dims); QuantizedKVCache's
    are a (packed, scales, biases) tuple); 0 for one that holds no keys."""
    keys = getattr(c, "keys", None)
    if isinstance(keys, (tuple, list)):
        keys = keys[0] if keys else None
    if keys is None or not hasattr(keys, "shape") or len(keys.shape) < 3:
        return 0
    return int(keys.shape[2])


def trim_heap() -> None:
    """Return the heap's free pages to the system (glibc only)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def mlx_memory() -> dict[str, int]:
    return {
        "mlx_active": int(mx.get_active_memory()),
        "mlx_cache": int(mx.get_cache_memory()),
        "mlx_peak": int(mx.get_peak_memory()),
    }


@functools.cache
def _libc() -> Any:
    # Found once: find_library runs `ldconfig -p` in a subprocess each time.
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mmap_large_buffers() -> None:
    # glibc raises its mmap threshold each time a large mmapped buffer is freed (up to 32 MiB), after which such
    # buffers come from the heap and their pages stay with the process when freed: a worker that prefilled a
    # batch once keeps gigabytes it no longer uses. A fixed threshold turns that off.
    libc = _libc()
    m_mmap_threshold = -3
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(m_mmap_threshold, 1 * MIB)
