"""The MLX engine: one loaded model (with its adapter, and a draft model held for speculative decoding), its
tokenizer, and generation through the batcher. Requests become sequences in worker.sequence_builder."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.utils import dequantize_model

from mlxq.contract import GenerationResult, JobKind, Priority
from mlxq.events import Event
from mlxq.keys import cache_partition
from mlxq.request import Request
from mlxq.settings import get_settings
from worker import model_fixes
from worker.batcher import Batcher, KvLimit
from worker.constrained import Grammars
from worker.generator import Generator, GeneratorConfig, GeneratorFactory, mlx_batch_generator
from worker.memory import (
    ALLOWANCE_SLACK,
    Budget,
    KvShape,
    check_fits,
    default_budget,
    kv_shape,
    mlx_memory,
    parameters,
    peak_rss,
    prefill_bytes_per_token,
    prefill_sizes,
    rss,
    weights_bytes,
)
from worker.model_spec import ModelKey, ModelSpec, model_key
from worker.prefix_cache import PrefixCache, needs_checkpoints
from worker.sequence import Sequence
from worker.sequence_builder import RequestError, SequenceBuilder, typed
from worker.speculative import DraftStats, supports
from worker.tool_parse import ModelToolFormat, model_tool_format

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)

__all__ = ["BatchLimits", "Engine", "ModelKey", "ModelSpec", "RequestError", "wait"]

EventSink = Callable[[Event], None]
# Prefill in chunks this size: each chunk reports progress (SSE keepalives during long prompts).
PREFILL_STEP = 512
# The thorough warm-up waits at most this long for its stream to decode before the others come in (`warm_up`).
WARM_UP_WAIT_S = 60.0


@dataclass(frozen=True)
class BatchLimits:
    """Sequences decoded together, KV tokens they may hold (0 = what the memory budget's KV share holds), and at
    most this many sequences prefilled together (fewer when the budget's prefill share is small); the scheduler's
    step target and fair shares (worker.generator.ChunkedPrefill, worker.batcher), by default from the settings."""

    size: int = 16
    tokens: int = 0
    prefill: int = 8
    step_ms: float = field(default_factory=lambda: get_settings().step_target_ms)
    key_weights: Mapping[str, float] = field(default_factory=lambda: dict(get_settings().key_weights))
    key_max_inflight: int = field(default_factory=lambda: get_settings().key_max_inflight)
    low_age_s: float = field(default_factory=lambda: get_settings().low_priority_age_s)
    speculative: str = field(default_factory=lambda: get_settings().speculative)  # worker.speculative: lookup | off


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu or not (mx.metal.is_available() or mx.cuda.is_available())


def _parser_name(tokenizer: Any) -> str | None:
    """The mlx-lm tool parser module inferred for this tokenizer, if any."""
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "") or ""
    return module.rsplit(".", 1)[-1] if module.startswith("mlx_lm.tool_parsers") else None


def _vocab_size(model: nn.Module, tokenizer: Any) -> int:
    """Rows of the embedding: token ids at or past it are not the model's."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    return int(size) if size else len(tokenizer.get_vocab())


# mlx-lm's LoRA and DoRA parameters (mlx_lm.tuner): what an adapter adds to the model.
ADAPTER_LEAVES = frozenset({"lora_a", "lora_b", "m"})


def weight_sets(model: nn.Module, draft: nn.Module | None = None) -> dict[str, int]:
    """Bytes of each set of weights the engine holds: the model, its adapter's own parameters, the draft model."""
    named = cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    adapter = sum(v.nbytes for name, v in named if name.rsplit(".", 1)[-1] in ADAPTER_LEAVES)
    sets = {"model": sum(v.nbytes for _, v in named) - adapter}
    if adapter:
        sets["adapter"] = adapter
    if draft is not None:
        sets["draft"] = weights_bytes(draft)
    return sets


def _load(path: Path, adapter: Path | None = None) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    model_fixes.apply()
    # With return_config=True it is (model, tokenizer, config); mlx-lm's hint is the union of both forms.
    loaded = mlx_load(str(path), return_config=True, adapter_path=str(adapter) if adapter is not None else None)
    net, tokenizer, config = cast("tuple[nn.Module, TokenizerWrapper, dict[str, Any]]", loaded)
    if _on_cpu():
        # MLX's CPU backend has no fast quantized kernels: float32 is its fastest path.
        dequantize_model(net)
        net.set_dtype(mx.float32)
        mx.eval(net.parameters())
    return net, tokenizer, config


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        key: ModelKey,
        context_length: int,
        batch: BatchLimits | None = None,
        budget: Budget | None = None,
        *,
        draft: nn.Module | None = None,
        generator: GeneratorFactory = mlx_batch_generator,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.key = key
        self.context_length = context_length
        # Drafts for speculative decoding where prompt lookup finds none (worker.speculative).
        self.draft = draft
        self.batch = batch or BatchLimits()
        # Drafted and accepted tokens (worker.speculative), kept across the generators a failed step replaces.
        self.draft_stats = DraftStats()

        def make_generator(config: GeneratorConfig, stream: Any) -> Generator:
            config = replace(
                config, speculative=self.batch.speculative, draft_stats=self.draft_stats, draft_model=self.draft
            )
            return generator(config, stream)

        self.generator: GeneratorFactory = make_generator
        self.tool_format: ModelToolFormat | None = model_tool_format(_parser_name(tokenizer))
        self.prefix: PrefixCache | None = None
        self._batcher: Batcher | None = None
        self._batcher_lock = threading.Lock()
        self.vocab_size = _vocab_size(model, tokenizer)
        # mlx-lm's TokenizerWrapper holds the HF fast tokenizer llguidance reads.
        self.grammars = Grammars(getattr(tokenizer, "_tokenizer", tokenizer), self.vocab_size)
        # A cache that cannot always be trimmed (recurrent state, a sliding window): the prefix cache keeps
        # checkpoints during prefill (worker.boundaries, worker.prefix_cache).
        self.checkpoints = needs_checkpoints(model)
        self.builder = SequenceBuilder(
            tokenizer,
            vocab_size=self.vocab_size,
            context_length=context_length,
            grammars=self.grammars,
            tool_format=self.tool_format,
        )
        self.budget = budget or Budget.split(default_budget(), weight_sets(model, draft), rss() + ALLOWANCE_SLACK)
        # What one sequence's cache costs: per token of the layers that grow, windows, recurrent state.
        self.kv_shape: KvShape = kv_shape(model)
        if draft is not None and supports(draft):
            # A drafting sequence holds a row of the draft model's cache too (worker.speculative): budgeted with it.
            self.kv_shape = replace(self.kv_shape, per_token=self.kv_shape.per_token + kv_shape(draft).per_token)
        # The longest a sequence's KV can be: what prefill's working set is sized for.
        longest = max(self.kv_shape.longest(self.budget.kv, cap=context_length, chunk=PREFILL_STEP), 1)
        on_cpu = _on_cpu()
        itemsize = next(iter(v.dtype.size for v in parameters(model)), 4)
        per_token = prefill_bytes_per_token(getattr(model, "args", None), longest, itemsize, on_cpu)
        self.prefill_step, self.prefill_sequences = prefill_sizes(
            self.budget.prefill, per_token, chunk=PREFILL_STEP, sequences=self.batch.prefill
        )
        # A prompt's chunk may grow to the prefill share's tokens (worker.generator.ChunkedPrefill.chunk_size) where
        # every layer's cache grows with the sequence: a window briefly holds a chunk more (and the KV budget counts
        # `prefill_step`), and a recurrent layer's scan may take transients quadratic in its chunk, which the prefill
        # share does not count. Read when the engine thread starts, as `prefill_step` is.
        self.chunks_grow = not (self.kv_shape.windows or self.kv_shape.fixed)

    def enable_prefix_cache(self, *, max_entries: int, max_bytes: int | None = None) -> PrefixCache:
        """The prefix cache, bounded by `max_bytes` or else by the memory budget's prefix share."""
        self.prefix = PrefixCache(
            self.model, self.key, max_entries, max_bytes or self.budget.prefix, checkpoints=self.checkpoints
        )
        return self.prefix

    def save_prefix_cache(
        self, directory: Path, max_bytes: int, *, put_off: Callable[[], bool] | None = None
    ) -> int | None:
        """Persist the prefix cache from the engine thread (its arrays live on that thread's stream), one entry's file
        per call, so that the engine steps between them; how many entries the manifest lists. `put_off`, asked between
        files: True stops the save there (a request is waiting), None returned; the files written are kept, and the
        next save skips them."""
        prefix = self.prefix
        if prefix is None:
            return 0
        while self.batcher.call(lambda: prefix.write_next(directory, max_bytes)):
            if put_off is not None and put_off():
                return None
        return int(self.batcher.call(lambda: prefix.save(directory, max_bytes)))

    @classmethod
    def load(
        cls,
        model: str | ModelSpec,
        batch: BatchLimits | None = None,
        memory: int = 0,
        prefix_bytes: int = 0,
        *,
        generator: GeneratorFactory = mlx_batch_generator,
    ) -> Engine:
        """Load a model (a directory, or a ModelSpec naming its adapter and draft model too) within a memory budget
        of `memory` bytes (0: the machine's default), `prefix_bytes` of it (0: the budget's share) for the prefix
        cache. Weights that do not fit, all sets together, raise ModelTooLarge."""
        spec = ModelSpec.of(model)
        dirs = spec.directories()
        for name, path in dirs.items():
            if not path.exists():
                hint = " (run `mlxq models pull` for the built-in model)" if name == "model" else ""
                raise FileNotFoundError(f"{name} directory {path} not found{hint}")
        path = dirs["model"]
        total = memory or default_budget()
        allowance = rss() + ALLOWANCE_SLACK  # the process before the model: Python, libraries, tokenizer to come
        on_disk = sum(f.stat().st_size for d in dirs.values() for f in d.glob("*.safetensors"))
        check_fits(on_disk, total, path.name)
        net, tokenizer, config = _load(path, dirs.get("adapter"))
        draft = None
        if "draft" in dirs:
            draft, draft_tokenizer, _ = _load(dirs["draft"])
            if _vocab_size(draft, draft_tokenizer) != _vocab_size(net, tokenizer):
                # Its tokens are not the model's: it cannot draft them. Not loaded, rather than a worker that fails.
                log.warning("the draft model %s has another vocabulary than the model's: not used", dirs["draft"].name)
                draft = None
        context = int(config.get("max_position_embeddings") or 8192)
        budget = Budget.split(total, weight_sets(net, draft), allowance, prefix=prefix_bytes, model=path.name)
        return cls(net, tokenizer, model_key(spec), context, batch, budget, draft=draft, generator=generator)

    def warm_up(self, thorough: bool | None = None) -> None:
        """One short generation at start, so the first real request does not pay first-run costs; on a GPU
        (`thorough`, by default where the engine runs on one) the batch's other paths too, at once: a prompt of
        several chunks while a stream decodes and drafts, short prompts prefilled together, greedy and sampled. Then
        the generator starts afresh (`Batcher.renew`): these forwards' times are not what later ones cost.

        Why on a GPU: MLX builds kernels the first time it meets them (the CUDA build compiles them with NVRTC and
        keeps them in its PTX cache directory, MLX_PTX_CACHE_DIR, until the machine's temporary files go). On a fresh
        H200 a 3,000-token prompt beside a drafting stream paused that stream for 5.8 s, a step that takes 0.2 s
        once they are built (scripts/bench_steps.py --parts pause --speculative lookup, run first and then again)."""
        hello = {"prompt": "Hello", "temperature": 0.0, "max_tokens": 2}
        self.generate("completion", hello, use_prefix_cache=False)
        if not (thorough if thorough is not None else not _on_cpu()):
            return
        sentence = "The quick brown fox jumps over the lazy dog. "
        long_tokens = min(3 * self.prefill_step + 100, self.context_length - 64)
        long = sentence * max(long_tokens // len(self.completion_tokens({"prompt": sentence})), 1)
        stream = {"prompt": "Repeat this: " + sentence * 8, "temperature": 0.0, "max_tokens": 96}  # drafts by lookup
        others = [
            {"prompt": long, "temperature": 0.0, "max_tokens": 2},
            {"prompt": "Hi", "temperature": 0.0, "max_tokens": 4},
            {"prompt": "Hello there", "temperature": 0.8, "top_p": 0.9, "max_tokens": 4},
        ]
        decoding = threading.Event()

        def on_event(event: Event) -> None:
            if event.get("type") == "delta":
                decoding.set()

        try:
            with ThreadPoolExecutor(1 + len(others)) as pool:
                runs = [pool.submit(self.generate, "completion", stream, on_event, use_prefix_cache=False)]
                runs[0].add_done_callback(lambda _: decoding.set())  # ended with no text: nothing to wait for
                decoding.wait(timeout=WARM_UP_WAIT_S)  # the others come in while the stream decodes
                runs += [pool.submit(self.generate, "completion", r, use_prefix_cache=False) for r in others]
                for run in runs:
                    run.result()
        except Exception:  # the worker still serves: its first requests build what is missing
            log.warning("the warm-up of the batch's paths failed", exc_info=True)
        finally:
            self.batcher.renew()

    # -- prompts (worker.sequence_builder) ---------------------------------------------------

    def chat_prompt(self, request: Request | dict[str, Any]) -> tuple[list[int], str, list[dict[str, Any]]]:
        """(prompt tokens, answer prefill, tools to parse for) of a chat request."""
        return self.builder.chat_prompt(typed(request, self.key.path))

    def chat_tokens(self, request: Request | dict[str, Any]) -> list[int]:
        return self.chat_prompt(request)[0]

    def completion_tokens(self, request: Request | dict[str, Any]) -> list[int]:
        return self.builder.completion_tokens(typed(request, self.key.path))

    # -- generation ------------------------------------------------------------------------

    @property
    def batcher(self) -> Batcher:
        """The engine thread, started on first use (after the prefix cache is set up)."""
        with self._batcher_lock:  # consumer threads may be first to ask: never two engine threads
            if self._batcher is None:
                self._batcher = Batcher(
                    self.model,
                    eos_ids=sorted(self.tokenizer.eos_token_ids),
                    batch_size=self.batch.size,
                    kv=KvLimit(self.kv_limit, self.kv_shape),
                    prefill_batch_size=self.prefill_sequences,
                    prefill_step=self.prefill_step,
                    chunks_grow=self.chunks_grow,
                    prefix=lambda: self.prefix,
                    budget=self.budget,
                    generator=self.generator,
                    checkpoints=self.checkpoints,
                    step_ms=self.batch.step_ms,
                    key_weights=self.batch.key_weights,
                    key_max_inflight=self.batch.key_max_inflight,
                    low_age_s=self.batch.low_age_s,
                )
            return self._batcher

    def close(self) -> None:
        """Stop the engine thread (waiting sequences fail); MLX must not be torn down under it at exit."""
        if self._batcher is not None:
            self._batcher.stop()
            self._batcher = None

    @property
    def kv_limit(self) -> int:
        """Bytes of KV the batch may hold: BatchLimits.tokens of this model's growing KV (each of the batch's
        sequences with its windows and fixed state beside them), or the budget's KV share."""
        if not self.batch.tokens:
            return self.budget.kv
        return self.kv_shape.limit(self.batch.tokens, self.batch.size, chunk=self.prefill_step)

    @property
    def kv_per_token(self) -> int:
        """Bytes per token of the layers whose cache grows (0 for a model with none)."""
        return self.kv_shape.per_token

    def speculation(self) -> dict[str, int]:
        """Speculative decoding's counters (/health, /metrics): draft tokens verified and accepted, decode steps and
        the tokens they generated (tokens per step)."""
        s = self.draft_stats
        return {"drafted": s.drafted, "accepted": s.accepted, "decode_steps": s.steps, "decode_tokens": s.tokens}

    def memory(self) -> dict[str, int]:
        """The budget, each part's limit and use, MLX's own counts and the process's RSS (/health, /metrics)."""
        batch = (
            self.batcher.stats()
            if self._batcher is not None
            else dict.fromkeys(("kv_bytes", "parked_bytes", "ahead_bytes"), 0)
        )
        return {
            **self.budget.limits(),
            "kv_in_flight": batch["kv_bytes"],
            # Within the KV share beside the batch (worker.batcher): parked sequences' caches, and a coming join's
            # buffers made ahead of it.
            "kv_parked": batch["parked_bytes"],
            "kv_ahead": batch["ahead_bytes"],
            "kv_limit": self.kv_limit,
            "prefix_cache": int(self.prefix.lru.held) if self.prefix is not None else 0,
            "prefix_spilling": self.prefix.spilling if self.prefix is not None else 0,
            **mlx_memory(),
            "rss": rss(),
            "rss_peak": peak_rss(),
        }

    def submit(
        self,
        kind: JobKind,
        request: Request | dict[str, Any],
        *,
        priority: Priority = "interactive",
        use_prefix_cache: bool = True,
        owner: str = "",
        partition: str | None = None,
        watched: bool = True,
    ) -> Sequence:
        """Queue one request for the batch; read its events from the returned sequence. A plain dict (tests,
        benchmarks) is validated as a Request first. `owner` (an API key's id, or a session) gets its fair share.
        `partition`: the prefix-cache partition it is served from and stored into (mlxq.keys.cache_partition of its
        job's namespace and its `cache_salt`); None: its salt's alone (no namespace). `watched`: a client streams
        it; an answer read whole (a sync request, a job, a batch line) lets the batch prefill newcomers together.

        Raises RequestError (in the caller's thread, before anything is queued) when the prompt does not fit.
        """
        request = typed(request, self.key.path)
        seq = self.builder.build(
            kind,
            request,
            priority=priority,
            use_prefix_cache=use_prefix_cache,
            checkpoints=self.checkpoints and use_prefix_cache and self.prefix is not None,
            owner=owner,
            partition=cache_partition("", request.cache_salt) if partition is None else partition,
            watched=watched,
        )
        self.batcher.submit(seq)
        return seq

    def generate(
        self,
        kind: JobKind,
        request: Request | dict[str, Any],
        emit: EventSink | None = None,
        should_stop: Callable[[], bool] | None = None,
        *,
        priority: Priority = "interactive",
        use_prefix_cache: bool = True,
    ) -> GenerationResult:
        """Run one request to completion through the batch (tests, benchmarks, warm-up).

        `emit` receives events as they happen: `started`, `progress` (prefill), `delta` (content
        safe to show, never part of a stop string or a tool call), and `tool_calls` at the end.
        """
        seq = self.submit(kind, request, priority=priority, use_prefix_cache=use_prefix_cache)
        return wait(seq, emit or (lambda _event: None), should_stop)


def wait(
    seq: Sequence, emit: EventSink, should_stop: Callable[[], bool] | None = None, poll_s: float = 0.1
) -> GenerationResult:
    """Relay a sequence's events to `emit` until it ends; its result, or its error raised."""
    while True:
        try:
            event = seq.events.get(timeout=poll_s)
        except queue.Empty:
            if should_stop is not None and should_stop():
                seq.cancelled.set()
            continue
        if event is None:
            break
        emit(event)
    if seq.error is not None:
        raise seq.error
    assert seq.result is not None
    return seq.result
