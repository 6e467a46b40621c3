"""A typed request (mlxq.request.Request) becomes a `Sequence` here and nowhere else: its prompt tokens (chat
template and tool prompt, or a completion's text or token ids), sampler, logits processors (penalties, then the
grammar), stop strings, logprobs and max_tokens.

Sampling is read once, into `SamplingSettings`: one field per field of mlxq.request.Sampling, checked at import,
so a sampling parameter declared there and not used here fails at once instead of being silently ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlxq.contract import JobError, JobKind, Priority, context_exceeded, job_error
from mlxq.grammar import Constraint, constraint_for
from mlxq.request import SAMPLING, Request
from worker.boundaries import Marks, chat_marks, completion_marks
from worker.constrained import GrammarError, Grammars
from worker.seeded_sampler import SeededSampler
from worker.sequence import Sampler, Sequence
from worker.tool_parse import ModelToolFormat, ToolStreamFilter
from worker.tool_prompt import prepare_chat, template_knows_tools

log = logging.getLogger(__name__)

# OpenAI's defaults, for a request that left them out (a canonical request has both: mlxq.keys fills them).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A request the model cannot serve as asked (a 4xx, not a server fault)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.error: JobError = job_error(400, message, type="invalid_request_error", code=code, param=param)


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen, as the worker uses it: defaults filled in, 0 meaning off."""

    temperature: float  # 0: greedy
    top_p: float  # 0 or 1: off
    top_k: int  # 0: off (as is a value at or past the vocabulary)
    min_p: float
    seed: int | None  # None: the shared random state
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logprobs: bool
    top_logprobs: int


if {f.name for f in fields(SamplingSettings)} != set(SAMPLING):
    raise TypeError(f"SamplingSettings must have one field per mlxq.request.Sampling field: {sorted(SAMPLING)}")


def sampling_settings(request: Request, vocab_size: int) -> SamplingSettings:
    top_k = int(request.top_k or 0)
    return SamplingSettings(
        temperature=DEFAULT_TEMPERATURE if request.temperature is None else float(request.temperature),
        top_p=float(request.top_p or 0.0),
        top_k=top_k if top_k < vocab_size else 0,
        min_p=float(request.min_p or 0.0),
        seed=request.seed,
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        repetition_penalty=float(request.repetition_penalty or 0.0),
        logprobs=bool(request.logprobs),
        top_logprobs=int(request.top_logprobs or 0),
    )


def penalty_processors(sampling: SamplingSettings) -> list[Any]:
    # mlx-lm leaves out a penalty of 0.
    return make_logits_processors(
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
    )


def final_prefill(messages: list[dict[str, Any]]) -> bool:
    """A final assistant message with text and no tool calls is the start of the answer, which the model continues:
    Anthropic's Messages API says so ("prefill"), and llama.cpp's server and Ollama take any dialect's that way."""
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant" or last.get("tool_calls"):
        return False
    content = last.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return isinstance(content, str) and bool(content.strip())


def typed(request: Request | dict[str, Any], model: str) -> Request:
    """A plain body (tests, benchmarks) validated as the api's requests are; it may leave out `model`."""
    return request if isinstance(request, Request) else Request.model_validate({"model": model, **request})


class SequenceBuilder:
    """The loaded model's tokenizer, vocabulary, context and grammars: what turning a request into a sequence needs."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        context_length: int,
        grammars: Grammars,
        tool_format: ModelToolFormat | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.grammars = grammars
        self.tool_format = tool_format
        self._samplers: dict[tuple[float, float, float, int], Sampler] = {}

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    # -- prompts ---------------------------------------------------------------------------

    def chat_prompt(self, request: Request) -> tuple[list[int], str, list[dict[str, Any]]]:
        """(prompt tokens, answer prefill, tools to parse for) of a chat request."""
        prompt, prefill, tools, _ = self._chat(request, continuing=self._continuing("chat", request), checkpoints=False)
        return prompt, prefill, tools

    def _chat(
        self, request: Request, *, continuing: bool, checkpoints: bool
    ) -> tuple[list[int], str, list[dict[str, Any]], Marks]:
        """`chat_prompt`, and the prompt's prefix-cache checkpoints when asked (worker.boundaries)."""
        if request.messages is None:
            raise RequestError("a chat request needs `messages`.", param="messages")
        wire = request.wire()
        messages, tools, prefill, parse_tools = prepare_chat(wire, template_knows_tools(self.chat_template))
        text = self._render(messages, tools, continuing=continuing)
        if not checkpoints:
            return self.tokenizer.encode(text + prefill, add_special_tokens=False), prefill, parse_tools, {}
        # worker.tool_prompt may have put a system message before the canonical ones (mlxq.keys.prefix_hashes').
        shift = len(messages) - len(wire.get("messages") or [])
        prompt, marks = chat_marks(self.tokenizer, messages, tools, text + prefill, shift=shift)
        return prompt, prefill, parse_tools, marks

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, continuing: bool) -> str:
        """The template's text: a new assistant turn opened, or the final assistant message left open to continue
        (the template may not place its content where it can be found: then a new turn, logged)."""
        if continuing:
            try:
                return str(
                    self.tokenizer.apply_chat_template(
                        messages, tools=tools, continue_final_message=True, tokenize=False
                    )
                )
            except ValueError as exc:
                log.warning("the final assistant message opens a new turn: %s", exc)
        return str(
            self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        )

    def continues(self, kind: JobKind, request: Request, constraint: Constraint | None) -> bool:
        """The answer goes on from text already in the prompt, so its first token's leading space is its own: a
        completion's prompt, or a chat's final assistant message (a prefill, `final_prefill`) where no grammar holds
        the whole answer from its start (a schema, a forced tool call: they open a new turn). `constraint`: the
        request's (`constraint_of`)."""
        if kind != "chat":
            return True
        if not final_prefill(request.wire().get("messages") or []):
            return False
        return constraint is None or constraint.trigger is not None

    def _continuing(self, kind: JobKind, request: Request) -> bool:
        return self.continues(kind, request, self.constraint_of(kind, request))

    def completion_tokens(self, request: Request) -> list[int]:
        prompt = request.prompt
        if prompt is None:
            raise RequestError("a completion request needs a `prompt`.", param="prompt")
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

    def prompt(self, kind: JobKind, request: Request) -> tuple[list[int], str, list[dict[str, Any]]]:
        """The prompt and what comes with it, refused (RequestError) when it leaves no room to answer."""
        prompt, prefill, tools, _ = self._prompt(
            kind, request, continuing=self._continuing(kind, request), checkpoints=False
        )
        return prompt, prefill, tools

    def _prompt(
        self, kind: JobKind, request: Request, *, continuing: bool, checkpoints: bool
    ) -> tuple[list[int], str, list[dict[str, Any]], Marks]:
        """`prompt`, and its prefix-cache checkpoints when asked."""
        if kind == "chat":
            prompt, prefill, tools, marks = self._chat(request, continuing=continuing, checkpoints=checkpoints)
            if len(prompt) + 1 > self.context_length and request.truncation == "auto":
                shorter = self._truncated(request, continuing=continuing, checkpoints=checkpoints)
                if shorter is not None:
                    prompt, prefill, tools, marks = shorter
        else:
            prompt, prefill, tools = self.completion_tokens(request), "", []
            marks = completion_marks(prompt) if checkpoints else {}
        if len(prompt) + 1 > self.context_length:
            raise RequestError(
                context_exceeded(len(prompt), self.context_length),
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        return prompt, prefill, tools, marks

    def _truncated(
        self, request: Request, *, continuing: bool, checkpoints: bool
    ) -> tuple[list[int], str, list[dict[str, Any]], Marks] | None:
        """The Responses API's `truncation: "auto"` for a conversation over the context: its oldest turns left out,
        as few as leave room for the answer (its max_tokens, at most a quarter of the context); None when even the
        last turn alone leaves none; where it may cut: `Request.truncation_cuts`. Its checkpoints name no boundary
        hash: those are the whole conversation's (mlxq.keys.prefix_hashes)."""
        messages = request.messages or []
        lead, cuts = request.truncation_cuts()
        room = min(request.max_tokens or DEFAULT_MAX_TOKENS, self.context_length // 4)
        found = None
        low, high = 0, len(cuts) - 1
        while low <= high:  # the earliest cut that fits: a later one leaves out more (one render per try)
            mid = (low + high) // 2
            shorter = request.model_copy(update={"messages": messages[:lead] + messages[cuts[mid] :]})
            tried = self._chat(shorter, continuing=continuing, checkpoints=checkpoints)
            if len(tried[0]) + room <= self.context_length:
                found, high = tried, mid - 1
            else:
                low = mid + 1
        if found is None:
            return None
        prompt, prefill, tools, marks = found
        log.info("truncation auto: %d of %d messages left out", cuts[low] - lead, len(messages))
        return prompt, prefill, tools, {position: (cache_type, None) for position, (cache_type, _) in marks.items()}

    # -- sampling and constraints --------------------------------------------------------------

    def sampler(self, sampling: SamplingSettings) -> Sampler | None:
        params = (sampling.temperature, sampling.top_p, sampling.min_p, sampling.top_k)
        if sampling.temperature == 0:
            return None  # the generator's greedy sampler, one batched argmax for all greedy sequences
        if sampling.seed is not None:
            return SeededSampler(*params, seed=sampling.seed)
        if params not in self._samplers:  # shared by equal requests, so they sample in one call
            self._samplers[params] = make_sampler(temp=params[0], top_p=params[1], min_p=params[2], top_k=params[3])
        return self._samplers[params]

    def constraint_of(self, kind: JobKind, request: Request) -> Constraint | None:
        """The grammar the answer must match (mlxq.grammar), if any."""
        native = kind == "chat" and template_knows_tools(self.chat_template)
        return constraint_for(request.wire(), native_tools=native)

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes (a byte-level token may hold part of a character), read through the grammar
        engine's tokenizer, which knows each family's byte encoding."""
        return self.grammars.tokenizer().decode_bytes([token])

    def grammar(self, constraint: Constraint | None) -> Any:
        """The constraint's logits processor (None when there is none, or a best-effort one did not compile)."""
        if constraint is None:
            return None
        try:
            return self.grammars.processor(constraint)
        except GrammarError as exc:
            if constraint.required:
                raise RequestError(f"The grammar does not compile: {exc}", param=constraint.param) from exc
            log.warning("tool calls left unconstrained: %s", exc)
            return None

    # -- the sequence ----------------------------------------------------------------------

    def build(
        self,
        kind: JobKind,
        request: Request,
        *,
        priority: Priority = "interactive",
        use_prefix_cache: bool = True,
        checkpoints: bool = False,
        owner: str = "",
        partition: str = "",
        watched: bool = True,
    ) -> Sequence:
        """The request as one sequence of the batch; RequestError when the model cannot serve it as asked.
        `checkpoints`: the model's cache cannot be trimmed and the prefix cache is on: the sequence gets the
        positions to keep checkpoints at (worker.boundaries). `owner`: whose it is, for fair shares (worker.batcher).
        `partition`: the prefix-cache partition it is served from and stored into (mlxq.keys.cache_partition).
        `watched`: a client streams it (worker.generator.Admission.watched)."""
        # One reading of the grammar decides both where the answer starts and what holds it.
        constraint = self.constraint_of(kind, request)
        continuing = self.continues(kind, request, constraint)
        prompt, prefill, tools, marks = self._prompt(kind, request, continuing=continuing, checkpoints=checkpoints)
        sampling = sampling_settings(request, self.vocab_size)
        processors = penalty_processors(sampling)
        grammar = self.grammar(constraint)
        if grammar is not None:  # last, so the mask has the final word over the penalties
            processors.append(grammar)
        max_tokens = request.max_tokens or DEFAULT_MAX_TOKENS
        return Sequence(
            prompt=prompt,
            max_tokens=min(int(max_tokens), self.context_length - len(prompt)),
            sampler=self.sampler(sampling),
            processors=processors,
            # A client's stop string must not cut an answer that a grammar holds whole (it would not parse).
            stops=[] if constraint is not None and constraint.trigger is None else list(request.stop or []),
            tool_filter=ToolStreamFilter(tools, self.tool_format),
            detokenizer=self.tokenizer.detokenizer,
            keep_space=continuing,
            decode=self.tokenizer.decode,
            token_bytes=self.token_bytes if sampling.logprobs else None,
            priority=priority,
            owner=owner,
            prefill=prefill,
            logprobs=sampling.logprobs,
            top_logprobs=sampling.top_logprobs,
            use_prefix_cache=use_prefix_cache,
            partition=partition,
            watched=watched,
            checkpoints=marks,
            prediction=self.tokenizer.encode(request.prediction, add_special_tokens=False)
            if request.prediction
            else [],
        )
