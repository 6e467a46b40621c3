"""Speculative decoding inside the batch (issue 27): every sequence in flight drafts tokens by prompt lookup, and one
batched forward pass checks every sequence's drafts; each keeps the tokens it accepts.

Decoding is memory-bound: a forward over a few positions per sequence costs about what one position costs, so a
sequence that copies its prompt (an edit returns most of the file it was sent) gets several tokens per step.

- Drafts: prompt lookup. The sequence's last n tokens (n = 3, then 2) are looked up in its own prompt and output (and
  in a predicted output the client sent, OpenAI's `prediction`); the tokens that followed their latest earlier
  occurrence are the draft (a loop continues periodically). Each sequence's draft length follows its acceptance:
  longer after a draft accepted whole, shorter after a partial one; after a few steps with nothing accepted it
  rests for a while (longer each time), so a sequence that copies nothing decodes plainly.
- Verification: each row feeds its last sampled token and its drafts, right-filled to the step's length L (the
  filler is never kept). The target token is sampled at every position; drafts are accepted while they equal it,
  and the first target that differs (or the one after the last draft) is the step's bonus token. Prompt-lookup
  drafts are point masses, so for a sampled sequence this is exactly the rejection rule (accept draft d with
  probability p(d); on rejection sample from p with d's mass removed): the target draw equals d with probability
  p(d), and given that it does not, it is distributed as p without d. Greedy output is token-for-token the plain
  output; sampled output comes from the same distribution.
- The KV cache (`RaggedKVCache`): mlx-lm's batch cache advances every sequence by the same number of positions, so
  trimming it back after a step would hold every sequence to the one that accepted least. Here each row has its own
  end: a step writes L positions at each row's end, the mask hides what lies past a row's end, and each row's end
  then advances by the tokens it kept; nothing is moved. Only models whose every layer is a plain KV cache take
  this path (`supports`); the others decode with mlx-lm's batch.
- A step where no sequence drafts decodes one token per sequence, as mlx-lm's batch does (the next forward is
  queued before the previous step's tokens are read), so a workload that copies nothing runs no slower.
- Logits processors see every verified position: the penalties with the context up to it, a grammar (worker.
  constrained) as if each draft had been sampled. A draft is cut where the grammar would refuse it, the processors
  mask each position as they would mask a plain step's, and the grammar forgets the drafts that were not accepted
  (llguidance rolls back), so an answer under a schema that copies its prompt is drafted too, with the same
  tokens. A grammar armed by a trigger (tool calls: free text until a call opens) does not draft: its watch of
  the text cannot be rolled back.
- How long a step's rows are: what quickens the rows most as their clients see it. Each row expects its accepted
  prefix over the step's cost, which every row pays: the cost of a forward by its positions is measured
  (`StepCost`), and the step length maximizes the geometric mean of the rows' expected rates (`_best_length`).
  Where the hardware is compute-bound (a CPU with many sequences) drafts are cut short, and a few rows' copies do
  not slow the rest.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from worker.generator import (
    Admission,
    Generated,
    GeneratorConfig,
    Prefilled,
    Step,
    finish_reason,
    ints,
    last_logits,
    sample_first,
)
from worker.seeded_sampler import SeededSampler
from worker.sequence import Sampler

NGRAMS = (3, 2)  # the suffix lengths looked up, longest first
K_START = 4  # draft tokens a sequence starts with
K_MAX = 8
MISSES = 3  # steps in a row with nothing accepted before a sequence rests
REST_START = 4  # steps a sequence rests the first time; doubled each time, up to REST_MAX
REST_MAX = 64
PREFILL_WAITS_COST = 1.1  # while prompts wait for prefill, a drafting step costs at most this times a plain one
PLAIN_TIMED_EVERY = 32  # plain steps between two timed ones (a timed step is not pipelined)
CATCH_UP = 512  # a row's tokens the draft model's cache takes in one step, at most


def supports(model: nn.Module) -> bool:
    """Whether the model's cache is plain KV in every layer (rows can end at different positions)."""
    cache = make_prompt_cache(model)
    return bool(cache) and all(type(c) is KVCache for c in cache)


@dataclass
class DraftStats:
    """Counters of one engine's speculative decoding, kept across its generators."""

    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, accepted
    steps: int = 0  # decode steps
    tokens: int = 0  # tokens generated by them

    def as_dict(self) -> dict[str, int]:
        return {"drafted": self.drafted, "accepted": self.accepted, "steps": self.steps, "tokens": self.tokens}


class RaggedKVCache:
    """A batch KV cache whose rows end at their own positions (module doc). Row i holds its tokens at physical
    positions [left[i], ends[i]); a forward of N positions writes each row's at [ends[i], ends[i] + N), and
    `advance` keeps as many of them as the row accepted."""

    step = 256

    def __init__(self, left: list[int], ends: list[int], keys: mx.array | None = None, values: mx.array | None = None):
        self.keys, self.values = keys, values
        self.left, self.ends = list(left), list(ends)
        self._sync()

    @classmethod
    def of(cls, batch: BatchKVCache) -> RaggedKVCache:
        """mlx-lm's merged batch cache (every row ending at its `_idx`) as a ragged one."""
        n = batch.left_padding.shape[0]
        if batch.keys is None:
            return cls([0] * n, [0] * n)
        return cls(batch.left_padding.tolist(), [batch._idx] * n, batch.keys, batch.values)

    @classmethod
    def single(cls, cache: KVCache) -> RaggedKVCache:
        """One sequence's own cache as a row, its buffer taken as it is: a prefilled prompt joins the batch with one
        copy (`extend`), not two (mlx-lm's merge into a batch cache of its own, then the batch's)."""
        if cache.keys is None or cache.offset == 0:
            return cls([0], [0])
        # New array objects over the same buffers: the batch's writes rebind its own, never the sequence cache's.
        return cls([0], [cache.offset], cache.keys[:], cache.values[:])

    def _sync(self) -> None:
        # What the model reads: each row's position (RoPE) and its left padding.
        self.offset = mx.array([e - s for s, e in zip(self.left, self.ends, strict=True)])
        self.left_padding = mx.array(self.left)

    # -- what the model calls ----------------------------------------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n = keys.shape[2]
        need = max(self.ends) + n
        if self.keys is None or self.values is None or need > self.keys.shape[2]:
            size = (need + self.step - 1) // self.step * self.step
            new_k = mx.zeros((keys.shape[0], keys.shape[1], size, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((values.shape[0], values.shape[1], size, values.shape[3]), values.dtype)
            if self.keys is not None and self.values is not None:
                have = self.keys.shape[2]
                new_k[..., :have, :] = self.keys
                new_v[..., :have, :] = self.values
            self.keys, self.values = new_k, new_v
        if len(set(self.ends)) == 1:
            e = self.ends[0]
            self.keys[..., e : e + n, :] = keys
            self.values[..., e : e + n, :] = values
        else:
            at = (mx.array(self.ends)[:, None] + mx.arange(n)[None])[:, None, :, None]
            self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
            self.values = mx.put_along_axis(self.values, at, values, axis=2)
        return self.keys[..., :need, :], self.values[..., :need, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_: Any) -> mx.array:
        # Query j of row i sits at ends[i] + j: it sees the row's tokens and the step's up to itself, nothing past.
        positions = mx.arange(max(self.ends) + n)[None, None, None, :]
        queries = (mx.array(self.ends)[:, None] + mx.arange(n)[None])[:, None, :, None]
        return (positions <= queries) & (positions >= self.left_padding[:, None, None, None])

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None or self.values is None else [self.keys, self.values]

    # -- the batch ---------------------------------------------------------------------------------------------------

    def rewind(self, held: list[int]) -> None:
        """Each row holds only its first `held[i]` tokens (a draft model's cache, past the drafts not accepted)."""
        self.ends = [s + h for s, h in zip(self.left, held, strict=True)]
        self._sync()

    def advance(self, kept: list[int]) -> None:
        """After a forward: each row keeps this many of the positions it wrote."""
        self.ends = [e + k for e, k in zip(self.ends, kept, strict=True)]
        self._sync()

    def filter(self, keep: list[int]) -> None:
        """Only the rows `keep`, in one buffer as long as they need: a 3,000-token row that ends leaves the rest
        their own length, not its (every later step's forward and copy would carry its positions)."""
        self.left = [self.left[i] for i in keep]
        self.ends = [self.ends[i] for i in keep]
        if self.keys is not None and self.values is not None:
            shift = min(self.left, default=0)  # no row starts before it any more
            size = self._room(max(self.ends, default=0) - shift)
            rows = mx.array(keep)
            # Sliced, then gathered: the gather's copy is the only buffer made, at the rows' own length.
            self.keys = self.keys[:, :, shift : shift + size][rows]
            self.values = self.values[:, :, shift : shift + size][rows]
            self.left = [s - shift for s in self.left]
            self.ends = [e - shift for e in self.ends]
        self._sync()

    def extend(self, *others: RaggedKVCache, into: Buffers | None = None) -> None:
        """Rows added below, in one buffer made once and written once (rows need not end together, so each part is
        copied up to its own last position): `into`, made ready beforehand (`joined_shapes`), where its shapes are
        the ones needed. On this 2-core VM a first touch of fresh memory runs at under 1 GB/s, and joining a 3,000-token
        prompt's cache to a decoding stream by padding and concatenating (three copies of it) took 0.4-0.9 s of one
        step, every stream paused for it."""
        parts = [p for p in (self, *others) if p.keys is not None and p.values is not None]
        left = [s for p in (self, *others) for s in p.left]
        ends = [e for p in (self, *others) for e in p.ends]
        if parts and len(ends) > len(self.ends):
            ref, ref_v = parts[0].keys, parts[0].values
            assert ref is not None and ref_v is not None
            shapes = _shapes(ref, ref_v, len(ends), self._room(max(ends)))
            if into is not None and _fits(into, shapes, (ref.dtype, ref_v.dtype)):
                keys, values = into
            else:
                keys, values = mx.zeros(shapes[0], ref.dtype), mx.zeros(shapes[1], ref_v.dtype)
            row = 0
            for p in (self, *others):
                if p.keys is not None and p.values is not None and (end := max(p.ends, default=0)):
                    rows = slice(row, row + len(p.ends))
                    keys[rows, :, :end] = p.keys[:, :, :end]
                    values[rows, :, :end] = p.values[:, :, :end]
                row += len(p.ends)
            self.keys, self.values = keys, values
        self.left, self.ends = left, ends
        self._sync()

    def joined_shapes(self, rows: int, end: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The keys' and values' buffer shapes once it holds `rows` rows and one more of them ends at `end` (None:
        nothing to go by)."""
        if self.keys is None or self.values is None:
            return None
        return _shapes(self.keys, self.values, rows, self._room(max(*self.ends, end)))

    def _room(self, tokens: int) -> int:
        """A buffer's length for rows that hold up to `tokens` positions: whole steps, with room for the next write."""
        return (tokens + self.step) // self.step * self.step

    def extract(self, i: int) -> KVCache:
        cache = KVCache()
        if self.keys is not None and self.values is not None and self.ends[i] > self.left[i]:
            cache.keys = mx.contiguous(self.keys[i : i + 1, :, self.left[i] : self.ends[i]])
            cache.values = mx.contiguous(self.values[i : i + 1, :, self.left[i] : self.ends[i]])
            cache.offset = self.ends[i] - self.left[i]
        return cache

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state)


Buffers = tuple[mx.array, mx.array]  # a layer's keys and values


def _shapes(keys: mx.array, values: mx.array, rows: int, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keys' and values' buffer shapes for `rows` rows of `size` positions, each by its own head dim: an MLA model's
    (DeepSeek-V3's) values are narrower than its keys."""
    return (rows, keys.shape[1], size, keys.shape[3]), (rows, values.shape[1], size, values.shape[3])


def _fits(buffers: Buffers, shapes: tuple[tuple[int, ...], tuple[int, ...]], dtypes: tuple[Any, Any]) -> bool:
    return all(tuple(b.shape) == s and b.dtype == d for b, s, d in zip(buffers, shapes, dtypes, strict=True))


def _buffer_bytes(shapes: tuple[tuple[int, ...], tuple[int, ...]], cache: RaggedKVCache) -> int:
    """The bytes of a layer's keys and values buffers of these shapes, in its cache's dtypes."""
    assert cache.keys is not None and cache.values is not None  # a layer with shapes to go by holds both
    return math.prod(shapes[0]) * cache.keys.dtype.size + math.prod(shapes[1]) * cache.values.dtype.size


class PromptLookup:
    """N-gram index of a sequence's tokens (prompt and output): where each n-gram last occurred."""

    def __init__(self, tokens: list[int], ngrams: tuple[int, ...] = NGRAMS) -> None:
        self.ngrams = ngrams
        self.tokens: list[int] = []
        self._at: dict[tuple[int, ...], int] = {}  # n-gram -> the position just past its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens)
            for n in self.ngrams:
                if end >= n:
                    self._at[tuple(self.tokens[end - n : end])] = end

    def find(self, suffix: list[int], n: int) -> int | None:
        """Where the tokens that followed the latest occurrence of `suffix`'s last n tokens start."""
        return self._at.get(tuple(suffix[-n:])) if len(suffix) >= n else None


def lookup_draft(
    context: PromptLookup, last: int, k: int, seed: PromptLookup | None = None, follow: int | None = None
) -> tuple[list[int], bool, int | None]:
    """Up to k tokens to follow `last` (the sampled token not yet in `context`); whether they come from the client's
    prediction; and where in the context they start (None: not from the context).

    In order: the prediction's continuation of the context's last 3 tokens; the copy being followed (`follow`: the
    context position a copy has reached, when `last` is the token there); the continuation of the latest earlier
    occurrence of the last n tokens (n = 3, then 2; the prediction first at each). The copy comes before the latest
    occurrence because a file returned with an edit repeats its lines: `for order in` occurs in several functions,
    and the latest one is rarely the one being copied."""
    if k <= 0:
        return [], False, None
    tail = [*context.tokens[-(max(context.ngrams) - 1) :], last]
    for n in context.ngrams:
        if seed is not None and (j := seed.find(tail, n)) is not None and j < len(seed.tokens):
            return seed.tokens[j : j + k], True, None
        if follow is not None and follow + 1 < len(context.tokens) and context.tokens[follow] == last:
            return context.tokens[follow + 1 : follow + 1 + k], False, follow + 1
        follow = None
        if (j := context.find(tail, n)) is not None:
            # The occurrence may be the very end (a loop): its continuation repeats with the loop's period.
            whole = [*context.tokens, last]
            period = len(whole) - j
            return [whole[j + i % period] for i in range(k)], False, j
    return [], False, None


class StepCost:
    """What a decoding forward costs by the positions it computes (rows × step length) and the context they attend
    to, as measured: a decaying average per power-of-two bucket of positions, kept apart for each power-of-two bucket
    of context (the batch's longest row).

    Why not a line a + b·n: the cost is flat while the forward is memory-bound (a few positions: the weights are
    read once whatever n is) and grows with n once it is compute-bound (many rows, or a CPU), and where it turns
    depends on the machine and the model. A line fitted at one batch size misjudges another (fitted on one client's
    drafts it priced eight clients' 9-position steps at a third of their measured 0.42 s, against 0.12 s for a
    plain step: drafting then cost eight clients 25% of their throughput). Buckets measured where the batch runs
    do not, and a bucket no step has reached is tried only one doubling past the largest measured (at that one's
    cost: if the forward is still memory-bound there, drafting longer pays), so a step never goes far into
    positions whose cost nobody knows. The plain step (one position a row) is measured first: nothing is drafted
    before it is.

    Why the context: every position attends to its row's whole cache, so deep in a long context a position costs
    several times one near the start (on a CPU, the attention's softmax is most of a deep forward). Priced by the
    positions alone, a 3,000-token prompt that joined a drafting stream was verified at the stream's shallow price:
    a 595 ms step beside 50 ms plain ones on this CPU, every stream paused for it. A context bucket starts unmeasured
    like any other: plain steps until its plain step is.

    A bucket's first forward is not counted: it is the first of its shapes, and on a GPU MLX builds kernels for new
    shapes as it meets them. On an H200 (MLX's CUDA build, scripts/bench_spec.py) the first round of eight edit
    clients ran at a third of the later rounds' speed, and the rounds at eight drafted little or nothing; a cold
    price, kept, would explain it (the decaying average hardly moves, and a bucket priced out is not tried again)."""

    SHALLOW = 512  # contexts up to this are one bucket

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self._seconds: dict[tuple[int, int], float] = {}  # (context bucket, positions bucket) -> seconds
        self._met: set[tuple[int, int]] = set()  # buckets whose first forward has run (and was not counted)

    @staticmethod
    def bucket(positions: int) -> int:
        return 1 << max(positions - 1, 0).bit_length()

    def _key(self, positions: int, context: int) -> tuple[int, int]:
        return max(self.bucket(context), self.SHALLOW), self.bucket(positions)

    def add(self, positions: int, seconds: float, context: int = 0) -> None:
        key = self._key(positions, context)
        if key not in self._met:
            self._met.add(key)
            return
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def measured(self, positions: int, context: int = 0) -> bool:
        return self._key(positions, context) in self._seconds

    def estimate(self, positions: int, context: int = 0) -> float | None:
        """Seconds for a forward of `positions` over `context`; None where it is not to be tried yet (nothing
        measured at that context, or more than one doubling past what has been)."""
        depth, b = self._key(positions, context)
        seconds = {k: v for (d, k), v in self._seconds.items() if d == depth}
        if not seconds:
            return None
        if b in seconds:
            return seconds[b]
        below = [k for k in seconds if k < b]
        above = [k for k in seconds if k > b]
        if below and above:  # between two measured buckets: interpolated
            lo, hi = max(below), min(above)
            return seconds[lo] + (seconds[hi] - seconds[lo]) * (b - lo) / (hi - lo)
        if above:  # fewer positions than any measured forward cost at most what the smallest did
            return seconds[min(above)]
        top = max(below)
        return seconds[top] if b <= 2 * top else None


@dataclass(eq=False)
class _Row:
    """A sequence in the decode batch."""

    uid: int
    tokens: list[int]  # what its cache holds
    last: int  # the token to feed next (sampled, not yet in the cache); known from the step that drafted
    # `last` is not reported: its prompt's last token, or a first token the prefill stage sampled and reported.
    fresh: bool
    left: int  # tokens it may still generate
    sampler: Sampler | None
    processors: tuple[Any, ...]
    lookup: PromptLookup
    seed: PromptLookup | None  # the client's prediction
    opened: bool = False  # a token of it has been reported (its first is what its client waits for)
    sample_first: bool = False  # joining: its prefill here takes `last` too and samples its first token
    seeded: bool = False  # this step's draft comes from the prediction
    start: int | None = None  # where in `lookup` this step's draft starts (None: not from there)
    follow: int | None = None  # the position in `lookup` of the copy being followed, where `last` should be
    modeled: bool = False  # this step's draft is the draft model's continuation
    drafted_held: int = 0  # of `tokens`, how many the draft model's cache holds
    logprobs: mx.array | None = None  # of `last`
    k: int = K_START
    misses: int = 0
    rest: int = 0  # steps left resting (no drafts)
    rest_next: int = REST_START
    alpha: list[float] = field(default_factory=lambda: [1.0, 2.0])  # accepted, tries (decaying): P(accept next)

    @property
    def draft_length(self) -> int:
        """Draft tokens it asks for this step: its adaptive length, short of its last allowed token."""
        return min(self.k, self.left - 1)

    def wants(self) -> bool:
        return (
            self.rest == 0
            and self.k > 0
            and self.left > 1
            # A processor's first call sees the prompt, not a token it takes: drafts wait for the next step.
            and (
                not self.processors or (not self.fresh and all(getattr(p, "draftable", True) for p in self.processors))
            )
        )


class SpeculativeBatch:
    """The decode stage with speculative decoding (module doc), behind the `Generator` interface: sequences come in
    prefilled (worker.generator.ChunkedPrefill's inner): their cache holds all but the last prompt token, or all of it
    with their first token sampled (`Admission.first`)."""

    def __init__(self, config: GeneratorConfig, stream: Any, stats: DraftStats | None = None) -> None:
        self.model = config.model
        self.stream = stream
        self.prefill_step = config.prefill_step
        self.eos = set(config.eos_ids)
        self.stats = stats if stats is not None else DraftStats()
        self.cost = StepCost()
        self._plain_steps = 0
        self._timing_due = False  # a plain step's timing was put off (`_plain`)
        self._rows: list[_Row] = []
        self._cache: list[RaggedKVCache] = []
        # The draft model (GeneratorConfig.draft_model) and its cache, row for row beside the model's; it catches up
        # with a row's tokens when the row next drafts, a bounded number per step.
        self.draft = config.draft_model if config.draft_model is not None and supports(config.draft_model) else None
        self._draft_cache: list[RaggedKVCache] = []
        self._last: mx.array | None = None  # each row's `last`, possibly still being computed (a plain step's)
        # Admitted, joining at the next step: each with its cache and the prompt tokens still to prefill before `last`.
        self._joining: list[tuple[_Row, list[Any], list[int]]] = []
        self._group_time: tuple[int, float] | None = None  # the last join's prefill: padded tokens, seconds
        self._next_uid = 0
        self._ready: dict[int, Buffers] = {}  # layer -> the zeroed buffers a coming join copies into (`warm`)
        self.ahead_bytes = 0  # theirs (an int: /health reads it from another thread)
        self.room = config.room
        # A sequence may come in with its whole prompt in its cache and its first token sampled (`Admission.first`),
        # or have its first token sampled from its prefill here (`Admission.sample_first`): the model's logits at a
        # prompt's last position alone (None: a model that is not a body under a head, whose prompts' last tokens
        # are fed by the decode step).
        with mx.stream(stream):
            self.last_logits = last_logits(self.model)

    # -- the Generator interface -------------------------------------------------------------------------------------

    # Short prompts come in whole, several at once (worker.generator.ChunkedPrefill's groups): prefilled as they
    # join, together, in one padded forward.
    prefills_together = True
    samples_first = True  # and samples their first tokens from that forward (`Admission.sample_first`)
    # Set by the scheduler (worker.generator.ChunkedPrefill) while prompts wait for their prefill. It gives prefill
    # what a step's target leaves after decoding, so a drafting step that costs more than a plain one takes its time
    # from the prompts waiting: then only drafts about as cheap as a plain step are tried (where the forward is
    # memory-bound). Measured here: eight edit clients at 0.9x drafting off, and 0.75x with steps up to the target.
    prefill_waits: bool = False

    def admit(self, admission: Admission) -> int:
        uid = self._next_uid
        self._next_uid += 1
        cache = admission.cache if admission.cache is not None else make_prompt_cache(self.model)
        sampled = admission.first is not None
        row = _Row(
            uid,
            tokens=list(admission.history),
            # A first token sampled by the prefill stage was reported there: `fresh`, it is fed but not reported again.
            last=admission.first if admission.first is not None else admission.rest[-1],
            fresh=True,
            left=admission.max_tokens - sampled,
            sampler=admission.sampler,
            processors=tuple(admission.processors or ()),
            lookup=PromptLookup([]),
            seed=PromptLookup(list(admission.prediction)) if admission.prediction else None,
            opened=sampled,
            sample_first=admission.sample_first and len(admission.rest) > 1,
        )
        self._joining.append((row, cache, [] if sampled else list(admission.rest[:-1])))
        return uid

    def step(self) -> Step:
        with mx.stream(self.stream):
            return self._step()

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        for j, (row, cache, _) in enumerate(self._joining):
            if row.uid == uid:  # the cache it came with, and the tokens that holds
                del self._joining[j]
                return cache, list(row.tokens)
        i = self._index(uid)
        row = self._rows[i]
        cache = self._take(i)
        self._drop([i])
        return cache, list(row.tokens)

    def remove(self, uid: int) -> None:
        for j, (row, _, _) in enumerate(self._joining):
            if row.uid == uid:
                del self._joining[j]
                return
        self._drop([self._index(uid)])

    def group_time(self) -> tuple[int, float] | None:
        """The padded tokens and seconds of the prefill of the rows that joined since the last call, if any (the
        scheduler's cost model takes them: worker.generator.PrefillCost)."""
        timed, self._group_time = self._group_time, None
        return timed

    def warm(self, end: int, seconds: float) -> float:
        """Make ready, a few layers each call, for up to about `seconds`, the buffers that a prompt whose cache ends at
        `end` will join the batch in (`end` 0: none is coming, the buffers go). The join then copies into memory
        already touched: on this 2-core VM, where the first touch of fresh memory is the join's cost (0.6-0.7 s of the
        step that joined a 3,000-token prompt to a stream, 0.13 s when warm), that cost is spread over the steps before
        it, each of which leaves prefill that much less (worker.generator.ChunkedPrefill.budget). Returns the seconds
        spent."""
        rows = len(self._rows) + len(self._joining) + 1
        joined = [cache.joined_shapes(rows, end) if end > 0 else None for cache in self._cache]
        # Held for up to WARM_STEPS steps, they are memory the batch's reservation does not count: made only within the
        # KV share's free room, else the join makes its buffers as it copies (its step pays the first touch).
        need = sum(_buffer_bytes(s, c) for s, c in zip(joined, self._cache, strict=True) if s is not None)
        if end <= 0 or not self._cache or (self.room is not None and need > self.room()):
            self._ready.clear()
            self.ahead_bytes = 0
            return 0.0
        tic = time.perf_counter()
        for layer, cache in enumerate(self._cache):
            shapes = joined[layer]
            held = self._ready.get(layer)
            if shapes is None or (held is not None and _fits(held, shapes, (held[0].dtype, held[1].dtype))):
                continue
            assert cache.keys is not None and cache.values is not None
            buffers = mx.zeros(shapes[0], cache.keys.dtype), mx.zeros(shapes[1], cache.values.dtype)
            mx.eval(*buffers)
            self._ready[layer] = buffers
            if time.perf_counter() - tic >= seconds:
                break
        self.ahead_bytes = sum(k.nbytes + v.nbytes for k, v in self._ready.values())
        return time.perf_counter() - tic

    # -- a step ------------------------------------------------------------------------------------------------------

    def _step(self) -> Step:
        # Those joining now have their whole prompt in: reported finished, as mlx-lm's batch reports them.
        joined = [Prefilled(row.uid, len(rest) + 1, len(rest) + 1, True) for row, _, rest in self._joining]
        firsts = self._join() if self._joining else []
        if firsts or not self._rows:
            # First tokens sampled in the join's forward go out now, not after a decode forward (a timed or a verifying
            # one is waited for): every row takes its next forward in the next step, which follows at once. Measured
            # on this CPU (SmolLM2, a lone one-line question): 248 ms to its first token, 328 ms fed by the decoder.
            return Step(joined, firsts)
        drafts = self._drafts()
        step = self._plain() if drafts is None or not any(drafts) else self._verify(drafts)
        step.prefilled.extend(joined)
        return step

    def _join(self) -> list[Generated]:
        """The admitted rows join the batch; those with prompt tokens to go are prefilled first, together, by
        mlx-lm's prompt batch (one padded forward, its cache merged as it goes), their last prompt tokens too where
        they `sample_first` (`_prompt_sampled`). Returns the first tokens sampled so."""
        joining, self._joining = self._joining, []
        prefill = [j for j in joining if j[2]]
        ready = [j for j in joining if not j[2]]
        parts: list[list[RaggedKVCache]] = []
        firsts: list[Generated] = []
        if prefill:
            tic = time.perf_counter()
            uids, caches = [r.uid for r, _, _ in prefill], [c for _, c, _ in prefill]
            batch = PromptProcessingBatch(self.model, uids, caches, prefill_step_size=self.prefill_step)
            sampled = self.last_logits is not None and all(row.sample_first for row, _, _ in prefill)
            padded = len(prefill) * (max(len(rest) for _, _, rest in prefill) + sampled)
            if sampled:
                prefill, firsts = self._prompt_sampled(batch, prefill)
            else:
                batch.prompt([rest for _, _, rest in prefill])  # evaluated: its time is the forward's
                for row, _, rest in prefill:
                    row.tokens += rest
            self._group_time = (padded, time.perf_counter() - tic)
            if prefill:
                parts.append([RaggedKVCache.of(c) for c in batch.prompt_cache])
        if not prefill and not ready:
            return firsts  # every one ended on its first token
        for _, cache, _ in ready:  # each as it is: `RaggedKVCache.extend` copies them all once
            parts.append([RaggedKVCache.single(c) for c in cache])
        rows = [r for r, _, _ in prefill + ready]
        for row in rows:
            row.lookup.extend(row.tokens)
        if not self._cache:
            self._cache, parts = parts[0], parts[1:]
        if parts:
            for layer, mine in enumerate(self._cache):
                mine.extend(*(part[layer] for part in parts), into=self._ready.pop(layer, None))
        self._ready.clear()
        self.ahead_bytes = 0
        if self.draft is not None:  # empty rows: they catch up when they draft
            empty = [RaggedKVCache([0] * len(rows), [0] * len(rows)) for _ in make_prompt_cache(self.draft)]
            if self._draft_cache:
                for mine, theirs in zip(self._draft_cache, empty, strict=True):
                    mine.extend(theirs)
            else:
                self._draft_cache = empty
        lasts = mx.array([r.last for r in rows], dtype=mx.uint32)
        self._last = lasts if self._last is None else mx.concatenate([self._last, lasts])
        self._rows.extend(rows)
        return firsts

    def _prompt_sampled(
        self, batch: PromptProcessingBatch, prefill: list[tuple[_Row, list[Any], list[int]]]
    ) -> tuple[list[tuple[_Row, list[Any], list[int]]], list[Generated]]:
        """Prefill the rows' rests and their last prompt tokens (`last`) in one forward into mlx-lm's prompt batch's
        cache, right-padded as its `prompt` pads them, and sample each row's first token from its last token's logits
        alone (`last_logits`), as the prefill stage samples a prompt's (worker.generator.sample_first): their first
        tokens then come with this step, not after a decode forward of their last prompt tokens. A row that ends on
        its first token leaves at once with its cache. Returns the rows that join and the first tokens."""
        assert self.last_logits is not None
        fed = [rest + [row.last] for row, _, rest in prefill]
        lengths = [len(f) for f in fed]
        width = max(lengths)
        padding = [width - n for n in lengths]
        if max(padding) > 0:
            for c in batch.prompt_cache:
                c.prepare(lengths=lengths, right_padding=padding)
        inputs = mx.array([f + [0] * (width - len(f)) for f in fed], dtype=mx.uint32)
        logits = self.last_logits(inputs, batch.prompt_cache, mx.array([n - 1 for n in lengths]))
        sampled = []
        for i, ((row, _, _), seq) in enumerate(zip(prefill, fed, strict=True)):
            row.tokens += seq
            sampled.append(sample_first(logits[i : i + 1], row.tokens, row.processors, row.sampler))
        if max(padding) > 0:
            for c in batch.prompt_cache:
                c.finalize()
        tokens = mx.concatenate([t for t, _ in sampled])
        mx.eval([c.state for c in batch.prompt_cache], tokens, [lp for _, lp in sampled])
        mx.clear_cache()
        joining, firsts, ended = [], [], []
        for i, (j, token, (_, logprobs)) in enumerate(zip(prefill, ints(tokens), sampled, strict=True)):
            row = j[0]
            row.last, row.left, row.opened = token, row.left - 1, True  # fed next, not reported again (`fresh`)
            reason = finish_reason(token, self.eos, row.left)
            cache = batch.extract_cache(i) if reason else None
            firsts.append(Generated(row.uid, token, logprobs[0], reason, cache, list(row.tokens) if reason else None))
            if reason:
                ended.append(i)
            else:
                joining.append(j)
        if ended and joining:
            for c in batch.prompt_cache:
                c.filter([i for i in range(len(prefill)) if i not in ended])
        return joining, firsts

    def _drafts(self) -> list[list[int]] | None:
        """Each row's draft; None when no row tries to draft in this step (then its tokens need not be read yet).
        When every draft is cut (`_trim`), the step decodes plainly."""
        for row in self._rows:
            row.rest = max(row.rest - 1, 0)
        # Whether drafts could pay at all is decided before the last tokens are read: reading them waits for the
        # previous forward, which a plain step would not (its next forward is queued first), and that wait costs
        # a step about what drafting gains (measured: 8 clients at 0.8x with every step reading them).
        if self._best_length([row.draft_length if row.wants() else 0 for row in self._rows]) == 1:
            return None
        assert self._last is not None
        for row, last in zip(self._rows, ints(self._last), strict=True):
            row.last = last
        drafts: list[list[int]] = []
        for row in self._rows:
            row.modeled, row.start = False, None
            if not row.wants():
                drafts.append([])
                continue
            draft, row.seeded, row.start = lookup_draft(row.lookup, row.last, row.draft_length, row.seed, row.follow)
            drafts.append(draft)
        if self.draft is not None and any(row.wants() and not d for row, d in zip(self._rows, drafts, strict=True)):
            drafts = self._modeled(drafts)
        for i, row in enumerate(self._rows):
            draft = drafts[i]
            if not row.wants():
                continue
            for processor in row.processors:  # a grammar cuts the draft where it would refuse a token
                if draft and hasattr(processor, "allowed"):
                    draft = draft[: max(processor.allowed([row.last, *draft]) - 1, 0)]
            if not draft:
                self._missed(row)
            drafts[i] = draft
        return self._trim(drafts)

    def _modeled(self, drafts: list[list[int]]) -> list[list[int]]:
        """The draft model's greedy continuation for the rows that want a draft and found none by lookup. Its
        cache first catches up with each row's tokens (at most CATCH_UP a step; a row further behind does not draft
        this step), then it runs one forward per draft token for every row together. Greedy drafts are point
        masses: the acceptance rule stays exact for sampled rows (module doc)."""
        assert self.draft is not None
        feeds, wanting = [], []
        for row, d in zip(self._rows, drafts, strict=True):
            behind = row.tokens[row.drafted_held :]
            if row.wants() and not d and len(behind) < CATCH_UP:
                feeds.append([*behind, row.last])
                wanting.append(True)
            else:
                feeds.append(behind[:CATCH_UP])
                wanting.append(False)
        k = max((row.draft_length for row, w in zip(self._rows, wanting, strict=True) if w), default=0)
        if k <= 0:
            return drafts
        width = max(max(len(f) for f in feeds), 1)
        inputs = mx.array([f + [0] * (width - len(f)) for f in feeds], dtype=mx.uint32)
        logits = self.draft(inputs, cache=self._draft_cache)
        at = mx.array([max(len(f) - 1, 0) for f in feeds])
        token = mx.argmax(logits[mx.arange(len(feeds)), at], axis=-1)
        for c in self._draft_cache:
            c.advance([len(f) for f in feeds])
        chain = [token]
        for _ in range(k - 1):
            logits = self.draft(token[:, None], cache=self._draft_cache)
            token = mx.argmax(logits[:, -1], axis=-1)
            for c in self._draft_cache:
                c.advance([1] * len(feeds))
            chain.append(token)
        continuation = cast(list[list[int]], mx.stack(chain, axis=1).tolist())
        out = list(drafts)
        for i, (row, f, w) in enumerate(zip(self._rows, feeds, wanting, strict=True)):
            # What its cache holds for certain: the tokens fed (a wanting row's `last` included); its drafts'
            # are counted back in when they are accepted (`_verify`).
            row.drafted_held += len(f)
            if w:
                out[i] = continuation[i][: row.draft_length]
                row.modeled, row.start = True, None
        return out

    def _trim(self, drafts: list[list[int]]) -> list[list[int]]:
        """Cut the drafts to the step length that yields the most tokens per second (`_best_length`). Drafting that
        does not pay at this batch's size is not a failed draft: the rows do not rest for it (they would rest in
        turn, and with most rows resting no step's drafts would ever pay); the step is plain."""
        best = self._best_length([len(d) for d in drafts])
        return [d[: best - 1] for d in drafts]

    def _best_length(self, lengths: list[int]) -> int:
        """The step length (1 + drafts) for rows with drafts of these lengths that maximizes the geometric mean of
        the rows' expected tokens per second: each row expects its accepted prefix (its acceptance rate per token),
        and every row waits for the whole forward, priced by its positions (`StepCost`). 1: drafting does not pay.

        Why not the batch's total tokens per second: each client waits for its own answer. Eight essays, a few of
        them repeating themselves, drafted where their copies made the total grow while every other row's step got
        dearer: the batch ran at 0.82x drafting off (scripts/bench_concurrency.py, 8 clients). The geometric mean
        (proportional fairness) drafts when the rows' gains outweigh what all of them pay; for one row, or rows that
        all copy, it is the total's choice."""
        rates = [row.alpha[0] / row.alpha[1] for row in self._rows]
        margin = len(lengths) * math.log(1.02)  # a longer step must pay for itself clearly: 2% a row
        best, best_score, plain = 1, -math.inf, 0.0
        context = self._context()
        for length in range(1, max(lengths, default=0) + 2):
            seconds = self.cost.estimate(len(lengths) * length, context)
            if seconds is None or (length > 1 and self.prefill_waits and seconds > PREFILL_WAITS_COST * plain):
                break
            if length == 1:
                plain = seconds
            score = sum(
                math.log(1 + sum(r**j for j in range(1, min(n, length - 1) + 1)))
                for n, r in zip(lengths, rates, strict=True)
            ) - len(lengths) * math.log(seconds)
            if score > best_score + (margin if length > 1 else 0.0):
                best, best_score = length, score
        return best

    def _plain(self) -> Step:
        """One token per row, the next forward queued before this step's tokens are read (mlx-lm's decode step)."""
        assert self._last is not None
        inputs = self._last
        # A plain step's forward is timed (so not pipelined) where its cost is not known, and now and then: the
        # price drafting is weighed against (`_trim`). Between steps the scheduler may prefill, so the time between
        # pipelined steps would not tell it.
        context = self._context()
        due = self._timing_due or not self.cost.measured(len(self._rows), context)
        due = due or self._plain_steps % PLAIN_TIMED_EVERY == 0
        # Not a step that reports a row's first token: a timed step reads its tokens after its own forward, which
        # would then be in that row's time to first token (a decode step: 4 ms for the tiny model on this CPU, 70 ms
        # for SmolLM2). The timing is due still, at the next step that may take it.
        timed = due and all(row.fresh or row.opened for row in self._rows)
        self._timing_due = due and not timed
        self._plain_steps += 1
        if timed:
            mx.eval(inputs)
            tic = time.perf_counter()
        logprobs = self._forward(inputs[:, None])
        sampled = self._sample(logprobs)[:, 0]
        previous = [row.logprobs for row in self._rows]
        now = [logprobs[i, 0] for i in range(len(self._rows))]
        if timed:
            mx.eval(sampled, now)
            self.cost.add(len(self._rows), time.perf_counter() - tic, context)
        mx.async_eval(sampled, now)
        mx.eval(inputs, [p for p in previous if p is not None])
        out: list[list[tuple[int, mx.array | None]]] = []
        for row, token, lp, nxt in zip(self._rows, ints(inputs), previous, now, strict=True):
            out.append([] if row.fresh else [(token, lp)])
            row.tokens.append(token)
            row.lookup.extend([token])
            row.logprobs, row.fresh, row.follow = nxt, False, None
        self._last = sampled
        return self._finish(out, [1] * len(self._rows))

    def _verify(self, drafts: list[list[int]]) -> Step:
        """Every row's last token and drafts in one forward; each row keeps the drafts its samples confirm."""
        length = 1 + max(len(d) for d in drafts)
        inputs = []
        for row, d in zip(self._rows, drafts, strict=True):
            fed = [row.last, *d]
            inputs.append(fed + [fed[-1]] * (length - len(fed)))
        context = self._context()
        tic = time.perf_counter()
        logprobs = self._forward(mx.array(inputs, dtype=mx.uint32), [1 + len(d) for d in drafts])
        targets = self._sample(logprobs)
        previous = [row.logprobs for row in self._rows]
        mx.eval(targets, [p for p in previous if p is not None])
        self.cost.add(len(self._rows) * length, time.perf_counter() - tic, context)
        out: list[list[tuple[int, mx.array | None]]] = []
        fed_all, lasts, predicted = [], [], []
        for i, (row, d, t) in enumerate(zip(self._rows, drafts, cast(list[list[int]], targets.tolist()), strict=True)):
            accepted = 0
            while accepted < len(d) and t[accepted] == d[accepted]:
                accepted += 1
            fed = [row.last, *d[:accepted]]
            # What it reports: its last token (unless that is its prompt's) and the accepted drafts.
            out.append(
                ([] if row.fresh else [(row.last, previous[i])]) + [(d[j], logprobs[i, j]) for j in range(accepted)]
            )
            fed_all.append(fed)
            predicted.append((accepted, len(d) - accepted) if row.seeded and d else (0, 0))
            if row.modeled:  # the draft model's cache holds the accepted drafts it fed (all but its last)
                row.drafted_held += min(accepted, max(len(d) - 1, 0))
            for processor in row.processors if d else ():  # a grammar took every draft: it forgets the rejected
                if hasattr(processor, "rollback"):
                    processor.rollback(len(d) - accepted)
            if isinstance(row.sampler, SeededSampler):  # a seeded sampler drew every position: it hands back the unkept
                row.sampler.rollback(length - 1 - accepted)
            row.fresh = False
            row.last, row.logprobs = t[accepted], logprobs[i, accepted]
            # Where its new last token sits in the copy it drafted from, if that is what it is copying.
            row.follow = row.start + accepted if row.start is not None else None
            lasts.append(row.last)
            if d:
                self._adapt(row, len(d), accepted)
        self._last = mx.array(lasts, dtype=mx.uint32)
        return self._finish(out, [len(f) for f in fed_all], fed_all, predicted)

    def _finish(
        self,
        out: list[list[tuple[int, mx.array | None]]],
        kept: list[int],
        fed: list[list[int]] | None = None,
        predicted: list[tuple[int, int]] | None = None,
    ) -> Step:
        """Report each row's tokens of the step, ending those that reach an end-of-sequence token or their length;
        each row's cache keeps what it fed up to there (`fed`: the tokens, when not yet in its `tokens`). A row's
        first token carries its drafts from the prediction (`predicted`: accepted, rejected)."""
        generated: list[Generated] = []
        ended: dict[int, int] = {}  # row -> the index of its last Generated
        for i, (row, tokens) in enumerate(zip(self._rows, out, strict=True)):
            row.opened = row.opened or bool(tokens)
            for j, (token, lp) in enumerate(tokens):
                assert lp is not None
                row.left -= 1
                reason = finish_reason(token, self.eos, row.left)
                prediction = predicted[i] if predicted is not None and j == 0 else (0, 0)
                generated.append(Generated(row.uid, token, lp, reason, prediction=prediction))
                if reason is not None:
                    kept[i] -= len(tokens) - 1 - j  # the tokens after it were fed but are not its
                    ended[i] = len(generated) - 1
                    break
            if fed is not None:
                row.tokens.extend(fed[i][: kept[i]])
                row.lookup.extend(fed[i][: kept[i]])
        for c in self._cache:
            c.advance(kept)
        if self._draft_cache:  # past what it holds for certain: the next catch-up writes over it
            held = [min(row.drafted_held, len(row.tokens)) for row in self._rows]
            for c in self._draft_cache:
                c.rewind(held)
        for i, at in ended.items():
            # The cache and the tokens it holds go with the last token (the prefix cache keeps them).
            g = generated[at]
            generated[at] = replace(g, cache=self._take(i), tokens=list(self._rows[i].tokens))
        self.stats.steps += 1
        self.stats.tokens += len(generated)
        self._drop(list(ended))
        return Step([], generated)

    def _take(self, i: int) -> list[Any]:
        return [c.extract(i) for c in self._cache]

    def _forward(self, inputs: mx.array, fed: list[int] | None = None) -> mx.array:
        """Log-probabilities [B, L, V] of the rows' next tokens. A row with processors has them applied at each of
        its first `fed[i]` positions (1 each when None), with its tokens up to that position as the context."""
        logits = self.model(inputs, cache=self._cache)
        if any(row.processors for row in self._rows):
            rows = []
            for i, row in enumerate(self._rows):
                x = logits[i]
                if row.processors:
                    n = fed[i] if fed is not None else 1
                    held = mx.array(row.tokens, dtype=mx.uint32)
                    positions = []
                    for j in range(n):
                        context = mx.concatenate([held, inputs[i, : j + 1].astype(mx.uint32)])
                        position = x[j : j + 1]
                        for processor in row.processors:
                            position = processor(context, position)
                        positions.append(position)
                    x = mx.concatenate([*positions, x[n:]]) if x.shape[0] > n else mx.concatenate(positions)
                rows.append(x)
            logits = mx.stack(rows)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def _sample(self, logprobs: mx.array) -> mx.array:
        """Target tokens [B, L]: one argmax for the greedy rows, each sampled row's own sampler over its positions."""
        greedy = mx.argmax(logprobs, axis=-1)
        if all(row.sampler is None for row in self._rows):
            return greedy
        return mx.stack(
            [greedy[i] if row.sampler is None else row.sampler(logprobs[i]) for i, row in enumerate(self._rows)]
        ).astype(greedy.dtype)

    def _adapt(self, row: _Row, drafted: int, accepted: int) -> None:
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        row.alpha = [0.8 * row.alpha[0] + accepted, 0.8 * row.alpha[1] + accepted + (accepted < drafted)]
        if accepted == drafted:
            row.k = min(row.k * 2, K_MAX)
        elif accepted:
            row.k = max(accepted + 1, 2)
        if accepted:
            row.misses, row.rest_next = 0, REST_START
        else:
            self._missed(row)

    def _missed(self, row: _Row) -> None:
        row.misses += 1
        if row.misses >= MISSES:
            row.misses, row.rest = 0, row.rest_next
            row.rest_next = min(row.rest_next * 2, REST_MAX)

    def _context(self) -> int:
        """The positions the batch's next forward attends to: its longest row's."""
        return max(self._cache[0].ends, default=0) if self._cache else 0

    def _index(self, uid: int) -> int:
        return next(i for i, row in enumerate(self._rows) if row.uid == uid)

    def _drop(self, indices: list[int]) -> None:
        if not indices:
            return
        keep = [i for i in range(len(self._rows)) if i not in set(indices)]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._draft_cache, self._last = [], [], None
            return
        for c in [*self._cache, *self._draft_cache]:
            c.filter(keep)
        assert self._last is not None
        self._last = self._last[mx.array(keep)]
