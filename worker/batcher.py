"""Continuous batching: one engine thread decodes every request in flight together.

Decoding is memory-bound, so sequences that share a forward pass cost little more than one. The
engine thread loops over four small steps:

- admit: move waiting sequences into the generator (worker.generator: mlx-lm's `BatchGenerator` behind
  a small interface), interactive before low priority, within `batch_size` sequences and the KV bytes
  the memory budget gives (`KvLimit`: each sequence reserves prompt + max_tokens, and mlx-lm's batch
  cache pads every sequence to the longest). A sequence that does not fit waits for room; one that
  could never fit runs when the batch is empty. An interactive sequence parks the low-priority ones
  still prefilling (and, when the batch is full, a decoding one), their KV caches kept and resumed
  later; low-priority prefill is let in about one chunk at a time. So low-priority work delays an
  interactive request by at most the step in progress plus its own prefill.
- step: one generator step: one decoding step for the batch and at most one prefill chunk
  (`prefill_step` tokens per sequence) for newcomers, so a long prompt never stalls the others
  for more than a chunk.
- emit: hand each token to its `Sequence` (text, stop strings, tool-call filter, logprobs, deltas).
- retire: finished or cancelled sequences leave the batch; their KV cache goes into the prefix
  cache and their consumer is woken.
- keep within budget: when MLX's memory exceeds the budget (an estimate fell short), the prefix
  cache is shed and freed buffers returned; a sequence in flight is never failed for it.

Nothing here blocks on I/O: consumers read their sequence's event queue in their own threads. An
idle engine thread waits on a condition and uses no CPU. A failure inside a step fails the
sequences in the batch (never the thread) and starts a fresh generator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlxq import events
from mlxq.states import FinishReason
from worker.generator import Admission, Checkpoint, Generator, GeneratorConfig, GeneratorFactory, mlx_batch_generator
from worker.memory import Budget, KvShape, trim_heap
from worker.prefix_cache import PrefixCache, cache_length, materialize
from worker.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvLimit:
    """The KV bytes the batch may hold, and what one sequence of this model's cache takes (its `KvShape`: bytes
    per token of the layers that grow, its windows, its fixed state)."""

    bytes: int
    shape: KvShape


class Batcher:
    def __init__(
        self,
        model: nn.Module,
        *,
        eos_ids: list[int],
        batch_size: int,
        kv: KvLimit,
        prefill_batch_size: int,
        prefill_step: int,
        prefix: Callable[[], PrefixCache | None],
        budget: Budget,
        generator: GeneratorFactory = mlx_batch_generator,
        checkpoints: bool = False,
    ) -> None:
        self.model = model
        self.generator = generator
        # The model's cache cannot always be trimmed (worker.prefix_cache.needs_checkpoints): prompts keep
        # checkpoints as they are prefilled, and a parked decoding sequence resumes from the prefix cache.
        self.checkpoints = checkpoints
        self.eos_ids = eos_ids
        self.batch_size = batch_size
        self.kv = kv
        self.budget = budget
        self.prefill_batch_size = min(prefill_batch_size, batch_size)
        self.prefill_step = prefill_step
        self.prefix = prefix
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[Sequence]] = {"interactive": deque(), "low": deque()}
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: dict[int, Sequence] = {}
        self._gen: Generator | None = None
        self._stopping = False
        self.preempted = 0
        self.sheds = 0  # times the prefix cache was shed to get back within the budget
        self._thread = threading.Thread(target=self._run, name="mlxq-engine", daemon=True)
        self._thread.start()

    # -- other threads -----------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            self._waiting[seq.priority].append(seq)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps (the prefix cache is the engine's alone)."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future.result()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "active": len(self._active),
                "waiting": sum(len(q) for q in self._waiting.values()),
                "tokens": self._tokens_in_flight(),
                "kv_bytes": self._kv_bytes(),
                "preempted": self.preempted,
                "sheds": self.sheds,
            }

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        # The generator's stream is made on this thread: MLX streams belong to the thread that runs them.
        stream = mx.default_stream(mx.default_device())
        self._gen = self._new_generator(stream)
        while True:
            with self._cond:
                while not (self._stopping or self._calls or self._active or any(self._waiting.values())):
                    self._cond.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                self._admit()
                if self._active:
                    self._step()
                self._retire_cancelled()
                self._keep_within_budget()
            except Exception as exc:
                log.exception("batch step failed; failing %d sequences", len(self._active))
                for seq in list(self._active.values()):
                    seq.fail(exc)
                self._active.clear()
                self._gen = self._new_generator(stream)
        for seq in [*self._active.values(), *self._waiting["interactive"], *self._waiting["low"]]:
            seq.fail(RuntimeError("the engine stopped"))

    def _new_generator(self, stream: Any) -> Generator:
        config = GeneratorConfig(
            self.model,
            eos_ids=tuple(self.eos_ids),
            batch_size=self.batch_size,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step=self.prefill_step,
        )
        gen = self.generator(config, stream)
        # The budget's limits, set with each generator: mlx-lm's sets the wired limit to the machine's.
        self.budget.apply()
        return gen

    # -- admit -------------------------------------------------------------------------------

    def _tokens_in_flight(self) -> int:
        return sum(seq.budget for seq in self._active.values())

    def _kv_bytes(self, extra: Sequence | None = None) -> int:
        """The batch cache's bytes with `extra` in it: every sequence padded to the longest reservation, each with
        its windows (a prefill chunk over their size at most) and its fixed state."""
        seqs = [*self._active.values(), *([extra] if extra is not None else [])]
        longest = max((s.budget for s in seqs), default=0)
        return self.kv.shape.reservation(longest, len(seqs), chunk=self.prefill_step)

    def _fits(self, seq: Sequence) -> bool:
        if not self._active:
            return True
        return len(self._active) < self.batch_size and self._kv_bytes(seq) <= self.kv.bytes

    def _low_prefill_room(self, seq: Sequence) -> bool:
        """Low-priority prefill waits while an interactive prompt prefills, and then goes about one chunk per step
        (several short prompts together), so the step an interactive request may find in progress stays short."""
        if any(s.prefilling for s in self._active.values() if s.priority == "interactive"):
            return False
        pending = sum(s.prefilling for s in self._active.values() if s.priority == "low")
        return pending == 0 or pending + len(seq.prompt) <= self.prefill_step

    def _admit(self) -> None:
        while True:
            with self._cond:
                queue = self._waiting["interactive"] or self._waiting["low"]
                if not queue:
                    return
                seq = queue[0]
                if not seq.cancelled.is_set():
                    if seq.priority == "interactive":
                        self._park_low_prefills()
                    elif not self._low_prefill_room(seq):
                        return
                    if not self._fits(seq):
                        if seq.priority == "low" or not self._preempt_low():
                            return
                        continue
                queue.popleft()
                others = [s.prompt for q in self._waiting.values() for s in q]
            if seq.cancelled.is_set():
                seq.finish = FinishReason.CANCELLED
                seq.complete()
                continue
            self._start(seq, others)

    def _start(self, seq: Sequence, others: list[list[int]]) -> None:
        assert self._gen is not None
        prefix = self.prefix() if seq.use_prefix_cache else None
        if seq.resume is not None:  # preempted earlier: continue from its own KV cache
            (cache, kept), seq.resume = seq.resume, None
            if cache is None and prefix is not None and prefix.checkpoints:
                # Its cache could not be kept (it was decoding: a cache that cannot be trimmed holds one token too
                # many to resume from): from its checkpoints, prefilling the tokens generated since.
                resumed = prefix.fetch(seq.fed, others=others)
                cache, kept = resumed.cache, resumed.cached_tokens
                if resumed.taken is not None:
                    prefix.release(seq.taken_entry)
                    seq.taken_entry = resumed.taken
            rest, history = seq.fed[kept:], seq.fed[:kept]
        else:
            fetched = prefix.fetch(seq.prompt, others=others) if prefix is not None else None
            cache = fetched.cache if fetched is not None else None
            rest = fetched.rest if fetched is not None else seq.prompt
            seq.cached_tokens = fetched.cached_tokens if fetched is not None else 0
            seq.taken_entry = fetched.taken if fetched is not None else None
            history = seq.prompt[: seq.cached_tokens]
            seq.emit(events.started(len(seq.prompt), seq.cached_tokens))
        seq.uid = self._gen.admit(
            Admission(
                rest=rest,
                max_tokens=seq.remaining,
                cache=cache,
                history=history,
                sampler=seq.sampler,
                processors=seq.processors,
                # Those it has not reached yet (a resumed sequence may be past some).
                checkpoints=tuple(sorted(p for p in seq.checkpoints if p > len(history))) if prefix is not None else (),
            )
        )
        seq.admitted_at = time.monotonic()
        seq.prefilling = len(rest)
        self._active[seq.uid] = seq

    def _preempt_low(self) -> bool:
        """Make room for an interactive sequence: park a low-priority one with its KV cache, the one parked
        least often so far (the newest among those): always the newest would park the same line each
        time, leaving it to finish alone at the end of a batch."""
        low = [s for s in self._active.values() if s.priority == "low"]
        if not low:
            return False
        if self.checkpoints:  # one still prefilling keeps its cache; a decoding one prefills its answer again
            self._park(min(low, key=lambda s: (not s.prefilling, s.preemptions, -s.admitted_at)))
        else:
            self._park(min(low, key=lambda s: (s.preemptions, -s.admitted_at)))
        return True

    def _park_low_prefills(self) -> None:
        """An interactive prompt is prefilled ahead of low-priority ones: those still prefilling step aside."""
        for seq in [s for s in self._active.values() if s.priority == "low" and s.prefilling]:
            self._park(seq)

    def _park(self, seq: Sequence) -> None:
        """Take a low-priority sequence out of the batch with its KV cache; it resumes from there later."""
        assert self._gen is not None
        seq.preemptions += 1
        uid = seq.uid
        assert uid is not None  # every active sequence has one
        cache: list[Any] | None
        cache, tokens = self._gen.extract(uid)
        del self._active[uid]
        # Keep at least one token to feed back in, so the decoder has input when it resumes: a prefilling sequence's
        # cache holds less than its prompt, a decoding one's every token it was fed, one to trim.
        keep = min(len(tokens), len(seq.fed) - 1)
        usable = keep > 0 and cache_length(cache, len(tokens)) == len(tokens)
        if usable and len(tokens) > keep:
            drop = len(tokens) - keep
            # A cache that cannot be trimmed (recurrent state, a moved window) trims nothing: feeding the last token
            # again on top of it would be wrong.
            usable = can_trim_prompt_cache(cache) and trim_prompt_cache(cache, drop) == drop
        if not usable:
            cache = None  # prefill again: from the prefix cache's checkpoints where the model keeps them
            keep = 0
        else:
            materialize(cache)
        seq.resume, seq.uid = (cache, keep), None
        self.preempted += 1
        self._waiting["low"].appendleft(seq)
        log.info("preempted a low-priority sequence (%d tokens kept) for an interactive request", keep)

    # -- step and emit -----------------------------------------------------------------------

    def _step(self) -> None:
        assert self._gen is not None
        step = self._gen.step()
        for checkpoint in step.checkpoints:
            self._checkpoint(checkpoint)
        for p in step.prefilled:
            seq = self._active.get(p.uid)
            if seq is not None:
                seq.prefilling = 0 if p.finished else p.total - p.done
            if seq is not None and not p.finished and p.total > self.prefill_step:
                seq.emit(events.progress(p.done, p.total))
        for g in step.generated:
            seq = self._active[g.uid]
            seq.prefilling = 0
            if seq.add_token(g.token, g.logprobs, g.finish_reason):
                self._retire(seq, g.cache, g.tokens)

    def _checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keep a checkpoint of a prompt in the prefix cache (worker.boundaries); the sequence remembers it for the
        prefix index."""
        seq = self._active.get(checkpoint.uid)
        prefix = self.prefix() if seq is not None and seq.use_prefix_cache else None
        if seq is None or prefix is None or (mark := seq.checkpoints.get(len(checkpoint.tokens))) is None:
            return
        cache_type, message = mark
        entry = prefix.insert_checkpoint(checkpoint.tokens, checkpoint.cache, cache_type)
        if entry is not None:
            seq.checkpoint_entries.append((message, entry))

    # -- keep within budget ------------------------------------------------------------------

    def _keep_within_budget(self) -> None:
        """Over budget (an estimate fell short, or the weights grew): shed the prefix cache, least recent first,
        and hand freed buffers back. Sequences in flight keep running."""
        over = mx.get_active_memory() + mx.get_cache_memory() - self.budget.total
        prefix = self.prefix()
        if over <= 0 or prefix is None or not prefix.lru.nbytes:
            return
        prefix.lru.trim_to(n_bytes=max(int(prefix.lru.nbytes) - over, 0))
        mx.clear_cache()
        trim_heap()
        self.sheds += 1
        log.warning("over the memory budget by %d MB: prefix cache shed to %d MB", over >> 20, prefix.lru.nbytes >> 20)

    # -- retire ------------------------------------------------------------------------------

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self._active.values() if s.cancelled.is_set()]:
            seq.finish = FinishReason.CANCELLED
            self._retire(seq)

    def _retire(self, seq: Sequence, cache: list[Any] | None = None, tokens: list[int] | None = None) -> None:
        """Take a finished sequence out of the batch, keep its KV cache, wake its consumer."""
        assert self._gen is not None and seq.uid is not None
        prefix = self.prefix() if seq.use_prefix_cache else None
        if cache is None:  # finished by us (stop string, cancel), not by the generator
            if prefix is not None:
                cache, tokens = self._gen.extract(seq.uid)
            else:  # nothing would keep its cache
                self._gen.remove(seq.uid)
        del self._active[seq.uid]
        try:
            if prefix is not None and cache and tokens:
                seq.prefix_entry = prefix.insert(list(tokens), cache)
            if prefix is not None:
                prefix.release(seq.taken_entry)
            seq.complete()
        except Exception as exc:  # this sequence's failure, not the batch's: its consumer is told, never left waiting
            log.exception("finishing a sequence failed")
            seq.fail(exc)
