"""The MLX engine: one loaded model, its tokenizer, and generation through mlx-lm."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler
from mlx_lm.utils import dequantize_model

from mlxq.contract import GenerationResult, JobError, JobKind, Priority, job_error
from mlxq.events import Event
from mlxq.grammar import constraint_for
from mlxq.weights import fingerprint
from worker.batcher import Batcher, KvLimit
from worker.constrained import GrammarError, Grammars
from worker.memory import (
    ALLOWANCE_SLACK,
    Budget,
    check_fits,
    default_budget,
    mlx_memory,
    parameters,
    peak_rss,
    prefill_bytes_per_token,
    prefill_sizes,
    rss,
    weights_bytes,
)
from worker.prefix_cache import PrefixCache
from worker.sequence import Sampler, Sequence
from worker.tool_parse import ModelToolFormat, ToolStreamFilter, model_tool_format
from worker.tool_prompt import prepare_chat, template_knows_tools

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger(__name__)

EventSink = Callable[[Event], None]
# Prefill in chunks this size: each chunk reports progress (SSE keepalives during long prompts).
PREFILL_STEP = 512


class RequestError(Exception):
    """A request the model cannot serve as asked (a 4xx, not a server fault)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.error: JobError = job_error(400, message, type="invalid_request_error", code=code, param=param)


@dataclass(frozen=True)
class BatchLimits:
    """Sequences decoded together, KV tokens they may hold (0 = what the memory budget's KV share holds), and at
    most this many sequences prefilled together (fewer when the budget's prefill share is small)."""

    size: int = 16
    tokens: int = 0
    prefill: int = 8


@dataclass(frozen=True)
class ModelKey:
    """Hashable, stable identity of the loaded weights (never the model object itself)."""

    path: str
    revision: str


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


def _model_key(path: Path) -> ModelKey:
    return ModelKey(str(path.resolve()), fingerprint(path))


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        key: ModelKey,
        context_length: int,
        batch: BatchLimits | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.key = key
        self.context_length = context_length
        self.tool_format: ModelToolFormat | None = model_tool_format(_parser_name(tokenizer))
        self.prefix: PrefixCache | None = None
        self.batch = batch or BatchLimits()
        self._batcher: Batcher | None = None
        self._batcher_lock = threading.Lock()
        self._samplers: dict[tuple[float, float, float, int], Sampler] = {}
        self.vocab_size = _vocab_size(model, tokenizer)
        # mlx-lm's TokenizerWrapper holds the HF fast tokenizer llguidance reads.
        self.grammars = Grammars(getattr(tokenizer, "_tokenizer", tokenizer), self.vocab_size)
        self.budget = budget or Budget.split(default_budget(), weights_bytes(model), rss() + ALLOWANCE_SLACK)
        self.kv_per_token = self._kv_bytes_per_token()
        # The longest a sequence's KV can be: what prefill's working set is sized for.
        longest = min(context_length, max(self.budget.kv // self.kv_per_token, 1))
        on_cpu = _on_cpu()
        itemsize = next(iter(v.dtype.size for v in parameters(model)), 4)
        per_token = prefill_bytes_per_token(getattr(model, "args", None), longest, itemsize, on_cpu)
        self.prefill_step, self.prefill_sequences = prefill_sizes(
            self.budget.prefill, per_token, chunk=PREFILL_STEP, sequences=self.batch.prefill
        )

    def enable_prefix_cache(self, *, max_entries: int, max_bytes: int | None = None) -> PrefixCache:
        """The prefix cache, bounded by `max_bytes` or else by the memory budget's prefix share."""
        self.prefix = PrefixCache(self.model, self.key, max_entries, max_bytes or self.budget.prefix)
        return self.prefix

    def save_prefix_cache(self, directory: Path, max_bytes: int) -> int:
        """Persist the prefix cache from the engine thread: its arrays live on that thread's stream."""
        prefix = self.prefix
        return self.batcher.call(lambda: prefix.save(directory, max_bytes)) if prefix is not None else 0

    @classmethod
    def load(cls, model: str, batch: BatchLimits | None = None, memory: int = 0, prefix_bytes: int = 0) -> Engine:
        """Load a model within a memory budget of `memory` bytes (0: the machine's default), `prefix_bytes` of it
        (0: the budget's share) for the prefix cache. A model that does not fit raises ModelTooLarge."""
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model directory {path} not found (run `mlxq models pull` for the built-in model)")
        total = memory or default_budget()
        allowance = rss() + ALLOWANCE_SLACK  # the process before the model: Python, libraries, tokenizer to come
        check_fits(sum(f.stat().st_size for f in path.glob("*.safetensors")), total, path.name)
        # With return_config=True it is (model, tokenizer, config); mlx-lm's hint is the union of both forms.
        loaded = mlx_load(str(path), return_config=True)
        net, tokenizer, config = cast("tuple[nn.Module, TokenizerWrapper, dict[str, Any]]", loaded)
        if _on_cpu():
            # MLX's CPU backend has no fast quantized kernels: float32 is its fastest path.
            dequantize_model(net)
            net.set_dtype(mx.float32)
            mx.eval(net.parameters())
        context = int(config.get("max_position_embeddings") or 8192)
        budget = Budget.split(total, weights_bytes(net), allowance, prefix=prefix_bytes, model=path.name)
        return cls(net, tokenizer, _model_key(path), context, batch, budget)

    def warm_up(self) -> None:
        """One short generation at start, so the first real request does not pay first-run costs."""
        self.generate("completion", {"prompt": "Hello", "temperature": 0.0, "max_tokens": 2}, use_prefix_cache=False)

    # -- prompts ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def chat_prompt(self, request: dict[str, Any]) -> tuple[list[int], str, list[dict[str, Any]]]:
        """(prompt tokens, answer prefill, tools to parse for) for a canonical chat request."""
        messages, tools, prefill, parse_tools = prepare_chat(request, template_knows_tools(self.chat_template))
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text + prefill, add_special_tokens=False), prefill, parse_tools

    def chat_tokens(self, request: dict[str, Any]) -> list[int]:
        return self.chat_prompt(request)[0]

    def completion_tokens(self, request: dict[str, Any]) -> list[int]:
        prompt = request["prompt"]
        if isinstance(prompt, list):  # already token ids
            tokens = [int(t) for t in prompt]
            if bad := [t for t in tokens if not 0 <= t < self.vocab_size]:
                # Out-of-range ids would index past the embedding inside the shared batch.
                raise RequestError(
                    f"prompt token ids must be in [0, {self.vocab_size}); got {bad[0]}.",
                    param="prompt",
                    code="invalid_token_id",
                )
            return tokens
        return self.tokenizer.encode(prompt)

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
                    kv=KvLimit(self.kv_limit, self.kv_per_token),
                    prefill_batch_size=self.prefill_sequences,
                    prefill_step=self.prefill_step,
                    prefix=lambda: self.prefix,
                    budget=self.budget,
                )
            return self._batcher

    def close(self) -> None:
        """Stop the engine thread (waiting sequences fail); MLX must not be torn down under it at exit."""
        if self._batcher is not None:
            self._batcher.stop()
            self._batcher = None

    @property
    def kv_limit(self) -> int:
        """Bytes of KV the batch may hold: BatchLimits.tokens of this model's KV, or the budget's KV share."""
        return self.batch.tokens * self.kv_per_token if self.batch.tokens else self.budget.kv

    def _kv_bytes_per_token(self) -> int:
        """This model's KV bytes per token, measured on a one-token cache."""
        cache = make_prompt_cache(self.model)
        self.model(mx.array([[0]]), cache=cache)
        per_token = sum(c.nbytes / max(c.keys.shape[2], 1) for c in cache if getattr(c, "keys", None) is not None)
        return max(int(per_token), 1)

    def memory(self) -> dict[str, int]:
        """The budget, each part's limit and use, MLX's own counts and the process's RSS (/health, /metrics)."""
        batch = self.batcher.stats() if self._batcher is not None else {"kv_bytes": 0}
        return {
            **self.budget.limits(),
            "kv_in_flight": batch["kv_bytes"],
            "kv_limit": self.kv_limit,
            "prefix_cache": int(self.prefix.lru.nbytes) if self.prefix is not None else 0,
            **mlx_memory(),
            "rss": rss(),
            "rss_peak": peak_rss(),
        }

    def submit(
        self,
        kind: JobKind,
        request: dict[str, Any],
        *,
        priority: Priority = "interactive",
        use_prefix_cache: bool = True,
    ) -> Sequence:
        """Queue one request for the batch; read its events from the returned sequence.

        Raises RequestError (in the caller's thread, before anything is queued) when the prompt does not fit.
        """
        if kind == "chat":
            prompt, prefill, tools = self.chat_prompt(request)
        else:
            prompt, prefill, tools = self.completion_tokens(request), "", []
        if len(prompt) + 1 > self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens; "
                f"the prompt has {len(prompt)} tokens.",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        processors = make_logits_processors(
            repetition_penalty=request.get("repetition_penalty"),
            presence_penalty=request.get("presence_penalty"),
            frequency_penalty=request.get("frequency_penalty"),
        )
        native = kind == "chat" and template_knows_tools(self.chat_template)
        if (constraint := constraint_for(request, native_tools=native)) is not None:
            try:  # last, so the mask has the final word over the penalties
                processors.append(self.grammars.processor(constraint))
            except GrammarError as exc:
                if constraint.required:
                    raise RequestError(f"The grammar does not compile: {exc}", param=constraint.param) from exc
                log.warning("tool calls left unconstrained: %s", exc)
        seq = Sequence(
            prompt=prompt,
            max_tokens=min(int(request.get("max_tokens") or 16), self.context_length - len(prompt)),
            sampler=self._sampler(request),
            processors=processors,
            # A client's stop string must not cut an answer that a grammar holds whole (it would not parse).
            stops=[] if constraint is not None and constraint.trigger is None else list(request.get("stop") or []),
            tool_filter=ToolStreamFilter(tools, self.tool_format),
            detokenizer=self.tokenizer.detokenizer,
            decode=self.tokenizer.decode,
            priority=priority,
            prefill=prefill,
            logprobs=bool(request.get("logprobs")),
            top_logprobs=int(request.get("top_logprobs") or 0),
            use_prefix_cache=use_prefix_cache,
        )
        self.batcher.submit(seq)
        return seq

    def _sampler(self, request: dict[str, Any]) -> Sampler | None:
        top_k = int(request.get("top_k") or 0)
        params = (
            float(request.get("temperature", 1.0)),
            float(request.get("top_p") or 0.0),
            float(request.get("min_p") or 0.0),
            top_k if top_k < self.vocab_size else 0,
        )
        if params[0] == 0:
            return None  # the generator's greedy sampler, one batched argmax for all greedy sequences
        if request.get("seed") is not None:
            return seeded_sampler(*params, seed=int(request["seed"]))
        if params not in self._samplers:  # shared by equal requests, so they sample in one call
            self._samplers[params] = make_sampler(temp=params[0], top_p=params[1], min_p=params[2], top_k=params[3])
        return self._samplers[params]

    def generate(
        self,
        kind: JobKind,
        request: dict[str, Any],
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


def seeded_sampler(temp: float, top_p: float, min_p: float, top_k: int, seed: int) -> Sampler:
    """mlx-lm's sampling chain drawing from its own random key, so a seed reproduces whatever else is batched."""
    # mlx-lm's samplers draw from the global mx.random.state, which MLX 0.32 no longer lets a caller swap
    # per request; its filters are reused here and only the draw takes this request's key.
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        for f in filters:
            logprobs = f(logprobs)
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temp), key=draw)

    return sample


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
