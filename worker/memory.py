"""The worker's memory budget: one figure (MLXQ_MEMORY_GB) split between the parts that use memory, the limits
that hold each part to its share, and the measurements /health reports.

The parts, and what holds each:

- weights: every set the worker holds (the model, its adapter, a draft model), measured at load; weights that
  leave too little room fail to load, saying so.
- KV in flight: the batcher admits a request only while the batch's KV, counted in bytes as mlx-lm's batch cache
  lays it out (one rectangle: every sequence padded to the longest reservation), stays within its share.
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
import logging
import os
import resource
import sys
from collections.abc import Mapping
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
        kv_and_prefix = int(free * (KV_SHARE + PREFIX_SHARE))
        prefix = min(prefix, kv_and_prefix // 2) if prefix else int(free * PREFIX_SHARE)
        return cls(
            total=total,
            allowance=allowance,
            weights=held,
            kv=kv_and_prefix - prefix,
            prefix=prefix,
            prefill=int(free * PREFILL_SHARE),
            # A larger cache of freed buffers saves allocations but holds memory nothing uses.
            buffer_cache=min(int(free * BUFFER_SHARE), MAX_BUFFER_CACHE),
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


def kv_reservation(longest: int, sequences: int, per_token: int) -> int:
    """Bytes of a batch cache holding `sequences`, each padded to `longest` tokens (rounded up to mlx-lm's
    growth step): how mlx-lm's BatchKVCache lays out the batch."""
    return sequences * -(-longest // KV_STEP) * KV_STEP * per_token


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


def _libc() -> Any:
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
