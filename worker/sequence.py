"""One request inside the batch: what it asked for and what it has produced so far.

Everything that is per request lives here (sampler, logits processors, stop strings, the tool-call
stream filter, logprobs, the detokenizer, cancellation, the queue of events for its consumer), so the
batcher only moves tokens between the generator (worker.generator) and these objects.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx

from mlxq import events
from mlxq.contract import GenerationResult, JobError, Priority, job_error
from mlxq.states import FinishReason
from worker.tool_parse import ToolStreamFilter

log = logging.getLogger(__name__)

Event = events.Event
Sampler = Callable[[mx.array], mx.array]


class GrammarBroken(Exception):
    """The grammar that holds the whole answer could not go on (the parser's limits): a 400, since the schema is
    what cannot be followed, never a 200 whose answer does not match it."""

    def __init__(self, why: str, *, param: str) -> None:
        super().__init__(why)
        self.error: JobError = job_error(
            400,
            f"The {param} schema could not be followed to the end of the answer: {why}",
            type="invalid_request_error",
            code="invalid_schema",
            param=param,
        )


@dataclass(eq=False)
class Sequence:
    """A request's state. The engine thread writes it; the consumer thread reads `events` and `result`."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler | None
    processors: list[Any]
    stops: list[str]
    tool_filter: ToolStreamFilter
    detokenizer: Any
    decode: Callable[[list[int]], str]
    # A token's own bytes, for logprobs' `bytes`: a token holding part of a character decodes to U+FFFD, whose
    # bytes are not its own (clients join the pieces' bytes to rebuild the character). None: its text's bytes.
    token_bytes: Callable[[int], bytes] | None = None
    priority: Priority = "interactive"
    # Whose request it is, for fair shares of the batch (worker.batcher): an API key's id, or else the session; "" none.
    owner: str = ""
    prefill: str = ""  # answer text already in the prompt (a forced tool call)
    # The answer continues text in the prompt (a completion, an assistant prefill): a leading space of its first
    # token is its own, where mlx-lm's detokenizers drop it (right for a new turn).
    keep_space: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    use_prefix_cache: bool = True
    # Its prefix-cache partition (mlxq.keys.cache_partition): it is served from and stored into that one only.
    partition: str = ""
    # Prefix-cache checkpoints to keep while its prompt is prefilled (a model whose cache cannot be trimmed:
    # worker.boundaries): token position -> (cache type, canonical message count whose boundary it holds).
    checkpoints: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    # The answer the client expects (OpenAI's `prediction`), tokenized: speculative drafts are taken from it.
    prediction: list[int] = field(default_factory=list)
    # A client streams it (worker.generator.Admission.watched): others' prefill pauses its decoding only briefly.
    watched: bool = True

    # -- filled in as it runs (engine thread) --------------------------------------------------
    uid: int | None = None  # in the generator while admitted
    queued_at: float = 0.0  # when it was submitted to the batcher (time.monotonic)
    admitted_at: float = 0.0
    preemptions: int = 0
    # The stop string that ended the answer, if one did (Anthropic reports it as `stop_sequence`).
    stop_sequence: str | None = None
    cached_tokens: int = 0
    # Draft tokens from `prediction` accepted and rejected (OpenAI's usage reports both).
    prediction_accepted: int = 0
    prediction_rejected: int = 0
    prefix_entry: int | None = None  # the prefix-cache entry its KV went into when it finished
    taken_entry: int | None = None  # the prefix-cache entry it took out of the trie to extend
    # The checkpoints kept: (canonical message count or None, prefix-cache entry id), for worker.prefix_index.
    checkpoint_entries: list[tuple[int | None, int]] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0
    finish: FinishReason | None = None
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    all_logprobs: list[dict[str, Any]] = field(default_factory=list)
    # Prompt tokens still to prefill (0 once the first token is out): the batcher parks one still prefilling first.
    prefilling: int = 0
    # A preempted sequence resumes from (KV cache or None, how many tokens of `fed` it holds).
    resume: tuple[list[Any] | None, int] | None = None

    # -- the consumer's side ------------------------------------------------------------------------
    events: queue.SimpleQueue[Event | None] = field(default_factory=queue.SimpleQueue)
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.text = self.prefill
        self.request_stops = list(self.stops)  # the client's, not the closing tag added below
        if self.prefill:  # a forced call ends with its closing tag
            self.stops = [*self.stops, "</tool_call>"]
        # Text that could still be the start of a stop string is held back from the stream.
        self.stop_hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def fed(self) -> list[int]:
        """Every token the KV cache sees: the prompt, then each generated token."""
        return self.prompt + self.generated

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    @property
    def budget(self) -> int:
        """KV tokens this sequence may come to hold."""
        return len(self.prompt) + self.max_tokens

    def _starts_with_space(self) -> bool:
        """Whether the answer's text begins with a space, read after the prompt's last token: a SentencePiece
        tokenizer's decode drops a leading space of the first token it decodes, as its detokenizer does."""
        if not self.prompt:
            return bool(self.decode(self.generated).startswith(" "))
        anchor = self.prompt[-1:]
        return bool(self.decode(anchor + self.generated)[len(self.decode(anchor)) :].startswith(" "))

    def emit(self, event: Event) -> None:
        self.events.put(event)

    # -- tokens in ---------------------------------------------------------------------------

    def add_token(self, token: int, logprobs: mx.array, finish_reason: str | None) -> bool:
        """Take one generated token; True when the sequence is finished."""
        if self.broken_grammar() is not None:  # it would go on as free text: ends here, failed (`complete`)
            self.finish = FinishReason.STOP
            return True
        self.generated.append(token)
        if finish_reason == "stop":  # mlx-lm's own reason: an end-of-sequence token, never part of the text
            self.detokenizer.finalize()
        else:
            self.detokenizer.add_token(token)
            if self.logprobs:
                entry = self._logprob_entry(token, logprobs)
                self.pending_logprobs.append(entry)
                self.all_logprobs.append(entry)
            if finish_reason is not None:
                self.detokenizer.finalize()
        piece = self.detokenizer.last_segment
        if self.keep_space and piece and len(self.text) == len(self.prefill) and not piece.startswith(" "):
            if self._starts_with_space():
                piece = " " + piece
        self.text += piece
        if self.stops and self._cut_at_stop(len(piece)):
            self.finish = FinishReason.STOP
            return True
        if finish_reason is not None:
            self.finish = FinishReason(finish_reason)
            return True
        self._emit_safe_delta()
        return False

    def _cut_at_stop(self, new: int) -> bool:
        search_from = max(len(self.prefill), self.shown - self.stop_hold, len(self.text) - new - self.stop_hold)
        found = [(i, s) for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if not found:
            return False
        cut, self.stop_sequence = min(found)
        self.text = self.text[:cut]
        return True

    def _emit_safe_delta(self) -> None:
        visible = self.text[: max(len(self.text) - self.stop_hold, 0)] if self.stops else self.text
        safe = self.tool_filter.safe_length(visible)
        if safe > self.shown:
            self.emit(events.delta(self.text[self.shown : safe], self.pending_logprobs or None))
            self.shown, self.pending_logprobs = safe, []

    def _bytes(self, token: int, text: str) -> list[int]:
        return list(self.token_bytes(token) if self.token_bytes is not None else text.encode())

    def _logprob_entry(self, token: int, logprobs: mx.array) -> dict[str, Any]:
        text = self.decode([token])
        entry: dict[str, Any] = {
            "token": text,
            "logprob": float(logprobs[token]),
            "bytes": self._bytes(token, text),
            "top_logprobs": [],
        }
        if top := self.top_logprobs:
            # A 1-D integer array: tolist() gives a list of int (mlx's hint covers every shape and dtype).
            ids = cast("list[int]", mx.argpartition(-logprobs, kth=top - 1)[:top].tolist())
            ids.sort(key=lambda i: -float(logprobs[i]))
            # A grammar's mask leaves disallowed tokens at -inf, which is not JSON: only finite ones are listed.
            entry["top_logprobs"] = [
                {"token": (t := self.decode([i])), "logprob": lp, "bytes": self._bytes(i, t)}
                for i in ids
                if math.isfinite(lp := float(logprobs[i]))
            ]
        return entry

    # -- the end -----------------------------------------------------------------------------

    def broken_grammar(self) -> GrammarBroken | None:
        """The failure of the grammar that holds the whole answer, when it broke (worker.constrained's
        GrammarProcessor.broken, naming its own field), or None."""
        for processor in self.processors:
            if why := getattr(processor, "broken", None):
                return GrammarBroken(str(why), param=processor.param)
        return None

    def complete(self) -> None:
        """Flush what was held back, build the result and wake the consumer."""
        if (broken := self.broken_grammar()) is not None:
            self.fail(broken)
            return
        finish = self.finish or FinishReason.LENGTH
        calls: list[dict[str, Any]]
        if finish in (FinishReason.CANCELLED, FinishReason.LENGTH):
            # A cut-off answer is not a call, even one that parses (repaired): its text, held back
            # from the stream as a possible call, goes out as content, so the stream equals the text.
            rest, calls = self.text[self.shown :], []
        else:
            try:
                rest, calls = self.tool_filter.finish(self.text, self.shown)
            except Exception:  # a parser bug must not fail the request, nor the batch it runs in
                log.exception("tool-call parsing failed; the answer is left as text")
                rest, calls = self.text[self.shown :], []
        if rest or self.pending_logprobs:
            self.emit(events.delta(rest, self.pending_logprobs or None))
        if calls:
            self.emit(events.tool_calls(calls))
        result = GenerationResult(
            text=self.text[: self.shown] + rest,
            finish_reason=FinishReason.TOOL_CALLS if calls else finish,
            usage={
                "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.generated),
                "cached_tokens": self.cached_tokens,
                "accepted_prediction_tokens": self.prediction_accepted,
                "rejected_prediction_tokens": self.prediction_rejected,
            },
        )
        if finish == FinishReason.STOP and not calls and self.stop_sequence in self.request_stops:
            result["stop_sequence"] = self.stop_sequence
        if calls:
            result["tool_calls"] = calls
        if self.logprobs:
            result["logprobs"] = self.all_logprobs
        self.result = result
        self._close()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._close()

    def _close(self) -> None:
        self.done.set()
        self.events.put(None)
