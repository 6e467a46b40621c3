"""The MLX engine: one loaded model, its tokenizer, and generation through mlx-lm."""

from __future__ import annotations

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
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import dequantize_model

from mlxq.contract import GenerationResult, JobError, job_error

log = logging.getLogger(__name__)

DeltaSink = Callable[[str], None]


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

    # -- prompts ---------------------------------------------------------------------------

    def chat_tokens(self, request: dict[str, Any]) -> list[int]:
        messages = [dict(m) for m in request["messages"]]
        for m in messages:
            if m.get("content") is None:
                m["content"] = ""
        text = self.tokenizer.apply_chat_template(
            messages, tools=request.get("tools") or None, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_tokens(self, request: dict[str, Any]) -> list[int]:
        return self.tokenizer.encode(request["prompt"])

    # -- generation ------------------------------------------------------------------------

    def generate(self, kind: str, request: dict[str, Any], on_delta: DeltaSink | None = None,
                 should_stop: Callable[[], bool] | None = None) -> GenerationResult:
        """Run one request to completion, calling `on_delta` with text safe to show so far."""
        prompt = self.chat_tokens(request) if kind == "chat" else self.completion_tokens(request)
        max_tokens = int(request.get("max_tokens") or 16)
        if len(prompt) + 1 > self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens; "
                f"the prompt has {len(prompt)} tokens.",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = min(max_tokens, self.context_length - len(prompt))
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
        stops: list[str] = list(request.get("stop") or [])
        # Text that could still be the start of a stop string is held back from the stream.
        hold = max((len(s) for s in stops), default=1) - 1

        text, sent, finish, generated = "", 0, "length", 0
        started = time.perf_counter()
        for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                         sampler=sampler, logits_processors=processors):
            generated = response.generation_tokens
            text += response.text
            if stops:
                cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0),
                          default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
            if response.finish_reason is not None:
                finish = response.finish_reason
            if on_delta is not None and len(text) - hold > sent:
                on_delta(text[sent: len(text) - hold])
                sent = len(text) - hold
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
        if on_delta is not None and len(text) > sent:
            on_delta(text[sent:])
        log.info("generated %d tokens (prompt %d) in %.2fs", generated, len(prompt), time.perf_counter() - started)
        return GenerationResult(
            text=text,
            finish_reason="stop" if finish not in ("length", "cancelled") else finish,
            usage={"prompt_tokens": len(prompt), "completion_tokens": generated, "cached_tokens": 0},
        )
