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
from typing import Any, cast

from mlxq.keys import tool_names

ParseFn = Callable[[str, Any], Any]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_LINE = re.compile(rf"(?:^|\n)[ \t]*{THINK_OPEN}")
# Where a call certainly opens (a Markdown fence may hold one too: the filter judges each fence apart).
_GENERIC_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function=")
_NAME_KEYS = ("name", "tool", "tool_name", "function")
_ARG_KEYS = ("arguments", "parameters", "args", "input")
# A JSON call opens with one of these keys (models write the name, or OpenAI's `type`/`id`, first): an object that
# opens with another is no call, which a stream can tell from its first key, not only once it closes.
_CALL_KEYS = frozenset((*_NAME_KEYS, *_ARG_KEYS, "id", "type"))


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
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            return props if isinstance(props, dict) else {}
    return {}


# -- values -------------------------------------------------------------------------------------


def _typed(value: str, schema: dict[str, Any]) -> Any:
    """An XML parameter value typed by the tool's JSON schema."""
    kind = schema.get("type") if isinstance(schema, dict) else None  # a schema may be `true`
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
    try:  # strict JSON: no NaN or Infinity, nothing Python-only (sets, complex numbers, bytes)
        return json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


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
_SPACE = re.compile(r"\s*")
_JSON_START = re.compile(r"\{\s*[\"}]|\[\s*\{")
# A JSON string, and the opening of a value's first object (in a list too).
_STRING, _OPENING = r'"(?:[^"\\]|\\.)*"', r"(?:\[\s*)?\{\s*"
# A JSON value's first key, once written with its colon.
_FIRST_KEY = re.compile(rf"{_OPENING}({_STRING})\s*:")
# Its call's name where a model writes it, before anything else but string `type`/`id` fields: `{"name": "x"` or
# OpenAI's `{"type": "function", "function": {"name": "x"`, once the name's string has closed.
_FIRST_NAME = re.compile(
    rf'{_OPENING}(?:"(?:type|id)"\s*:\s*{_STRING}\s*,\s*)*(?:"function"\s*:\s*\{{\s*)?"name"\s*:\s*({_STRING})'
)
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_XML_PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _json_values(text: str) -> list[tuple[Any, int, int]]:
    """Every top-level JSON object or list of objects in `text`, with its span (braces in strings are fine)."""
    found, pos = [], 0
    # Only where a call can start: an object, or a list whose first item is one. A run of "[[[[" or
    # "[1,[1," (a degenerate answer) then costs nothing; each decode there would recurse to the limit.
    while m := _JSON_START.search(text, pos):
        start = m.start()
        try:
            value, end = _decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # RecursionError: nested past the interpreter's limit
            pos = start + 1
            continue
        found.append((value, start, end))
        pos = end
    return found


def _calls_in_json(value: Any, bare: bool = True) -> list[tuple[str, Any]]:
    """The calls a JSON value is: an object with a call's shape, or a list of them. A `bare` one (no call's marker
    around it) must also open each with a call's key (`_CALL_KEYS`)."""
    items = value if isinstance(value, list) else [value]
    calls = [
        _as_call(item) if not bare or (isinstance(item, dict) and next(iter(item), None) in _CALL_KEYS) else None
        for item in items
    ]
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
        calls.extend(_calls_in_json(value, bare=False))
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
            return _calls_in_json(json.loads(text + "}" * k), bare=False)
        except (ValueError, RecursionError):
            continue
    return []


def _blocks(text: str, start: str, end: str) -> list[tuple[int, int, str]]:
    """(span start, span end, body) of each start...end block; an unterminated one runs to the end."""
    out, pos = [], 0
    while (i := text.find(start, pos)) >= 0:
        body_start = i + len(start)
        after = _json_end(text, body_start)  # a marker inside the JSON a block holds does not end it
        j = text.find(end, after) if end else -1
        if j < 0:
            nxt = text.find(start, after)
            j_end = nxt if nxt >= 0 else len(text)
            out.append((i, j_end, text[body_start:j_end]))
            pos = j_end
        else:
            out.append((i, j + len(end), text[body_start:j]))
            pos = j + len(end)
    return out


def _skip_space(text: str, pos: int) -> int:
    """Past the whitespace at `pos`."""
    return cast("re.Match[str]", _SPACE.match(text, pos)).end()  # `\s*` matches at every position


def _json_end(text: str, pos: int) -> int:
    """Past the JSON object or list that starts at `pos` (after whitespace), if one does; else `pos`."""
    start = _skip_space(text, pos)
    if not text.startswith(("{", "["), start):
        return pos
    try:
        return _decoder.raw_decode(text, start)[1]
    except (ValueError, RecursionError):
        return pos


def _function_syntax(text: str, names: list[str]) -> list[tuple[str, Any, int, int]]:
    """`name({...})` or `name(key=value, ...)` for offered names; a call inside another's arguments is not one."""
    found: list[tuple[str, Any, int, int]] = []
    last_close = text.rfind(")")
    for name in names:
        # Not preceded by a name character: `x-get(` is not a call of `get` when `x-get` is offered.
        for m in re.finditer(rf"(?<![\w.-]){re.escape(name)}\s*\(", text):
            open_at = m.end()
            if open_at > last_close:  # "get(get(get(..." of a looping answer: nothing closes
                break
            start = _skip_space(text, open_at)
            if text.startswith("{", start):
                try:
                    args, close = _decoder.raw_decode(text, start)
                except (ValueError, RecursionError):
                    continue
                close = _skip_space(text, close)
                if text.startswith(")", close):
                    found.append((name, args, m.start(), close + 1))
                continue
            end = _call_end(text, open_at)
            if end is None:
                continue
            try:
                call = ast.parse("f" + text[m.start() + len(name) : end], mode="eval").body
                if isinstance(call, ast.Call) and not call.args:
                    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
                    if kwargs or text[open_at : end - 1].strip() == "":
                        found.append((name, kwargs, m.start(), end))
            # literal_eval raises TypeError on `{[1]: 2}`, the parser RecursionError on `1+1+...+1`
            except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
                continue
    outer: list[tuple[str, Any, int, int]] = []
    end = 0
    for hit in sorted(found, key=lambda c: c[2]):
        if hit[2] >= end:
            outer.append(hit)
            end = hit[3]
    return outer


_PY_TOKEN = re.compile(r"""[()]|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'""")
_MAX_CALL, _MAX_DEPTH = 1 << 16, 64  # Python's own parser gives up at 200 levels


def _call_end(text: str, open_at: int) -> int | None:
    """Just past the ")" closing the call opened before `open_at`; parentheses in string literals don't count."""
    depth = 1
    for m in _PY_TOKEN.finditer(text, open_at, min(len(text), open_at + _MAX_CALL)):
        if m.group() == "(":
            depth += 1
            if depth > _MAX_DEPTH:
                return None
        elif m.group() == ")":
            depth -= 1
            if not depth:
                return m.end()
    return None


# -- the parser -------------------------------------------------------------------------------


def _strip_think(text: str) -> tuple[str, str]:
    """(thinking, rest): a leading <think> section is kept out of parsing."""
    # Only a <think> that starts a line opens one: one inside a JSON string (a call's arguments) can't.
    if m := _THINK_LINE.search(text):
        j = text.find(THINK_CLOSE, m.end())
        if j < 0:
            return text, ""
        return text[: j + len(THINK_CLOSE)], text[j + len(THINK_CLOSE) :]
    if THINK_CLOSE in text:  # templates that open the think block in the prompt
        j = text.find(THINK_CLOSE)
        return text[: j + len(THINK_CLOSE)], text[j + len(THINK_CLOSE) :]
    return "", text


def parse_tool_calls(
    text: str, tools: list[dict[str, Any]] | None, model_format: ModelToolFormat | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Split model output into (content, OpenAI tool_calls). Content keeps any unparsed text."""
    floor, spans, calls = _find_calls(text, tools, model_format)
    if not calls:
        return text, []
    return _content(text, floor, spans), calls


def _find_calls(
    text: str,
    tools: list[dict[str, Any]] | None,
    model_format: ModelToolFormat | None,
) -> tuple[int, list[tuple[int, int]], list[dict[str, Any]]]:
    """(where the text after any <think> section starts, the calls' spans in `text`, the calls)."""
    names = tool_names(tools)
    if not names:
        return 0, [], []
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
                take([c for c in map(_as_call, parsed) if c is not None], (s, e))
            except Exception:  # the family parser is strict; the generic ones below may still match
                continue
    # 2. tagged formats shared across families
    if not raw:
        for start, end in (("<tool_call>", "</tool_call>"), ("[TOOL_CALLS]", ""), ("<|python_tag|>", "")):
            for s, e, inner in _blocks(body, start, end):
                found = _parse_tagged(inner, tools)
                if not found and start == "[TOOL_CALLS]":
                    found = [
                        (m.group(1), v)
                        for m in re.finditer(r"([\w-]+)\s*\[ARGS\]", inner)
                        for v, _, _ in _json_values(inner[m.end() :])[:1]
                    ]
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
        if arguments is None:  # never: take() kept only calls whose arguments are JSON
            continue
        same = (name, json.dumps(json.loads(arguments), sort_keys=True))  # the same call, keys in any order
        if same in seen:
            continue
        seen.add(same)
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}})
    floor = len(thinking)
    return floor, [(s + floor, e + floor) for s, e in (_with_fence(body, *span) for span in spans)], calls


def _with_fence(text: str, start: int, end: int) -> tuple[int, int]:
    """The span widened to the Markdown fence around it, when the call is all the fence holds."""
    i = start
    while i > 0 and text[i - 1].isspace():
        i -= 1
    opening = next((i - len(f) for f in ("```json", "```") if text.endswith(f, 0, i)), None)
    j = _skip_space(text, end)
    if opening is None or not text.startswith("```", j):
        return start, end
    return opening, j + 3


def _content(text: str, floor: int, spans: list[tuple[int, int]]) -> str:
    """`text` without the calls' spans; what precedes `floor` stays as it is.

    Whitespace before a call goes, and so does whitespace after one that nothing precedes, or that
    ends the text. A text shown as far as any point before its first call (never ending in
    whitespace) therefore keeps exactly that beginning: the stream and the result agree.
    """
    kept, out, pos = text[:floor], "", floor
    for s, e in sorted(spans):
        gap = text[pos:s]
        if pos > floor and not (kept or out):
            gap = gap.lstrip()
        out += gap.rstrip()
        pos = e
    tail = text[pos:]
    out += tail if kept or out else tail.lstrip()
    return kept + out.rstrip()


# Outside its strings a JSON value holds only these (Python's decoder also reads NaN, Infinity and -Infinity).
_JSON_BARE = frozenset(" \t\r\n{}[]:,-+.0123456789eE" + "truefalsn" + "NaNInfinity")


class _JsonScan:
    """Where a JSON value that starts at `start` ends, found incrementally as the text grows: the stream filter
    asks after every token, so each character is read once (a rescan per token would be quadratic). A character no
    JSON value holds outside a string (a quote mark, `=`, `(`: code, say `d = {"q": '"'}`) ends it at once, as a
    value that cannot parse; else a stray quote inside it held the rest of the answer back until its end."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.pos = start
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def end(self, text: str) -> int | None:
        """Past the value's closing bracket, once the text has it; None while it is open."""
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch not in _JSON_BARE:
                self.pos = i + 1
                return i + 1  # not JSON: the decoder refuses it
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.pos = i + 1
                    return i + 1
        self.pos = len(text)
        return None


# A Markdown fence's opening line: its info string decides whether a call could be all the fence holds
# (`_with_fence` takes "```" or "```json" with it when it does).
_FENCE = re.compile(r"```([^\n`]*)\n")


def _overlap(text: str, name: str) -> int:
    """The length of the longest start of `name` (short of all of it) that `text` ends with; 0 for none."""
    for k in range(min(len(name) - 1, len(text)), 0, -1):
        if text.endswith(name[:k]):
            return k
    return 0


@dataclass
class ToolStreamFilter:
    """Decides how much of the growing text is safe to stream as content.

    Held back is only what could still be a tool call, as the one-shot parse (`_find_calls`) would read it at
    the end: from a call's opening marker (the model's own, `<tool_call>`, `[TOOL_CALLS]`, `name(` of an offered
    tool, ...) to the end, and a JSON value (with the Markdown fence around it) until it closes; a closed value
    that is not a call to an offered tool is released, and so is a fence whose first line shows it is code, so an
    answer that opens with a code block streams as it is written (llama.cpp and vLLM stream likewise until a
    call's opening is seen). Inside a <think> section nothing is held.
    """

    tools: list[dict[str, Any]] | None
    model_format: ModelToolFormat | None = None
    held_from: int | None = None  # a call's opening marker was seen here: everything after it is held
    markers: tuple[str, ...] = field(default=())
    # Everything before `settled` is content for good (scanned, no call can start in it).
    settled: int = 0
    _scan: _JsonScan | None = None
    _call_from: int = 0  # no call of `name(` syntax starts before this

    def __post_init__(self) -> None:
        names = tool_names(self.tools)
        self.names = names
        extra = (self.model_format.start,) if self.model_format else ()
        self.markers = tuple(dict.fromkeys(extra + _GENERIC_MARKERS))
        # `name(` opens a call only where the one-shot parse (`_function_syntax`) reads one: not inside a longer name
        # or after a dot (`client.get_weather(` in code is no call), with space before the parenthesis allowed.
        either = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        self._call_open = re.compile(rf"(?<![\w.-])(?:{either})\s*\(")
        self.active = bool(names)

    def safe_length(self, text: str) -> int:
        """How many leading characters of `text` can be shown as content now."""
        if not self.active:
            return len(text)
        if self.held_from is not None:
            return len(text[: self.held_from].rstrip())
        thinking = _strip_think(text)[0]
        if thinking == text:  # still inside a <think> section: nothing in it is a call
            return len(text)
        floor = max(len(thinking), self.settled)
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
        start = max(floor, self._call_from)
        while (call := self._call_open.search(text, start)) is not None:
            # Held until its parenthesis closes; then a call holds the rest, and anything else (`def get_weather(data):`
            # in code) is content, as the one-shot parse reads it, rather than holding the rest of the answer.
            end = _call_end(text, call.end())
            if end is None or _function_syntax(text[call.start() : end], self.names):
                cut = min(cut, call.start())
                if end is not None:
                    self.held_from = cut
                break
            start = self._call_from = end
        else:
            # An opening can only start where the end of the text may still grow into one: the next look starts there.
            self._call_from = max(start, self._call_tail(text))
            cut = min(cut, self._call_from)
        if self.held_from is None:
            cut = min(cut, self._json_hold(text, floor, cut))
        # Trailing whitespace may precede a call; hold it until we know.
        return len(text[:cut].rstrip()) if cut < len(text) or text[cut - 1 : cut].isspace() else cut

    def _call_tail(self, text: str) -> int:
        """Where the end of `text` may still grow into a `name(` opening (a name's first characters, or all of it and
        space), at a name's start as `_call_open` reads it; `len(text)` where it cannot."""
        stripped = text.rstrip()
        tail = len(text)
        for name in self.names:
            if stripped.endswith(name):
                at = len(stripped) - len(name)
            elif stripped == text and (k := _overlap(text, name)):
                at = len(text) - k
            else:
                continue
            if at < tail and not (at and (text[at - 1].isalnum() or text[at - 1] in "_.-")):
                tail = at
        return tail

    def _json_hold(self, text: str, floor: int, limit: int) -> int:
        """Where the first JSON value (or the fence around it) that may still be a call starts, before `limit`;
        `limit` when none may. What precedes a value that closed without being a call is settled content."""
        pos = floor
        while True:
            value = _JSON_START.search(text, pos, limit)
            if value is not None:
                start = value.start()
            else:  # a "{" or "[" at the very end may grow into a value's start, and a "`" or "``" into a fence
                rest = text[pos:limit]
                if rest.endswith("`") and "```" not in rest[-3:]:
                    return limit - (len(rest) - len(rest.rstrip("`")))
                rest = rest.rstrip()
                start = pos + len(rest) - 1 if rest.endswith(("{", "[")) else limit
            opening = text.find("```", pos, start)
            if opening >= 0:
                fence = _FENCE.match(text, opening, limit)
                if fence is None:
                    return opening  # its first line is not complete: it may open a call's fence
                after = min(_skip_space(text, fence.end()), limit)
                if fence.group(1).strip() in ("", "json") and after == start:
                    hold = opening  # a call may be all this fence holds: its opening goes with it
                else:
                    pos = fence.end()  # code or prose: the fence's first line is content
                    self.settled = pos
                    continue
            else:
                hold = start
            if value is None:
                self.settled = max(self.settled, pos)
                return hold
            if self._scan is None or self._scan.start != start:
                self._scan = _JsonScan(start)
            end = self._scan.end(text[:limit])
            if end is None:
                # Open, but its first key or its name may already show it is no call (`_no_call`): shown as it is written, the
                # scan going on to its end, after which a call may still come. A JSON answer (a fenced one too) had
                # arrived as one chunk at its end: 443 characters after 10 s on this CPU.
                return limit if self._no_call(text, start, limit) else hold
            try:
                parsed = _decoder.raw_decode(text[:end], start)[0]
            except (ValueError, RecursionError):  # not JSON: the one-shot parse looks again one character on
                pos, self._scan = start + 1, None
                continue
            if any(name in self.names and _arguments_json(args) is not None for name, args in _calls_in_json(parsed)):
                self.held_from = hold
                return hold
            pos, self._scan = end, None
            self.settled = pos

    def _no_call(self, text: str, start: int, limit: int) -> bool:
        """Whether the JSON value at `start` has shown that it is no call to an offered tool: by its first key, or by
        its call's name (SmolLM2 answers a JSON request with tools offered in a call's shape, `{"type": "function",
        "function": {"name": "fruit_1", ...`, held until it closed)."""
        try:
            key = _FIRST_KEY.match(text, start, limit)
            if key is not None and json.loads(key.group(1)) not in _CALL_KEYS:
                return True
            name = _FIRST_NAME.match(text, start, limit)
            return name is not None and json.loads(name.group(1)) not in self.names
        except ValueError:
            return True  # not a JSON string: the value cannot parse

    def finish(self, text: str, shown: int) -> tuple[str, list[dict[str, Any]]]:
        """(content still to show, tool calls) once generation is over."""
        if not self.active:
            return text[shown:], []
        # Calls are looked for only in what was held back; the content around them is cut as the
        # one-shot parse of the whole text cuts it, so the stream plus this equals that content.
        floor, spans, calls = _find_calls(text[shown:], self.tools, self.model_format)
        if not calls:
            return text[shown:], []
        return _content(text, shown + floor, [(s + shown, e + shown) for s, e in spans])[shown:], calls
