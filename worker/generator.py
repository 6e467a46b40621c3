"""The seam between the batcher and whatever decodes: the batcher admits sequences, steps the generator, and takes
sequences out with their KV cache, through `Generator` alone. mlx-lm's `BatchGenerator` is the one implementation
(`MlxBatchGenerator`); speculative decoding or another cache kind is another implementation, not a change to the
batcher's scheduling.

The dataclasses here are the generator-neutral form of what goes in and comes out of a step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
class Step:
    prefilled: list[Prefilled]
    generated: list[Generated]


class Generator(Protocol):
    def admit(self, admission: Admission) -> int:
        """Queue a sequence for prefill; its uid, by which the step's output names it."""
        ...

    def step(self) -> Step:
        """One decoding step for the sequences past prefill, and at most one prefill chunk for the others."""
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

    def admit(self, admission: Admission) -> int:
        # mlx-lm takes None entries (a new cache; the generator's own sampler), though its hints say otherwise.
        caches: list[Any] = [admission.cache]
        samplers: list[Any] = [admission.sampler]
        (uid,) = self._gen.insert(
            [admission.rest],
            max_tokens=[admission.max_tokens],
            caches=caches,
            all_tokens=[admission.history],
            samplers=samplers,
            logits_processors=[admission.processors],
        )
        return int(uid)

    def step(self) -> Step:
        prompt_responses, responses = self._gen.next()
        return Step(
            prefilled=[Prefilled(p.uid, p.progress[0], p.progress[1], p.end_of_prompt) for p in prompt_responses],
            generated=[
                Generated(r.uid, r.token, r.logprobs, r.finish_reason, r.prompt_cache, r.all_tokens) for r in responses
            ],
        )

    def extract(self, uid: int) -> tuple[list[Any], list[int]]:
        cache, tokens = self._gen.remove([uid], return_prompt_caches=True)[uid]
        return cache, tokens

    def remove(self, uid: int) -> None:
        self._gen.remove([uid])


def mlx_batch_generator(config: GeneratorConfig, stream: Any) -> Generator:
    return MlxBatchGenerator(config, stream)
