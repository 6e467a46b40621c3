"""Tool calls out of model text, in the formats models really emit.

Priority: the model family's own format (mlx-lm's `tool_parsers`, inferred from the chat
template), then the tagged formats common across families (`<tool_call>` JSON or XML,
`[TOOL_CALLS]`, `<|python_tag|>`), then a bare JSON object, then `name({...})`. Names not
offered in `tools` are not tool calls; identical calls are dropped; arguments always leave
as a JSON string. `<think>` sections are never parsed.

The streaming side (`ToolStreamFilter`) holds back text from the first place a call may start,
so a client never sees half a tool call as content; the same filter decides the non-streamed
result, so both paths always agree.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlxq.keys import tool_names

ParseFn = Callable[[str, Any], Any]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_GENERIC_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function=", "```")
_NAME_KEYS = ("name", "tool", "tool_name", "function")
_ARG_KEYS = ("arguments", "parameters", "args", "input")


@dataclass(frozen=True)
class ModelToolFormat:
    """A model family's own tool-call markers and parser (from mlx-lm's tool_parsers)."""

    start: str
    end: str
    parse: ParseFn


def model_tool_format(parser_name: str | None) -> ModelToolFormat | None:
    if not parser_name:
        return None
    try:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_name}")
    except ImportError:
        return None
    return ModelToolFormat(module.tool_call_start, getattr(module, "tool_call_end", ""), module.parse_tool_call)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _schema_props(tools: list[dict[str, Any]] | None, name: str) -> dict[str, Any]:
    for tool in tools or []:
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            return (fn.get("parameters") or {}).get("properties") or {}
    return {}


# -- values -------------------------------------------------------------------------------------

def _typed(value: str, schema: dict[str, Any]) -> Any:
    """An XML parameter value typed by the tool's JSON schema."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    text = value.strip()
    if "string" in kinds:
        return value
    for k in kinds:
        try:
            if k == "integer":
                return int(text)
            if k == "number":
                number = float(text)
                return int(number) if number.is_integer() and "." not in text else number
            if k == "boolean" and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if k in ("object", "array"):
                return json.loads(text)
            if k == "null" and text.lower() in ("null", "none"):
                return None
        except ValueError:
            continue
    if kind is None:
        try:
            return json.loads(text)
        except ValueError:
            return value
    return value


def _arguments_json(arguments: Any) -> str | None:
    """Arguments as a JSON object string, or None when they cannot be one."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return json.dumps(arguments, ensure_ascii=False)


def _as_call(obj: Any) -> tuple[str, Any] | None:
    """(name, arguments) when `obj` has the shape of a call, else None."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI-style {"type": "function", "function": {...}}
        return _as_call(obj["function"])
    name = next((obj[k] for k in _NAME_KEYS if isinstance(obj.get(k), str)), None)
    if name is None:
        return None
    args = next((obj[k] for k in _ARG_KEYS if k in obj), None)
    extra = set(obj) - set(_NAME_KEYS) - set(_ARG_KEYS) - {"id", "type"}
    if args is None and extra:
        return None
    return name, args


# -- scanners ---------------------------------------------------------------------------------

_decoder = json.JSONDecoder()
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_XML_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _json_values(text: str) -> list[tuple[Any, int, int]]:
    """Every top-level JSON object or array in `text`, with its span (braces in strings are fine)."""
    found, pos = [], 0
    while True:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return found
        start = min(starts)
        try:
            value, end = _decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        found.append((value, start, end))
        pos = end


def _calls_in_json(value: Any) -> list[tuple[str, Any]]:
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item) for item in items]
    return [c for c in calls if c is not None] if all(c is not None for c in calls) else []


def _parse_tagged(body: str, tools: list[dict[str, Any]] | None) -> list[tuple[str, Any]]:
    """The inside of a <tool_call> block: JSON, or Qwen3-Coder XML with typed parameters."""
    calls = []
    for m in _XML_FUNCTION.finditer(body):
        name, inner = m.group(1), m.group(2)
        props = _schema_props(tools, name)
        calls.append((name, {k: _typed(v, props.get(k, {})) for k, v in _XML_PARAM.findall(inner)}))
    if calls:
        return calls
    for value, _, _ in _json_values(body):
        calls.extend(_calls_in_json(value))
    if not calls:
        calls = _repaired(body)
    return calls


def _repaired(body: str) -> list[tuple[str, Any]]:
    """Small models often drop the closing brace of the outer object: close it and retry."""
    text = body.strip()
    if not text.startswith("{"):
        return []
    for k in (1, 2):
        try:
            return _calls_in_json(json.loads(text + "}" * k))
        except ValueError:
            continue
    return []


def _blocks(text: str, start: str, end: str) -> list[tuple[int, int, str]]:
    """(span start, span end, body) of each start...end block; an unterminated one runs to the end."""
    out, pos = [], 0
    while (i := text.find(start, pos)) >= 0:
        body_start = i + len(start)
        j = text.find(end, body_start) if end else -1
        if j < 0:
            nxt = text.find(start, body_start)
            j_end = nxt if nxt >= 0 else len(text)
            out.append((i, j_end, text[body_start:j_end]))
            pos = j_end
        else:
            out.append((i, j + len(end), text[body_start:j]))
            pos = j + len(end)
    return out


def _function_syntax(text: str, names: list[str]) -> list[tuple[str, Any, int, int]]:
    """`name({...})` or `name(key=value, ...)` for offered names."""
    found = []
    for name in names:
        for m in re.finditer(rf"(?<![\w.]){re.escape(name)}\s*\(", text):
            open_at = m.end()
            rest = text[open_at:].lstrip()
            skip = len(text[open_at:]) - len(rest)
            if rest.startswith("{"):
                try:
                    args, used = _decoder.raw_decode(rest)
                except ValueError:
                    continue
                close = open_at + skip + used
                tail = text[close:].lstrip()
                if tail.startswith(")"):
                    found.append((name, args, m.start(), close + (len(text[close:]) - len(tail)) + 1))
                continue
            depth, i = 1, open_at
            while i < len(text) and depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if depth:
                continue
            try:
                call = ast.parse(text[m.start():i].replace(name, "f", 1), mode="eval").body
                if isinstance(call, ast.Call) and not call.args:
                    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
                    if kwargs or text[open_at:i - 1].strip() == "":
                        found.append((name, kwargs, m.start(), i))
            except (SyntaxError, ValueError):
                continue
    return sorted(found, key=lambda c: c[2])


# -- the parser -------------------------------------------------------------------------------

def _strip_think(text: str) -> tuple[str, str]:
    """(thinking, rest): a leading <think> section is kept out of parsing."""
    if THINK_OPEN in text:
        i = text.find(THINK_OPEN)
        j = text.find(THINK_CLOSE, i)
        if j < 0:
            return text, ""
        return text[: j + len(THINK_CLOSE)], text[j + len(THINK_CLOSE):]
    if THINK_CLOSE in text:  # templates that open the think block in the prompt
        j = text.find(THINK_CLOSE)
        return text[: j + len(THINK_CLOSE)], text[j + len(THINK_CLOSE):]
    return "", text


def parse_tool_calls(text: str, tools: list[dict[str, Any]] | None,
                     model_format: ModelToolFormat | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Split model output into (content, OpenAI tool_calls). Content keeps any unparsed text."""
    names = tool_names(tools)
    if not names:
        return text, []
    thinking, body = _strip_think(text)
    spans: list[tuple[int, int]] = []
    raw: list[tuple[str, Any]] = []

    def take(found: list[tuple[str, Any]], span: tuple[int, int]) -> None:
        good = [(n, a) for n, a in found if n in names and _arguments_json(a) is not None]
        if good:
            raw.extend(good)
            spans.append(span)

    # 1. the model family's own format
    if model_format is not None:
        for s, e, inner in _blocks(body, model_format.start, model_format.end):
            try:
                parsed = model_format.parse(inner.strip(), tools)
                parsed = parsed if isinstance(parsed, list) else [parsed]
                take([(p["name"], p.get("arguments")) for p in parsed if isinstance(p, dict) and "name" in p],
                     (s, e))
            except Exception:  # the family parser is strict; the generic ones below may still match
                continue
    # 2. tagged formats shared across families
    if not raw:
        for start, end in (("<tool_call>", "</tool_call>"), ("[TOOL_CALLS]", ""), ("<|python_tag|>", "")):
            for s, e, inner in _blocks(body, start, end):
                found = _parse_tagged(inner, tools)
                if not found and start == "[TOOL_CALLS]":
                    found = [(m.group(1), v) for m in re.finditer(r"([\w-]+)\s*\[ARGS\]", inner)
                             for v, _, _ in _json_values(inner[m.end():])[:1]]
                take(found, (s, e))
    # 3. a bare JSON object (or list of them), possibly fenced
    if not raw:
        for value, s, e in _json_values(body):
            take(_calls_in_json(value), (s, e))
    # 4. name({...})
    if not raw:
        for name, args, s, e in _function_syntax(body, names):
            take([(name, args)], (s, e))

    calls, seen = [], set()
    for name, args in raw:
        arguments = _arguments_json(args)
        if (name, arguments) in seen:
            continue
        seen.add((name, arguments))
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}})
    if not calls:
        return text, []
    content = body
    for s, e in sorted(spans, reverse=True):
        content = content[:s] + content[e:]
    content = re.sub(r"```(?:json)?\s*```", "", content)
    return (thinking + content).strip(), calls


@dataclass
class ToolStreamFilter:
    """Decides how much of the growing text is safe to stream as content.

    Everything from the first place a tool call may start is held back; at the end the held
    text is parsed. Inside a <think> section nothing is held.
    """

    tools: list[dict[str, Any]] | None
    model_format: ModelToolFormat | None = None
    held_from: int | None = None
    markers: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        names = tool_names(self.tools)
        extra = (self.model_format.start,) if self.model_format else ()
        self.markers = tuple(dict.fromkeys(extra + _GENERIC_MARKERS + tuple(f"{n}(" for n in names)))
        self.active = bool(names)

    def safe_length(self, text: str) -> int:
        """How many leading characters of `text` can be shown as content now."""
        if not self.active:
            return len(text)
        if self.held_from is not None:
            return self.held_from
        thinking = _strip_think(text)[0]
        if thinking == text:  # still inside a <think> section: nothing in it is a call
            return len(text)
        floor = len(thinking)
        cut = len(text)
        for marker in self.markers:
            i = text.find(marker, floor)
            if i >= 0:
                cut = min(cut, i)
                self.held_from = cut
            else:  # a partial marker at the very end may still grow into one
                for k in range(min(len(marker) - 1, len(text) - floor), 0, -1):
                    if text.endswith(marker[:k]):
                        cut = min(cut, len(text) - k)
                        break
        # A bare JSON call starts a line with { or [.
        for m in re.finditer(r"(?:^|\n)[ \t]*([{\[])", text[floor:]):
            i = floor + m.start(1)
            cut = min(cut, i)
            self.held_from = min(self.held_from if self.held_from is not None else i, i)
            break
        if self.held_from is not None:
            cut = min(cut, self.held_from)
        # Trailing whitespace may precede a call; hold it until we know.
        return len(text[:cut].rstrip()) if cut < len(text) or text[cut - 1:cut].isspace() else cut

    def finish(self, text: str, shown: int) -> tuple[str, list[dict[str, Any]]]:
        """(content still to show, tool calls) once generation is over."""
        if not self.active:
            return text[shown:], []
        content, calls = parse_tool_calls(text[shown:], self.tools, self.model_format)
        if not calls:
            return text[shown:], []
        return content, calls
