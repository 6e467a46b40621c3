"""The one request every dialect becomes: neutral, typed, hashed by mlxq.keys and read by the worker.

Each dialect's adapter (api.dialects.*) turns its own body into the neutral chat or completion body;
mlxq.keys canonicalizes it (defaults filled, aliases resolved, ids renumbered) and `Request` types the
result. The job row stores `Request.wire()` and the worker reads it back with `Request.model_validate`,
so the api→worker contract is this class, not a dict read with `.get`.

Sampling parameters are declared once: in `SamplingExtras` (which every dialect's request model inherits and
every adapter carries by name) or, for the few each dialect names its own way, in `Sampling`. A new one is one
field there plus its use in the worker's sampler (worker.sequence_builder.SamplingSettings, which refuses to
import without it); the key covers it by itself (mlxq.keys.OUTPUT_FIELDS is read from here), and
tests/test_sampling_reach.py fails until every dialect carries it to the sampler.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Seeds the worker can use: mlx.core.random.key takes 0..2**64-1; OpenAI documents an int64, so the
# intersection (a non-negative int64, which PostgreSQL's JSON and any client also hold) is accepted.
MAX_SEED = 2**63 - 1

JobKind = Literal["chat", "completion", "count"]
# Interactive requests (sync and streamed) are admitted to the batch before low-priority work
# (batch lines, jobs that ask for it); OpenAI clients ask for low priority with `service_tier: "flex"`.
Priority = Literal["interactive", "low"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "low")


def priority_of(service_tier: str | None) -> Priority:
    """OpenAI's "flex" tier (slower, cheaper) is low priority; every other tier is interactive."""
    return "low" if service_tier == "flex" else "interactive"


class SamplingExtras(BaseModel):
    """Sampling parameters that not every dialect's specification names but every dialect here accepts (as vLLM
    and mlx_lm.server do): each dialect's request model inherits them, and its adapter carries every field of
    this class by name, so one declared here reaches the sampler from all three."""

    # NaN and infinities are not JSON (Python's parser accepts them anyway).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # 0 disables it; past the vocabulary it is refused (api.pipeline.validation, once a worker published it).
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    # OpenAI chat's own; extras to Anthropic's and the Responses API's bodies.
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


EXTRAS: tuple[str, ...] = tuple(SamplingExtras.model_fields)


class Sampling(SamplingExtras):
    """Every parameter that shapes how the next token is chosen, as the worker's sampler reads it: the extras
    above, and those every dialect names in its own way (a dialect's adapter maps them onto these names)."""

    temperature: float | None = None  # None: the service's default (mlxq.keys fills it in the canonical form)
    top_p: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


SAMPLING: tuple[str, ...] = tuple(Sampling.model_fields)


# vLLM's per-request `cache_salt`: clients that share an API key but not a trust boundary give different salts, and
# neither's prompt is then served from the other's prefix KV cache or response cache (README, "What the caches
# share"). A non-empty string, as vLLM requires; every dialect accepts it as an extra body field.
CacheSalt = Annotated[str, Field(min_length=1)]


class Message(BaseModel):
    """One turn of a chat, in the neutral form every dialect maps onto (system, user, assistant with its tool
    calls, tool results): what chat templates take."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Request(Sampling):
    """A canonical request (mlxq.keys): what the worker runs and what its key describes.

    A chat has `messages`, a completion a `prompt` (text or token ids). Optional fields are None when the
    client did not set them: `wire()` leaves them out, so the key holds what was asked and no default.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    stop: list[str] | None = None
    max_tokens: int | None = None  # None: the service's default (filled in the canonical form)
    n: int | None = None
    # How it is scheduled, not what it answers: outside the key and the job's stored request (the job row has
    # its own columns for them).
    priority: Priority = Field("interactive", exclude=True)
    # In the key (an identical request with another salt is not a response-cache hit) and the prefix cache's
    # partition (mlxq.keys.cache_partition); it does not change the answer.
    cache_salt: CacheSalt | None = None
    # OpenAI's Predicted Outputs (`prediction.content`, as text): what the client expects most of the answer to be
    # (an editor's file before its edit). It seeds speculative decoding's drafts (worker.speculative); it does not
    # change the answer, only how fast it comes and the usage's accepted and rejected prediction tokens.
    prediction: str | None = None
    # The Responses API's `truncation: "auto"`: a conversation longer than the context is answered with its oldest
    # turns left out (worker.sequence_builder) rather than refused. In the key: it changes the prompt. "disabled"
    # (the default) is left out of the canonical form (mlxq.keys).
    truncation: Literal["auto", "disabled"] | None = None
    # The client's session (OpenAI's `prompt_cache_key`, Anthropic's `metadata.user_id`): it keeps a
    # conversation on one worker before its prefix is cached anywhere (mlxq.delivery).
    session: str | None = Field(None, exclude=True)

    def truncation_cuts(self) -> tuple[int, list[int]]:
        """Where `truncation: "auto"` may cut the conversation: (how many system messages lead, which stay; the
        indexes of the later user messages, before which alone it cuts, so that no tool result loses its call and a
        template that wants a user turn first gets one). Read by the api's early bound and the worker's truncation."""
        messages = self.messages or []
        lead = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
        return lead, [i for i in range(lead + 1, len(messages)) if messages[i].role == "user"]

    def wire(self) -> dict[str, Any]:
        """The JSON form: what is hashed (mlxq.keys.request_key), stored on the job row and read back."""
        return self.model_dump(exclude_none=True)

    @property
    def deterministic(self) -> bool:
        """Greedy, or seeded: the same request gives the same answer (so it may be cached and replayed)."""
        return self.temperature == 0 or self.seed is not None

    @classmethod
    def from_body(cls, body: dict[str, Any], *, priority: Priority = "interactive") -> Request:
        """The neutral request a dialect's adapter hands over, from its body in the neutral chat (or completion)
        form: the fields the request has, aliases resolved; delivery fields (`stream`, `cache`, ...) left to
        the route. Not canonical yet (mlxq.keys.canonical_request fills the defaults)."""
        fields = {k: v for k, v in body.items() if k in cls.model_fields and v is not None}
        if body.get("max_completion_tokens") is not None:
            fields["max_tokens"] = body["max_completion_tokens"]
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]
        metadata = body.get("metadata")
        user = metadata.get("user_id") if isinstance(metadata, dict) else None
        key = body.get("prompt_cache_key")
        given = key if isinstance(key, str) and key else user if isinstance(user, str) and user else None
        return cls.model_validate({**fields, "priority": priority, "session": client_session(given) if given else None})

    @classmethod
    def read(cls, wire: dict[str, Any]) -> Request:
        """A canonical request as stored (a job row, a task): how the worker reads what the api wrote."""
        return cls.model_validate(wire)

    @property
    def tool_names(self) -> list[str]:
        """The function names offered (OpenAI `{"function": {...}}` or a bare function object)."""
        names = []
        for tool in self.tools or []:
            fn = tool.get("function", tool)
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.append(fn["name"])
        return names


def client_session(given: str) -> str:
    """A client's own session id (any length: Claude Code's is long) as the job keeps it."""
    return hashlib.sha256(given.encode()).hexdigest()[:32]


# What changes the answer besides the prompt: every field of the request but the model and the prompt itself.
OUTPUT_FIELDS: tuple[str, ...] = tuple(
    f for f in Request.model_fields if f not in ("model", "messages", "prompt", "priority", "session")
)
