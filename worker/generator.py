"""The seam between the batcher and whatever decodes: the batcher admits sequences, steps the generator, and takes
sequences out with their KV cache, through `Generator` alone. mlx-lm's `BatchGenerator` decodes
(`MlxBatchGenerator`); `ChunkedPrefill` prefills in front of it, within a time budget per step (the default);
speculative decoding or another cache kind is another implementation, not a change to the batcher's scheduling.

The dataclasses here are the generator-neutral form of what goes in and comes out of a step.

The prefill stage (`ChunkedPrefill`, issue 25: nobody waits behind somebody else's prompt). mlx-lm's prompt batch
prefills every prompt in it together, padded, in fixed chunks: a one-line question that arrives behind a long prompt
waits for it, and every decoding stream pauses for each whole chunk. Here, as vLLM's chunked prefill and
Sarathi-Serve do, each step first decodes the running sequences (one step of mlx-lm's decode batch), then spends a
token budget on prefill chunks of the waiting prompts, one prompt at a time (batch 1, no padding, each in its own
cache): interactive before low priority, then the owner (API key, or session) that has had the least prefill for
its weight, then the prompt with the fewest tokens left. A short prompt that arrives behind a long one is prefilled in
the next step, and the long one loses only that short prompt's tokens. A prompt whose tokens are all in its cache but
the last one goes on to mlx-lm's batch, which decodes from there as from any prefix-cache hit; where the decode batch
is ours (worker.speculative), the last chunk takes the last token too and its forward gives the first token, one
forward sooner than mlx-lm's batch, which feeds the prompt's last token in a decode step of its own.

The budget is time: about `GeneratorConfig.step_ms` per step, decode included. What a chunk costs (a fixed cost per
forward, a cost per token, and one per pair of a token and one it attends to, which deep in a long prompt is most of
it) is measured over the chunks actually run, so the budget follows the machine, the model and the context length
without a setting per model. Beside decoding sequences a step runs longer, up to the bound a stream pauses for, where
the decode forward would otherwise take more than OVERHEAD_SHARE of it (a small CPU), so a long prompt beside a stream
pays little for it (`budget`, `step_s`). Beside them, a long prompt's memory is made ahead of the step that would
touch it first, a share of the steps before (`OWN_WARM_MIN`: its own cache; `JOIN_APART`: the decode batch's buffer it
joins), since a first touch of fresh memory was most of what those steps cost on a small CPU.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

from worker.boundaries import MIN_GAP
from worker.sequence import Sampler

log = logging.getLogger(__name__)

# A step's target length, decode included (MLXQ_STEP_TARGET_MS): what a newcomer waits for the step in progress and
# a decoding stream pauses at most, about. See `ChunkedPrefill.budget`.
DEFAULT_STEP_MS = 150.0


@dataclass(frozen=True)
class GeneratorConfig:
    """What a generator is made with: the model, the tokens that end a sequence, and the batch's sizes."""

    model: nn.Module
    eos_ids: tuple[int, ...]
    batch_size: int  # sequences decoded together
    prefill_batch_size: int  # sequences prefilled together
    prefill_step: int  # tokens per sequence in one prefill chunk
    # Each step's target length in ms, decode included (`ChunkedPrefill`); 0: mlx-lm's own prefill (fixed chunks of
    # `prefill_step` tokens of every prompt in its prompt batch together).
    step_ms: float = DEFAULT_STEP_MS
    # Speculative decoding in the decode batch (worker.speculative): "lookup" (prompt lookup) or "off".
    speculative: str = "off"
    draft_stats: Any = None  # a worker.speculative.DraftStats that the decode batch counts into; None: its own
    # A small model of the same tokenizer whose greedy continuation drafts where prompt lookup finds nothing.
    draft_model: nn.Module | None = None
    # True when an interactive request has come in since the engine last admitted (worker.batcher): a step's prefill
    # ends after the chunk under way, and the newcomer is admitted then rather than after the step's whole budget.
    arrived: Callable[[], bool] | None = None
    # Called on the engine thread with the decode batch's output as soon as it is out, before the step's prefill
    # chunks (`ChunkedPrefill`), which then no longer hold every stream's token and a newcomer's first one for up to
    # MAX_STEP targets; the step returns the rest. None: the step returns it all.
    decoded: Callable[[Step], None] | None = None
    # The most tokens one prompt's chunk may take (`ChunkedPrefill.chunk_size`); 0: `prefill_step`. The engine
    # allows the prefill share's tokens (prefill_step × prefill_batch_size) where every layer's cache grows with the
    # sequence (worker.engine: not for windows or recurrent layers).
    long_chunk: int = 0
    # Bytes the KV share has free beside the batch's reservation and the parked caches (worker.batcher): a join's
    # buffers are made ahead of it (`SpeculativeBatch.warm`) only within them. None: no bound.
    room: Callable[[], int] | None = None


@dataclass(frozen=True)
class Admission:
    """One sequence handed to the generator."""

    rest: list[int]  # prompt tokens still to prefill (the cache holds those before them)
    max_tokens: int  # tokens it may still generate
    cache: list[Any] | None  # its KV cache so far (prefix cache, or its own when it was parked); None: a new one
    history: list[int]  # the tokens that cache holds: logits processors (penalties) see them
    sampler: Sampler | None  # None: greedy (one batched argmax for every greedy sequence)
    processors: list[Any]
    # Prompt positions (counted from the start of `history`) to hand its cache back at, as a `Checkpoint`
    # (worker.boundaries): prefill stops there, so the cache then holds exactly that prefix.
    checkpoints: tuple[int, ...] = ()
    # The answer the client expects (OpenAI's `prediction`), tokenized: it seeds speculative drafts.
    prediction: tuple[int, ...] = ()
    # Who waits for it, for the prefill order (`ChunkedPrefill`): interactive before low, then by owner's share.
    priority: str = "interactive"
    owner: str = ""  # an API key's id, or a session; "" for none
    weight: float = 1.0  # the owner's weight in its fair share
    # A client reads its tokens as they come (a stream): while it decodes, others' prefill may pause it only for a
    # bounded step. A sync request, a job or a batch line sees its answer whole, so what counts is when it ends.
    watched: bool = True
    # Its whole prompt is in `cache` (`rest` empty) and its first token was sampled from the prefill's last forward
    # (`ChunkedPrefill`, where the decode batch has `last_logits`): already reported, it is the decoder's first input.
    first: int | None = None
    # It comes whole with others (`ChunkedPrefill`'s group) and the decode batch prefills its last prompt token with
    # the rest, its first token sampled from that forward (where the decode batch has `last_logits`, and `_merges`).
    sample_first: bool = False


@dataclass(frozen=True)
class Prefilled:
    """Prefill progress of one sequence in this step."""

    uid: int
    done: int
    total: int
    finished: bool  # its whole prompt is in: tokens come from the next step


@dataclass(frozen=True)
class Generated:
    """One generated token."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None  # "stop" (an end-of-sequence token) or "length" when it ended the sequence
    # When the generator ended the sequence: its KV cache and the tokens it holds (for the prefix cache).
    cache: list[Any] | None = None
    tokens: list[int] | None = None
    # Draft tokens from the client's prediction verified with this token's step: (accepted, rejected).
    prediction: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Checkpoint:
    """A copy of a sequence's cache taken at one of its `Admission.checkpoints`; the sequence goes on."""

    uid: int
    cache: list[Any]  # may still view the batch's buffers: worker.prefix_cache.materialize copies them
    tokens: list[int]  # the whole prefix that cache holds


@dataclass(frozen=True)
class Step:
    prefilled: list[Prefilled]
    generated: list[Generated]
    checkpoints: list[Checkpoint] = field(default_factory=list)


class Generator(Protocol):
    def admit(self, admission: Admission) -> int:
        """Queue a sequence for prefill; its uid, by which the step's output names it."""
        ...

    def step(self) -> Step:
        """One decoding step for the sequences past prefill, and prefill chunks for the others (a bounded amount:
        the step stays short); the caches of those whose prefill reached one of their checkpoints."""
        ...

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        """Take a sequence out, with its KV cache and the tokens that cache holds."""
        ...

    def remove(self, uid: int) -> None:
        """Take a sequence out, dropping its cache."""
        ...


# Called on the engine thread with that thread's stream: MLX streams belong to the thread that runs them.
GeneratorFactory = Callable[[GeneratorConfig, Any], Generator]


class MlxBatchGenerator:
    """mlx-lm's continuous batching behind the `Generator` interface."""

    # Sequences admitted with several prompt tokens to go are prefilled together in one padded forward.
    prefills_together = True
    # It takes no sequence whose first token it must sample from that forward (`Admission.sample_first`).
    samples_first = False

    def __init__(self, config: GeneratorConfig, stream: Any) -> None:
        self._gen = BatchGenerator(
            config.model,
            stop_tokens=[[t] for t in config.eos_ids],
            completion_batch_size=config.batch_size,
            prefill_batch_size=config.prefill_batch_size,
            prefill_step_size=config.prefill_step,
            stream=stream,
        )
        # uid -> (tokens its cache held when admitted, the absolute positions still to hand back).
        self._checkpoints: dict[int, tuple[int, set[int]]] = {}
        self._stats = config.draft_stats  # its decode steps and their tokens (/health), as the drafting batch counts
        # A sequence may come in with its whole prompt in its cache and its first token sampled by the prefill stage
        # (`Admission.first`), from the model's logits at the prompt's last position alone (None: a model that is not
        # a body under a head). mlx-lm's batch hands a sequence's first token out a decode step after the forward of
        # its last prompt token (its decode runs a step ahead), so a prompt it finished waited two decode forwards
        # for it: a real-size Gemma 3's later turns on this CPU came ~150 ms after mlx_lm.server's.
        with mx.stream(stream):
            self.last_logits = last_logits(config.model)

    def admit(self, admission: Admission) -> int:
        if admission.first is not None:
            # Its first token was reported by the prefill stage: it is mlx-lm's last input, and its first answer the
            # second token.
            admission = replace(admission, rest=[admission.first], max_tokens=admission.max_tokens - 1)
        # The prompt goes in as segments ending at the checkpoints: mlx-lm's prefill never crosses a segment's end
        # in one chunk and reports it (`end_of_segment`), as mlx_lm.server takes its own checkpoints.
        base, rest = len(admission.history), admission.rest
        cuts = sorted({p - base for p in admission.checkpoints if 0 < p - base < len(rest)})
        segments, start = [], 0
        for cut in cuts:
            segments.append(rest[start:cut])
            start = cut
        segments.append(rest[start:])
        # mlx-lm takes None entries (a new cache; the generator's own sampler), though its hints say otherwise.
        caches: list[Any] = [admission.cache]
        samplers: list[Any] = [admission.sampler]
        (uid,) = self._gen.insert_segments(
            [segments],
            max_tokens=[admission.max_tokens],
            caches=caches,
            all_tokens=[admission.history],
            samplers=samplers,
            logits_processors=[admission.processors],
        )
        if cuts:
            self._checkpoints[int(uid)] = (base, {base + c for c in cuts})
        return int(uid)

    def step(self) -> Step:
        prompt_responses, responses = self._gen.next()
        if responses and self._stats is not None:
            self._stats.steps += 1
            self._stats.tokens += len(responses)
        wanted = []
        for p in prompt_responses:
            if p.uid not in self._checkpoints:
                continue
            base, positions = self._checkpoints[p.uid]
            if p.end_of_prompt:
                del self._checkpoints[p.uid]
            elif p.end_of_segment and base + p.progress[0] in positions:
                wanted.append(p.uid)
        checkpoints = []
        if wanted:
            # After next() the chunk is in: each cache holds exactly the tokens up to its segment's end. The token
            # list is the batch's own, which it goes on appending to: copied.
            for uid, (cache, tokens) in self._gen.extract_cache(wanted).items():
                checkpoints.append(Checkpoint(int(uid), cache, list(tokens)))
        return Step(
            prefilled=[Prefilled(p.uid, p.progress[0], p.progress[1], p.end_of_prompt) for p in prompt_responses],
            generated=[
                Generated(r.uid, r.token, r.logprobs, r.finish_reason, r.prompt_cache, r.all_tokens) for r in responses
            ],
            checkpoints=checkpoints,
        )

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        self._checkpoints.pop(uid, None)
        cache, tokens = self._gen.remove([uid], return_prompt_caches=True)[uid]
        return cache, tokens

    def remove(self, uid: int) -> None:
        self._checkpoints.pop(uid, None)
        self._gen.remove([uid])


PRIORITY_RANK = {"interactive": 0, "low": 1}
MIN_BUDGET = 16  # prefill tokens per step, at least
FIRST_BUDGET = 64  # before any chunk has been timed
# A chunk at least this many times its forward's fixed cost (75% of the peak prefill rate): where one forward alone
# takes about the step's target (a CPU), steps run longer rather than prefill at a fraction of the machine's speed.
EFFICIENT_CHUNK = 3.0
# A step's prefill never runs past this many times the target by the plain average cost per token of the recent chunks
# (their fixed costs spread over their tokens, so it errs long). A fit bent by noise (a fixed cost that is really a
# busy machine's jitter) once made that floor thousands of tokens: a 37 s step, a newcomer and every decoding stream
# held for a whole prefill. Measured on this 2-core CPU (SmolLM2, a 3,000-token prompt beside a decoding stream).
MAX_STEP = 3.0
SLOW_STEP = 3.0  # a step this many times its expected cost is logged (`ChunkedPrefill._log_slow`)
# Beside decoding sequences, the decode forward (what a stream adds to a long prompt's prefill) is at most this share of
# a step: the step runs longer, up to PAUSE_SHARE of MAX_STEP targets, rather than leave a long prompt a step's remains.
# 1 - 1/1.15: the bound on what a long prompt pays beside a stream. With 150 ms steps on this 2-core CPU (a
# decode forward 70 ms, a chunk's fixed cost 60 ms) a 3,000-token prompt's first token came 1.6x its time alone
# (scripts/bench_steps.py --parts pause). On a GPU, where a decode forward is a few ms, steps keep their target: there
# it is also most of what a newcomer waits for (an H200's idle time to first token is about 50 ms).
OVERHEAD_SHARE = 0.13
# Of MAX_STEP targets, what such a step aims at: steps on this CPU ran up to a fifth past their estimate (a busy VM).
PAUSE_SHARE = 0.9
# A prompt prefilled over at least this many chunks joins a decoding batch in a step of its own, its last chunk one
# token (`ChunkedPrefill._prefill`): the join copies its whole cache, and the batch's rows to its length, into a new
# buffer, and the next decode forward reads it all, every stream paused for both. On this 2-core CPU the step that ran a
# 3,000-token prompt's last 19 tokens (0.34 s, deep in their context) and then joined it paused a stream 1.2-1.3 s
# (scripts/bench_steps.py --parts pause). Over so many chunks the step it loses is a few percent of its prefill; a
# prompt of fewer (any prompt on a GPU, where a step takes thousands of tokens) joins in the step its last chunk runs.
JOIN_APART = 16
# Such a prompt's join buffers are made ready (`SpeculativeBatch.warm`) in the steps before it, from this many steps'
# budgets before its end, at most this share of each step.
WARM_STEPS, WARM_SHARE = 24, 0.15
# A prompt of at least this many tokens admitted beside decoding sequences has its cache's buffers (reserved whole for
# its prefill, `_reserve`) made over the steps before its first chunk (`ChunkedPrefill._warm_own`), a share of each or,
# while no other prompt is ready, the prefill's part: made in its first chunk they were a first touch of the whole
# cache's memory at once, and on this CPU a stream paused 0.98 s as a 6,000-token prompt's prefill began.
OWN_WARM_MIN = 1024
_N_SCALE, _Q_SCALE = 256.0, float(1 << 20)  # a chunk's tokens and pairs (`pairs`), in units near their usual size


class PrefillCost:
    """What a prefill chunk costs, as measured: a forward of n tokens takes about `a + b·n` seconds (a: its fixed cost,
    the weights read once and the kernels launched; b: per token), fitted by least squares over the chunks run, older
    ones decaying; and the decode step's seconds (an average, older ones decaying).

    Where in its context a chunk sits matters too: its tokens attend to every token before them, so deep in a long
    prompt a token costs several times one at the start (on a CPU, 15 ms against 4 at 2,500 tokens of context, 29 at
    5,500). `fit_depth` tells that apart, a cost per pair of a token and one it attends to (`pairs`), so that a step
    deep in a long prompt is sized by what its chunk will cost there, not by the chunks before it. What a newcomer's
    tokens cost is measured apart too (`at_start`): the chunks that start within `START` tokens of their context."""

    # A chunk this near the start of its context costs about what a newcomer's does.
    START = 512

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self._sums = [0.0] * 5  # weights, n, t, n·n, n·t
        self._fitted: tuple[float, float] | None = None  # the last fit that told the fixed cost apart
        self.decode_s = 0.0
        self.last = 0.0  # the last chunk's seconds per token
        self._start = (0.0, 0.0)  # tokens, seconds of the chunks near the start of their context, decaying
        # The normal equations of t = a + b·n + c·pairs, decaying: the 3x3 X'X (upper triangle) and X't.
        self._depth_sums = [0.0] * 9
        self._depth_fitted: tuple[float, float, float] | None = None

    def add(self, tokens: int, seconds: float, depth: int = 0) -> None:
        """A forward of `tokens` tokens after `depth` tokens of context took `seconds`."""
        self.last = seconds / tokens
        new = (1.0, tokens, seconds, tokens * tokens, tokens * seconds)
        self._sums = [self.decay * s + x for s, x in zip(self._sums, new, strict=True)]
        n, q = tokens / _N_SCALE, pairs(tokens, depth) / _Q_SCALE  # of one magnitude: a well-conditioned solve
        row = (1.0, n, q, n * n, n * q, q * q, seconds, n * seconds, q * seconds)
        self._depth_sums = [self.decay * s + x for s, x in zip(self._depth_sums, row, strict=True)]
        if depth < self.START:
            n, t = self._start
            self._start = (self.decay * n + tokens, self.decay * t + seconds)

    @property
    def at_start(self) -> float | None:
        """Seconds per token, fixed costs included, of the recent chunks near the start of their context (what a
        newcomer's cost); None before any."""
        n, t = self._start
        return t / n if n > 0 and t > 0 else None

    def add_decode(self, seconds: float) -> None:
        self.decode_s = seconds if not self.decode_s else self.decay * self.decode_s + (1 - self.decay) * seconds

    def fit(self) -> tuple[float, float] | None:
        """(a, b); None before any chunk. Recent chunks all of about one size (or timings that noise bent into a
        negative cost) tell no fixed cost apart: then the last fit that did, else a = 0 and b the average seconds per
        token."""
        w, n, t, nn, nt = self._sums
        if n <= 0 or t <= 0:
            return None
        spread = w * nn - n * n
        if spread > 1e-3 * w * nn:
            b = (w * nt - n * t) / spread
            a = (t - b * n) / w
            if b > 0 and a >= 0:
                self._fitted = (a, b)
        return self._fitted or (0.0, t / n)

    def fit_depth(self) -> tuple[float, float, float] | None:
        """(a, b, c): a forward of n tokens after d of context takes about a + b·n + c·pairs(n, d) seconds; None before
        any chunk. Where the recent chunks tell no cost per pair apart (all near the start of their context, as on a GPU
        where attention costs little, or timings that noise bent into a negative cost): the last fit that did, else
        `fit()`'s line and c = 0."""
        w, n, q, nn, nq, qq, t, nt, qt = self._depth_sums
        line = self.fit()
        if line is None:
            return None
        matrix = [[w, n, q], [n, nn, nq], [q, nq, qq]]
        solved = _solve3(matrix, [t, nt, qt])
        if solved is not None and all(x >= 0 for x in solved) and solved[1] > 0 and solved[2] > 0:
            self._depth_fitted = (solved[0], solved[1] / _N_SCALE, solved[2] / _Q_SCALE)
        return self._depth_fitted or (*line, 0.0)

    def seconds(self, tokens: int, depth: int) -> float | None:
        """What a forward of `tokens` tokens after `depth` of context is expected to take; None before any chunk."""
        fit = self.fit_depth()
        if fit is None:
            return None
        a, b, c = fit
        return a + b * tokens + c * pairs(tokens, depth)

    def per_token(self) -> float | None:
        """Seconds per token (fixed costs included) of the recent chunks, or of the last one where that cost more:
        a long prompt's chunks cost more as its context grows (on a CPU, a token at 2,500 tokens of context costs
        four times one at the start: scripts/bench_steps.py), so the average lags behind them. None before any
        chunk."""
        _, n, t, _, _ = self._sums
        return max(t / n, self.last) if n > 0 and t > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        """The peak prefill rate (a long chunk's), for the record."""
        fit = self.fit()
        return 1 / fit[1] if fit is not None else None


def pairs(tokens: int, depth: int) -> int:
    """The pairs of a token and one it attends to in a forward of `tokens` tokens after `depth` of context (each
    attends to the context and to itself and those before it in the chunk): what its attention costs."""
    return tokens * depth + tokens * (tokens + 1) // 2


def _solve3(m: list[list[float]], v: list[float]) -> tuple[float, float, float] | None:
    """x with m·x = v (Cramer's rule, m symmetric and 3x3), or None where m is near singular (the recent chunks do
    not tell the three costs apart). Written out rather than numpy's: three equations, on the engine thread."""

    def det(a: list[list[float]]) -> float:
        return (
            a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
        )

    d = det(m)
    scale = m[0][0] * m[1][1] * m[2][2]
    if scale <= 0 or abs(d) <= 1e-9 * scale:
        return None
    xs = []
    for i in range(3):
        replaced = [[v[r] if j == i else m[r][j] for j in range(3)] for r in range(3)]
        xs.append(det(replaced) / d)
    return xs[0], xs[1], xs[2]


@dataclass(eq=False)
class _Prefilling:
    """A sequence in the prefill stage: its own cache, what that holds, and what is still to go in."""

    uid: int
    admission: Admission
    cache: list[Any]
    tokens: list[int]  # what `cache` holds: the history, then the prompt tokens prefilled so far
    rest: list[int]  # still to prefill, the last one included (the decoder's first input, unless `_tail` is 0)
    total: int  # len(rest) when admitted
    checkpoints: list[int]  # the positions (len(tokens)) still to hand a copy of the cache back at, ascending
    chunks: int = 0  # run so far (`_run`)
    # While its cache's buffers are being made, over the steps before its first chunk (OWN_WARM_MIN): layer -> keys,
    # values made so far. None: ready (its cache takes its chunks).
    own: dict[int, tuple[mx.array, mx.array]] | None = None
    first: tuple[int, mx.array] | None = None  # its first token and its log-probabilities, once its last chunk ran


class ChunkedPrefill:
    """Prefill in front of a decoding generator (by default mlx-lm's batch, `MlxBatchGenerator`), within a time budget
    per step (module doc). A sequence is in one stage or the other; `extract` and `remove` take it from either."""

    def __init__(self, config: GeneratorConfig, stream: Any, inner: Generator | None = None) -> None:
        self.model = config.model
        self.stream = stream
        # Every prefilled sequence joins the decode batch in the step it is ready: they are moved, not prefilled.
        self.inner = inner or MlxBatchGenerator(replace(config, prefill_batch_size=config.batch_size), stream)
        self.target_s = config.step_ms / 1000
        self.chunk = max(config.prefill_step, 1)  # one forward's tokens: the memory budget's prefill chunk
        self.cap = self.chunk * max(config.prefill_batch_size, 1)  # a step's, as mlx-lm's prompt batch prefilled
        self.long_chunk = min(max(config.long_chunk, self.chunk), self.cap)
        self.cost = PrefillCost()
        self.last_budget = 0
        self._next_uid = 0
        self._prefilling: dict[int, _Prefilling] = {}
        self._inner_uid: dict[int, int] = {}  # ours -> the inner generator's, once decoding
        self._uid: dict[int, int] = {}  # the inner generator's -> ours
        self._totals: dict[int, int] = {}  # ours -> its prompt's tokens to prefill, until it is reported finished
        self._served: dict[str, float] = {}  # owner -> prefill tokens over weight, while it has prompts here
        self._watched: set[int] = set()  # ours, decoding, read as streams (`Admission.watched`)
        self._moved = False  # a sequence joined the inner generator since its last step
        self._held_back = False  # the last step took newcomers whole and held the prompts under way back for them
        # Short prompts chosen in one step are prefilled together by mlx-lm's prompt batch (one padded forward, its
        # fixed cost paid once: most of a short prompt's cost on a CPU) rather than one by one here.
        self._groups = getattr(self.inner, "prefills_together", False)
        self._arrived = config.arrived or (lambda: False)
        self._decoded = config.decoded
        self.eos = set(config.eos_ids)
        # Where the decode batch takes a sequence with its first token sampled (`Admission.first`: it has the model's
        # `last_logits`), a prompt's last chunk takes its last token too and samples the first token from that
        # forward's last position alone: 0 tokens are left for the decoder to feed. Else 1, as mlx-lm's batch takes
        # them. Measured on this CPU (SmolLM2, a later turn of 30 new tokens on 1,100 cached): 29 tokens then a forward
        # of the last one, 373 ms; all 30 in one forward, 318 ms.
        self._last_logits: LastLogits | None = getattr(self.inner, "last_logits", None)
        self._tail = 1 if self._last_logits is None else 0
        self._firsts: list[Generated] = []  # first tokens sampled in this step's chunks (`_decode`)
        self._chunks: list[tuple[int, int, float]] = []  # this step's chunks: tokens, depth, seconds (`_log_slow`)
        self.warm_s = 0.0  # this step's spent making buffers ready: a coming join's (`_warm`), a prompt's (`_warm_own`)
        # Each KV layer's index, heads, key and value head dims and dtype (`_warm_own`), once a prompt needs them.
        self._layout: list[tuple[int, int, int, int, Any]] | None = None

    # -- the Generator interface -----------------------------------------------------------------------------------

    def admit(self, admission: Admission) -> int:
        uid = self._next_uid
        self._next_uid += 1
        self._totals[uid] = len(admission.rest)
        history = list(admission.history)
        cache = admission.cache if admission.cache is not None else make_prompt_cache(self.model)
        # Not one that goes whole to the decode batch (its buffers would be merged there, not these).
        warms = bool(self._uid) and len(admission.rest) >= max(OWN_WARM_MIN, self.chunk + 2)
        if warms and self._layout is None:
            with mx.stream(self.stream):
                self._layout = _kv_layout(self.model)
        warms = warms and bool(self._layout)
        _reserve(cache, len(admission.rest))
        base, end = len(history), len(history) + len(admission.rest)
        p = _Prefilling(
            uid,
            admission,
            cache,
            history,
            list(admission.rest),
            len(admission.rest),
            sorted({c for c in admission.checkpoints if base < c < end}),
            own={} if warms else None,
        )
        if len(p.rest) <= 1:
            self._decode(p)
        else:
            others = [self._served[q.admission.owner] for q in self._prefilling.values()]
            if admission.owner not in self._served:  # an owner that was away has no credit saved up
                self._served[admission.owner] = min(others, default=0.0)
            self._prefilling[uid] = p
        return uid

    def step(self) -> Step:
        with mx.stream(self.stream):
            return self._step()

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        self._totals.pop(uid, None)
        p = self._prefilling.pop(uid, None)
        if p is not None:
            self._forget_owner(p.admission.owner)
            if p.chunks >= JOIN_APART:
                self._warm(0)  # the buffers made ready for its join, if any, go
            _reserve(p.cache, 0)
            return p.cache, list(p.tokens)
        inner = self._inner_uid.pop(uid)
        del self._uid[inner]
        self._watched.discard(uid)
        return self.inner.extract(inner)

    def remove(self, uid: int) -> None:
        self._totals.pop(uid, None)
        p = self._prefilling.pop(uid, None)
        if p is not None:
            self._forget_owner(p.admission.owner)
            if p.chunks >= JOIN_APART:
                self._warm(0)  # the buffers made ready for its join, if any, go
            return
        inner = self._inner_uid.pop(uid)
        del self._uid[inner]
        self._watched.discard(uid)
        self.inner.remove(inner)

    # -- a step ----------------------------------------------------------------------------------------------------

    def budget(self, decoding: int, depth: int = 0, alone: bool = False) -> int:
        """Prefill tokens for this step (vLLM's and Sarathi-Serve's token budget, in time): what fits in the step
        (`step_s`) after the decode step (as measured; each decoding sequence at least one token's worth, as vLLM counts
        them) and each chunk's fixed cost, by what a chunk `depth` tokens into its context is expected to cost
        (`PrefillCost.fit_depth`). Never below a chunk of EFFICIENT_CHUNK times the fixed cost (where the target cannot
        be met, a step runs longer instead) nor MIN_BUDGET; never above `cap` (the tokens mlx-lm's prompt batch
        prefilled per step, `prefill_batch_size` chunks of `prefill_step`, what the memory budget's prefill share is
        sized for, here one chunk at a time) nor above what fits in MAX_STEP targets after the decode step, by that
        cost and by the average cost per token, whatever the fit says."""
        fit = self.cost.fit_depth()
        if fit is None:
            return min(FIRST_BUDGET, self.cap)
        a, b, c = fit
        decode = max(self.cost.decode_s, decoding * b) if decoding else 0.0
        size = self.chunk_size()
        fits = _tokens_within(self.step_s(decode, alone) - decode - self.warm_s, a, b, c, depth, size)
        per_token = self.cost.per_token() or b
        # The bound is on the whole step, its decode included: it is what a stream pauses and a newcomer waits for. Deep
        # in a long prompt on this CPU, chunks sized by the cost of those before them ran 0.45-0.56 s beside the decode.
        bound = MAX_STEP * self.target_s - decode - self.warm_s
        # A fit that noise bent (a fixed cost that is really a busy machine's jitter; three chunks fitted exactly) can say
        # nothing fits, or that thousands of tokens do: the plain average cost per token bounds the step whatever it says.
        # Without that bound, a stream beside a 2,645-token prompt paused 14.8 s for one chunk (the built-in model).
        by_fit = _tokens_within(bound, a, b, c, depth, size)
        most = min(self.cap, bound / per_token, by_fit if by_fit > 0 else math.inf)
        efficient_size = EFFICIENT_CHUNK * a / (b + c * depth)
        efficient = min(efficient_size, bound / per_token)
        # With nobody decoding, no stream pauses for the step, and a newcomer waits for the chunk under way only: a
        # chunk is never below the efficient size, then, however long a forward's fixed cost makes it. The bounds
        # above, sized by the average cost per token of chunks kept small by them, held a model whose forward alone
        # took most of the step to MIN_BUDGET chunks: a 135M Gemma 3 on this CPU (a forward 0.2 s) prefilled 743
        # tokens in 46 chunks, and a later turn's 26 new tokens in two (scripts/bench_arch.py --size real). It grows
        # at most twice the last step's budget a step: a fit that noise bent cannot make one step of thousands.
        alone_floor = 0.0 if decoding else min(efficient_size, 2 * self.last_budget, self.cap)
        return int(max(min(max(fits, efficient), most), alone_floor, MIN_BUDGET))

    def least_stop(self, depth: int) -> int:
        """The fewest prompt tokens a prefix-cache checkpoint should close (worker.boundaries.stops): its stop ends a
        chunk, so the tokens after it cost a forward's fixed cost more, worth this many tokens `depth` tokens into a
        context by the measured costs (at least MIN_GAP; MIN_GAP before any chunk was timed)."""
        fit = self.cost.fit_depth()
        if fit is None:
            return MIN_GAP
        a, b, c = fit
        return max(MIN_GAP, round(a / (b + c * depth)))

    def step_s(self, decode: float, alone: bool = False) -> float:
        """This step's length: the target, or beside decoding sequences long enough that their decode forward is at
        most OVERHEAD_SHARE of it, up to PAUSE_SHARE of MAX_STEP targets (the bound a stream pauses for); with none
        and one prompt `alone` to prefill, that bound. Nobody then waits for the step as a whole: a newcomer waits for
        the chunk under way (the step's prefill ends after it, `GeneratorConfig.arrived`), at most the bound on any
        step. Each chunk pays a forward's fixed cost, and on this CPU (SmolLM2: 58 ms a forward, 6 ms a token at 1,000
        tokens of context) an agent's later turn, prefilled alone, was cut into 150 ms chunks: 1.28x mlx_lm.server's
        time to first token on a turn of ~300 new tokens (scripts/bench_arch.py --families smollm2). Beside other
        prompts the target holds: one that is ready to decode waits for the rest of the step's chunks."""
        bound = PAUSE_SHARE * MAX_STEP * self.target_s
        if not decode:
            return bound if alone else self.target_s
        return min(max(self.target_s, decode / OVERHEAD_SHARE), bound)

    def chunk_size(self) -> int:
        """One forward's tokens of a prompt: the memory budget's chunk (`prefill_step`), or where a forward's measured
        fixed cost would make that mostly overhead, EFFICIENT_CHUNK times it (a/b tokens), in whole chunks (fewer
        shapes: a GPU builds kernels for each), up to `long_chunk`. The step's budget bounds it as any chunk.

        On an H200 (MLX's CUDA build, SmolLM2, scripts/bench_steps.py --parts cost) a forward costs about 20 ms
        whatever its size and 0.013 ms a token: a 512-token chunk took 25 ms, 2,048 took 47 ms, so 512-token chunks
        prefilled at half the speed 2,048 did, and a flood of 3,000-token prompts finished 23 in 15 s where
        mlx_lm.server's 2,048-token chunks finished 85 in 25 s. On a CPU a forward's fixed cost is a few dozen tokens'
        worth: the chunk stays `prefill_step`."""
        fit = self.cost.fit()
        if fit is None or self.long_chunk <= self.chunk:
            return self.chunk
        a, b = fit
        return int(min(max(math.ceil(EFFICIENT_CHUNK * a / b / self.chunk), 1) * self.chunk, self.long_chunk))

    def group_budget(self, watched: int) -> int:
        """Padded tokens of short prompts prefilled together in one forward this step. They are newcomers' own
        prefill, and each one staggered to a later step would wait for it and then decode in steps of its own at
        the end: with no stream decoding (`watched`: nothing, or only answers read whole), as many as the prefill
        share allows (`cap`), as mlx-lm's prompt batch takes them; else what one forward does in MAX_STEP targets,
        the bound on any step a stream pauses for, at what tokens near the start of their context cost
        (`PrefillCost.at_start`; a long prompt's deep chunks, which the fit takes in too, made it a few dozen tokens
        on a CPU, and a one-line question was then prefilled over three steps while a stream decoded).

        Eight sync clients arriving a step apart were prefilled one or two a step with the bound applied to answers
        nobody saw until their end: 0.75x mlx_lm.server's tokens/s, against 0.85x grouped (scripts/bench_concurrency.py,
        this 2-core CPU, where one prompt's forward takes about the whole bound)."""
        if not watched:
            return self.cap
        left = MAX_STEP * self.target_s - self.cost.decode_s
        if (start := self.cost.at_start) is not None:  # newcomers' tokens, at the start of their context
            return int(min(self.cap, max(left / start, 0)))
        fit = self.cost.fit()
        if fit is None:
            return min(FIRST_BUDGET, self.cap)
        a, b = fit
        return int(min(self.cap, max((left - a) / b, 0)))

    def _step(self) -> Step:
        decoding = len(self._uid)
        watched = len(self._watched)
        if hasattr(self.inner, "prefill_waits"):  # a drafting decode stage: its steps leave prefill its share
            self.inner.prefill_waits = bool(self._prefilling)
        self._chunks = []
        per_token = self.cost.per_token()  # before this step's chunks: what they were expected to cost
        start = tic = time.perf_counter()
        step = self._inner_step()
        grouped = 0
        decode_s = 0.0
        if self._prefilling:
            # Its tokens go out now, not after the chunks below (a newcomer's first token among them). Measured on this
            # CPU with key A's eight 3,000-token prompts prefilling: key B's time to first token was its prefill's
            # step, then the next step's decode and that step's chunks. Before the decode forward it queued for the
            # next tokens is done, too, unless the step hands caches back (ended sequences, checkpoints): the prefix
            # cache's insert waits for the forward, and would be timed as the decode's.
            decoded = self._decoded if step.generated or step.prefilled or step.checkpoints else None
            if decoded is not None and not (step.checkpoints or any(g.cache is not None for g in step.generated)):
                decoded(step)
                step, decoded = Step([], []), None
            if decoding:
                # mlx-lm's decode step runs asynchronously: waited for, so that its time is not taken for prefill's.
                mx.synchronize(self.stream)
                decode_s = time.perf_counter() - tic
                self.cost.add_decode(decode_s)
            if decoded is not None:
                decoded(step)
                step = Step([], [])
            self.warm_s = self._warm(decoding) + self._warm_own(decode_s)
            if ready := self._ready():
                first = min(ready, key=self._order)  # the prompt the budget's first chunk goes to
                budget = self.budget(decoding, len(first.tokens), alone=len(ready) == 1)
                prefilled, checkpoints, grouped = self._prefill(
                    budget, max(budget, self.group_budget(watched)), decoding
                )
                step.checkpoints.extend(checkpoints)
                if self._firsts and self._decoded is not None:
                    # Out before the join below copies their caches into the decode batch's (with the prefill progress,
                    # which then comes before them).
                    self._decoded(Step(prefilled, self._firsts))
                else:
                    step.prefilled.extend(prefilled)
                    step.generated.extend(self._firsts)
                self._firsts = []
        if self._moved:
            # Those that joined it take their first decoding forward now: their first token comes with the next
            # step's decode, not one step later (a group handed over whole is prefilled in it, in one forward, which
            # gives their first tokens where they `sample_first`). The others get a second token in this step (the
            # batcher takes both; one that ends on the first is ended by the generator on the second, with its cache).
            tic = time.perf_counter()
            more = self._inner_step()
            timed = getattr(self.inner, "group_time", lambda: None)()
            if timed is not None:
                # The group's forward alone, as the decode batch timed it (beside decoding sequences too: eight sync
                # clients' groups were never timed, and a fit of the lone first prompts alone told no fixed cost apart).
                self.cost.add(*timed)
            elif grouped and not decoding:
                mx.synchronize(self.stream)
                self.cost.add(grouped, time.perf_counter() - tic)
            step.prefilled.extend(more.prefilled)
            step.generated.extend(more.generated)
            step.checkpoints.extend(more.checkpoints)
        took = time.perf_counter() - start
        if per_token and (self._chunks or grouped):
            expected = decode_s + self.warm_s + per_token * (grouped + sum(n for n, _, _ in self._chunks))
            if took > max(MAX_STEP * self.target_s, SLOW_STEP * expected):
                self._log_slow(took, decoding, decode_s, grouped)
        return step

    def _warm(self, decoding: int) -> float:
        """Where the decode batch can make a join's buffers ready beforehand and a prompt that joins apart
        (JOIN_APART) is within WARM_STEPS steps of its end: a share of this step doing so. Returns the seconds spent."""
        warm = getattr(self.inner, "warm", None)
        if warm is None:
            return 0.0
        joining = [p for p in self._prefilling.values() if p.chunks >= JOIN_APART]
        if not decoding or not joining:
            return float(warm(0, 0.0))
        p = min(joining, key=lambda q: len(q.rest))
        if len(p.rest) > WARM_STEPS * max(self.last_budget, MIN_BUDGET):
            return 0.0
        return float(warm(len(p.tokens) + len(p.rest) - self._tail, WARM_SHARE * self.step_s(self.cost.decode_s)))

    @property
    def ahead_bytes(self) -> int:
        """The bytes of a coming join's buffers made ahead of it (`_warm`)."""
        return int(getattr(self.inner, "ahead_bytes", 0))

    def _ready(self) -> list[_Prefilling]:
        """The prompts whose caches can take a chunk (not still being made: `_warm_own`)."""
        return [p for p in self._prefilling.values() if p.own is None]

    def _warm_own(self, decode: float) -> float:
        """Make the buffers of the prompts admitted to have them made beforehand (OWN_WARM_MIN), a layer at a time, for
        up to WARM_SHARE of the step, or while no other prompt is ready the step's prefill part; a prompt whose layers
        are all made has them as its cache's (what it holds already copied in). Returns the seconds spent."""
        warming = sorted((p for p in self._prefilling.values() if p.own is not None), key=self._order)
        if not warming or self._layout is None:
            return 0.0
        step = self.step_s(decode)
        # The prefill's part while it comes first (no other prompt ready, or it is the one the step's chunks would go
        # to first); else a share, so as not to hold up the one that comes first.
        first = min(self._prefilling.values(), key=self._order)
        limit = max(step - decode, WARM_SHARE * step) if first.own is not None else WARM_SHARE * step
        tic = time.perf_counter()
        for p in warming:
            assert p.own is not None
            size = _whole_steps(len(p.tokens) + len(p.rest))
            for layer, heads, k_dim, v_dim, dtype in self._layout:
                if layer in p.own:
                    continue
                if time.perf_counter() - tic >= limit:
                    return time.perf_counter() - tic
                buffers = mx.zeros((1, heads, size, k_dim), dtype), mx.zeros((1, heads, size, v_dim), dtype)
                mx.eval(*buffers)
                p.own[layer] = buffers
            own, p.own = p.own, None
            for layer, (keys, values) in own.items():
                cache = p.cache[layer]
                if cache.keys is not None and cache.offset:  # a prefix-cache hit's: what it holds, copied in
                    keys[..., : cache.offset, :] = cache.keys[..., : cache.offset, :]
                    values[..., : cache.offset, :] = cache.values[..., : cache.offset, :]
                cache.keys, cache.values = keys, values
            mx.eval([c.state for c in p.cache])
        return time.perf_counter() - tic

    def _log_slow(self, took: float, decoding: int, decode_s: float, grouped: int) -> None:
        """A step with prefill in it ran several times what its chunks were expected to cost and past MAX_STEP targets,
        and every decoding stream paused for it: what it held, so that such a pause (a GPU's first forwards of new
        shapes, say) can be told from the budget's."""
        chunks = ", ".join(f"{n}@{depth}: {s * 1000:.0f} ms" for n, depth, s in self._chunks)
        log.warning(
            "slow step %.0f ms: %d decoding (%.0f ms), budget %d, chunks [%s], group of %d tokens",
            took * 1000,
            decoding,
            decode_s * 1000,
            self.last_budget,
            chunks,
            grouped,
        )

    def _prefill(self, budget: int, grouped: int, decoding: int = 0) -> tuple[list[Prefilled], list[Checkpoint], int]:
        """Spend `budget` tokens on prefill chunks, the first in order (module doc) first, chosen again after each.
        Newcomers (near the start of their context) whose whole rest fits in what is left of `grouped` go to the decode
        batch whole, together, and are prefilled there in one forward; the others are prefilled here a chunk at a
        time. Beside `decoding` sequences, a long prompt joins them in a step of its own (JOIN_APART). Also returns the
        group's padded tokens (0: none)."""
        self.last_budget = budget
        prefilled: list[Prefilled] = []
        checkpoints: list[Checkpoint] = []
        group: list[_Prefilling] = []
        spent = 0  # by chunks run here
        held_back = False
        size = self.chunk_size()
        skipped: set[int] = set()  # prompts that wait for a later step (their join: JOIN_APART)
        while spent + _padded(group) < max(budget, grouped) and (
            ready := [p for p in self._ready() if p.uid not in skipped]
        ):
            p = min(ready, key=self._order)
            # A newcomer near the start of its context goes whole where the group's forward takes it: the budget counts
            # the tokens of the prompt under way, which deep in a long prompt cost several times a newcomer's (on a
            # CPU, 15 ms against 4 at 2,500 tokens of context), so a one-line question was prefilled over three steps.
            # A prompt deep in its context (a long prompt's tail, a later turn after a prefix-cache hit) is prefilled
            # here in its own cache within the step's budget, like any chunk, and joins the decode batch as it is:
            # through the group, its cache was copied into the group's batch cache and again into the decode batch's,
            # and on this CPU the step that ended a 3,000-token prompt ran 0.4-0.9 s past the others.
            newcomer = len(p.rest) == p.total and len(p.tokens) < PrefillCost.START
            goes_whole = self._groups and newcomer and not p.checkpoints and len(p.rest) - 1 <= min(grouped, self.chunk)
            if group and not goes_whole and not self._held_back:
                # Newcomers that go whole get a step of their own: their first token then comes after their forward
                # and the decode step, not after chunks of somebody's long prompt as well. Key B's one-line question
                # behind key A's flood of 3,000-token prompts ran beside them every time (8x its idle time to first
                # token on an H200, where a step's chunks fill its target; on this CPU, where a chunk deep in a long
                # prompt is a few dozen tokens, 3.45x before and 3.22x after). At most every other step, so that
                # newcomers arriving without a pause cannot hold a long prompt back for good.
                held_back = True
                break
            if goes_whole:
                if group and spent + _padded([*group, p]) > grouped:
                    break  # the next step's
                if not group and spent + len(p.rest) - 1 > grouped:
                    n = min(len(p.rest) - 1, budget - spent)  # one chunk of it, here, as for any other
                else:
                    group.append(p)
                    self._charge(p, len(p.rest) - 1)
                    del self._prefilling[p.uid]
                    continue
            else:
                end = len(p.tokens) + len(p.rest) - self._tail  # every prompt token but what the decoder feeds
                if p.checkpoints:
                    end = min(end, p.checkpoints[0])  # a chunk never crosses a checkpoint: the cache holds it exactly
                n = min(end - len(p.tokens), size, budget - spent - _padded(group))
                left = end - len(p.tokens) - n
                if not decoding and 0 < left and n + left <= size and left < self.least_stop(len(p.tokens) + n):
                    # What the budget leaves of its segment costs less than the forward it would take on its own (a
                    # later turn's 26 new tokens ran as 23 and 3, two forwards of 0.2 s each on this CPU). With
                    # nobody decoding, the step runs that much longer instead.
                    n += left
            last = len(p.rest) - self._tail  # a chunk of this many ends its prefill, and it joins the decode batch
            joins_apart = decoding > 0 and p.chunks >= JOIN_APART and n == last
            # A step that holds newcomers back for the prompts under way (`_held_back`) takes the join beside its
            # group: newcomers arriving without a pause would otherwise hold it back for good.
            if joins_apart and (spent or (_padded(group) and not self._held_back) or n > 1):
                n -= 1  # all but one token now; that one, and the join, first in a later step
                if n <= 0:
                    skipped.add(p.uid)
                    continue
            if n <= 0:
                break
            self._run(p, n)
            spent += n
            self._charge(p, n)
            prefilled.append(Prefilled(p.uid, p.total - len(p.rest), p.total, False))
            if p.checkpoints and len(p.tokens) == p.checkpoints[0]:
                p.checkpoints.pop(0)
                checkpoints.append(Checkpoint(p.uid, _copy(p.cache), list(p.tokens)))
            if len(p.rest) == self._tail:
                del self._prefilling[p.uid]
                self._forget_owner(p.admission.owner)
                self._decode(p)
                if joins_apart:
                    break  # the step's remains are the join's
            if self._arrived():
                # Somebody is waiting to be admitted: where a step runs several chunks (a GPU runs a 512-token chunk
                # in a small part of the step's target), it would otherwise wait for all of them before its own.
                break
        self._held_back = held_back
        # The group's first tokens from its forward too, where that costs less than the decode step their last prompt
        # tokens would otherwise wait for (`_merges`, over the group's padded tokens): as measured beside others, and
        # at least a forward of a token a row (eight prompts alone: 56 ms by the fit, where a forward's fixed cost
        # alone, 21 ms, kept their first tokens a decode step later).
        sample_first = (
            bool(group)
            and self._last_logits is not None
            and getattr(self.inner, "samples_first", True)
            and self._merges(
                _padded(group),
                0,
                len(group[0].cache),
                max(self.cost.decode_s, self.cost.seconds(len(group), 0) or 0.0),
            )
        )
        for p in group:
            self._forget_owner(p.admission.owner)
            self._decode(p, sample_first)
        mx.clear_cache()  # prefill's transient buffers, as mlx-lm's prompt batch returns them
        return prefilled, checkpoints, _padded(group)

    def _charge(self, p: _Prefilling, tokens: int) -> None:
        """Its owner's fair share has had `tokens` more prefill, over the owner's weight."""
        self._served[p.admission.owner] += tokens / max(p.admission.weight, 1e-6)

    def _order(self, p: _Prefilling) -> tuple[int, float, int, int]:
        owner = p.admission.owner
        return (PRIORITY_RANK.get(p.admission.priority, 1), self._served[owner], len(p.rest), p.uid)

    def _run(self, p: _Prefilling, n: int) -> None:
        """One chunk of one prompt, alone, into its own cache; timed for the budget. A chunk that ends the prompt where
        the decode batch takes a sampled first token (`_last_logits`) samples it: from the chunk's own forward, or
        where computing the last layer for every token of the chunk would cost more than a forward's fixed cost
        (`_merges`), from a forward of the last token of its own, in this step all the same."""
        chunk = p.rest[:n]
        depth = len(p.tokens)
        tic = time.perf_counter()
        if self._last_logits is not None and n == len(p.rest):
            last = chunk
            if n > 1 and not self._merges(n, depth, len(p.cache)):
                self.model(mx.array(chunk[:-1])[None], cache=p.cache)
                mx.eval([c.state for c in p.cache])
                self.cost.add(n - 1, time.perf_counter() - tic, depth=depth)
                last = chunk[-1:]
            logits = self._last_logits(mx.array(last)[None], p.cache)
            a = p.admission
            token, logprobs = sample_first(logits, p.tokens + chunk, a.processors or (), a.sampler)
            mx.eval([c.state for c in p.cache], token, logprobs)
            # A forward of the chunk's own: its cost is a chunk's. The last token's alone is not, nor a chunk of that one
            # token (a checkpoint just before it): a decode's shape, it runs one token's experts in a mixture of experts,
            # and a real-size Qwen3-Next's 70 ms beside chunks' 200 ms fixed cost bent the fit, which halved the chunks
            # (twice the forwards: its cold prompts took 1.7x as long).
            if last is chunk and n > 1:
                self.cost.add(n, time.perf_counter() - tic, depth=depth)
            p.first = ints(token)[0], logprobs[0]
        else:
            self.model(mx.array(chunk)[None], cache=p.cache)
            mx.eval([c.state for c in p.cache])
            self.cost.add(n, time.perf_counter() - tic, depth=depth)
        self._chunks.append((n, depth, time.perf_counter() - tic))
        p.chunks += 1
        p.tokens.extend(chunk)
        del p.rest[:n]

    def _merges(self, n: int, depth: int, layers: int, apart: float = 0.0) -> bool:
        """Whether a prompt's last chunk of `n` tokens takes its last token in the same forward. A chunk that only
        fills the cache leaves its last layer's attention and MLP uncomputed; one whose last position's logits are
        wanted computes that layer for every token of the chunk, about a `layers`-th of what the chunk costs past its
        fixed cost. Apart, the last token costs one more forward's fixed cost, or `apart` where that is more (a
        group's: the decode step its rows wait for). Measured on this CPU: SmolLM2 (30 layers), 30 tokens on 1,100
        cached, 318 ms in one forward against 373 apart; the 2-layer tiny llama, a 1,000-token prompt's last 488
        tokens, 75 ms in one against 25 apart. Chunks all of one size (a group's, eight clients' alike) tell no fixed
        cost apart: then `apart` alone decides. A model called whole (`LastLogits.heads_all`) would pay its head at
        every token of the chunk too, up to a quarter of a token's cost each at SmolLM2's size: apart."""
        if n > 1 and self._last_logits is not None and self._last_logits.heads_all:
            return False
        fit = self.cost.fit_depth()
        expected = self.cost.seconds(n, depth)
        if fit is None or expected is None:
            return False
        fixed = fit[0]
        return (expected - fixed) / max(layers, 1) < max(fixed, apart)

    def _decode(self, p: _Prefilling, sample_first: bool = False) -> None:
        """Hand a prefilled sequence (its cache holds all its prompt but what the decoder feeds: the last prompt token,
        or with `first` none) to the decode batch, its first token (`first`) to the batcher with this step. A group's
        (`sample_first`) has the decode batch prefill its last prompt token with the rest and sample its first."""
        _reserve(p.cache, 0)
        a = p.admission
        first = None
        if p.first is not None:
            first, logprobs = p.first
            if reason := finish_reason(first, self.eos, a.max_tokens - 1):
                # It ends here: the cache, holding its prompt, goes with its only token.
                self._totals.pop(p.uid, None)
                self._firsts.append(Generated(p.uid, first, logprobs, reason, p.cache, list(p.tokens)))
                return
            self._firsts.append(Generated(p.uid, first, logprobs, None))
        inner = self.inner.admit(
            replace(
                a, rest=p.rest, cache=p.cache, history=p.tokens, checkpoints=(), first=first, sample_first=sample_first
            )
        )
        self._inner_uid[p.uid] = inner
        self._uid[inner] = p.uid
        if a.watched:
            self._watched.add(p.uid)
        self._moved = True

    def _forget_owner(self, owner: str) -> None:
        if not any(q.admission.owner == owner for q in self._prefilling.values()):
            self._served.pop(owner, None)

    def _inner_step(self) -> Step:
        """The inner generator's step, in our uids."""
        self._moved = False
        inner = self.inner.step()
        prefilled = []
        for p in inner.prefilled:
            uid = self._uid.get(p.uid)
            if uid is not None and p.finished:
                total = self._totals.pop(uid, p.total)
                prefilled.append(Prefilled(uid, total, total, True))
        generated = []
        for g in inner.generated:
            uid = self._uid.get(g.uid)
            if uid is None:
                continue
            if g.finish_reason is not None:  # the inner generator has let it go
                del self._uid[g.uid], self._inner_uid[uid]
                self._totals.pop(uid, None)
                self._watched.discard(uid)
            generated.append(replace(g, uid=uid))
        checkpoints = [replace(c, uid=self._uid[c.uid]) for c in inner.checkpoints if c.uid in self._uid]
        return Step(prefilled, generated, checkpoints)


def _tokens_within(seconds: float, a: float, b: float, c: float, depth: int, size: int) -> float:
    """The tokens n that chunks of at most `size`, back to back from `depth` tokens into their context, prefill in
    `seconds`: k·a + b·n + c·pairs(n, depth) <= seconds, k the chunks n tokens take."""
    n = 0.0
    for _ in range(2):  # as one chunk, then in as many chunks as that many tokens take
        room = seconds - a * max(math.ceil(n / size), 1)
        if room <= 0:
            return 0.0
        per = b + c * (depth + 0.5)
        n = room / per if c <= 0 else 2 * room / (per + math.sqrt(per * per + 2 * c * room))
    return n


def _kv_layout(model: nn.Module) -> list[tuple[int, int, int, int, Any]]:
    """Each KV layer's index, heads, key and value head dims and dtype, as one token forwarded into a new cache shows
    them (mlx-lm's caches take their shapes from what they are given)."""
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)
    kv = [(i, c) for i, c in enumerate(cache) if type(c) is KVCache and c.keys is not None]
    return [(i, c.keys.shape[1], c.keys.shape[3], c.values.shape[3], c.keys.dtype) for i, c in kv]


class LastLogits(Protocol):
    @property
    def heads_all(self) -> bool:
        """Whether a forward computes the head (the output projection over the vocabulary) at every position of its
        tokens, not only at the one wanted (`last_logits`'s fallback): a chunk of n tokens then pays n heads."""
        ...

    def __call__(self, tokens: mx.array, cache: list[Any], at: mx.array | None = None) -> mx.array:
        """Logits [B, V] at each row's last position (`at`: each row's position, else the last) of a forward over
        `tokens` [B, L] into `cache`."""
        ...


@dataclass(frozen=True)
class _BodyHead:
    """The body over every position, the head over the wanted one alone."""

    body: nn.Module
    head: Any
    heads_all: bool = False

    def __call__(self, tokens: mx.array, cache: list[Any], at: mx.array | None = None) -> mx.array:
        hidden = self.body(tokens, cache=cache)
        return self.head(hidden[:, -1, :] if at is None else hidden[mx.arange(hidden.shape[0]), at])


@dataclass(frozen=True)
class _Whole:
    """The whole model, as mlx-lm calls it, and the wanted position's logits of all it computes."""

    model: nn.Module
    heads_all: bool = True

    def __call__(self, tokens: mx.array, cache: list[Any], at: mx.array | None = None) -> mx.array:
        logits = self.model(tokens, cache=cache)
        return logits[:, -1, :] if at is None else logits[mx.arange(logits.shape[0]), at]


def last_logits(model: nn.Module) -> LastLogits:
    """The model's logits at one position per row of a forward over `tokens` (into `cache`), its body over them all and
    its head (the output projection over the vocabulary) over that position alone: over every position, a chunk of
    n tokens would pay n of the head's forwards, on this CPU a fifth of a SmolLM2 token's cost each. mlx-lm's models
    are a body (`model.model`) under a head (`lm_head`, or the tied embedding's `as_linear`); one that does more (a
    logit scale, a softcap: Falcon-H1, Granite 4, Nemotron-H's `backbone`) is told apart here by comparing body and
    head with the whole model, over the same positions (the same kernels), and is called whole (`heads_all`): the
    prefill stage then forwards a prompt's last token alone (`ChunkedPrefill._merges`) and samples its first token
    from that forward, rather than have the decode batch feed it, which mlx-lm's runs a step ahead: the first token
    came a decode forward later (a real-size Falcon-H1's later turns ~0.1 s behind mlx_lm.server's on this CPU)."""
    try:
        body = model["model"]
        head = model["lm_head"] if "lm_head" in model else body["embed_tokens"].as_linear
        probe = mx.array([[1, 2, 3]])
        same = bool(mx.array_equal(head(body(probe, cache=make_prompt_cache(model))), model(probe)).item())
    except Exception:  # not a body under a head, or a body that is called otherwise
        same = False
    if same:
        return _BodyHead(body, head)
    log.info("the model is not a body under an output projection: a prompt's last token is forwarded whole, alone")
    return _Whole(model)


def sample_first(
    logits: mx.array, context: list[int], processors: tuple[Any, ...] | list[Any], sampler: Sampler | None
) -> tuple[mx.array, mx.array]:
    """A prompt's first token from its last position's logits ([1, V]) as the decode batch samples a token: its
    processors with the whole prompt (`context`) as theirs, log-probabilities, its sampler or the argmax."""
    if processors:
        tokens = mx.array(context, dtype=mx.uint32)
        for processor in processors:
            logits = processor(tokens, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (mx.argmax(logprobs, axis=-1) if sampler is None else sampler(logprobs)), logprobs


def finish_reason(token: int, eos: set[int], left: int) -> str | None:
    """How a sequence that has just generated `token` ends, with `left` tokens it may still generate: "stop" on an
    end-of-sequence token, "length" with none left; None while it goes on."""
    return "stop" if token in eos else "length" if left <= 0 else None


def ints(x: mx.array) -> list[int]:
    """A 1-d array of token ids as a list."""
    return cast(list[int], x.tolist())


def _padded(group: list[_Prefilling]) -> int:
    """The tokens one forward over a group's prompts computes: each padded to the longest."""
    return max((len(p.rest) - 1 for p in group), default=0) * len(group)


def _reserve(cache: list[Any], tokens: int) -> None:
    """Its attention layers grow by `tokens` at once, the prompt still to prefill (0: by mlx-lm's step again, as any
    cache that leaves the prefill stage). mlx-lm's KVCache grows 256 tokens at a time, each time a new buffer with the
    whole cache copied in: over a 6,000-token prompt some 3 GB copied, and on this CPU the stream beside it paused
    0.2 s longer every 16 steps."""
    for layer in cache:
        if type(layer) in (KVCache, QuantizedKVCache):
            if tokens > 0:
                layer.step = _whole_steps(tokens)
            else:
                layer.__dict__.pop("step", None)


def _whole_steps(tokens: int) -> int:
    """`tokens` rounded up to mlx-lm's KVCache allocation step."""
    return -(-tokens // KVCache.step) * KVCache.step


def _copy(cache: list[Any]) -> list[Any]:
    """A copy of a cache that goes on being prefilled into (a checkpoint): its own arrays, evaluated now."""
    copied = copy.deepcopy(cache)
    _reserve(copied, 0)
    mx.eval([c.state for c in copied])
    return copied


def mlx_batch_generator(config: GeneratorConfig, stream: Any) -> Generator:
    """The engine's generator: the decode batch behind the prefill stage, or mlx-lm's batch alone with `step_ms` 0.
    The decode batch drafts and verifies tokens (worker.speculative) where `speculative` asks and the model's cache
    allows; else it is mlx-lm's."""
    if config.step_ms <= 0:
        return MlxBatchGenerator(config, stream)
    from worker.speculative import SpeculativeBatch, supports  # it builds on this module's types

    inner: Generator | None = None
    if config.speculative != "off" and supports(config.model):
        inner = SpeculativeBatch(replace(config, prefill_batch_size=config.batch_size), stream, config.draft_stats)
    return ChunkedPrefill(config, stream, inner)
