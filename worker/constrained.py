"""Constrained decoding inside the continuous batch: a sequence whose answer must match a grammar
(mlxq.grammar) carries a logits processor that masks, at each step, every token the grammar does not allow.

It is one of mlx-lm's per-sequence logits processors, so a constrained sequence decodes beside unconstrained ones
in the same forward pass; the others are not touched. The mask needs the token sampled in the previous step, so
it is computed in the step: the step's forward pass is started first (it needs no mask, only the sampling after
it does), and the mask is computed while it runs (llguidance: ~0.1 ms for SmolLM2's 49k vocabulary, against tens
of ms for a forward pass; scripts/bench_structured.py measures the whole cost).

Compiled grammars are cached by their hash (one schema for every line of a batch compiles once); each sequence
gets its own copy of the matcher.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, cast

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from mlxq.grammar import Constraint, parser_limits

log = logging.getLogger(__name__)

CACHED_GRAMMARS = 64


class GrammarError(Exception):
    """A grammar that does not compile with this model's tokenizer (the api checks without one)."""


class Grammars:
    """The model's llguidance tokenizer (built on first use: about a second) and compiled grammars by hash."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: LLTokenizer | None = None
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> LLTokenizer:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
        return self._tokenizer

    def processor(self, constraint: Constraint) -> GrammarProcessor:
        """A fresh processor for one sequence."""
        with self._lock:
            matcher = self._compiled.get(constraint.key)
            if matcher is None:
                matcher = LLMatcher(self.tokenizer(), constraint.grammar, limits=parser_limits())
                if matcher.is_error():
                    raise GrammarError(f"{constraint.param}: {matcher.get_error()}")
                self._compiled[constraint.key] = matcher
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(constraint.key)
            return GrammarProcessor(
                matcher.deep_copy(),
                self.vocab_size,
                tokenizer=self.tokenizer(),
                trigger=constraint.trigger,
                param=constraint.param,
            )


class GrammarProcessor:
    """mlx-lm's logits-processor protocol: called once per step with the tokens so far and the step's logits.

    The first call comes before any answer token (the last token is the prompt's); every later one whose context
    grew first hands the matcher the token sampled in the previous step. mlx-lm runs the processors on a token in
    the step that returns it, so a sequence preempted after that step has fed the matcher its last token already:
    resumed, it is fed that token again with a context of the same length, which is skipped (by length, since
    the token alone cannot tell a repeat from a new one).

    With a `trigger` the grammar is armed, not active: the answer's text is watched, and from where the trigger
    text appears (a call's opening tag) the grammar holds, until it is complete; then the text is free again.
    What the token that completed the trigger wrote past it is handed to the matcher as text.
    """

    def __init__(
        self,
        matcher: LLMatcher,
        vocab_size: int,
        *,
        tokenizer: LLTokenizer | None = None,
        trigger: str | None = None,
        param: str = "response_format",
    ) -> None:
        self.matcher = matcher
        self.param = param
        self.vocab_size = vocab_size
        self._bitmask = allocate_token_bitmask(1, vocab_size)
        self._seen: int | None = None  # the length of the context the matcher has consumed up to
        self._tokenizer = tokenizer
        self._trigger = trigger.encode() if trigger else None
        self._armed = matcher.deep_copy() if trigger else None  # a fresh matcher for each call
        self._active = trigger is None
        self._tail = b""  # the answer's last bytes, while armed

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._seen is not None and tokens.shape[-1] > self._seen:
            # Start the step's forward pass before waiting on the previous step's token, so the mask is computed
            # while the model runs rather than after it.
            mx.async_eval(logits)
            self._take(cast(int, tokens[-1].item()))  # the token sampled in the previous step
        self._seen = tokens.shape[-1]
        if not self._active or self.matcher.is_error():
            return logits  # free text; and never a batch of -inf: a broken answer ends as it ends
        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        if allowed.shape[0] < logits.shape[-1]:
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return mx.where(mx.array(allowed.astype(bool)), logits, -mx.inf)

    @property
    def broken(self) -> str | None:
        """Why a grammar that holds the whole answer (a schema, a forced call) can no longer hold it (the parser's
        error: a limit met deep in an answer), or None. The answer is then not what was asked for: it ends, failed
        (worker.sequence), rather than going on as free text. A tool call's grammar (armed) is best effort."""
        if self._trigger is None and self.matcher.is_error():
            return str(self.matcher.get_error()).splitlines()[0]
        return None

    # -- speculative drafts (worker.speculative) ----------------------------------------------------------------------

    @property
    def draftable(self) -> bool:
        """Whether drafts can be masked and forgotten: a grammar that holds from the start (an armed one's watch of
        the text cannot be rolled back)."""
        return self._trigger is None and not self.matcher.is_error()

    def allowed(self, tokens: list[int]) -> int:
        """How many of these tokens, after those the matcher has taken, the grammar allows in a row."""
        return int(self.matcher.validate_tokens(tokens))

    def rollback(self, n: int) -> None:
        """Forget the last n tokens taken (drafts that were not accepted)."""
        if n > 0:
            self.matcher.rollback(n)
            assert self._seen is not None
            self._seen -= n

    def _take(self, token: int) -> None:
        if self._active:
            if not self.matcher.consume_token(token):
                log.warning("constrained sequence left its grammar: %s", self.matcher.get_error())
            elif self._armed is not None and self.matcher.is_stopped():  # the call is complete: free again
                self._active, self._tail = False, b""
            return
        assert self._tokenizer is not None and self._trigger is not None and self._armed is not None
        self._tail = (self._tail + self._tokenizer.decode_bytes([token]))[-(len(self._trigger) + 64) :]
        at = self._tail.find(self._trigger)
        if at < 0:
            return
        rest = self._tail[at + len(self._trigger) :]
        self.matcher, self._active = self._armed.deep_copy(), True
        if rest and not self.matcher.consume_tokens(self._tokenizer.tokenize_bytes(rest)):
            log.warning("a call opened past its grammar: %s", self.matcher.get_error())
