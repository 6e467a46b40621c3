"""OpenAI request and response schemas, in the order of the official spec.

Unknown fields are allowed (clients send many); non-spec extras are fenced below. The request models
describe the shape of every field we accept, so a malformed value is a 400 naming its path and the
OpenAPI schema says what a valid body is; what this server cannot honour (and the limits from the
settings) is refused in api.pipeline.validation.

Optional fields default to None: a request is dumped with `exclude_none` into its canonical form (the
cache key), which must hold what the client sent and no default a model invented.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from mlxq.request import CacheSalt, Priority, SamplingExtras, priority_of

# Content parts of other modalities: named in the error, since the model is text-only.
MEDIA_PARTS = ("image_url", "input_audio", "file", "image", "audio", "input_image", "input_file", "video_url")


class OpenAIBaseModel(BaseModel):
    # NaN and infinities are not JSON (Python's parser accepts them anyway): refused in every float field.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


def _json_type(value: Any) -> str | None:
    """The JSON type of a value, to pick the one branch of a union that applies (so an error names one path)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, BaseModel):  # serializing a validated request
        return "object"
    return {str: "string", list: "array", dict: "object", int: "integer", float: "number"}.get(type(value))


def one_of(message: str) -> Discriminator:
    """A discriminator by JSON type over `Tag("string")`, `Tag("array")`, ... branches; `message` otherwise."""
    return Discriminator(_json_type, custom_error_type="invalid_type", custom_error_message=message)


# -- messages ----------------------------------------------------------------------------------


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


def _text_only(part: Any) -> Any:
    """Say plainly why a part that is not text is refused, before it is read as a text part."""
    if isinstance(part, dict) and "type" in part and part["type"] != "text":
        if part["type"] in MEDIA_PARTS:
            raise PydanticCustomError(
                "unsupported_content_part",
                "this model is text-only: content parts of type '{part_type}' are not supported",
                {"part_type": part["type"]},
            )
        raise PydanticCustomError(
            "unsupported_content_part",
            "unsupported content part type '{part_type}'; only 'text' parts are served",
            {"part_type": str(part["type"])},
        )
    return part


ContentPart = Annotated[TextPart, BeforeValidator(_text_only)]
Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Tag("array"), Field(min_length=1)],
    one_of("Input should be a string or a list of content parts"),
]


class FunctionCall(OpenAIBaseModel):
    name: str
    # OpenAI sends a JSON string; some clients send the object itself: both are accepted.
    arguments: (
        Annotated[
            Annotated[str, Tag("string")] | Annotated[dict[str, Any], Tag("object")],
            one_of("Input should be a JSON string (or a JSON object)"),
        ]
        | None
    ) = None


class ToolCall(OpenAIBaseModel):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class SystemMessage(OpenAIBaseModel):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(OpenAIBaseModel):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"]
    content: Content | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise PydanticCustomError("missing_content", "an assistant message needs `content` or `tool_calls`")
        return self


class ToolMessage(OpenAIBaseModel):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(OpenAIBaseModel):
    """Deprecated by OpenAI (replaced by tool messages), still accepted."""

    role: Literal["function"]
    content: str | None
    name: str


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


# -- tools -------------------------------------------------------------------------------------


class FunctionDefinition(OpenAIBaseModel):
    # OpenAI's rule plus dots (namespaced tools): the name is also written into prompts and prefills.
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("string")] | Annotated[NamedToolChoice, Tag("object")],
    one_of('Input should be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'),
]


class JSONSchemaFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, validate_by_name=True, serialize_by_alias=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` would shadow BaseModel.schema: kept under its wire name by the alias.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_given(cls, value: JSONSchemaFormat | None, info: ValidationInfo) -> JSONSchemaFormat | None:
        # Checked on the field, not the model, so the 400 names `response_format.json_schema` itself.
        if info.data.get("type") == "json_schema" and value is None:
            raise PydanticCustomError("missing", "Field required: json_schema")
        return value


class StreamOptions(TypedDict, total=False):
    """A typed dict rather than a model: the streaming code reads it as the plain dict it was."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    include_usage: bool


Stop = Annotated[
    Annotated[str, Tag("string"), Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Tag("array")],
    one_of("Input should be a string or a list of strings"),
]


# -- requests ----------------------------------------------------------------------------------


ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
# The tier an answer says served it: OpenAI's "auto" (and no tier) are served by the project's default, "default".
ServedTier = Literal["default", "flex", "scale", "priority"]


class GenerationRequest(OpenAIBaseModel, SamplingExtras):
    """The sampling and delivery fields chat and legacy completions share (`seed`, the penalties and the non-spec
    sampling extras come from mlxq.request.SamplingExtras, declared once for every dialect)."""

    model: str
    # Token id -> bias; accepted in shape, refused when non-empty (not supported).
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=1, strict=True)
    n: int | None = Field(None, ge=1, strict=True)
    # json_object / json_schema: the answer is decoded under the schema's grammar (mlxq.grammar).
    response_format: ResponseFormat | None = None
    # "flex" (OpenAI's slower, cheaper tier) runs at low priority: after interactive requests.
    service_tier: ServiceTier | None = None
    stop: Stop | None = None
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # -- non-spec extras -------------------------------------------------------------------
    # LiteLLM-style per-request cache controls: {"no-cache": true, "no-store": true, "ttl": 60}.
    cache: dict[str, Any] | None = None
    # vLLM's: separates this client's prefix KV cache and response cache from others' of the same key.
    cache_salt: CacheSalt | None = None

    @property
    def priority(self) -> Priority:
        return priority_of(self.service_tier)

    @property
    def served_tier(self) -> ServedTier:
        """The `service_tier` the answer carries: the processing that served it, as OpenAI reports it."""
        if self.service_tier is None or self.service_tier == "auto":
            return "default"
        return self.service_tier


class Prediction(OpenAIBaseModel):
    """OpenAI's Predicted Outputs: the text the answer is expected to repeat (an edited file), as a string or text
    parts."""

    type: Literal["content"]
    content: Content

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # Output audio: refused (the model is text-only).
    audio: dict[str, Any] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    metadata: dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    prediction: Prediction | None = None
    tool_choice: ToolChoice | None = None
    tools: list[ChatCompletionTool] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


def _prompt_type(value: Any) -> str | None:
    """Which of the four prompt shapes a value is, judged by its first item (an error then names the item)."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        first = value[0] if value else ""
        if isinstance(first, list):
            return "token_lists"
        return "tokens" if isinstance(first, int) else "strings"
    return None


# Token ids are strict ints (not true, not 1.0): their range is checked in api.pipeline.validation, with its own code.
Prompt = Annotated[
    Annotated[str, Tag("string")]
    | Annotated[list[str], Tag("strings"), Field(min_length=1)]
    | Annotated[list[StrictInt], Tag("tokens"), Field(min_length=1)]
    | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Tag("token_lists"), Field(min_length=1)],
    Discriminator(
        _prompt_type,
        custom_error_type="invalid_type",
        custom_error_message="Input should be a string, a list of strings, a list of token ids "
        "or a list of lists of token ids",
    ),
]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    # Only 1 (the default) is served.
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
