"""Anthropic Messages request models (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as the official
`anthropic` SDK and Claude Code send them, and their conversion to the neutral chat form (mlxq.request) the pipeline runs.

Unknown fields are allowed (Claude Code sends new ones with each release). What this server cannot honour is
refused here, so the 400 names the field: image and document blocks (the model is text-only; in a tool result a
note instead), Anthropic-defined tools (web search, bash, text editor, ...: their schemas live on Anthropic's
side). Accepted and ignored, since they change nothing here: `cache_control` anywhere (the worker's prefix cache
needs no breakpoints), `citations`, the `thinking` config and `thinking`/`redacted_thinking` blocks, `metadata`,
`service_tier`, `disable_parallel_tool_use`, a tool result's `is_error` (the OpenAI form has no place for it; Claude Code's error
results say so in their text).

`to_chat` maps a request onto the neutral chat body (mlxq.request.Request: OpenAI-shaped messages, since that is
what chat templates take) that says the same conversation, so that it has the same canonical form (mlxq.keys) and
so the same cache key as that conversation sent through any other dialect.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from api.dialects.openai.protocol import one_of
from api.errors import APIError
from mlxq.keys import strip_volatile
from mlxq.request import EXTRAS, CacheSalt, SamplingExtras

# Blocks of other modalities: named in the error, since the model is text-only.
MEDIA_BLOCKS = ("image", "document")
# The OpenAI dialect's rule for function names (api.dialects.openai.protocol.FunctionDefinition), so a tool that
# passes here also passes there; Anthropic's own rule is the same without the dot.
TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class AnthropicBaseModel(BaseModel):
    # NaN and infinities are not JSON (Python's parser accepts them anyway): refused in every float field.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# -- content blocks ----------------------------------------------------------------------------


class TextBlock(AnthropicBaseModel):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


def _has_text(block: TextBlock) -> TextBlock:
    """Anthropic refuses a text block with nothing to read in a message or the system prompt (a tool result's may be
    empty): it would render as an empty turn, and key the cache apart from the same prompt without it."""
    if not block.text:
        raise PydanticCustomError("empty_text", "text content blocks must be non-empty")
    if block.text.isspace():
        raise PydanticCustomError("blank_text", "text content blocks must contain non-whitespace text")
    return block


NonEmptyText = Annotated[TextBlock, AfterValidator(_has_text)]


class ToolUseBlock(AnthropicBaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(AnthropicBaseModel):
    """An earlier answer's reasoning, sent back by clients that keep it: dropped (the model never wrote it)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(AnthropicBaseModel):
    type: Literal["redacted_thinking"]
    data: str


def _block_type(block: Any) -> str | None:
    if isinstance(block, dict):
        return block.get("type")
    return getattr(block, "type", None)


def _only(allowed: tuple[str, ...], where: str) -> BeforeValidator:
    """Say plainly why a block of another type is refused in `where`, before it is read as one of `allowed`."""

    def check(block: Any) -> Any:
        kind = _block_type(block) if isinstance(block, dict) else None
        if kind is None or kind in allowed:
            return block
        if kind in MEDIA_BLOCKS:
            raise PydanticCustomError(
                "unsupported_content_block",
                "this model is text-only: content blocks of type '{block_type}' are not supported",
                {"block_type": kind},
            )
        raise PydanticCustomError(
            "unsupported_content_block",
            "content blocks of type '{block_type}' are not supported in {where}, which takes blocks of type {allowed}",
            {"block_type": str(kind), "where": where, "allowed": " or ".join(f"'{a}'" for a in allowed)},
        )

    return BeforeValidator(check)


def _by_type(allowed: tuple[str, ...]) -> Discriminator:
    return Discriminator(
        _block_type,
        custom_error_type="invalid_content_block",
        custom_error_message=f"Input should be a content block with a `type` of {', '.join(allowed)}",
    )


class MediaBlock(AnthropicBaseModel):
    """An image or document in a tool's result (Claude Code's Read of an image or a PDF): the model is text-only, so
    it reads a note in its place. Refusing it instead would refuse every later turn, which sends the history again
    (as the Responses dialect's `MediaPart` does for Codex's `view_image`)."""

    type: Literal["image", "document"]

    @property
    def note(self) -> str:
        return f"[{self.type} omitted: this model reads text only]"


TOOL_RESULT_BLOCKS = ("text", *MEDIA_BLOCKS)
ToolResultContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[MediaBlock, Tag("image")] | Annotated[MediaBlock, Tag("document")],
    _by_type(TOOL_RESULT_BLOCKS),
    _only(TOOL_RESULT_BLOCKS, "a tool result"),
]


class ToolResultBlock(AnthropicBaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: (
        Annotated[
            Annotated[str, Tag("string")] | Annotated[list[ToolResultContentBlock], Tag("array")],
            one_of("Input should be a string or a list of content blocks"),
        ]
        | None
    ) = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


USER_BLOCKS = ("text", "tool_result")
ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")

UserBlock = Annotated[
    Annotated[NonEmptyText, Tag("text")] | Annotated[ToolResultBlock, Tag("tool_result")],
    _by_type(USER_BLOCKS),
    _only(USER_BLOCKS, "a user message"),
]
AssistantBlock = Annotated[
    Annotated[NonEmptyText, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")],
    _by_type(ASSISTANT_BLOCKS),
    _only(ASSISTANT_BLOCKS, "an assistant message"),
]
SystemBlock = Annotated[NonEmptyText, _only(("text",), "the system prompt")]

UserContent = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[UserBlock], Tag("array")],
    one_of("Input should be a string or a list of content blocks"),
]
AssistantContent = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[AssistantBlock], Tag("array")],
    one_of("Input should be a string or a list of content blocks"),
]
SystemContent = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[SystemBlock], Tag("array")],
    one_of("Input should be a string or a list of text blocks"),
]


# -- messages ----------------------------------------------------------------------------------


EMPTY_CONTENT = "all messages must have non-empty content except for the optional final assistant message"


def _not_empty(content: Any) -> Any:
    """Anthropic refuses a turn with an empty list of blocks or an empty string, but for a final assistant turn's
    string, the prefill of the answer (`_assistant_not_empty`, `CountTokensRequest._empty_turns`)."""
    if content == "" or (isinstance(content, list) and not content):
        raise PydanticCustomError("empty_content", EMPTY_CONTENT)
    return content


def _assistant_not_empty(content: Any) -> Any:
    return content if content == "" else _not_empty(content)


class UserMessage(AnthropicBaseModel):
    role: Literal["user"]
    content: Annotated[UserContent, BeforeValidator(_not_empty)]


class AssistantMessage(AnthropicBaseModel):
    role: Literal["assistant"]
    content: Annotated[AssistantContent, BeforeValidator(_assistant_not_empty)]


class SystemMessage(AnthropicBaseModel):
    """A system turn inside `messages`: Anthropic takes it under the `mid-conversation-system` beta (Claude Code sends
    its list of agents so) and refuses it otherwise (`check_system_turns`, by the request's `anthropic-beta`)."""

    role: Literal["system"]
    content: Annotated[SystemContent, BeforeValidator(_not_empty)]


UNEXPECTED_ROLE = (
    'Unexpected role "{role}". The Messages API accepts a top-level `system` parameter, not "system" as an input '
    "message role; messages take the roles user and assistant"
)
# The `anthropic-beta` feature under which a `system` turn may sit among the messages.
MID_CONVERSATION_SYSTEM = "mid-conversation-system"


def _message_role(message: Any) -> Any:
    """Anthropic's Messages API has user and assistant turns (and system ones under a beta, `SystemMessage`): any
    other role is refused, with the field that takes a system prompt named."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in (None, "user", "assistant", "system"):
        raise PydanticCustomError("unexpected_role", UNEXPECTED_ROLE, {"role": str(role)})
    return message


Message = Annotated[
    UserMessage | AssistantMessage | SystemMessage, Field(discriminator="role"), BeforeValidator(_message_role)
]


# -- tools -------------------------------------------------------------------------------------


def _custom_tool(tool: Any) -> Any:
    """Anthropic-defined tools carry a versioned `type` and no schema: say why they are refused."""
    if isinstance(tool, dict) and tool.get("type") not in (None, "custom"):
        raise PydanticCustomError(
            "unsupported_tool",
            "tools of type '{tool_type}' (Anthropic-defined or server tools) are not supported; "
            "only custom tools (name, description, input_schema) are served",
            {"tool_type": str(tool["type"])},
        )
    return tool


class Tool(AnthropicBaseModel):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None  # structured outputs: the call's input follows the schema strictly


CustomTool = Annotated[Tool, BeforeValidator(_custom_tool)]


class ToolChoiceAuto(AnthropicBaseModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(AnthropicBaseModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(AnthropicBaseModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(AnthropicBaseModel):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


# -- structured output -------------------------------------------------------------------------


class OutputFormat(AnthropicBaseModel):
    """A JSON schema the answer must follow (decoded under its grammar, mlxq.grammar)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, validate_by_name=True, serialize_by_alias=True)

    type: Literal["json_schema"]
    # `schema` would shadow BaseModel.schema: kept under its wire name by the alias.
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(AnthropicBaseModel):
    format: OutputFormat | None = None


# -- requests ----------------------------------------------------------------------------------


class ThinkingEnabled(AnthropicBaseModel):
    type: Literal["enabled"]
    # Anthropic's floor; its `budget_tokens < max_tokens` is not checked: under the interleaved-thinking beta (Claude
    # Code's) the budget may exceed max_tokens, and it bounds nothing here.
    budget_tokens: int = Field(ge=1024, strict=True)


class ThinkingOther(AnthropicBaseModel):
    type: Literal["disabled", "adaptive"]


Thinking = Annotated[ThinkingEnabled | ThinkingOther, Field(discriminator="type")]


class CountTokensRequest(AnthropicBaseModel):
    """`POST /v1/messages/count_tokens`: the conversation, without what shapes the answer."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: SystemContent | None = None
    tools: list[CustomTool] | None = None
    tool_choice: ToolChoice | None = None
    # Extended thinking: checked as Anthropic checks it, then ignored (the served model thinks, or not, by its own
    # template).
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _empty_turns(self) -> CountTokensRequest:
        for i, turn in enumerate(self.messages[:-1]):
            if turn.content == "":  # an assistant turn's (`_assistant_not_empty`), but the last is a prefill
                raise PydanticCustomError("empty_content", "messages.{i}: " + EMPTY_CONTENT, {"i": i})
        return self


class MessagesRequest(CountTokensRequest, SamplingExtras):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=1, strict=True)
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool | None = Field(None, strict=True)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    # `top_k` is Anthropic's own; it and the non-spec extras come from mlxq.request.SamplingExtras.
    # LiteLLM-style per-request cache controls: {"no-cache": true, "no-store": true, "ttl": 60}.
    cache: dict[str, Any] | None = None
    # vLLM's: separates this client's prefix KV cache and response cache from others' of the same key.
    cache_salt: CacheSalt | None = None
    # Structured output as the current SDK sends it (`output_config.format`), and as the older beta did.
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None


# -- conversion --------------------------------------------------------------------------------

# Carried into the OpenAI body under the same name when set (the rest is renamed or dropped).
# `metadata` carries Claude Code's session (`user_id`), which routing keeps on one worker; not in the cache key.
_SAME_NAME = ("max_tokens", "temperature", "top_p", *EXTRAS, "stream", "cache", "cache_salt", "metadata")


def _text_parts(blocks: list[TextBlock | MediaBlock]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": b.text if isinstance(b, TextBlock) else b.note} for b in blocks]


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) and content else list(content or [])


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    # The OpenAI form takes no empty list; mlxq.keys flattens a list of text parts, "" is the same as none.
    return parts or ""


def _system(content: str | list[TextBlock]) -> str | list[dict[str, Any]] | None:
    """System text, its blocks kept as text parts. A block that is only Claude Code's volatile billing line is
    dropped here, per block: mlxq.keys strips that line from the flattened text, and flattening first would make
    it take the next block's first line with it."""
    if isinstance(content, str):
        return content
    parts = [{"type": "text", "text": text} for b in content if (text := strip_volatile(b.text))]
    return parts or None


# What a tool result with `is_error` says first: the tool failed, and what follows is its error.
TOOL_ERROR = "Error: "


def _user(content: str | list[Any]) -> list[dict[str, Any]]:
    """A user turn: its tool results become `tool` messages in order; text between them, user messages."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        if isinstance(block, ToolResultBlock):
            if parts:
                out.append({"role": "user", "content": parts})
                parts = []
            result = block.content if isinstance(block.content, str) else _text_parts(block.content or [])
            if block.is_error:  # the model is told, as the OpenAI form has no flag for it
                result = [{"type": "text", "text": TOOL_ERROR}, *_parts(result)]
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result or ""})
        else:
            parts.append({"type": "text", "text": block.text})
    if parts or not out:
        out.append({"role": "user", "content": _content(parts)})
    return out


def _arguments(tool_input: dict[str, Any]) -> str:
    # Formatted as the worker formats the arguments it parses (worker/tool_parse.py), so an OpenAI client that
    # sends an answer's tool call back unchanged says the same bytes as an Anthropic client sending its input.
    return json.dumps(tool_input, ensure_ascii=False)


def _assistant(content: str | list[Any]) -> dict[str, Any]:
    """An assistant turn: its text blocks as content, its tool uses as tool calls; thinking dropped."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    parts = [{"type": "text", "text": b.text} for b in content if isinstance(b, TextBlock)]
    calls = [
        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": _arguments(b.input)}}
        for b in content
        if isinstance(b, ToolUseBlock)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": parts or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def check_system_turns(body: CountTokensRequest, beta: str | None) -> None:
    """A `system` turn among the messages is taken only under the `mid-conversation-system` beta, as Anthropic takes
    it: without it, the 400 Anthropic gives (Claude Code then sends the text in the next user turn instead)."""
    if beta and any(name.strip().startswith(MID_CONVERSATION_SYSTEM) for name in beta.split(",")):
        return
    for i, message in enumerate(body.messages):
        if isinstance(message, SystemMessage):
            raise APIError(400, f"messages.{i}: " + UNEXPECTED_ROLE.format(role="system"), param=f"messages.{i}")


def thread_refusal(body: MessagesRequest) -> dict[str, Any] | None:
    """The 400 for a request with `thread` (server-held conversation state, the SDK's threads and its tool runner's
    default), or None. Unread, its `continue` was answered without the conversation before it. The error code is the
    one the SDK reads (`thread_unsupported_request`): its tool runner then sends the whole conversation, unthreaded."""
    if (body.model_extra or {}).get("thread") is None:
        return None
    return {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "thread: server-held conversation state is not supported here; send the whole conversation "
            "without `thread`",
            "details": {"error_code": "thread_unsupported_request"},
        },
    }


def _reminder(content: str | list[TextBlock]) -> dict[str, Any]:
    """A system turn among the messages, as the user-side `<system-reminder>` Claude Code writes the same text as
    without the beta: every chat template takes a user turn there, where many refuse a system message past the
    first."""
    text = content if isinstance(content, str) else "\n\n".join(b.text for b in content)
    return {"role": "user", "content": f"<system-reminder>\n{text}\n</system-reminder>"}


def _tool_choice(choice: Any) -> str | dict[str, Any]:
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def _unanswered(pending: tuple[int, list[str]] | None, answered: set[str]) -> None:
    """Refuse the `tool_use` ids of assistant turn `pending` (its index, its ids) that `answered` (the next turn's
    `tool_result` ids) leaves out, in Anthropic's words."""
    if pending is not None and (missing := [use for use in pending[1] if use not in answered]):
        raise APIError(
            400,
            f"messages.{pending[0]}: `tool_use` ids were found without `tool_result` blocks immediately after: "
            f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in the next "
            "message.",
            param=f"messages.{pending[0]}",
        )


def _check_tool_results(body: CountTokensRequest) -> None:
    """Tool uses and results pair up as Anthropic requires (it names the turn, or the block as
    `messages.N.content.M`, in its message): each `tool_result` answers a `tool_use` of an earlier assistant turn;
    `tool_use` ids are unique; each is answered by a `tool_result` in the next turn (a `system` turn of the
    mid-conversation beta aside)."""
    uses: set[str] = set()
    pending: tuple[int, list[str]] | None = None  # the last assistant turn's tool uses, until the next turn
    for i, message in enumerate(body.messages):
        if isinstance(message, SystemMessage):
            continue
        blocks = [] if isinstance(message.content, str) else message.content
        if isinstance(message, UserMessage):
            results = [(j, b) for j, b in enumerate(blocks) if isinstance(b, ToolResultBlock)]
            for j, block in results:
                if block.tool_use_id not in uses:
                    raise APIError(
                        400,
                        f"messages.{i}.content.{j}.tool_use_id: unexpected `tool_use_id` found in `tool_result` "
                        f"blocks: {block.tool_use_id}. Each `tool_result` block must have a corresponding "
                        "`tool_use` block in an earlier assistant message.",
                        param=f"messages.{i}.content.{j}.tool_use_id",
                    )
            _unanswered(pending, {block.tool_use_id for _, block in results})
            pending = None
        else:
            _unanswered(pending, set())
            ids: list[str] = []
            for j, use in enumerate(blocks):
                if isinstance(use, ToolUseBlock):
                    if use.id in uses:
                        raise APIError(
                            400,
                            f"messages.{i}.content.{j}: `tool_use` ids must be unique",
                            param=f"messages.{i}.content.{j}",
                        )
                    uses.add(use.id)
                    ids.append(use.id)
            pending = (i, ids) if ids else None
    _unanswered(pending, set())


def _check_final_turn(body: CountTokensRequest) -> None:
    """A final assistant turn is the start of the answer (a prefill): Anthropic refuses one that ends with
    whitespace (a model's next token usually carries its own leading space)."""
    i, last = len(body.messages) - 1, body.messages[-1]
    if not isinstance(last, AssistantMessage):
        return
    content = last.content
    text = content if isinstance(content, str) else content[-1].text if isinstance(content[-1], TextBlock) else ""
    if text and text[-1].isspace():
        raise APIError(
            400, f"messages.{i}: final assistant content cannot end with trailing whitespace", param=f"messages.{i}"
        )


def to_chat(body: CountTokensRequest) -> dict[str, Any]:
    """The neutral chat body (what mlxq.request.Request.from_body reads) that says the same conversation, so every
    dialect shares one canonical request, one cache key and the prefix cache.

    - `system` becomes a first system message; a list of blocks stays a list of text parts, which mlxq.keys
      flattens the one way it flattens OpenAI parts (so the join is decided in one place for both dialects).
    - A user turn's text blocks are text parts; each `tool_result` is a `tool` message, in order.
    - An assistant turn's text blocks are its content and its `tool_use` blocks its `tool_calls`
      (arguments: the input as JSON).
    - tools → functions; tool_choice auto → "auto", any → "required", tool → the named function, none → "none";
      stop_sequences → stop; max_tokens and sampling carried; `model` as given.
    Consecutive turns of one role stay separate messages (the chat template sees them as sent).
    """
    _check_tool_results(body)
    _check_final_turn(body)
    messages: list[dict[str, Any]] = []
    if body.system is not None and (system := _system(body.system)) is not None:
        messages.append({"role": "system", "content": system})
    for message in body.messages:
        if isinstance(message, UserMessage):
            messages.extend(_user(message.content))
        elif isinstance(message, SystemMessage):
            messages.append(_reminder(message.content))
        else:
            messages.append(_assistant(message.content))
    out: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.tools:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    **({"description": t.description} if t.description is not None else {}),
                    "parameters": t.input_schema,
                    **({"strict": t.strict} if t.strict is not None else {}),
                },
            }
            for t in body.tools
        ]
    if body.tool_choice is not None:
        out["tool_choice"] = _tool_choice(body.tool_choice)
    if isinstance(body, MessagesRequest):
        for field in _SAME_NAME:
            if (value := getattr(body, field)) is not None:
                out[field] = value
        if body.stop_sequences:
            out["stop"] = list(body.stop_sequences)
        fmt = (body.output_config.format if body.output_config is not None else None) or body.output_format
        if fmt is not None:
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}
    return out
