"""Trace analysis: what a workload gains, or would gain, from each cache (scripts/analyze_traces.py)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlxq.keys import canonical_chat, request_key, tool_names
from mlxq.states import CacheOutcome

CHARS_PER_TOKEN = 4


def from_request_log(db_url: str) -> dict[str, Any]:
    from mlxq.db import make_engine, make_sessionmaker
    from mlxq.repos import request_log

    with make_sessionmaker(make_engine(db_url))() as session:
        rows = request_log.request_log(session=session)
    seen: set[str] = set()
    repeats = 0
    tools: Counter[str] = Counter()
    for row in rows:
        repeats += row.key in seen
        seen.add(row.key)
        tools.update(row.tools or [])
    outcomes = Counter(row.cache for row in rows)
    looked_up = outcomes[CacheOutcome.HIT] + outcomes[CacheOutcome.MISS]
    prompt = sum(row.prompt_tokens or 0 for row in rows if row.cache != CacheOutcome.HIT)
    saved = sum(row.cached_tokens or 0 for row in rows if row.cache != CacheOutcome.HIT)
    return {
        "source": "request_log",
        "total_requests": len(rows),
        "unique_requests": len(seen),
        "cache_outcomes": dict(outcomes),
        "hit_rate": round(outcomes[CacheOutcome.HIT] / looked_up, 4) if looked_up else 0.0,
        "potential_hit_rate": round(repeats / len(rows), 4) if rows else 0.0,
        "prefix_tokens_saved": saved,
        "prefix_saved_fraction": round(saved / prompt, 4) if prompt else 0.0,
        "streamed": sum(1 for row in rows if row.stream),
        "top_tools": tools.most_common(10),
    }


def _openai_body(body: dict[str, Any]) -> dict[str, Any]:
    """Anthropic messages bodies become OpenAI-shaped for the canonical key (system first, text blocks)."""
    if "system" not in body and not any(
        isinstance(m.get("content"), list)
        and any(b.get("type") in ("tool_use", "tool_result") for b in m["content"] if isinstance(b, dict))
        for m in body.get("messages", [])
    ):
        return body
    messages = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else "".join(b.get("text", "") for b in system)
        messages.append({"role": "system", "content": text})
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(
                b.get("text", "") if b.get("type") == "text" else json.dumps(b, sort_keys=True)
                for b in content
                if isinstance(b, dict)
            )
        messages.append({"role": m.get("role"), "content": content})
    tools = [
        {"type": "function", "function": {"name": t.get("name"), "parameters": t.get("input_schema", {})}}
        for t in body.get("tools") or []
    ]
    return {**body, "messages": messages, "tools": tools or None, "system": None}


def _called_tools(messages: list[dict[str, Any]]) -> Iterable[str | None]:
    for m in messages:
        for call in m.get("tool_calls") or []:
            yield (call.get("function") or {}).get("name")
        if isinstance(m.get("content"), list):
            for block in m["content"]:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    yield block.get("name")


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def from_jsonl(paths: list[Path]) -> dict[str, Any]:
    keys: Counter[str] = Counter()
    offered: Counter[str] = Counter()
    called: Counter[str] = Counter()
    total = repeats = bad = 0
    prompt_chars = shared_chars = 0
    previous: list[str] = []
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                raw = record.get("request") or record.get("body") or record
                body = _openai_body(raw)
                canonical = canonical_chat(body, default_temperature=1.0, default_max_tokens=512)
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
                continue
            total += 1
            key = request_key("chat", canonical, weights="")  # one model: only repeats matter here
            repeats += keys[key] > 0
            keys[key] += 1
            offered.update(tool_names(canonical.get("tools")))
            called.update(n for n in _called_tools(raw.get("messages", [])) if n)
            text = json.dumps([canonical.get("tools"), canonical["messages"]], sort_keys=True)
            prompt_chars += len(text)
            # The longest prefix shared with any earlier request: what a prefix cache could reuse.
            shared_chars += max((_common_prefix(text, p) for p in previous[-64:]), default=0)
            previous.append(text)
    return {
        "source": "jsonl",
        "total_requests": total,
        "unique_requests": len(keys),
        "unparsed_lines": bad,
        "potential_hit_rate": round(repeats / total, 4) if total else 0.0,
        "prefix_tokens_saved_estimate": shared_chars // CHARS_PER_TOKEN,
        "prefix_saved_fraction": round(shared_chars / prompt_chars, 4) if prompt_chars else 0.0,
        "top_tools_offered": offered.most_common(10),
        "top_tools_called": called.most_common(10),
    }
