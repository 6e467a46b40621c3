"""What a request's answer must match, as an llguidance grammar: the one decision of when and how an answer is
constrained, for the api (which refuses a grammar that cannot compile, before anything is enqueued) and the
worker (which decodes under it, api-independent: llguidance needs no MLX to compile or check a grammar).

- A forced tool call (`tool_choice` "required" or a named function; Anthropic's `any` and `tool` arrive as
  those) in the fallback call format (worker.tool_prompt): the model's answer, after the prefill the worker
  writes for it, is `{"name": <one of the tools>, "arguments": <that tool's parameters schema>}` and the closing
  tag, so it always parses into a valid call.
- `response_format` `json_object` (any JSON object) or `json_schema` (its schema): the whole answer.
- Tools with `auto` (fallback format): text stays free; once the model writes the call's opening tag, the
  call is constrained from there (`Constraint.trigger`) to a call of an offered tool, its arguments to that
  tool's schema, and the closing tag; then text is free again, until the next opening tag. This one is best
  effort (`Constraint.required` false): agents send whatever schemas their tools have (`propertyNames`,
  `uniqueItems`, odd `format`s), so keywords llguidance does not implement are ignored, and a grammar that
  still does not compile leaves the answer free rather than refusing a request the client did not ask to
  constrain.

JSON is compact (no free whitespace), so a small model cannot spend its budget on blank lines.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# The fallback call format (worker.tool_prompt): what the worker writes before a forced call, and what ends it.
CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def forced_prefill(name: str | None) -> str:
    """The answer text the worker writes for a forced call: the open tag, and for a named call its name."""
    return CALL_OPEN + (f'{{"name": "{name}", "arguments": ' if name else "")


def tool_choice_of(request: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, str]:
    """(tools to offer, forced function name, mode: auto | required | none) of a canonical chat request."""
    tools, choice = list(request.get("tools") or []), request.get("tool_choice")
    if choice in (None, "auto"):
        return tools, None, "auto"
    if choice == "none":
        return [], None, "none"
    if choice == "required":
        return tools, None, "required"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        return [t for t in tools if (t.get("function") or t).get("name") == name], name, "required"
    return tools, None, "auto"


@dataclass(frozen=True)
class Constraint:
    grammar: str  # llguidance's serialized grammar
    param: str  # the request field it comes from (named by a 400)
    # None: the whole answer; else the grammar holds from each place this text appears in the answer, until
    # the grammar is complete (a call the model opens on its own).
    trigger: str | None = None
    # False for a best-effort constraint: one that does not compile leaves the answer free instead of a 400.
    required: bool = True

    @property
    def key(self) -> str:
        """Compiled grammars are cached by this."""
        return hashlib.sha256(self.grammar.encode()).hexdigest()


def _schema(schema: Any, *, lenient: bool = False) -> dict[str, Any]:
    """A schema embedded in a Lark grammar, with mlxq's JSON options (its own `x-guidance` wins); `lenient`
    ignores the keywords llguidance does not implement."""
    base: dict[str, Any] = dict(schema) if isinstance(schema, dict) else {"type": "object"}
    own = base.get("x-guidance")
    options: dict[str, Any] = {**JSON_OPTIONS, "lenient": True} if lenient else dict(JSON_OPTIONS)
    return {**base, "x-guidance": {**options, **(own if isinstance(own, dict) else {})}}


# Where a JSON schema holds subschemas: `strict` reaches into each.
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


def _subschemas_mapped(
    schema: dict[str, Any], fn: Callable[[Any], Any], lists: tuple[str, ...] = _SUBSCHEMA_LISTS
) -> dict[str, Any]:
    """A copy of `schema` with `fn` applied to each of its direct subschemas (those in `lists` among the lists)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: fn(sub) for name, sub in value.items()}
        elif key in lists and isinstance(value, list):
            out[key] = [fn(sub) for sub in value]
        elif key in _SUBSCHEMA_ONE:
            out[key] = fn(value)
        else:
            out[key] = value
    return out


def strict_schema(schema: Any) -> Any:
    """OpenAI's `strict: true`: every object has exactly its declared properties, all of them present (a field is
    optional only as a union with null). Applied to what is decoded, so a strict answer never has an undeclared
    or a missing field, where the schema alone (JSON Schema's defaults) would allow both."""
    if not isinstance(schema, dict):
        return schema
    out = _subschemas_mapped(schema, strict_schema)
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
        if isinstance(out.get("properties"), dict):
            out["required"] = list(out["properties"])
    return out


def closed_schema(schema: Any) -> Any:
    """A tool's arguments schema whose objects that declare `properties` and say nothing of other keys take only
    those, as llama.cpp's grammars read every schema: JSON Schema's default lets any other key in, with any value,
    and a small model forced into a call then fills it with keys of its own (SmolLM2 wrote `{"type": {"type": ...`
    until max_tokens, and the call came back as text). A tool runs on the arguments it declares. Left open: an
    `allOf`'s branches (each sees only its own properties: closed, they would have no object in common) and an
    object that requires a key it does not declare."""
    if not isinstance(schema, dict):
        return schema
    out = _subschemas_mapped(schema, closed_schema, lists=("anyOf", "oneOf", "prefixItems"))
    properties, required = out.get("properties"), out.get("required")
    declared = isinstance(properties, dict) and (
        not isinstance(required, list) or all(isinstance(r, str) and r in properties for r in required)
    )
    others = {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf"} & out.keys()
    if declared and not others:
        out["additionalProperties"] = False
    return out


def _parameters(tool: dict[str, Any]) -> Any:
    """A tool's arguments schema: strict when the tool says so, else closed to its declared keys."""
    function = tool.get("function") or {}
    parameters = function.get("parameters")
    return strict_schema(parameters) if function.get("strict") else closed_schema(parameters)


# Where a schema holds data rather than subschemas: a `$ref` key there is not a reference.
_DATA_KEYWORDS = ("const", "enum", "default", "examples")


def _rebased(schema: Any, base: str) -> Any:
    """A schema whose local `$ref`s (`#/$defs/x`, `#`) point into it where it is nested at JSON pointer `base` of
    a larger one: llguidance resolves a `$ref` from the root of the whole schema, so a tool's `#/$defs/x` nested
    under a call's `arguments` would name nothing (pydantic writes every nested model so)."""
    if isinstance(schema, list):
        return [_rebased(sub, base) for sub in schema]
    if not isinstance(schema, dict) or "$id" in schema:  # a resource of its own: its refs resolve inside it
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + base + value[1:]
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):  # names, then subschemas: a name is no keyword
            out[key] = {name: _rebased(sub, base) for name, sub in value.items()}
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _rebased(value, base)
    return out


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


def _call_grammar(tools: list[dict[str, Any]], forced: str | None, *, lead: str = "", lenient: bool = False) -> str:
    """The text after `forced_prefill(forced)`: the rest of the call, then the closing tag; `lead`, a Lark
    expression before it (the whitespace a model may write after an opening tag it wrote itself)."""
    if forced is not None:
        (tool,) = tools
        arguments = _schema(_parameters(tool))
        lark = f"start: args {_lark_string('}' + CALL_CLOSE)}\nargs: %json {json.dumps(arguments)}\n"
    else:
        calls = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": (t.get("function") or {}).get("name")},
                        "arguments": _rebased(
                            _schema(_parameters(t), lenient=lenient), f"/anyOf/{i}/properties/arguments"
                        ),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for i, t in enumerate(tools)
            ]
        }
        lark = f"start: {lead} call {_lark_string(CALL_CLOSE)}\ncall: %json {json.dumps(_schema(calls, lenient=lenient))}\n"
    return LLMatcher.grammar_from_lark(lark)


def constraint_for(request: dict[str, Any], *, native_tools: bool = False) -> Constraint | None:
    """The constraint on a canonical chat or completion request's answer, if any. `native_tools`: the model's
    own template takes the tools (its call format is its own, not constrained here)."""
    tools, forced, mode = tool_choice_of(request)
    if tools and mode == "required" and not native_tools:
        return Constraint(_call_grammar(tools, forced), "tool_choice" if forced else "tools")
    response_format = request.get("response_format") or {}
    kind = response_format.get("type")
    if kind == "json_object":
        return Constraint(
            LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS), "response_format"
        )
    if kind == "json_schema":
        json_schema = response_format.get("json_schema") or {}
        schema = json_schema.get("schema")
        if json_schema.get("strict"):
            schema = strict_schema(schema)
        return Constraint(
            LLMatcher.grammar_from_json_schema(schema if isinstance(schema, dict) else {}, defaults=JSON_OPTIONS),
            "response_format",
        )
    if tools and mode == "auto" and not native_tools:
        opened = CALL_OPEN.rstrip("\n")
        try:
            grammar = _call_grammar(tools, None, lead="/[ \\t\\n]*/", lenient=True)
        except ValueError:  # a schema llguidance refuses outright: the answer stays free
            return None
        return Constraint(grammar, "tools", trigger=opened, required=False)
    return None


# How many bytes of an answer `problem` walks the grammar through: a schema that compiles and still cannot be
# matched (a reference to itself and nothing else, a property that requires itself forever) fails at its first.
PROBE_BYTES = 16


def problem(constraint: Constraint) -> str | None:
    """Why the grammar cannot be compiled (a feature llguidance does not implement, a bad pattern) or matched, or
    None."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(constraint.grammar, limits=parser_limits())
    if is_error:
        return messages[0] if messages else "the grammar does not compile"
    unimplemented = [m for m in messages if "Unimplemented" in m or "unsupported" in m.lower()]
    return unimplemented[0] if unimplemented else _probe(constraint.grammar)


def _probe(grammar: str) -> str | None:
    """The parser's error on the first bytes of some answer the grammar allows (its first allowed byte each step),
    or None. Compiling checks the grammar, not that it can be followed: one that cannot fails here as it would in
    the worker's first steps, where it would leave the answer unconstrained. Bytes, so the api needs no model."""
    tokenizer = _bytes()
    matcher = LLMatcher(tokenizer, grammar, limits=parser_limits())
    mask = allocate_token_bitmask(1, tokenizer.vocab_size)
    for _ in range(PROBE_BYTES):
        if matcher.is_error() or matcher.is_stopped() or matcher.is_accepting():
            break
        fill_next_token_bitmask(matcher, mask, 0)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[: tokenizer.vocab_size])
        if not allowed.size or not matcher.consume_token(int(allowed[0])):
            break
    return f"no answer can follow it ({matcher.get_error().splitlines()[0]})" if matcher.is_error() else None


@functools.cache
def _bytes() -> LLTokenizer:
    """llguidance's byte-level tokenizer: made once, read-only after."""
    return LLTokenizer("byte")


def parser_limits() -> LLParserLimits:
    """Bounds on compiling one grammar and on each step's work, so a pathological schema is refused rather than
    compiled (or matched) for minutes."""
    return LLParserLimits(max_grammar_size=2_000_000, initial_lexer_fuel=2_000_000, step_lexer_fuel=500_000)
