"""OpenAI Responses request models (`POST /v1/responses`), as the `openai` SDK's `client.responses` and Codex
send them, and their conversion to the neutral chat form (mlxq.request) the pipeline runs.

Unknown fields are allowed (the API grows with each SDK release). What the shapes alone can refuse is refused by
the models, so the 400 names the field: an input item of a type this server cannot read (hosted tools' calls,
images and files: the model is text-only), a message of another role, a `tool_choice` naming a hosted tool.
What needs the whole conversation is refused by `to_chat` with an `APIError` naming the field: an output whose
`call_id` answers no earlier call, an `item_reference` left unresolved (the route resolves each to the stored
item it names, api.dialects.responses.stored.resolve_references),
two tools of one name, `prompt` templates and `conversation` objects (stored on OpenAI's side).

Accepted and dropped, since they change nothing here: `reasoning` items and the `reasoning` config (the served
model thinks, or not, by its own template), `metadata`, `store`, `background`, `include` (but for logprobs),
`prompt_cache_key`, `safety_identifier`, `client_metadata`, `max_tool_calls`, `text.verbosity`.
Hosted tools (`web_search`, `file_search`, `mcp`, ...) are dropped from the tools the model sees; `hosted_tools`
lists them so the answer can say so.
`truncation: "auto"` is honoured by the worker: a conversation over the context loses its oldest turns
(worker.sequence_builder).

`to_chat` maps a request onto the neutral chat body (mlxq.request.Request: OpenAI-shaped messages, since that is
what chat templates take) that says the same conversation, so that it has the same canonical form (mlxq.keys) and
so the same cache key as that conversation sent through any other dialect.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from llguidance import LLMatcher
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from api.dialects.openai.protocol import one_of
from api.errors import APIError
from mlxq.grammar import parser_limits
from mlxq.request import EXTRAS, CacheSalt, Priority, SamplingExtras, priority_of

# The OpenAI dialect's rule for function names (api.dialects.openai.protocol.FunctionDefinition): every tool
# here becomes one of its functions, so a name refused there is refused here, where the 400 names the tool.
TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
# Content parts of other modalities: named in the error, since the model is text-only.
MEDIA_PARTS = ("input_image", "input_file", "input_audio", "image", "file", "audio")
# The chat parameters a custom (free-form) tool becomes: one string argument holding the whole input.
CUSTOM_TOOL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}
# `include` entry that asks for the output text's logprobs.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Without `max_output_tokens` a response may run to the end of the context, as OpenAI's do: Codex never sends it,
# and the chat default (MLXQ_DEFAULT_MAX_TOKENS) would cut its longer answers and the tool calls in them. The
# worker clamps this to the room the prompt leaves (and MLXQ_MAX_TOKENS_CEILING still applies).
UNTIL_CONTEXT_ENDS = 1_000_000


class ResponsesBaseModel(BaseModel):
    # NaN and infinities are not JSON (Python's parser accepts them anyway): refused in every float field.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


def _field(value: Any, name: str) -> Any:
    """A field of a raw dict, or of a model (when a validated request is serialized)."""
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


# -- content parts -----------------------------------------------------------------------------


class TextPart(ResponsesBaseModel):
    """Text in either direction: `input_text` (what users send) or `output_text` (an earlier answer)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class RefusalPart(ResponsesBaseModel):
    """An earlier answer's refusal (from another server): kept as the text it said."""

    type: Literal["refusal"]
    refusal: str


class UnsupportedPart(ResponsesBaseModel):
    """Any other part: refused with its type named (images, files and audio: the model is text-only)."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, kind: str) -> str:
        if kind in MEDIA_PARTS:
            raise PydanticCustomError(
                "unsupported_content_part",
                "this model is text-only: content parts of type '{part_type}' are not supported",
                {"part_type": kind},
            )
        raise PydanticCustomError(
            "unsupported_content_part",
            "content parts of type '{part_type}' are not supported; only 'input_text' and 'output_text' are",
            {"part_type": kind},
        )


def _part_kind(part: Any) -> str:
    kind = _field(part, "type")
    if kind in ("input_text", "output_text"):
        return "text"
    return "refusal" if kind == "refusal" else "other"


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[UnsupportedPart, Tag("other")],
    Discriminator(_part_kind),
]
Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("array")],
    one_of("Input should be a string or a list of content parts"),
]


# -- input items -------------------------------------------------------------------------------


class MessageItem(ResponsesBaseModel):
    """A turn: `type` may be left out (the SDK's EasyInputMessage). `id`, `status` and `phase` change nothing."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(ResponsesBaseModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    # Set on calls to a namespace's tools: the chat form knows the tool by its own name (tools are flattened).
    namespace: str | None = None


class MediaPart(ResponsesBaseModel):
    """An image, file or audio part of a tool's output (Codex's `view_image`): the model is text-only, so it
    reads a note in its place. Refusing it instead would refuse every later turn, which sends the history again."""

    type: Literal["input_image", "input_file", "input_audio"]

    @property
    def note(self) -> str:
        return f"[{self.type.removeprefix('input_')} omitted: this model reads text only]"


def _output_part_kind(part: Any) -> str:
    kind = _field(part, "type")
    return "media" if kind in ("input_image", "input_file", "input_audio") else _part_kind(part)


OutputPart = Annotated[
    Annotated[TextPart, Tag("text")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[MediaPart, Tag("media")]
    | Annotated[UnsupportedPart, Tag("other")],
    Discriminator(_output_part_kind),
]
# A tool's output: a string or parts, media among them.
OutputContent = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[OutputPart], Tag("array")],
    one_of("Input should be a string or a list of content parts"),
]


class FunctionCallOutputItem(ResponsesBaseModel):
    type: Literal["function_call_output"]
    call_id: str
    output: OutputContent
    id: str | None = None
    status: str | None = None


class CustomToolCallItem(ResponsesBaseModel):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    id: str | None = None
    namespace: str | None = None


class CustomToolCallOutputItem(ResponsesBaseModel):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: OutputContent
    id: str | None = None


class ReasoningItem(ResponsesBaseModel):
    """An earlier answer's reasoning, sent back by clients that keep it: dropped (its content is opaque, and
    mlxq never writes one)."""

    type: Literal["reasoning"]
    id: str | None = None


class ItemReference(ResponsesBaseModel):
    """A stored item by id: the route replaces it with that item (api.dialects.responses.stored)."""

    type: Literal["item_reference"] | None = None
    id: str


# Items other servers' hosted tools produce: they can only come from a run this server did not make.
HOSTED_ITEMS = (
    "file_search_call",
    "web_search_call",
    "computer_call",
    "computer_call_output",
    "image_generation_call",
    "code_interpreter_call",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "mcp_call",
    "tool_search_call",
    "tool_search_output",
)


class UnsupportedItem(ResponsesBaseModel):
    """Any other input item: refused with its type named."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, kind: str) -> str:
        if kind in HOSTED_ITEMS:
            raise PydanticCustomError(
                "unsupported_input_item",
                "input items of type '{item_type}' are not supported: they belong to hosted tools, "
                "which this server does not run",
                {"item_type": kind},
            )
        raise PydanticCustomError(
            "unsupported_input_item",
            "input items of type '{item_type}' are not supported; the types served are {served}",
            {"item_type": kind, "served": ", ".join(f"'{t}'" for t in ITEM_TYPES)},
        )


ITEM_TYPES = (
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "reasoning",
    "item_reference",
)


def _item_kind(item: Any) -> str:
    """The item's type; an item without one is a message when it has a role, else an item reference when it
    has an id (both shapes the SDK documents), else a message (so the error names the missing role)."""
    kind = _field(item, "type")
    if kind is None:
        if _field(item, "role") is None and _field(item, "id") is not None:
            return "item_reference"
        return "message"
    return kind if kind in ITEM_TYPES else "unsupported"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[CustomToolCallItem, Tag("custom_tool_call")]
    | Annotated[CustomToolCallOutputItem, Tag("custom_tool_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")]
    | Annotated[UnsupportedItem, Tag("unsupported")],
    Discriminator(_item_kind),
]
_ITEMS: TypeAdapter[list[Any]] = TypeAdapter(list[InputItem])
Input = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[InputItem], Tag("array")],
    one_of("Input should be a string or a list of input items"),
]


# -- tools -------------------------------------------------------------------------------------


class FunctionTool(ResponsesBaseModel):
    """A function, flat (`name` beside `type`, not under `function` as in chat completions)."""

    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextInputFormat(ResponsesBaseModel):
    type: Literal["text"]


class GrammarInputFormat(ResponsesBaseModel):
    type: Literal["grammar"]
    syntax: Literal["lark", "regex"]
    definition: str


class CustomTool(ResponsesBaseModel):
    """A tool that takes free-form text (Codex's `apply_patch`). A regex grammar is enforced while sampling (the
    input's pattern); a Lark one is told to the model in the tool's description, not enforced."""

    type: Literal["custom"]
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    format: Annotated[TextInputFormat | GrammarInputFormat, Field(discriminator="type")] | None = None


NamespacedTool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class NamespaceTool(ResponsesBaseModel):
    """A group of tools (Codex puts each MCP server's in one). The model sees its tools by their own names;
    a call to one is answered with the namespace beside the name, as the SDK's function_call carries it."""

    type: Literal["namespace"]
    name: str
    # Required by the SDK's model of the echoed tools: "" where the client left it out.
    description: str = ""
    tools: list[NamespacedTool]


class HostedTool(ResponsesBaseModel):
    """Any tool of another type (`web_search`, `file_search`, `mcp`, `code_interpreter`, ...): it runs on
    OpenAI's side, so it is dropped from what the model sees (and listed by `hosted_tools`)."""

    type: str


def _tool_kind(tool: Any) -> str:
    kind = _field(tool, "type")
    return kind if kind in ("function", "custom", "namespace") else "hosted"


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[CustomTool, Tag("custom")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[HostedTool, Tag("hosted")],
    Discriminator(_tool_kind),
]


class ToolChoiceFunction(ResponsesBaseModel):
    type: Literal["function"]
    name: str


class ToolChoiceCustom(ResponsesBaseModel):
    type: Literal["custom"]
    name: str


class ToolChoiceAllowed(ResponsesBaseModel):
    """Only these tools this turn (the rest stay declared): served by offering the model only these."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class ToolChoiceHosted(ResponsesBaseModel):
    """A choice of a hosted tool (`web_search_preview`, `mcp`, ...): refused, those tools are not run here."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, kind: str) -> str:
        raise PydanticCustomError(
            "unsupported_tool_choice",
            "tool_choice of type '{choice_type}' names a hosted tool, which this server does not run; "
            "use 'auto', 'none', 'required', a function or a custom tool",
            {"choice_type": kind},
        )


def _choice_kind(choice: Any) -> str:
    if isinstance(choice, str):
        return "string"
    kind = _field(choice, "type")
    return kind if kind in ("function", "custom", "allowed_tools") else "hosted"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("string")]
    | Annotated[ToolChoiceFunction, Tag("function")]
    | Annotated[ToolChoiceCustom, Tag("custom")]
    | Annotated[ToolChoiceAllowed, Tag("allowed_tools")]
    | Annotated[ToolChoiceHosted, Tag("hosted")],
    Discriminator(_choice_kind),
]


# -- text format -------------------------------------------------------------------------------


class TextFormatText(ResponsesBaseModel):
    type: Literal["text"]


class TextFormatJSONObject(ResponsesBaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(ResponsesBaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: str
    # `schema` would shadow BaseModel.schema: kept under its wire name by the alias.
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")]


class TextConfig(ResponsesBaseModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# -- the request -------------------------------------------------------------------------------


class ResponsesRequest(ResponsesBaseModel, SamplingExtras):
    """`POST /v1/responses`."""

    model: str
    input: Input | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, strict=True)
    max_tool_calls: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # "flex" (OpenAI's slower, cheaper tier) runs at low priority; "fast"/"ultrafast" are "priority" in chat.
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast", "ultrafast"] | None = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    store: bool | None = None
    background: bool | None = Field(None, strict=True)
    stream: bool | None = Field(None, strict=True)
    stream_options: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None
    # Stored on OpenAI's side: refused by to_chat when set.
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    # -- non-spec extras: `seed` and the sampling extras come from mlxq.request.SamplingExtras -------------
    # LiteLLM-style per-request cache controls: {"no-cache": true, "no-store": true, "ttl": 60}.
    cache: dict[str, Any] | None = None
    # vLLM's: separates this client's prefix KV cache and response cache from others' of the same key.
    cache_salt: CacheSalt | None = None

    @property
    def priority(self) -> Priority:
        return priority_of(self.service_tier)


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens`: the same body, with `model` optional (the served model)."""

    model: str | None = None  # type: ignore[assignment]


# -- what the renderer needs from the tools ------------------------------------------------------


def _declared(body: ResponsesRequest) -> Iterator[tuple[str, FunctionTool | CustomTool, str | None]]:
    """(param path, tool, namespace or None) of every tool the model is offered, namespaces flattened."""
    for i, tool in enumerate(body.tools or []):
        if isinstance(tool, FunctionTool | CustomTool):
            yield f"tools.{i}", tool, None
        elif isinstance(tool, NamespaceTool):
            for j, inner in enumerate(tool.tools):
                yield f"tools.{i}.tools.{j}", inner, tool.name


def hosted_tools(body: ResponsesRequest) -> list[str]:
    """The types of the hosted tools the request declared, which the model is not offered (each type once, in
    the order declared): for the answer to say so."""
    kinds = [t.type for t in body.tools or [] if isinstance(t, HostedTool)]
    return list(dict.fromkeys(kinds))


def custom_tool_names(body: ResponsesRequest) -> set[str]:
    """The names of the custom (free-form) tools, namespaced ones included: a call to one is answered as a
    `custom_tool_call` whose `input` is the call's `input` argument."""
    return {tool.name for _, tool, _ in _declared(body) if isinstance(tool, CustomTool)}


def tool_namespaces(body: ResponsesRequest) -> dict[str, str]:
    """Tool name → the namespace that declared it, for the tools declared in one: a call to one is answered with
    that `namespace` beside its name."""
    return {tool.name: namespace for _, tool, namespace in _declared(body) if namespace is not None}


# -- conversion --------------------------------------------------------------------------------


def _text(content: str | list[Any]) -> str | list[dict[str, Any]]:
    """Content as the chat form says it: a string stays one; parts become text parts (mlxq.keys flattens them
    the one way it flattens chat parts, so both dialects join them alike); no parts, "" (the same as none)."""
    if isinstance(content, str):
        return content
    parts = [
        {"type": "text", "text": part.text if isinstance(part, TextPart) else part.note}
        if isinstance(part, TextPart | MediaPart)
        else {"type": "text", "text": part.refusal}
        for part in content
        if isinstance(part, TextPart | RefusalPart | MediaPart)
    ]
    return parts or ""


def _custom_arguments(text: str) -> str:
    # Formatted as the worker formats the arguments it parses (worker/tool_parse.py): a chat client sending the
    # answer's call back unchanged says the same bytes.
    return json.dumps({"input": text}, ensure_ascii=False)


def _call(item: FunctionCallItem | CustomToolCallItem) -> dict[str, Any]:
    arguments = item.arguments if isinstance(item, FunctionCallItem) else _custom_arguments(item.input)
    return {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": arguments}}


def _previous_items(previous: list[dict[str, Any]] | None) -> list[tuple[str, Any]]:
    """The stored items of the earlier responses, validated as input items; a fault in them is named as
    `previous_response_id` (the client never sent them)."""
    if not previous:
        return []
    try:
        items = _ITEMS.validate_python(previous)
    except ValidationError as exc:
        raise APIError(
            400,
            f"The stored conversation of previous_response_id cannot be continued: {exc.errors()[0]['msg']}.",
            param="previous_response_id",
        ) from None
    return [("previous_response_id", item) for item in items]


def _input_items(body: ResponsesRequest) -> list[tuple[str, Any]]:
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [("input", MessageItem(role="user", content=body.input))]
    return [(f"input.{i}", item) for i, item in enumerate(body.input)]


def _messages(items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages the items say, in order.

    - A message keeps its role (`developer` → `system`); its parts become text parts.
    - A `function_call` or `custom_tool_call` joins the assistant message just before it (a chat client sends
      an answer's text and its calls as one message), else starts one with no content.
    - An output (`function_call_output`, `custom_tool_call_output`) becomes a `tool` message; its `call_id` must
      answer a call earlier in the conversation, and every call must have one later, as OpenAI requires.
    - `reasoning` items are dropped; `item_reference` is refused.
    """
    messages: list[dict[str, Any]] = []
    calls: set[str] = set()
    unanswered: dict[str, str] = {}  # call_id -> the call's item type, until its output comes
    for where, item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem | CustomToolCallItem):
            calls.add(item.call_id)
            unanswered[item.call_id] = item.type
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(_call(item))
                if not last["content"]:  # a chat client's message of calls only has no content
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [_call(item)]})
        elif isinstance(item, FunctionCallOutputItem | CustomToolCallOutputItem):
            if item.call_id not in calls:
                raise APIError(
                    400,
                    f"No tool call with call_id '{item.call_id}' comes before this {item.type} in the input "
                    "(or in the previous response): an output answers a function_call or custom_tool_call "
                    "that precedes it.",
                    param=f"{where}.call_id",
                )
            unanswered.pop(item.call_id, None)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        elif isinstance(item, ItemReference):
            raise APIError(
                400,
                f"item_reference ('{item.id}') is not supported: send the item itself, or continue a stored "
                "response with previous_response_id.",
                param=f"{where}.id",
            )
        # ReasoningItem: dropped (module doc).
    if unanswered:  # OpenAI's words, for the first call left without an output
        call_id, kind = next(iter(unanswered.items()))
        what = "function call" if kind == "function_call" else "custom tool call"
        raise APIError(400, f"No tool output found for {what} {call_id}.", param="input")
    return messages


def _custom_description(tool: CustomTool) -> str:
    """What the model is told about a free-form tool, which it calls as a function of one string."""
    note = "This tool takes free-form text: call it with one argument, `input`, holding the whole text."
    if isinstance(tool.format, GrammarInputFormat):
        note += f"\nThe text must match this {tool.format.syntax} grammar:\n{tool.format.definition}"
    return f"{tool.description}\n\n{note}" if tool.description else note


@functools.lru_cache(maxsize=256)
def _regex_problem(pattern: str) -> str | None:
    """Why llguidance cannot compile this input pattern, or None."""
    grammar = LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, limits=parser_limits())
    return (messages[0] if messages else "the regex does not compile") if is_error else None


def _chat_tool(tool: FunctionTool | CustomTool, where: str) -> dict[str, Any]:
    if isinstance(tool, CustomTool):
        parameters = CUSTOM_TOOL_PARAMETERS
        if isinstance(tool.format, GrammarInputFormat) and tool.format.syntax == "regex":
            # A regex grammar is the input's pattern, so a call's input is decoded under it (mlxq.grammar).
            pattern = {"type": "string", "pattern": f"^(?:{tool.format.definition})$"}  # the whole input
            # Refused whatever tool_choice says (a best-effort call grammar would drop it silently), naming it.
            if why := _regex_problem(pattern["pattern"]):
                raise APIError(
                    400,
                    f"Invalid regex in the custom tool '{tool.name}': {why}",
                    param=f"{where}.format.definition",
                )
            parameters = {**CUSTOM_TOOL_PARAMETERS, "properties": {"input": pattern}}
        function = {"name": tool.name, "description": _custom_description(tool), "parameters": parameters}
    else:
        function = {"name": tool.name}
        for field in ("description", "parameters", "strict"):
            if (value := getattr(tool, field)) is not None:
                function[field] = value
    return {"type": "function", "function": function}


def _chat_tools(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The function tools the model is offered: functions as they are, custom tools as functions of one string,
    namespaces' tools by their own names, hosted tools dropped. One name names one tool."""
    seen: dict[str, str] = {}
    tools = []
    for where, tool, _ in _declared(body):
        if tool.name in seen:
            raise APIError(
                400,
                f"The tool name '{tool.name}' is declared twice ({seen[tool.name]} and {where}); "
                "the model knows tools by name, namespaced ones included.",
                param=f"{where}.name",
            )
        seen[tool.name] = where
        tools.append(_chat_tool(tool, where))
    return tools


def _allowed(tools: list[dict[str, Any]], choice: ToolChoiceAllowed) -> list[dict[str, Any]]:
    """The offered tools that `allowed_tools` names (function or custom tools, by name)."""
    offered = {t["function"]["name"] for t in tools}
    names: set[str] = set()
    for k, entry in enumerate(choice.tools):
        name = entry.get("name")
        if entry.get("type") not in ("function", "custom") or not isinstance(name, str) or name not in offered:
            raise APIError(
                400,
                "allowed_tools names a tool that is not among the function and custom tools declared: "
                f"{json.dumps(entry, ensure_ascii=False)}.",
                param=f"tool_choice.tools.{k}",
            )
        names.add(name)
    return [t for t in tools if t["function"]["name"] in names]


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if isinstance(fmt, TextFormatJSONObject):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJSONSchema):
        schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.description is not None:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": schema}
    return None


def _refuse_unserved(body: ResponsesRequest) -> None:
    if body.prompt is not None:
        raise APIError(
            400, "Prompt templates are stored on OpenAI's side and not supported; send the input.", param="prompt"
        )
    if body.conversation is not None:
        raise APIError(
            400,
            "Conversation objects are not supported; continue with previous_response_id or send the input.",
            param="conversation",
        )


# Carried into the chat body under the same name when set (the rest is renamed or dropped).
_SAME_NAME = (
    "temperature",
    "top_p",
    *EXTRAS,
    "parallel_tool_calls",
    "stream",
    "user",
    "cache",
    "prompt_cache_key",  # the session that routing keeps on one worker (mlxq.delivery); not in the cache key
    "cache_salt",
    "truncation",
)
# Responses' service tiers chat completions does not name: the same processing there.
_SERVICE_TIERS = {"fast": "priority", "ultrafast": "priority"}


def to_chat(body: ResponsesRequest, *, previous: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The neutral chat body (what mlxq.request.Request.from_body reads) that says the same conversation, so every
    dialect shares one canonical request, one cache key and the prefix cache.

    - `instructions` becomes a first system message, before everything (a previous response's instructions are
      not carried over, as OpenAI documents); then `previous` (the earlier responses' input and output items, in
      Responses item form, as the route resolved them from `previous_response_id`); then `input` (a string is
      one user message). Items become messages as `_messages` says.
    - tools → functions (`_chat_tools`); tool_choice "auto"/"none"/"required" as they are, a function or custom
      tool → that function, `allowed_tools` → its mode, with only those tools offered.
    - text.format json_object / json_schema → response_format; max_output_tokens → max_tokens (without it, to
      the end of the context: `UNTIL_CONTEXT_ENDS`); the output
      text's logprobs (`include`, `top_logprobs`) → logprobs, top_logprobs; sampling, `parallel_tool_calls`,
      `service_tier`, `user` and the extras carried; `model` as given.

    Raises APIError (400, naming the field) for what only the whole conversation shows (module doc).
    """
    _refuse_unserved(body)
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    messages += _messages(_previous_items(previous) + _input_items(body))
    if not messages:
        raise APIError(400, "Missing required parameter: 'input'.", param="input")
    out: dict[str, Any] = {"model": body.model, "messages": messages}
    tools = _chat_tools(body)
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceAllowed):
        tools = _allowed(tools, choice)
        out["tool_choice"] = choice.mode
    elif isinstance(choice, ToolChoiceFunction | ToolChoiceCustom):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif isinstance(choice, str):
        out["tool_choice"] = choice
    if tools:
        out["tools"] = tools
    if (response_format := _response_format(body.text)) is not None:
        out["response_format"] = response_format
    out["max_tokens"] = body.max_output_tokens if body.max_output_tokens is not None else UNTIL_CONTEXT_ENDS
    for field in _SAME_NAME:
        if (value := getattr(body, field)) is not None:
            out[field] = value
    if body.service_tier is not None:
        out["service_tier"] = _SERVICE_TIERS.get(body.service_tier, body.service_tier)
    if LOGPROBS_INCLUDE in (body.include or []) or body.top_logprobs:
        out["logprobs"] = True
        if body.top_logprobs:
            out["top_logprobs"] = body.top_logprobs
    return out
