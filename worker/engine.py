"""The MLX engine: one loaded model, its tokenizer, and generation through mlx-lm."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import dequantize_model

from mlxq.contract import GenerationResult, JobError, job_error
from worker.prefix_cache import PrefixCache
from worker.tool_parse import ModelToolFormat, ToolStreamFilter, model_tool_format
from worker.tool_prompt import prepare_chat, template_knows_tools

log = logging.getLogger(__name__)

EventSink = Callable[[dict[str, Any]], None]
# Prefill in chunks this size: each chunk reports progress (SSE keepalives during long prompts).
PREFILL_STEP = 512


class RequestError(Exception):
    """A request the model cannot serve as asked (a 4xx, not a server fault)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.error: JobError = job_error(400, message, type="invalid_request_error", code=code, param=param)


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


def _model_key(path: Path) -> ModelKey:
    weights = sorted(path.glob("*.safetensors"))
    revision = ",".join(f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights)
    return ModelKey(str(path.resolve()), revision)


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Any, key: ModelKey, context_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.key = key
        self.context_length = context_length
        self.tool_format: ModelToolFormat | None = model_tool_format(_parser_name(tokenizer))
        self.prefix: PrefixCache | None = None

    def enable_prefix_cache(self, *, max_entries: int, max_bytes: int) -> PrefixCache:
        self.prefix = PrefixCache(self.model, self.key, max_entries, max_bytes)
        return self.prefix

    @classmethod
    def load(cls, model: str) -> Engine:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model directory {path} not found (run `mlxq models pull` for the built-in model)"
            )
        net, tokenizer, config = mlx_load(str(path), return_config=True)
        if _on_cpu():
            # MLX's CPU backend has no fast quantized kernels: float32 is its fastest path.
            dequantize_model(net)
            net.set_dtype(mx.float32)
            mx.eval(net.parameters())
        context = int(config.get("max_position_embeddings") or 8192)
        return cls(net, tokenizer, _model_key(path), context)

    def warm_up(self) -> None:
        """One short generation at start, so the first real request does not pay first-run costs.

        With a loaded prefix cache it runs through the most recent entry, so its size (the copy,
        the allocations for a long context) is paid here too; the cache's counters are left as they were.
        """
        prompt, cache = self.tokenizer.encode("Hello"), None
        if self.prefix is not None and (entries := self.prefix.entries()):
            saved = dataclasses.replace(self.prefix.stats)
            fetched = self.prefix.fetch(entries[-1][0])
            prompt, cache = fetched.rest, fetched.cache
            self.prefix.stats = saved
        for _ in stream_generate(self.model, self.tokenizer, prompt, max_tokens=2, prompt_cache=cache):
            pass

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
            return [int(t) for t in prompt]
        return self.tokenizer.encode(prompt)

    # -- generation ------------------------------------------------------------------------

    def _logprob_entry(self, token: int, logprobs: mx.array, top: int) -> dict[str, Any]:
        text = self.tokenizer.decode([token])
        entry: dict[str, Any] = {"token": text, "logprob": float(logprobs[token]),
                                 "bytes": list(text.encode()), "top_logprobs": []}
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top].tolist()
            ids.sort(key=lambda i: -float(logprobs[i]))
            entry["top_logprobs"] = [
                {"token": (t := self.tokenizer.decode([i])), "logprob": float(logprobs[i]), "bytes": list(t.encode())}
                for i in ids
            ]
        return entry

    def generate(self, kind: str, request: dict[str, Any], emit: EventSink | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """Run one request to completion.

        `emit` receives events as they happen: `started`, `progress` (prefill), `delta` (content
        safe to show, never part of a stop string or a tool call), and `tool_calls` at the end.
        """
        emit = emit or (lambda _event: None)
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
        max_tokens = min(int(request.get("max_tokens") or 16), self.context_length - len(prompt))
        if request.get("seed") is not None:
            mx.random.seed(int(request["seed"]))
        sampler = make_sampler(
            temp=float(request.get("temperature", 1.0)),
            top_p=float(request.get("top_p") or 0.0),
            min_p=float(request.get("min_p") or 0.0),
            top_k=int(request.get("top_k") or 0),
        )
        processors = make_logits_processors(
            repetition_penalty=request.get("repetition_penalty"),
            presence_penalty=request.get("presence_penalty"),
            frequency_penalty=request.get("frequency_penalty"),
        )
        want_logprobs = bool(request.get("logprobs"))
        top_logprobs = int(request.get("top_logprobs") or 0)
        stops: list[str] = list(request.get("stop") or [])
        if prefill:  # a forced call ends with its closing tag
            stops.append("</tool_call>")
        # Text that could still be the start of a stop string is held back from the stream.
        stop_hold = max((len(s) for s in stops), default=1) - 1
        tool_filter = ToolStreamFilter(tools, self.tool_format)
        fetched = self.prefix.fetch(prompt) if self.prefix is not None else None
        prompt_cache = fetched.cache if fetched is not None else make_prompt_cache(self.model)
        to_prefill = fetched.rest if fetched is not None else prompt
        cached_tokens = fetched.cached_tokens if fetched is not None else 0
        fed = list(prompt)  # what the KV cache will have seen: prompt, then each generated token
        emit({"type": "started", "prompt_tokens": len(prompt), "cached_tokens": cached_tokens})

        text, shown, finish, generated = prefill, 0, "length", 0
        pending_logprobs: list[dict[str, Any]] = []
        all_logprobs: list[dict[str, Any]] = []
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            emit({"type": "progress", "processed": done, "total": total})

        steps = stream_generate(self.model, self.tokenizer, to_prefill, max_tokens=max_tokens, sampler=sampler,
                                logits_processors=processors, prompt_cache=prompt_cache,
                                prefill_step_size=PREFILL_STEP, prompt_progress_callback=progress)
        for response in steps:
            generated = response.generation_tokens
            fed.append(response.token)
            text += response.text
            if want_logprobs and response.finish_reason != "stop":
                entry = self._logprob_entry(response.token, response.logprobs, top_logprobs)
                pending_logprobs.append(entry)
                all_logprobs.append(entry)
            if stops:
                search_from = max(len(prefill), shown - stop_hold, len(text) - len(response.text) - stop_hold)
                cut = min((i for i in (text.find(s, search_from) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
            if response.finish_reason is not None:
                finish = response.finish_reason
            safe = tool_filter.safe_length(text[: max(len(text) - stop_hold, 0)] if stops else text)
            if safe > shown:
                emit({"type": "delta", "content": text[shown:safe], "logprobs": pending_logprobs or None})
                shown, pending_logprobs = safe, []
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break

        steps.close()  # no step runs after this, so the cache holds exactly what was fed
        if self.prefix is not None:
            self.prefix.insert(fed, prompt_cache)
        rest, calls = tool_filter.finish(text, shown)
        if rest or pending_logprobs:
            emit({"type": "delta", "content": rest, "logprobs": pending_logprobs or None})
        if calls:
            emit({"type": "tool_calls", "tool_calls": calls})
        log.info("generated %d tokens (prompt %d) in %.2fs", generated, len(prompt), time.perf_counter() - started)
        result = GenerationResult(
            text=text[:shown] + rest,
            finish_reason="tool_calls" if calls else ("stop" if finish not in ("length", "cancelled") else finish),
            usage={"prompt_tokens": len(prompt), "completion_tokens": generated, "cached_tokens": cached_tokens},
        )
        if calls:
            result["tool_calls"] = calls
        if want_logprobs:
            result["logprobs"] = all_logprobs
        return result
