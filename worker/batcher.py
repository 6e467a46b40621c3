"""Continuous batching: one engine thread decodes every request in flight together.

Decoding is memory-bound, so sequences that share a forward pass cost little more than one. The
engine thread loops over four small steps:

- admit: move waiting sequences into the generator (worker.generator: a prefill stage in front of mlx-lm's
  `BatchGenerator`, behind a small interface), interactive before low priority (a low-priority sequence that has
  waited `low_age_s` counts as interactive: an interactive flood cannot starve it), within `batch_size`
  sequences and the KV bytes the memory budget gives (`KvLimit`: each sequence reserves prompt +
  max_tokens, and mlx-lm's batch cache pads every sequence to the longest). Within a priority, owners
  (API keys; with keys off, sessions) take fair shares of the batch: the next admitted is the oldest
  of the owner with the fewest sequences in flight for its weight (MLXQ_KEY_WEIGHTS), and an owner at
  its ceiling (MLXQ_KEY_MAX_INFLIGHT, by default half the batch) waits while another owner under it
  does. A sequence that does not fit waits for room; one that could never fit runs when the batch is
  empty. An interactive sequence that does not fit parks a low-priority one, else one of an owner
  over its ceiling (one still prefilling first), their KV caches kept and resumed later. So neither
  low-priority work nor another key's flood holds an interactive request for longer than the step in
  progress plus its own prefill. A parked cache counts within the KV share beside the batch: it is kept
  only while it leaves room for the sequence it was parked for, and handed to the prefix cache when an
  admission needs its room (the sequence resumes from there, or prefills again once the LRU has let it
  go, as vLLM's recompute preemption does), so parking never takes memory past the budget.
- step: one generator step: one decoding step for the batch, then prefill chunks of waiting prompts
  within a time budget (worker.generator.ChunkedPrefill: interactive first, then the owner with the
  least prefill for its weight, then the shortest), so a short prompt behind a long one is prefilled
  in the next step, and a decoding stream pauses for one step, never a whole prefill.
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
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlxq import events
from mlxq.states import FinishReason
from worker.boundaries import MIN_GAP, STOP_WORTH, stops
from worker.generator import (
    DEFAULT_STEP_MS,
    Admission,
    Checkpoint,
    Generator,
    GeneratorConfig,
    GeneratorFactory,
    Step,
    mlx_batch_generator,
)
from worker.memory import Budget, KvShape, trim_heap
from worker.prefix_cache import PrefixCache, cache_bytes, cache_length, materialize
from worker.sequence import Sequence

log = logging.getLogger(__name__)

PRIORITIES = ("interactive", "low")
# Work of the engine thread besides the generator's step (admitting: the prefix cache's fetch; retiring: its insert)
# that takes longer than this is logged: every decoding stream pauses for it as for a step (the generator logs its
# own slow steps).
SLOW_WORK_S = 0.25
# How long the batch rests before the heap's free pages go back to the system. An agent's next turn comes a few ms
# after the answer it follows, and a trim then (glibc walks the whole heap: up to tens of ms for a worker's) was in its
# time to first token.
IDLE_TRIM_S = 0.5


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
        step_ms: float = DEFAULT_STEP_MS,
        key_weights: Mapping[str, float] | None = None,
        key_max_inflight: int = 0,
        low_age_s: float = 0.0,
        chunks_grow: bool = False,
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
        # One prompt's chunk may grow to the prefill share's tokens (GeneratorConfig.long_chunk; worker.engine says
        # for which models).
        self.chunks_grow = chunks_grow
        self.step_ms = step_ms
        # Fair shares between owners: each one's weight (1 unless set), and the most sequences one holds while
        # another waits (0: half the batch).
        self.key_weights = dict(key_weights or {})
        self.key_max_inflight = key_max_inflight
        # A low-priority sequence waiting this long is promoted (`_promote_aged`); 0: never.
        self.low_age_s = low_age_s
        self.prefix = prefix
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[Sequence]] = {"interactive": deque(), "low": deque()}
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._stream: Any = None  # the engine thread's, once it runs
        self._active: dict[int, Sequence] = {}
        # Waiting sequences that were parked with their KV cache (`_park`); pruned as their caches go.
        self._parked: list[Sequence] = []
        # Interactive submissions, and how many of them the last admission had seen (`_arrived`).
        self._arrivals = 0
        self._admitted_at = 0
        self._gen: Generator | None = None
        self._stopping = False
        self.preempted = 0
        self.sheds = 0  # times the prefix cache was shed to get back within the budget
        self._thread = threading.Thread(target=self._run, name="mlxq-engine", daemon=True)
        self._thread.start()

    # -- other threads -----------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            seq.queued_at = time.monotonic()
            self._waiting[seq.priority].append(seq)
            self._arrivals += seq.priority == "interactive"
            self._cond.notify()

    def _arrived(self) -> bool:
        """An interactive request came in after the last admission began (read by the generator between prefill
        chunks, on the engine thread: an int read needs no lock)."""
        return self._arrivals != self._admitted_at

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps (the prefix cache is the engine's alone)."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future.result()

    def renew(self) -> None:
        """A new generator, its measured costs forgotten, if nothing is in flight: after the warm-up
        (worker.engine.Engine.warm_up), whose forwards were the first of their shapes and, on a GPU, built kernels as
        they ran; timed, they would price prefill and drafting for many steps."""
        self.call(self._renew)

    def _renew(self) -> None:
        if not self._active and self._stream is not None:
            # The old one goes first: mlx-lm's batch puts back the wired-memory limit it found when it is dropped,
            # which would undo the one the new generator sets.
            self._gen = None
            self._gen = self._new_generator(self._stream)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "active": len(self._active),
                "waiting": sum(len(q) for q in self._waiting.values()),
                "tokens": self._tokens_in_flight(),
                "kv_bytes": self._kv_bytes(),
                "parked_bytes": self._parked_bytes(),
                "ahead_bytes": int(getattr(self._gen, "ahead_bytes", 0)),
                "preempted": self.preempted,
                "sheds": self.sheds,
            }

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)
        # join() returns before the thread's own C++ thread-locals are destroyed: MLX's compile cache among them, which
        # takes the GIL to drop what it holds. Had the interpreter begun to finalize by then, the thread was made to exit
        # inside that destructor and the process aborted ("terminate called without an active exception"). On Linux,
        # wait until the thread is gone.
        task = Path(f"/proc/self/task/{self._thread.native_id}")
        deadline = time.monotonic() + 2.0
        while not self._thread.is_alive() and task.exists() and time.monotonic() < deadline:
            time.sleep(0.002)

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        # The generator's stream is made on this thread: MLX streams belong to the thread that runs them.
        stream = self._stream = mx.default_stream(mx.default_device())
        self._gen = self._new_generator(stream)
        trim_at: float | None = None  # when the batch, gone idle, hands the heap's free pages back
        while True:
            with self._cond:
                while not (self._stopping or self._calls or self._active or any(self._waiting.values())):
                    if trim_at is not None and trim_at <= time.monotonic():
                        break
                    self._cond.wait(None if trim_at is None else trim_at - time.monotonic())
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
                idle = not (calls or self._active or any(self._waiting.values()))
            if idle:
                # At rest the process holds its weights, caches and allowance, not what its busiest moment left.
                trim_at = None
                trim_heap()
                continue
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            try:
                tic = time.perf_counter()
                self._admit()
                if (took := time.perf_counter() - tic) > SLOW_WORK_S:
                    log.warning("slow admission: %.0f ms, %d sequences in the batch", took * 1000, len(self._active))
                busy = bool(self._active)
                if busy:
                    self._step()
                self._retire_cancelled()
                self._keep_within_budget()
                if busy and not self._active and not any(self._waiting.values()):
                    trim_at = time.monotonic() + IDLE_TRIM_S  # unless work comes first (IDLE_TRIM_S)
            except Exception as exc:
                log.exception("batch step failed; failing %d sequences", len(self._active))
                for seq in list(self._active.values()):
                    seq.fail(exc)
                self._active.clear()
                self._renew()
        for seq in [*self._active.values(), *self._waiting["interactive"], *self._waiting["low"]]:
            seq.fail(RuntimeError("the engine stopped"))

    def _new_generator(self, stream: Any) -> Generator:
        config = GeneratorConfig(
            self.model,
            eos_ids=tuple(self.eos_ids),
            batch_size=self.batch_size,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step=self.prefill_step,
            step_ms=self.step_ms,
            arrived=self._arrived,
            decoded=self._take,
            long_chunk=self.prefill_step * (self.prefill_batch_size if self.chunks_grow else 1),
            room=lambda: self.kv.bytes - self._kv_bytes() - self._parked_bytes(),
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

    # -- parked caches -------------------------------------------------------------------------------

    def _parked_bytes(self, but: Sequence | None = None) -> int:
        """Bytes of the KV caches that parked sequences keep while they wait, `but`'s aside."""
        # `resume` read once: the engine thread clears it (a resume) while /health reads this under the lock.
        return sum(cache_bytes(r[0]) for s in self._parked if s is not but and (r := s.resume) and r[0])

    def _parked_room(self, seq: Sequence, held: int = 0) -> bool:
        """Whether the batch with `seq` in it, the parked caches beside it and `held` more bytes fit the KV share."""
        return self._kv_bytes(seq) + self._parked_bytes(but=seq) + held <= self.kv.bytes

    def _drop_parked(self, seq: Sequence) -> None:
        """Give `seq` the room parked caches hold, as little as it needs: low priority's first, the most recently
        parked first within a priority. Their caches go to the prefix cache, which their resume reads (`_start`)."""
        for other in sorted(reversed([s for s in self._parked if s is not seq]), key=lambda s: s.priority != "low"):
            if self._parked_room(seq):
                return
            if other.resume is not None and other.resume[0] is not None:
                self._let_go(other, other.resume[0], other.resume[1])
                other.resume = (None, 0)
                log.info("dropped a parked sequence's cache (it resumes from the prefix cache) to make room")

    def _let_go(self, seq: Sequence, cache: list[Any], keep: int) -> None:
        """A parked cache whose room is wanted goes into the prefix cache, within that share's bytes, where its resume
        finds it unless the LRU has let it go by then (it then prefills again, as vLLM's recompute preemption does)."""
        prefix = self.prefix() if seq.use_prefix_cache else None
        if prefix is not None and keep > 0 and can_trim_prompt_cache(cache):
            prefix.insert(seq.fed[:keep], cache, partition=seq.partition)

    # -- fair shares -------------------------------------------------------------------------------

    def _weight(self, owner: str) -> float:
        return max(float(self.key_weights.get(owner, 1.0)), 1e-6)

    @property
    def ceiling(self) -> int:
        """The most sequences one owner holds in the batch while another owner waits."""
        return self.key_max_inflight or max(1, self.batch_size // 2)

    def _pick(self) -> Sequence | None:
        """The waiting sequence to admit next: interactive before low; within a priority, of the owners whose
        sequences wait, those under the ceiling before those at it (when any is under), then the one with the
        fewest sequences in flight for its weight, then the one waiting longest; that owner's oldest sequence."""
        in_flight = Counter(s.owner for s in self._active.values())
        for priority in PRIORITIES:
            queue = self._waiting[priority]
            if not queue:
                continue
            oldest: dict[str, Sequence] = {}
            for seq in queue:
                oldest.setdefault(seq.owner, seq)
            under = [o for o in oldest if in_flight[o] < self.ceiling]
            owners = under or list(oldest)
            rank = {id(seq): i for i, seq in enumerate(queue)}
            owner = min(owners, key=lambda o: (in_flight[o] / self._weight(o), rank[id(oldest[o])]))
            return oldest[owner]
        return None

    def _admit(self) -> None:
        self._admitted_at = self._arrivals
        self._drop_cancelled_waiting()
        with self._cond:  # those resumed, or whose cache went, are parked no more
            self._parked = [s for s in self._parked if s.resume is not None and s.resume[0] is not None]
            self._promote_aged()
        while True:
            with self._cond:
                seq = self._pick()
                if seq is None:
                    return
                if not self._fits(seq):
                    if seq.priority == "low" or not (self._preempt_low(seq) or self._preempt_unfair(seq)):
                        return
                    continue
                if not self._parked_room(seq):
                    self._drop_parked(seq)
                self._waiting[seq.priority].remove(seq)
                # Waiting prompts that may share its prefix-cache entry: its own partition's only.
                others = [s.prompt for q in self._waiting.values() for s in q if s.partition == seq.partition]
            self._start(seq, others)

    def _promote_aged(self) -> None:
        """Low-priority sequences that have waited `low_age_s` since they were submitted (parked ones too) join the
        interactive queue, in the order they came, and are admitted, prefilled and parked as interactive from then on.
        Under strict priority an interactive flood that never lets up held a low-priority job `running` with nothing
        decoded for as long as it lasted (20 clients on a batch of 16: 60 s, and it ended 11 s after them)."""
        if not self.low_age_s:
            return
        low, now = self._waiting["low"], time.monotonic()
        for seq in [s for s in low if now - s.queued_at >= self.low_age_s]:
            low.remove(seq)
            seq.priority = "interactive"
            self._waiting["interactive"].append(seq)

    def _drop_cancelled_waiting(self) -> None:
        with self._cond:
            cancelled = [s for q in self._waiting.values() for s in q if s.cancelled.is_set()]
            for seq in cancelled:
                self._waiting[seq.priority].remove(seq)
        for seq in cancelled:
            seq.resume = None  # a parked cache goes with it
            seq.finish = FinishReason.CANCELLED
            seq.complete()

    def _start(self, seq: Sequence, others: list[list[int]]) -> None:
        assert self._gen is not None
        prefix = self.prefix() if seq.use_prefix_cache else None
        if seq.resume is not None:  # preempted earlier: continue from its own KV cache
            (cache, kept), seq.resume = seq.resume, None
            self._parked = [s for s in self._parked if s is not seq]  # parked again later, it is listed again
            if cache is None and prefix is not None:
                # Its cache was not kept (dropped for room, or it was decoding and cannot be trimmed: it holds one
                # token too many to resume from): from the prefix cache (a checkpoint where the model keeps them),
                # prefilling the rest.
                resumed = prefix.fetch(seq.fed, others=others, partition=seq.partition)
                cache, kept = resumed.cache, resumed.cached_tokens
                if resumed.taken is not None:
                    prefix.release(seq.taken_entry)
                    seq.taken_entry = resumed.taken
            rest, history = seq.fed[kept:], seq.fed[:kept]
        else:
            fetched = prefix.fetch(seq.prompt, others=others, partition=seq.partition) if prefix is not None else None
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
                # Those it has not reached yet (a resumed sequence may be past some), worth a forward each.
                checkpoints=self._stops(seq, len(history)) if prefix is not None else (),
                prediction=tuple(seq.prediction),
                priority=seq.priority,
                owner=seq.owner,
                weight=self._weight(seq.owner),
                watched=seq.watched,
            )
        )
        seq.admitted_at = time.monotonic()
        seq.prefilling = len(rest)
        self._active[seq.uid] = seq

    def _stops(self, seq: Sequence, start: int) -> tuple[int, ...]:
        """The checkpoints `seq`'s prefill from `start` stops at (worker.boundaries.stops), each closing at least
        STOP_WORTH times what the generator says a forward's fixed cost is worth in tokens there (`least_stop`; MIN_GAP
        where it has no measure), and the end of the prompt less its last token: the next turn starts there, and where
        the decode batch feeds the last token itself (every model that checkpoints, today) the prefill ends there
        anyway."""
        least = getattr(self._gen, "least_stop", None)
        kept = stops(seq.checkpoints, start, STOP_WORTH * least(start) if least is not None else MIN_GAP)
        end = len(seq.prompt) - 1
        return (*kept, end) if end > start and end in seq.checkpoints and end not in kept else kept

    def _preempt_low(self, seq: Sequence) -> bool:
        """Make room for an interactive sequence: park a low-priority one with its KV cache, the one parked
        least often so far (the newest among those): always the newest would park the same line each
        time, leaving it to finish alone at the end of a batch."""
        low = [s for s in self._active.values() if s.priority == "low"]
        if not low:
            return False
        if self.checkpoints:  # one still prefilling keeps its cache; a decoding one prefills its answer again
            self._park(min(low, key=lambda s: (not s.prefilling, s.preemptions, -s.admitted_at)), seq)
        else:
            self._park(min(low, key=lambda s: (s.preemptions, -s.admitted_at)), seq)
        return True

    def _preempt_unfair(self, seq: Sequence) -> bool:
        """Make room for an interactive sequence of an owner under its share: park a sequence of an owner over the
        ceiling whose share would still be the larger one, one still prefilling first (it loses nothing and no
        stream pauses), else the one parked least often, the newest among those."""
        in_flight = Counter(s.owner for s in self._active.values())
        mine = (in_flight[seq.owner] + 1) / self._weight(seq.owner)
        over = [
            s
            for s in self._active.values()
            if s.owner != seq.owner
            and in_flight[s.owner] > self.ceiling
            and (in_flight[s.owner] - 1) / self._weight(s.owner) >= mine - 1e-9
        ]
        if not over:
            return False
        victim = min(over, key=lambda s: (not s.prefilling, s.preemptions, -s.admitted_at))
        self._park(victim, seq, reason="another owner's request (fair share)")
        return True

    def _park(self, seq: Sequence, room_for: Sequence, reason: str = "") -> None:
        """Take a sequence out of the batch with its KV cache, kept while it leaves room for `room_for` within the KV
        share; it resumes from there later, first of its priority."""
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
        if usable and not self._parked_room(room_for, held=cache_bytes(cache)):
            # Its bytes are the room wanted (a batch at its KV share, not at its size).
            self._let_go(seq, cache, keep)
            usable = False
        if not usable:
            cache = None  # prefill again: from the prefix cache (its checkpoints, where the model keeps them)
            keep = 0
        else:
            materialize(cache)
            self._parked.append(seq)
        seq.resume, seq.uid = (cache, keep), None
        self.preempted += 1
        self._waiting[seq.priority].appendleft(seq)
        if reason:
            log.info("parked a sequence of %s (%d tokens kept) for %s", seq.owner or "no owner", keep, reason)
        else:
            log.info("preempted a low-priority sequence (%d tokens kept) for an interactive request", keep)

    # -- step and emit -----------------------------------------------------------------------

    def _step(self) -> None:
        assert self._gen is not None
        self._take(self._gen.step())

    def _take(self, step: Step) -> None:
        """A step's output (or its decode batch's, handed over before its prefill: `GeneratorConfig.decoded`): keep
        its checkpoints, note its prefill progress, emit its tokens, retire the sequences that ended."""
        tic = time.perf_counter()
        for checkpoint in step.checkpoints:
            self._checkpoint(checkpoint)
        for p in step.prefilled:
            seq = self._active.get(p.uid)
            if seq is not None:
                seq.prefilling = 0 if p.finished else p.total - p.done
            if seq is not None and not p.finished and p.total > self.prefill_step:
                seq.emit(events.progress(p.done, p.total))
        # A step may bring two tokens of a sequence (worker.generator.ChunkedPrefill); when it ends on the first (a stop
        # string) while the generator ended it on the second, the generator has let it go: its cache is that one's.
        ended = {g.uid: g for g in step.generated if g.finish_reason is not None}
        for g in step.generated:
            seq = self._active.get(g.uid)
            if seq is None:  # ended on an earlier token of this step
                continue
            seq.prefilling = 0
            seq.prediction_accepted += g.prediction[0]
            seq.prediction_rejected += g.prediction[1]
            if seq.add_token(g.token, g.logprobs, g.finish_reason):
                last = ended.get(g.uid, g)
                self._retire(seq, last.cache, last.tokens)
        if (took := time.perf_counter() - tic) > SLOW_WORK_S:
            log.warning(
                "slow step's aftermath: %.0f ms for %d checkpoints, %d tokens (%d ended)",
                took * 1000,
                len(step.checkpoints),
                len(step.generated),
                len(ended),
            )

    def _checkpoint(self, checkpoint: Checkpoint) -> None:
        """Keep a checkpoint of a prompt in the prefix cache (worker.boundaries); the sequence remembers it for the
        prefix index."""
        seq = self._active.get(checkpoint.uid)
        prefix = self.prefix() if seq is not None and seq.use_prefix_cache else None
        if seq is None or prefix is None or (mark := seq.checkpoints.get(len(checkpoint.tokens))) is None:
            return
        cache_type, message = mark
        entry = prefix.insert_checkpoint(checkpoint.tokens, checkpoint.cache, cache_type, partition=seq.partition)
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
        try:
            # It leaves the batch once its cache is stored: until then its KV counts as in flight. A /health read
            # between the two found it nowhere, nor the entries its insert evicted on their way to the disk tier.
            try:
                if prefix is not None and cache and tokens:
                    seq.prefix_entry = prefix.insert(list(tokens), cache, partition=seq.partition)
                if prefix is not None:
                    prefix.release(seq.taken_entry)
            finally:
                del self._active[seq.uid]
            seq.complete()
        except Exception as exc:  # this sequence's failure, not the batch's: its consumer is told, never left waiting
            log.exception("finishing a sequence failed")
            seq.fail(exc)
