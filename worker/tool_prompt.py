"""Tools into the prompt: through the chat template when it knows tools, else a documented fallback.

Fallback format (Hermes style), used when the template ignores `tools` (the built-in SmolLM2's
does, silently): the tool schemas go into the system prompt inside <tools></tools>, the model
answers with <tool_call>{"name": ..., "arguments": {...}}</tool_call>, earlier assistant tool calls
are rendered back in that same form, and tool results come back as
<tool_response>...</tool_response> in a user turn. The parser reads it back (tool_parse).
"""

from __future__ import annotations

import json
from typing import Any

from mlxq.grammar import forced_prefill, tool_choice_of

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": '
    "<args-json-object>}}\n</tool_call>"
)
DEFAULT_SYSTEM = "You are a helpful assistant."


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template and "tools" in chat_template)


def _arguments_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _text_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": _arguments_obj(c["function"].get("arguments"))}
                )
                + "\n</tool_call>"
                for c in m.pop("tool_calls")
            )
            m["content"] = ((m.get("content") or "") + "\n" + calls).strip()
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        m["content"] = m.get("content") or ""
        out.append(m)
    return out


def _native_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            # HF templates serialize arguments themselves and expect an object, not OpenAI's string.
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments_obj(c["function"].get("arguments"))}}
                for c in m["tool_calls"]
            ]
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def prepare_chat(
    request: dict[str, Any], native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str, list[dict[str, Any]]]:
    """(messages, tools for the template, text to prefill the answer with, tools to parse for)."""
    tools, forced, mode = tool_choice_of(request)
    messages = [dict(m) for m in request["messages"]]
    if native:
        messages = _native_history(messages)
        if mode == "required":
            must = f"You must call the function `{forced}`." if forced else "You must call at least one function."
            messages = _with_system(messages, must)
        return messages, tools or None, "", tools

    messages = _text_history(messages)
    prefill = ""
    if tools:
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        messages = _with_system(messages, FALLBACK_INSTRUCTIONS.format(tools=schemas))
        if mode == "required":  # the rest of the call is decoded under mlxq.grammar's call grammar
            prefill = forced_prefill(forced)
    return messages, None, prefill, tools


def _with_system(messages: list[dict[str, Any]], extra: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{extra}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": f"{DEFAULT_SYSTEM}\n\n{extra}"}, *messages]
