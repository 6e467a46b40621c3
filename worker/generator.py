"""The seam between the batcher and whatever decodes: the batcher admits sequences, steps the generator, and takes
sequences out with their KV cache, through `Generator` alone. mlx-lm's `BatchGenerator` is the one implementation
(`MlxBatchGenerator`); speculative decoding or another cache kind is another implementation, not a change to the
batcher's scheduling.

The dataclasses here are the generator-neutral form of what goes in and comes out of a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from worker.sequence import Sampler


@dataclass(frozen=True)
class GeneratorConfig:
    """What a generator is made with: the model, the tokens that end a sequence, and the batch's sizes."""

    model: nn.Module
    eos_ids: tuple[int, ...]
    batch_size: int  # sequences decoded together
    prefill_batch_size: int  # sequences prefilled together
    prefill_step: int  # tokens per sequence in one prefill chunk


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
        """One decoding step for the sequences past prefill, and at most one prefill chunk for the others; the
        caches of those whose prefill reached one of their checkpoints."""
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

    def admit(self, admission: Admission) -> int:
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


def mlx_batch_generator(config: GeneratorConfig, stream: Any) -> Generator:
    return MlxBatchGenerator(config, stream)
